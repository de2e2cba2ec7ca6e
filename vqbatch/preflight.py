"""The job's preflight: can this checkpoint run these sampling settings, and can this output be written? Answered
before Ray starts and before any model loads, from the checkpoint's small files alone.

Read: `model_index.json`, `scheduler/scheduler_config.json`, each model's `config.json` and the tokenizer's file
names; for a local folder also the header of every safetensors weight file (a file shorter than its header says is
a truncated copy). An s3:// checkpoint is read in place and a hub id fetches only its JSON and text files, so no
weights move.

The output (`check_output_location`) must not be an existing file, a local folder must be writable by this process,
and it must not lie inside an input folder (folders are read recursively, so a later run would read the dataset's
own Parquet files as prompts). Torch-free and Ray-free.
"""

from __future__ import annotations

import json
import os
import posixpath
import tempfile
from pathlib import Path
from typing import NamedTuple

import pyarrow.fs as pafs

from vqbatch.config import NOOP_MODEL, JobConfig, ModelConfig, S3Config, SamplingConfig
from vqbatch.hub import download_hub_snapshot, looks_like_hub_id
from vqbatch.io.filesystems import S3_SCHEME, exists, is_s3, list_files, read_bytes, resolve
from vqbatch.io.prompts import GLOB_CHARACTERS, glob_root
from vqbatch.models.weight_files import (DIFFUSERS_STEMS, TRANSFORMERS_STEMS, check_safetensors_complete,
                                         find_weight_files)

MODEL_INDEX = "model_index.json"
SCHEDULER_CONFIG = "scheduler/scheduler_config.json"
COMPONENT_CONFIG = "config.json"  # of each model component (diffusers' and transformers' name)
DEFAULT_NUM_TRAIN_TIMESTEPS = 100  # VQDiffusionScheduler's default, for a scheduler config without the key
# component folder -> the stems of its weight files (diffusers' models, then transformers' text encoder)
WEIGHTED_COMPONENTS = {"vqvae": DIFFUSERS_STEMS, "transformer": DIFFUSERS_STEMS,
                       "learned_classifier_free_sampling_embeddings": DIFFUSERS_STEMS,
                       "text_encoder": TRANSFORMERS_STEMS}
COMPONENTS = (*WEIGHTED_COMPONENTS, "tokenizer", "scheduler")
# a CLIP tokenizer loads from its fast-tokenizer file, or from its vocabulary and merges
TOKENIZER_FILE_SETS = (("tokenizer.json",), ("vocab.json", "merges.txt"))
HUB_CONFIG_PATTERNS = ["*.json", "*.txt"]  # every config, index and tokenizer file of a hub checkpoint; no weights


class Checkpoint(NamedTuple):
    filesystem: pafs.FileSystem
    root: str  # the checkpoint folder inside `filesystem`
    local_folder: Path | None  # set for a local folder, whose weight files are checked too


def check_checkpoint(model: ModelConfig, sampling: SamplingConfig, s3: S3Config) -> None:
    """A ValueError (or FileNotFoundError) naming the setting, its value and what is allowed when the checkpoint at
    `model.uri` cannot run `sampling`, or misses files it needs."""
    if model.uri == NOOP_MODEL:
        return
    checkpoint = open_checkpoint(model.uri, s3)
    index = read_config(checkpoint, MODEL_INDEX, model.uri)
    missing = [name for name in COMPONENTS if name not in index]
    if missing:
        raise ValueError(f"model.uri: {model.uri!r} is not a VQ-Diffusion checkpoint: its {MODEL_INDEX} lacks "
                         f"{', '.join(missing)}; a VQ-Diffusion checkpoint has {', '.join(COMPONENTS)}")
    check_steps(sampling.steps, read_config(checkpoint, SCHEDULER_CONFIG, model.uri), model.uri)
    for component in WEIGHTED_COMPONENTS:  # each model is built from its config before its weights are read
        read_config(checkpoint, f"{component}/{COMPONENT_CONFIG}", model.uri)
    check_tokenizer(checkpoint, model.uri)
    if checkpoint.local_folder is not None:
        check_weight_files(checkpoint.local_folder)


def open_checkpoint(uri: str, s3: S3Config) -> Checkpoint:
    """A local folder, an s3:// prefix read in place, or the config files of a hub snapshot."""
    if is_s3(uri):
        return Checkpoint(*resolve(uri, s3), local_folder=None)
    path = Path(uri).expanduser()
    if not path.exists() and looks_like_hub_id(uri):
        snapshot = download_hub_snapshot(uri, allow_patterns=HUB_CONFIG_PATTERNS)
        return Checkpoint(pafs.LocalFileSystem(), str(snapshot), local_folder=None)
    if not path.is_dir():
        raise FileNotFoundError(f"model.uri: {uri!r} is not a checkpoint folder, an s3:// URI, a hub id (owner/name) "
                                f"or {NOOP_MODEL!r}")
    return Checkpoint(pafs.LocalFileSystem(), str(path.resolve()), local_folder=path)


