"""`vqbatch inspect` and `vqbatch decode`: a published dataset summarised in the terminal, one row in full, and
images re-rendered from stored tokens.

    inspect   versions (time, fingerprint, parameters), rows, errors by kind, size on disk, formats; then one row
              in full with the command that reruns it
    decode    the stored tokens of chosen ids -> the dataset's model's VQ decoder -> image files (nothing sampled
              again); for png the files hold the stored images' pixels exactly
"""

from __future__ import annotations

import posixpath
import re
import shlex
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
from PIL import Image

from vqbatch.choices import IMAGE_FORMATS, check_choice
from vqbatch.config import NOOP_MODEL, ModelConfig, S3Config
from vqbatch.io.formats import is_metadata_name, is_shard_name
from vqbatch.io.images import EXTENSIONS, encode_image
from vqbatch.keys import readable_stem
from vqbatch.lineage import recorded_batch_shape
from vqbatch.proof import StoredDataset, rows_with_ids
from vqbatch.report import model_text, settings_text

ERROR_KINDS_SHOWN = 10
TOKENS_SHOWN = 16  # first tokens printed of a row's token list


# ---------------------------------------------------------------------------------------------------------------
# inspect
# ---------------------------------------------------------------------------------------------------------------

def inspect_dataset(output_uri: str, row_id: str | None = None, s3: S3Config | None = None) -> str:
    """The terminal summary of the dataset at `output_uri`, then row `row_id` (default: the first row) in full."""
    dataset = StoredDataset.open(output_uri, s3 or S3Config())
    metadata, manifest = dataset.metadata, dataset.manifest
    statuses = Counter(metadata.column("status").to_pylist())
    lines = [f"dataset   {output_uri} ({manifest.get('format')}, published {manifest['created']})",
             f"formats   {formats_text(metadata, dataset.output_format)}",
             f"rows      {metadata.num_rows} ({statuses.get('ok', 0)} ok, {statuses.get('error', 0)} errors) in "
             f"{len(manifest['metadata_files'])} metadata files",
             f"on disk   {size_text(dataset)}", "versions"]
    for entry in manifest["versions"]:
        parts = entry["fingerprint_parts"]
        lines += [f"  v{entry['version']}  {entry['created']}  fingerprint {entry['fingerprint']}  "
                  f"{entry['rows_added']} rows added ({entry['rows_ok']} ok, {entry['rows_failed']} failed)",
                  f"      model     {model_text(parts['model'])}",
                  f"      sampling  {settings_text(parts['sampling'])}",
                  f"      encoding  {settings_text(parts['encoding'])}"]
    kinds = error_kinds(metadata)
    lines.append("errors by kind" + ("" if kinds else ": none"))
    lines += [f"  {count:>6}  {kind}" for kind, count in kinds.most_common(ERROR_KINDS_SHOWN)]
    return "\n".join(lines + row_lines(output_uri, chosen_row(metadata, row_id))) + "\n"


STORAGE = {"files": "image files ({}) with Parquet metadata",
           "webdataset": "webdataset tar shards ({}) with Parquet metadata",
           "parquet": "Parquet shards holding the images ({})"}  # by `output.format`


def formats_text(metadata: pa.Table, output_format: str) -> str:
    images = sorted(set(metadata.column("image_format").to_pylist()))
    return STORAGE[output_format].format(", ".join(images))


def size_text(dataset: StoredDataset) -> str:
    """Bytes under the output root, split into images (image files, tars), metadata files and everything else; the
    parquet format's metadata files hold its images."""
    location = dataset.location
    sizes: Counter = Counter()
    for info in location.filesystem.get_file_info(pafs.FileSelector(location.root, recursive=True)):
        if info.type == pafs.FileType.File:
            sizes[file_kind(posixpath.relpath(info.path, location.root))] += info.size
    metadata = "metadata with the images" if dataset.output_format == "parquet" else "metadata"
    return f"{readable(sum(sizes.values()))} (images {readable(sizes['images'])}, {metadata} " \
           f"{readable(sizes['metadata'])}, other {readable(sizes['other'])})"


def file_kind(relative: str) -> str:
    """images (an image file or a webdataset tar), metadata (a shard's metadata file) or other."""
    name = posixpath.basename(relative)
    if "/images/" in f"/{relative}" or (is_shard_name(name) and not is_metadata_name(name)):
        return "images"
    return "metadata" if is_metadata_name(name) else "other"


