"""How a shard of sampled rows is stored: one writer and reader per `output.format` (`vqbatch.choices.OutputFormat`).

Every format writes, per shard of up to `rows_per_file` rows, one metadata Parquet file `part-<keys digest>.parquet`
in its version's folder: one row per image row (`metadata_table`), written last, so a shard exists once its metadata
file does. Publishing, deduplication, refresh and resume work on these files whatever the format; a format adds
where the image bytes live:

    files        images/<xx>/<sample key>.<ext> beside the metadata files; the metadata's `image` is the file's path
                 under the output root, `file_name` its path under the metadata file's own folder (what HF
                 `datasets`' imagefolder resolves)
    webdataset   part-<digest>.tar beside its metadata file, written first: per ok row `<key>.<png|jpg|webp>`,
                 `<key>.json` (the row's metadata) and `<key>.tokens.npy` (int32 tokens), the WebDataset naming
                 that `webdataset.WebDataset(urls)` reads; `image` is `<tar path>/<member>`. Error rows are only in
                 the metadata file (as img2dataset does): a training loop sees whole samples.
    parquet      the metadata file is the data: `image` is a struct {bytes, path} that HF `datasets` reads as an
                 `Image` feature (the schema carries the feature), null on error rows

Each file is written whole under a temporary name (`write_bytes_atomically`), at a name that depends only on its
rows' keys, so a retried writer overwrites instead of duplicating. `<key>` is `vqbatch.keys.sample_key`: the digest
of the id and the image index, free of dots, as WebDataset needs.
"""

from __future__ import annotations

import io
import json
import posixpath
import tarfile
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from vqbatch.io.filesystems import read_bytes, write_bytes_atomically, write_files_atomically
from vqbatch.io.images import encode_image
from vqbatch.keys import image_name, sample_key

IMAGE_STRUCT = pa.struct([("bytes", pa.binary()), ("path", pa.string())])  # HF datasets' `Image` storage
HF_FEATURES = {b"huggingface": json.dumps({"info": {"features": {"image": {"_type": "Image"}}}}).encode()}
FILE_NAME = "file_name"  # HF datasets' imagefolder column: an image path under the metadata file's folder
TAR_MEMBER_MODE = 0o444
TOKENS_DTYPE = np.int32


SHARD_PREFIX = "part-"


def metadata_name(digest: str) -> str:
    return f"{SHARD_PREFIX}{digest}.parquet"


def is_metadata_name(name: str) -> bool:
    return name.startswith(SHARD_PREFIX) and name.endswith(".parquet")


def is_shard_name(name: str) -> bool:
    """A shard's metadata file or data file (a webdataset tar)."""
    return is_metadata_name(name) or (name.startswith(SHARD_PREFIX) and name.endswith(".tar"))


@dataclass(frozen=True)
class ShardRows:
    """What a format writes: the sampled rows, their encoded images (None on error rows) and where the shard goes."""

    sampled: pa.Table  # SAMPLED_SCHEMA (+ kept input columns)
    images: Callable[[int], bytes | None]  # row position -> encoded image, computed when written
    extension: str  # png, jpg or webp
    folder: str  # the version folder, relative to the output root
    digest: str  # names the shard by its rows' keys

    @property
    def metadata_relative(self) -> str:
        return posixpath.join(self.folder, metadata_name(self.digest))

    def keys(self) -> list[str]:
        return [sample_key(row_id, index) for row_id, index in
                zip(self.sampled.column("id").to_pylist(), self.sampled.column("image_index").to_pylist())]

    def ok_positions(self) -> list[int]:
        return [position for position, status in enumerate(self.sampled.column("status").to_pylist())
                if status == "ok"]


# ---------------------------------------------------------------------------------------------------------------
# files: one image file per row
# ---------------------------------------------------------------------------------------------------------------

class FilesFormat:
    name = "files"
    image_type = pa.string()

    def write_images(self, filesystem, root: str, shard: ShardRows) -> dict[str, pa.Array]:
        """Write each ok row's image file; return the `image` and `file_name` columns."""
        keys, ok = shard.keys(), shard.ok_positions()
        names = [None] * shard.sampled.num_rows
        for position in ok:
            names[position] = image_name(keys[position], shard.extension)
        paths = [posixpath.join(root, shard.folder, names[position]) for position in ok]
        write_files_atomically(filesystem, paths, lambda item: shard.images(ok[item]))
        relative = [None if name is None else posixpath.join(shard.folder, name) for name in names]
        return {"image": pa.array(relative, pa.string()), FILE_NAME: pa.array(names, pa.string())}

    def data_files(self, metadata_relative: str) -> list[str]:
        return [metadata_relative]

    def rewrite(self, filesystem, root: str, metadata: pa.Table, old: str, new: str) -> pa.Table:
        return metadata  # image files are named by their key alone: they stay where they are

    def image_bytes(self, filesystem, root: str, rows: pa.Table) -> list[bytes | None]:
        return [None if path is None else read_bytes(filesystem, posixpath.join(root, path))
                for path in rows.column("image").to_pylist()]


# ---------------------------------------------------------------------------------------------------------------
# webdataset: tar shards
# ---------------------------------------------------------------------------------------------------------------

