"""The output dataset: images, metadata Parquet files and the manifest that publishes them.

Layout under the output root (a local folder or an s3:// prefix), per version of the dataset:

    versions/v0001/part-<rows digest>.parquet     a shard's metadata file, one row per image row (`metadata_schema`)
    versions/v0001/...                            the shard's images in the output's format (`vqbatch.io.formats`)
    manifest.json                                 the published files (`data_files`, `metadata_files`), counts,
                                                  input files, settings and the history of versions
    _SUCCESS                                      empty; written last

Every file is written whole (`write_bytes_atomically`) at a name that depends only on its content's rows, so a
rerun writes the same names. Only the files listed in `manifest.json` are published; `_SUCCESS` says the manifest
is complete.
"""

from __future__ import annotations

import io
import json
import posixpath
from dataclasses import dataclass
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from vqbatch.config import InputConfig, JobConfig, OutputConfig, S3Config
from vqbatch.io.card import CARD_NAME, write_dataset_card
from vqbatch.io.filesystems import exists, list_files, read_bytes, resolve, write_bytes_atomically
from vqbatch.io.formats import (FILE_NAME, FilesFormat, ShardRows, encoded_images, is_shard_name, shard_format,
                               with_hf_features)
from vqbatch.io.images import EXTENSIONS
from vqbatch.io.prompts import IMAGE_ROW_SCHEMA
from vqbatch.keys import keys_digest

MANIFEST_NAME = "manifest.json"
SUCCESS_NAME = "_SUCCESS"
METADATA_DIR = "metadata"
IMAGES_DIR = "images"
VERSIONS_DIR = "versions"
TOKENS_TYPE = pa.list_(pa.int32())  # latent pixel classes in the transformer's (row-major) pixel order

# What the sampler hands to the writer: the image rows (and kept input columns, after these) plus tokens and raw
# (H, W, C) pixels (null on error rows).
SAMPLED_FIELDS = [pa.field("tokens", TOKENS_TYPE), pa.field("pixels", pa.binary()), pa.field("height", pa.int32()),
                  pa.field("width", pa.int32()), pa.field("prompt_truncated", pa.bool_())]
SAMPLED_SCHEMA = pa.schema([*IMAGE_ROW_SCHEMA, *SAMPLED_FIELDS])

# The metadata of every format; `image` is a string here (files, webdataset) or `formats.IMAGE_STRUCT` (parquet), the
# files format adds `file_name` after it, and kept input columns (`input.keep_columns`) follow the last field.
METADATA_SCHEMA = pa.schema([
    ("id", pa.string()), ("prompt", pa.string()), ("image_index", pa.int32()), ("seed", pa.int64()),
    ("tokens", TOKENS_TYPE),
    ("image", pa.string()),  # where the image is, under the output root (see vqbatch.io.formats); null on error rows
    ("status", pa.string()), ("error", pa.string()),
    ("prompt_truncated", pa.bool_()),  # the tokenizer cut the prompt at its length limit; null when not sampled
    ("height", pa.int32()), ("width", pa.int32()),
    ("model", pa.string()), ("steps", pa.int32()), ("guidance_scale", pa.float64()),
    ("truncation_rate", pa.float64()), ("timestep_spacing", pa.string()), ("sampler", pa.string()),
    ("prior_weight", pa.float64()), ("noise", pa.string()), ("image_format", pa.string()),
])
FILE_NAME_FIELD = pa.field(FILE_NAME, pa.string())  # files format: the image's path under the metadata file's folder


def metadata_schema(output_format: str, kept: list[pa.Field] = ()) -> pa.Schema:
    """The metadata schema of a format, with the kept input columns `kept` at the end."""
    fields = list(METADATA_SCHEMA)
    position = METADATA_SCHEMA.get_field_index("image")
    fields[position] = pa.field("image", shard_format(output_format).image_type)
    if output_format == FilesFormat.name:
        fields.insert(position + 1, FILE_NAME_FIELD)
    return pa.schema([*fields, *kept])


@dataclass(frozen=True)
class OutputRoot:
    filesystem: pafs.FileSystem
    root: str

    @classmethod
    def of(cls, output: OutputConfig, s3: S3Config) -> "OutputRoot":
        return cls(*resolve(output.uri, s3))

    def path(self, relative: str) -> str:
        return posixpath.join(self.root, relative)


