"""The published view of a dataset: exactly its current rows, one per (id, image_index) key, for every format.

`manifest.json` (written last, atomically) is the one place that says which files are current: `data_files` are
the files a reader of the dataset's format opens (metadata Parquet for `files` and `parquet`, tars for `webdataset`),
the files of every version generated under the current fingerprint. Older versions stay on disk for their history,
so globbing `versions/*/` would count a key once per fingerprint it was generated under; readers go through the
manifest instead (`read_dataset`, or the recipes in the README, which read `data_files`).
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from vqbatch.config import S3Config
from vqbatch.io.dataset import read_manifest, read_metadata
from vqbatch.io.filesystems import OutputRoot, resolve
from vqbatch.io.formats import IMAGE_STRUCT, shard_format
from vqbatch.keys import key_column


def read_dataset(uri: str, s3: S3Config | None = None, images: bool = False) -> pa.Table:
    """Every current row of the dataset at `uri` (a folder or s3:// prefix), one per key, as one Arrow table.

    Columns: the metadata of its format (`vqbatch.io.formats.METADATA_SCHEMA`, kept input columns last). With
    `images=True`, `image` is a struct {bytes, path} in every format (HF `datasets`' Image storage), its bytes read
    from the image files or tars; error rows have none.
    """
    location = OutputRoot(*resolve(uri, s3 or S3Config()))
    manifest = read_manifest(location)
    rows = latest_per_key(read_metadata(location))
    if not images:
        return rows
    return with_image_bytes(location, rows, manifest["output"].get("format", "files"))


def latest_per_key(rows: pa.Table) -> pa.Table:
    """Each key's last row (files are read oldest version first); publishing already keeps each key once."""
    keys = key_column(rows)
    if len(pc.unique(keys)) == rows.num_rows:
        return rows
    positions = pa.table({"key": keys, "position": pa.array(range(rows.num_rows), pa.int64())})
    last = positions.group_by("key", use_threads=False).aggregate([("position", "max")]).column("position_max")
    return rows.take(last.take(pc.sort_indices(last)))  # the last rows, in file order


def with_image_bytes(location: OutputRoot, rows: pa.Table, output_format: str) -> pa.Table:
    """`rows` with `image` as a struct {bytes, path}; the parquet format stores it so already."""
    if rows.schema.field("image").type == IMAGE_STRUCT:
        return rows
    data = shard_format(output_format).image_bytes(location.filesystem, location.root, rows)
    images = [None if path is None else {"bytes": image, "path": path}
              for path, image in zip(rows.column("image").to_pylist(), data)]
    return rows.set_column(rows.schema.get_field_index("image"), "image", pa.array(images, IMAGE_STRUCT))