class WebDatasetFormat:
    name = "webdataset"
    image_type = pa.string()

    def write_images(self, filesystem, root: str, shard: ShardRows) -> dict[str, pa.Array]:
        """Write the shard's tar (its metadata file comes after it); return the `image` column."""
        tar_relative = tar_of(shard.metadata_relative)
        keys, names = shard.keys(), [None] * shard.sampled.num_rows
        rows = sample_json_rows(shard.sampled)
        tokens = shard.sampled.column("tokens").to_pylist()
        members = []
        for position in shard.ok_positions():
            names[position] = f"{keys[position]}.{shard.extension}"
            members += [(names[position], shard.images(position)),
                        (f"{keys[position]}.json", json_bytes(rows[position])),
                        (f"{keys[position]}.tokens.npy", npy_bytes(np.asarray(tokens[position], TOKENS_DTYPE)))]
        write_bytes_atomically(filesystem, posixpath.join(root, tar_relative), tar_bytes(members))
        return {"image": pa.array([None if name is None else f"{tar_relative}/{name}" for name in names],
                                  pa.string())}

    def data_files(self, metadata_relative: str) -> list[str]:
        return [tar_of(metadata_relative)]

    def rewrite(self, filesystem, root: str, metadata: pa.Table, old: str, new: str) -> pa.Table:
        """Write the tar of `new` with only the samples `metadata` keeps from the tar of `old`."""
        old_tar, new_tar = tar_of(old), tar_of(new)
        kept = {member_of(path) for path in metadata.column("image").to_pylist() if path is not None}
        kept_keys = {name.split(".", 1)[0] for name in kept}
        members = [(name, data) for name, data in tar_members(read_bytes(filesystem, posixpath.join(root, old_tar)))
                   if name.split(".", 1)[0] in kept_keys]
        write_bytes_atomically(filesystem, posixpath.join(root, new_tar), tar_bytes(members))
        images = [None if path is None else f"{new_tar}/{member_of(path)}"
                  for path in metadata.column("image").to_pylist()]
        return metadata.set_column(metadata.schema.get_field_index("image"), "image", pa.array(images, pa.string()))

    def image_bytes(self, filesystem, root: str, rows: pa.Table) -> list[bytes | None]:
        """Each row's image, read from its tar (each tar read once)."""
        paths = rows.column("image").to_pylist()
        tars = {}
        for tar in sorted({path.rsplit("/", 1)[0] for path in paths if path is not None}):
            tars[tar] = dict(tar_members(read_bytes(filesystem, posixpath.join(root, tar))))
        return [None if path is None else tars[path.rsplit("/", 1)[0]][member_of(path)] for path in paths]


def tar_of(metadata_relative: str) -> str:
    return metadata_relative.removesuffix(".parquet") + ".tar"


def member_of(image: str) -> str:
    return image.rsplit("/", 1)[1]


def sample_json_rows(sampled: pa.Table) -> list[dict]:
    """Each row's metadata for its `<key>.json`: every column but the pixels and the tokens (they have their own
    member)."""
    names = [name for name in sampled.column_names if name not in ("pixels", "tokens")]
    return sampled.select(names).to_pylist()


def json_bytes(row: dict) -> bytes:
    return json.dumps(row, ensure_ascii=False, default=str).encode("utf-8", errors="surrogatepass")


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    """A POSIX tar of `members` in order, with fixed times and owners: the same members give the same bytes."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), TAR_MEMBER_MODE, 0
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def tar_members(data: bytes) -> list[tuple[str, bytes]]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as archive:
        return [(info.name, archive.extractfile(info).read()) for info in archive if info.isfile()]


# ---------------------------------------------------------------------------------------------------------------
# parquet: image bytes inside the metadata file
# ---------------------------------------------------------------------------------------------------------------

class ParquetFormat:
    name = "parquet"
    image_type = IMAGE_STRUCT

    def write_images(self, filesystem, root: str, shard: ShardRows) -> dict[str, pa.Array]:
        """Nothing to write before the metadata file: return the `image` column holding each ok row's bytes."""
        keys, ok = shard.keys(), set(shard.ok_positions())
        images = [{"bytes": shard.images(position), "path": f"{keys[position]}.{shard.extension}"}
                  if position in ok else None for position in range(shard.sampled.num_rows)]
        return {"image": pa.array(images, IMAGE_STRUCT)}

    def data_files(self, metadata_relative: str) -> list[str]:
        return [metadata_relative]

    def rewrite(self, filesystem, root: str, metadata: pa.Table, old: str, new: str) -> pa.Table:
        return metadata  # the images travel inside the metadata

    def image_bytes(self, filesystem, root: str, rows: pa.Table) -> list[bytes | None]:
        return [None if image is None else image["bytes"] for image in rows.column("image").to_pylist()]


FORMATS = {shard_format.name: shard_format for shard_format in (FilesFormat(), WebDatasetFormat(), ParquetFormat())}


def shard_format(name: str) -> FilesFormat | WebDatasetFormat | ParquetFormat:
    return FORMATS[name]


def encoded_images(sampled: pa.Table, pixels: list[np.ndarray | None], image_format: str,
                   quality: int) -> Callable[[int], bytes | None]:
    """Row position -> its image encoded in `image_format` (None on error rows), encoded when asked."""
    def encode(position: int) -> bytes | None:
        image = pixels[position]
        return None if image is None else encode_image(image, image_format, quality)

    return encode


def with_hf_features(table: pa.Table, format_name: str) -> pa.Table:
    """Parquet files of the parquet format say in their schema that `image` is an HF `datasets` Image feature."""
    if format_name != ParquetFormat.name:
        return table
    return table.replace_schema_metadata({**(table.schema.metadata or {}), **HF_FEATURES})