def sampled_table(rows: pa.Table, tokens: list, pixels: list, prompt_truncated: list | None = None) -> pa.Table:
    """`rows` (IMAGE_ROW_SCHEMA, then any kept input columns) with per-row tokens (list of ints or None) and pixels
    ((H, W, 3) uint8 or None).

    `prompt_truncated`: per row, whether the tokenizer cut its prompt (None: not known)."""
    sizes = [(None, None) if image is None else image.shape[:2] for image in pixels]
    sampled = {"tokens": pa.array(tokens, TOKENS_TYPE),
               "pixels": pa.array([None if image is None else image.tobytes() for image in pixels], pa.binary()),
               "height": pa.array([size[0] for size in sizes], pa.int32()),
               "width": pa.array([size[1] for size in sizes], pa.int32()),
               "prompt_truncated": pa.array(prompt_truncated or [None] * rows.num_rows, pa.bool_())}
    kept = [field for field in rows.schema if field.name not in IMAGE_ROW_SCHEMA.names]
    columns = {**{name: rows.column(name) for name in IMAGE_ROW_SCHEMA.names}, **sampled,
               **{field.name: rows.column(field.name) for field in kept}}
    return pa.table(columns, schema=pa.schema([*SAMPLED_SCHEMA, *kept]))


def write_shard(sampled: pa.Table, config: JobConfig, folder: str = "") -> dict:
    """Encode and write the images of `sampled` in the output's format, then its metadata file last, into `folder`
    (a version's folder) of the output root; return the shard's summary."""
    output = OutputRoot.of(config.output, config.s3)
    settings = config.output
    shard = ShardRows(sampled, encoded_images(sampled, pixel_views(sampled), settings.image_format,
                                              settings.image_quality),
                      EXTENSIONS[settings.image_format], folder, keys_digest(sampled))
    image_columns = shard_format(settings.format).write_images(output.filesystem, output.root, shard)
    metadata = metadata_table(sampled, image_columns, config)
    write_bytes_atomically(output.filesystem, output.path(shard.metadata_relative), parquet_bytes(metadata))
    return shard_summary(shard.metadata_relative, metadata)


def shard_summary(relative: str, metadata: pa.Table) -> dict:
    ok = metadata.column("status").to_pylist().count("ok")
    return {"file": relative, "rows": metadata.num_rows, "ok": ok, "errors": metadata.num_rows - ok}


def pixel_views(sampled: pa.Table) -> list[np.ndarray | None]:
    """Each row's pixels (H, W, C) uint8, viewed in place in the table's buffers (no copy); None where null."""
    heights, widths = sampled.column("height").to_pylist(), sampled.column("width").to_pylist()
    flat = []
    for chunk in sampled.column("pixels").chunks:  # a binary array: int32 offsets into one data buffer
        _, offsets, data = chunk.buffers()
        ends = np.frombuffer(offsets, np.int32)[chunk.offset:chunk.offset + len(chunk) + 1].tolist()
        data = np.frombuffer(data, np.uint8) if data is not None else np.empty(0, np.uint8)
        flat += [data[start:end] for start, end in zip(ends[:-1], ends[1:])]
    return [None if height is None else view.reshape(height, width, -1)
            for view, height, width in zip(flat, heights, widths)]


def metadata_table(sampled: pa.Table, image_columns: dict[str, pa.Array], config: JobConfig) -> pa.Table:
    """The metadata rows of a shard: its sampled rows less the pixels, the format's `image_columns`, the sampling
    parameters, and the kept input columns last; in the parquet format the schema marks `image` as an HF Image."""
    constants = {"model": config.model.uri, "steps": config.sampling.steps,
                 "guidance_scale": config.sampling.guidance_scale, "truncation_rate": config.sampling.truncation_rate,
                 "timestep_spacing": config.sampling.timestep_spacing, "sampler": config.sampling.sampler,
                 "prior_weight": config.sampling.prior_weight, "noise": config.sampling.noise,
                 "image_format": config.output.image_format}
    kept = [field for field in sampled.schema if field.name not in SAMPLED_SCHEMA.names]
    schema = metadata_schema(config.output.format, kept)
    columns = {name: sampled.column(name) for name in sampled.column_names if name in schema.names}
    columns.update(image_columns)
    for name, value in constants.items():
        columns[name] = pa.array([value] * sampled.num_rows, METADATA_SCHEMA.field(name).type)
    return with_hf_features(pa.table({name: columns[name] for name in schema.names}, schema=schema),
                            config.output.format)


