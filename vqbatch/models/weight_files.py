"""Weight file names and their checks, torch-free (the job's preflight reads them before anything loads).

A component folder holds its weights the way diffusers writes them: one file, or shards listed by an index.

    diffusion_pytorch_model[.<variant>].safetensors                      one file
    diffusion_pytorch_model.safetensors.index[.<variant>].json           {"metadata": {...}, "weight_map": {key: shard}}
    diffusion_pytorch_model[.<variant>]-00001-of-00002.safetensors       the shards it names
    (the same with .bin for torch pickles)

transformers' models (the text encoder) use the stem `model` for safetensors and `pytorch_model` for pickles.
A variant goes before the last extension (diffusers' rule), which puts it after `.index` in an index name.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

WEIGHTS_NAME = "diffusion_pytorch_model"  # diffusers' models
FORMATS = ("safetensors", "bin")
DIFFUSERS_STEMS = dict.fromkeys(FORMATS, WEIGHTS_NAME)  # weight file stem per format, diffusers' models
TRANSFORMERS_STEMS = {"safetensors": "model", "bin": "pytorch_model"}  # and transformers' models
HEADER_LENGTH_BYTES = 8  # a safetensors file starts with its JSON header's length, a little-endian u64
MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit on the header


def with_variant(filename: str, variant: str | None) -> str:
    """`a.b.json` with variant `fp16` -> `a.b.fp16.json`: the variant goes before the last extension."""
    if not variant:
        return filename
    stem, extension = filename.rsplit(".", 1)
    return f"{stem}.{variant}.{extension}"


def single_file_name(weight_format: str, variant: str | None, name: str = WEIGHTS_NAME) -> str:
    return with_variant(f"{name}.{weight_format}", variant)


def index_file_name(weight_format: str, variant: str | None, name: str = WEIGHTS_NAME) -> str:
    return with_variant(f"{name}.{weight_format}.index.json", variant)


def shard_name_pattern(weight_format: str, variant: str | None, name: str = WEIGHTS_NAME) -> str:
    """huggingface_hub's `filename_pattern` for shards: `{suffix}` becomes `-00001-of-00002`."""
    return single_file_name(weight_format, variant, name).replace(f".{weight_format}", f"{{suffix}}.{weight_format}")


def allowed_formats(use_safetensors: bool | None) -> tuple[str, ...]:
    """None: safetensors preferred, pickles accepted; True: safetensors only; False: pickles only."""
    return FORMATS if use_safetensors is None else (("safetensors",) if use_safetensors else ("bin",))


def find_weight_files(folder: Path, variant: str | None = None, use_safetensors: bool | None = None,
                      stems: dict[str, str] = DIFFUSERS_STEMS) -> list[Path]:
    """The weight files of a component folder: its single file, or every shard its index names; `stems` gives the
    file stem of each format."""
    tried = []
    for weight_format in allowed_formats(use_safetensors):
        single = folder / single_file_name(weight_format, variant, stems[weight_format])
        index = folder / index_file_name(weight_format, variant, stems[weight_format])
        if single.is_file():
            return [single]
        if index.is_file():
            return shard_files(index)
        tried += [single.name, index.name]
    raise FileNotFoundError(f"no weights in {folder}: expected one of {', '.join(tried)}")


def shard_files(index: Path) -> list[Path]:
    """The shard files an index names, each once, in order; every one must exist next to the index."""
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise ValueError(f"{index} is not a weights index: it needs a 'weight_map' of tensor name -> shard file "
                         f"({type(error).__name__}: {error})") from None
    names = list(dict.fromkeys(weight_map.values()))
    missing = [name for name in names if not (index.parent / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{index} names shard files that are missing: {', '.join(missing)}")
    return [index.parent / name for name in names]


def check_safetensors_complete(path: Path) -> None:
    """A ValueError when the file is shorter than its header says: a truncated download or copy."""
    size = path.stat().st_size
    with path.open("rb") as file:
        prefix = file.read(HEADER_LENGTH_BYTES)
        if len(prefix) < HEADER_LENGTH_BYTES:
            raise ValueError(f"weight file {path} is truncated: {size} bytes, not even a safetensors header")
        (header_length,) = struct.unpack("<Q", prefix)
        if header_length > min(MAX_HEADER_BYTES, size - HEADER_LENGTH_BYTES):
            raise ValueError(f"weight file {path} is truncated or not safetensors: its header claims "
                             f"{header_length} bytes, the file has {size}")
        try:
            header = json.loads(file.read(header_length))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"weight file {path} has an unreadable safetensors header ({error})") from None
    data_length = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"), default=0)
    expected = HEADER_LENGTH_BYTES + header_length + data_length
    if size < expected:
        raise ValueError(f"weight file {path} is truncated: its header describes {expected} bytes, the file has "
                         f"{size}; download or copy it again")