def readable(size: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def error_kinds(metadata: pa.Table) -> Counter:
    """Error rows counted by kind: the message before its first detail (parenthesis, colon or semicolon), with
    numbers as N, so 'seed 7 is out of range' and 'seed 9 is out of range' are one kind."""
    errors = metadata.filter(pc.field("status") == "error").column("error").to_pylist()
    return Counter(re.sub(r"\d+", "N", re.split(r" \(|: |;", error or "no message")[0]) for error in errors)


def chosen_row(metadata: pa.Table, row_id: str | None) -> dict:
    if metadata.num_rows == 0:
        raise ValueError("the dataset has no rows")
    if row_id is None:
        return metadata.slice(0, 1).to_pylist()[0]
    return rows_with_ids(metadata, [row_id]).slice(0, 1).to_pylist()[0]


def row_lines(output_uri: str, row: dict) -> list[str]:
    lines = [f"row {row['id']!r}, image {row['image_index']}"]
    for name, value in row.items():
        if name == "tokens" and value is not None:
            value = f"{len(value)} tokens: {value[:TOKENS_SHOWN]}{' ...' if len(value) > TOKENS_SHOWN else ''}"
        if name == "image" and isinstance(value, dict):  # the parquet format's image bytes
            value = f"{value['path']} ({len(value['bytes'])} bytes in the metadata file)"
        lines.append(f"  {name:<17} {value}")
    lines.append(f"rerun it: vqbatch rerun --output {shlex.quote(output_uri)} --ids {shlex.quote(row['id'])}")
    return lines


# ---------------------------------------------------------------------------------------------------------------
# decode
# ---------------------------------------------------------------------------------------------------------------

def decode_rows(output_uri: str, ids: list[str], to: str | Path, image_format: str | None = None,
                size: int | None = None, s3: S3Config | None = None, device: str = "auto") -> list[Path]:
    """Write the images of every ok row of `ids` into `to`, decoded from their stored tokens by the dataset's model;
    `image_format` (default: each row's) and `size` (pixels per side; default: the model's) choose the files.
    Error rows have no tokens and are skipped. Returns the files written."""
    if image_format is not None:
        check_choice("--image-format", image_format, IMAGE_FORMATS)
    if size is not None and size < 1:
        raise ValueError(f"--size must be a positive number of pixels, got {size}")
    import torch
    s3 = s3 or S3Config()
    dataset = StoredDataset.open(output_uri, s3)
    rows = rows_with_ids(dataset.metadata, ids).filter(pc.field("status") == "ok")
    if NOOP_MODEL in rows.column("model").to_pylist():
        raise ValueError(f"{output_uri} was made with the no-op model {NOOP_MODEL!r} (a data-plane run): its "
                         "tokens are zeros and it has no decoder; decode rows of a dataset made with a checkpoint")
    folder = Path(to)
    folder.mkdir(parents=True, exist_ok=True)
    quality = dataset.manifest["output"]["image_quality"]
    written = []
    for model_uri in sorted(set(rows.column("model").to_pylist())):
        same_model = rows.filter(pc.field("model") == model_uri).to_pylist()
        tokens = torch.as_tensor(np.array([row["tokens"] for row in same_model], np.int64))  # (N, P)
        pixels = load_decoder(model_uri, dataset.manifest, s3, device).decode(tokens)
        for row, image in zip(same_model, pixels):
            chosen = image_format or row["image_format"]
            path = folder / f"{readable_stem(row['id'])}_{row['image_index']}.{EXTENSIONS[chosen]}"
            path.write_bytes(encode_image(resized(image, size), chosen, quality))
            written.append(path)
    return written


def load_decoder(model_uri: str, manifest: dict, s3: S3Config, device: str):
    """The engine's own model class at the dataset's batch shape: its `decode` is the code that made the stored
    images (datasets that recorded no shape decoded each image alone)."""
    from vqbatch.sampler import PipelineModel

    model = ModelConfig(uri=model_uri, dtype=manifest["model"]["dtype"], device=device)
    return PipelineModel.load(model, sampling=None, batch_shape=recorded_batch_shape(manifest) or 1, s3=s3)


def resized(pixels: np.ndarray, size: int | None) -> np.ndarray:  # (H, W, 3) uint8
    if size is None or size == pixels.shape[0] == pixels.shape[1]:
        return pixels
    image = Image.fromarray(pixels)
    resample = Image.NEAREST if size >= max(image.size) else Image.LANCZOS  # enlarged pixels stay sharp squares
    return np.asarray(image.resize((size, size), resample))