def parquet_bytes(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue()


def check_kept_columns(config: InputConfig) -> None:
    """Kept input columns go into every output row beside the metadata's own columns: their names must differ."""
    taken = {*METADATA_SCHEMA.names, FILE_NAME, *SAMPLED_SCHEMA.names}
    clashing = [name for name in config.keep_columns if name in taken]
    if clashing:
        raise ValueError(f"input.keep_columns: {', '.join(map(repr, clashing))} would overwrite the output's own "
                         f"column(s); allowed: input columns named other than {', '.join(sorted(taken))} (rename "
                         "them in the input)")


def check_output(output: OutputConfig, s3: S3Config) -> OutputRoot:
    """Refuse an output that already holds (part of) a dataset, unless mode is overwrite."""
    location = OutputRoot.of(output, s3)
    existing = dataset_parts(location)
    if existing and output.mode == "error":
        raise ValueError(f"output {output.uri} already holds a dataset ({', '.join(existing)}); choose an empty "
                         "output, set output.mode=overwrite (--overwrite) to replace it, or output.mode=refresh "
                         "(`vqbatch refresh`, `generate --resume`) to add the rows it lacks and finish a killed run")
    return location


def prepare_output(output: OutputConfig, s3: S3Config) -> OutputRoot:
    """`check_output`, then clear the output for overwrite: only what this layout writes is deleted."""
    location = check_output(output, s3)
    for name in dataset_parts(location) if output.mode == "overwrite" else ():
        remove(location.filesystem, location.path(name))
    return location


def dataset_parts(location: OutputRoot) -> list[str]:
    """What this layout writes at the root: markers, folders, and the shards of a dataset written without versions."""
    shards = [posixpath.basename(path) for path in list_files(location.filesystem, location.root, recursive=False)
              if is_shard_name(posixpath.basename(path))]
    return [name for name in (SUCCESS_NAME, MANIFEST_NAME, CARD_NAME, METADATA_DIR, IMAGES_DIR, VERSIONS_DIR)
            if exists(location.filesystem, location.path(name))] + shards


def remove(filesystem: pafs.FileSystem, path: str) -> None:
    if filesystem.get_file_info(path).type == pafs.FileType.Directory:
        filesystem.delete_dir(path)
    else:
        filesystem.delete_file(path)


def publish(location: OutputRoot, shards: list[dict], input_uris: list[str], config: JobConfig,
            versions: list[dict] | None = None) -> dict:
    """Write the manifest and the dataset card (`vqbatch.io.card`), then the `_SUCCESS` marker: the dataset is
    visible to readers from here on.

    `shards` are the files readers see; `versions` is the history of versions (see `vqbatch.io.versions`).
    """
    manifest = {
        "format": "vqbatch-dataset/1",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "rows": sum(shard["rows"] for shard in shards),
        "ok": sum(shard["ok"] for shard in shards),
        "errors": sum(shard["errors"] for shard in shards),
        "metadata_files": sorted(shards, key=lambda shard: shard["file"]),
        "data_files": data_files(shards, config.output.format),
        "input_files": input_uris,
        "model": config.model.model_dump(mode="json"),
        "sampling": config.sampling.model_dump(mode="json"),
        "output": config.output.model_dump(mode="json"),
        "versions": versions or [],
    }
    write_bytes_atomically(location.filesystem, location.path(MANIFEST_NAME),
                           json.dumps(manifest, indent=2, ensure_ascii=False).encode("utf-8"))
    write_dataset_card(location, manifest, published_schema(location, shards, config.output.format))
    write_bytes_atomically(location.filesystem, location.path(SUCCESS_NAME), b"")
    return manifest


def published_schema(location: OutputRoot, shards: list[dict], output_format: str) -> pa.Schema:
    """The metadata files' schema (kept input columns included): read from the first published file's footer."""
    if not shards:
        return metadata_schema(output_format)
    return pq.read_schema(location.path(shards[0]["file"]), filesystem=location.filesystem).remove_metadata()


def data_files(shards: list[dict], output_format: str) -> list[str]:
    """The files a reader of `output_format` opens, under the output root: the published view, oldest first."""
    return [path for shard in sorted(shards, key=lambda shard: shard["file"])
            for path in shard_format(output_format).data_files(shard["file"])]


def read_manifest(location: OutputRoot) -> dict:
    if not exists(location.filesystem, location.path(SUCCESS_NAME)):
        raise FileNotFoundError(f"no published dataset at {location.root}: {SUCCESS_NAME} is missing")
    return json.loads(read_bytes(location.filesystem, location.path(MANIFEST_NAME)))


def read_metadata(location: OutputRoot) -> pa.Table:
    """Every published metadata row (the files the manifest lists), as one table."""
    files = [location.path(shard["file"]) for shard in read_manifest(location)["metadata_files"]]
    tables = [pq.read_table(path, filesystem=location.filesystem) for path in files]
    return pa.concat_tables(tables, promote_options="default") if tables else METADATA_SCHEMA.empty_table()