def read_config(checkpoint: Checkpoint, relative: str, uri: str) -> dict:
    path = f"{checkpoint.root.rstrip('/')}/{relative}"
    if not exists(checkpoint.filesystem, path):
        raise FileNotFoundError(f"model.uri: checkpoint {uri!r} has no {relative}")
    try:
        data = json.loads(read_bytes(checkpoint.filesystem, path))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"model.uri: {relative} of checkpoint {uri!r} is not valid JSON ({error})") from None
    if not isinstance(data, dict):
        raise ValueError(f"model.uri: {relative} of checkpoint {uri!r} must hold a JSON object, got {data!r:.80}")
    return data


def check_steps(steps: int, scheduler_config: dict, uri: str) -> None:
    """The reverse chain has num_train_timesteps steps; a run can take at most that many."""
    num_train_timesteps = scheduler_config.get("num_train_timesteps", DEFAULT_NUM_TRAIN_TIMESTEPS)
    if steps > num_train_timesteps:
        raise ValueError(f"sampling.steps: value {steps} is not allowed: the checkpoint {uri!r} was trained with "
                         f"num_train_timesteps={num_train_timesteps}, so steps must lie in [1, {num_train_timesteps}]")


def check_tokenizer(checkpoint: Checkpoint, uri: str) -> None:
    """Without its files a CLIP tokenizer still loads, with a two-token vocabulary, and every prompt reads as empty."""
    folder = f"{checkpoint.root.rstrip('/')}/tokenizer"
    present = {name.rsplit("/", 1)[-1] for name in list_files(checkpoint.filesystem, folder)}
    if not any(present.issuperset(files) for files in TOKENIZER_FILE_SETS):
        need = " or ".join(" + ".join(files) for files in TOKENIZER_FILE_SETS)
        raise FileNotFoundError(f"model.uri: checkpoint {uri!r} has no tokenizer files in tokenizer/ (found: "
                                f"{', '.join(sorted(present)) or 'nothing'}); a CLIP tokenizer needs {need}")


def check_weight_files(root: Path) -> None:
    """Every weight file the pipeline will read exists (shards included) and no safetensors file is truncated."""
    for component, stems in WEIGHTED_COMPONENTS.items():
        for path in find_weight_files(root / component, stems=stems):
            if path.suffix == ".safetensors":
                check_safetensors_complete(path)


# ---------------------------------------------------------------------------------------------------------------
# The output
# ---------------------------------------------------------------------------------------------------------------

def check_output_location(config: JobConfig) -> None:
    """A ValueError saying what to fix when `output.uri` is an existing file, a local folder this process cannot
    write, or a folder inside one of the input folders."""
    uri = config.output.uri
    for pattern in config.input.paths:
        folder = input_folder(pattern, config.s3)
        if folder is not None and is_within(normalised(uri), folder):
            raise ValueError(f"output.uri: {uri!r} lies inside the input folder {pattern!r}, which is read with "
                             "every Parquet file below it: a later run would read the dataset's own metadata as "
                             "prompts; choose an output outside the input folders")
    filesystem, root = resolve(uri, config.s3)
    if filesystem.get_file_info(root).type == pafs.FileType.File:
        raise ValueError(f"output.uri: {uri!r} is an existing file; give a folder (created when missing) or an "
                         "s3:// prefix")
    if not is_s3(uri):
        check_writable(Path(root), uri)


def check_writable(folder: Path, uri: str) -> None:
    """The output folder, or the nearest folder above it that exists, takes a new file."""
    existing = next(path for path in (folder, *folder.parents) if path.exists())
    if not existing.is_dir():
        raise ValueError(f"output.uri: {uri!r} cannot be created: {existing} is a file; give a folder path")
    try:
        with tempfile.TemporaryFile(dir=existing):  # unnamed where the OS allows it; deleted on close
            pass
    except OSError as error:
        raise ValueError(f"output.uri: {uri!r} is not writable ({existing}: {error.strerror}); choose a folder this "
                         "user can write, or give it write permission") from None


def input_folder(pattern: str, s3: S3Config) -> str | None:
    """The folder an input path reads below (`normalised`): a folder itself, or a glob's fixed leading folders;
    None for a single file."""
    if any(character in pattern for character in GLOB_CHARACTERS):
        return normalised(glob_root(pattern) or ".")
    filesystem, path = resolve(pattern, s3)
    return normalised(pattern) if filesystem.get_file_info(path).type == pafs.FileType.Directory else None


def normalised(uri: str) -> str:
    """One spelling per location: `s3://bucket/a/b` without `//`, `.` or a trailing `/`; a local path absolute,
    with `~`, `..` and symbolic links resolved."""
    if is_s3(uri):
        return S3_SCHEME + posixpath.normpath(uri[len(S3_SCHEME):]).strip("/")
    return os.path.realpath(os.path.expanduser(uri))


def is_within(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip("/") + "/")
