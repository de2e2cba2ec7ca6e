"""How a shard of sampled rows is stored: one writer and reader per `output.format` (`vqbatch.choices.OutputFormat`).

Every format writes, per shard of up to `rows_per_file` rows, one metadata Parquet file `part-<keys digest>.parquet`
in its version's folder: one row per image row (`metadata_table`), written last, so a shard exists once its metadata
file does. Publishing, deduplication, refresh and resume work on these files whatever the format; a format adds
where the image bytes live:

    files        images/<xx>/<sample key>.<ext> beside the metadata files; the metadata's `image` is the file's path
                 under the output root, `file_name` its path under the metadata file's own folder (what HF
                 `datasets`' imagefolder resolves)
    webdataset   part-<digest>.tar beside its metadata file, written first: per ok row `<key>.<png|jpg|webp>`,
                 `<key>.json` (its metadata row but the tokens) and `<key>.tokens.npy` (int32 tokens), the
                 WebDataset naming that `webdataset.WebDataset(urls)` reads; `image` is `<tar path>/<member>`.
                 Error rows are only in the metadata file (as img2dataset does): a training loop sees whole
                 samples, and the tar of a shard without an ok row, empty, is left out of the manifest's
                 `data_files`.
    parquet      the metadata file is the data: `image` is a struct {bytes, path} that HF `datasets` reads as an
                 `Image` feature (the schema carries the feature), null on error rows

Each file is written whole under a temporary name (`write_bytes_atomically`), at a name that depends only on its
rows' keys, so a retried writer overwrites instead of duplicating. `<key>` is `vqbatch.keys.sample_key`: the digest
of the id and the image index, free of dots, as WebDataset needs.
"""

from __future__ import annotations

import functools
import io
import json
import posixpath
import tarfile
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from vqbatch.config import InputConfig, JobConfig
from vqbatch.io.filesystems import OutputRoot, read_bytes, write_bytes_atomically, write_files_atomically
from vqbatch.io.images import EXTENSIONS, decode_image, encode_image
from vqbatch.io.prompts import IMAGE_ROW_SCHEMA
from vqbatch.keys import image_name, keys_digest, sample_key

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
    constants: dict  # the metadata columns every row of the run shares (`run_constants`)

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
    samples_only = False  # a reader opens the metadata files, error rows included

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

    def row_problems(self, filesystem, root: str, rows: pa.Table, metadata_relative: str,
                     present: Callable[[str], bool], decode: bool) -> list[str | None]:
        """Per row of a shard's metadata: why its image is lost (its file is missing, or with `decode` does not
        decode), or None."""
        problems = []
        for path, ok in zip(rows.column("image").to_pylist(), ok_mask(rows)):
            if not ok:
                problems.append(None)
            elif not present(path):
                problems.append(f"image file {path} is missing")
            else:
                problems.append(decode_problem(lambda: read_bytes(filesystem, posixpath.join(root, path)),
                                               f"image file {path}") if decode else None)
        return problems


# ---------------------------------------------------------------------------------------------------------------
# webdataset: tar shards
# ---------------------------------------------------------------------------------------------------------------

class WebDatasetFormat:
    name = "webdataset"
    image_type = pa.string()
    samples_only = True  # a reader opens the tars, which hold the ok rows only

    def write_images(self, filesystem, root: str, shard: ShardRows) -> dict[str, pa.Array]:
        """Write the shard's tar (its metadata file comes after it); return the `image` column."""
        tar_relative = tar_of(shard.metadata_relative)
        keys, names = shard.keys(), [None] * shard.sampled.num_rows
        rows = sample_json_rows(shard)
        tokens = shard.sampled.column("tokens").to_pylist()
        members = []
        for position in shard.ok_positions():
            names[position] = f"{keys[position]}.{shard.extension}"
            rows[position]["image"] = f"{tar_relative}/{names[position]}"
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
        members = []  # no sample kept: the old tar need not be read (a repair drops the samples of a lost tar)
        if kept_keys:
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

    def row_problems(self, filesystem, root: str, rows: pa.Table, metadata_relative: str,
                     present: Callable[[str], bool], decode: bool) -> list[str | None]:
        """Per row: why its sample is lost (the shard's tar is missing; with `decode`, the tar does not read, or
        the sample's image is not in it or does not decode), or None. Error rows have no sample."""
        tar, ok = tar_of(metadata_relative), ok_mask(rows)
        if not present(tar):
            return [f"shard file {tar} is missing" if is_ok else None for is_ok in ok]
        if not decode:
            return [None] * rows.num_rows
        try:
            members = dict(tar_members(read_bytes(filesystem, posixpath.join(root, tar))))
        except (OSError, tarfile.TarError) as error:
            return [f"shard file {tar} does not read ({error})" if is_ok else None for is_ok in ok]
        return [None if not is_ok else
                f"sample {member_of(path)} is not in {tar}" if member_of(path) not in members else
                decode_problem(lambda: members[member_of(path)], f"sample {member_of(path)} of {tar}")
                for path, is_ok in zip(rows.column("image").to_pylist(), ok)]


def tar_of(metadata_relative: str) -> str:
    return metadata_relative.removesuffix(".parquet") + ".tar"


def member_of(image: str) -> str:
    return image.rsplit("/", 1)[1]


def sample_json_rows(shard: ShardRows) -> list[dict]:
    """Each row's metadata for its `<key>.json`, the columns of its metadata row in their order but the tokens (a
    member of their own): the sampled columns, `image` (set by the writer) and the run's constants, then the kept
    input columns."""
    order = metadata_schema(WebDatasetFormat.name).names
    columns = {name: shard.sampled.column(name).to_pylist() for name in shard.sampled.column_names
               if name not in ("pixels", "tokens")}
    names = [name for name in order if name in columns or name in shard.constants or name == "image"]
    names += [name for name in columns if name not in order]  # the kept input columns
    return [{name: columns[name][position] if name in columns else shard.constants.get(name) for name in names}
            for position in range(shard.sampled.num_rows)]


def json_bytes(row: dict) -> bytes:
    return json.dumps(row, ensure_ascii=False, default=str).encode("utf-8", errors="surrogatepass")


def npy_bytes(array: np.ndarray) -> bytes:
    """`array` as an .npy file in C order: for a C-ordered array, the bytes `np.save` writes."""
    return npy_header(array.shape, array.dtype.str) + array.tobytes()  # tobytes writes C order


@functools.lru_cache(maxsize=16)
def npy_header(shape: tuple[int, ...], dtype: str) -> bytes:
    """The .npy header of a C-ordered array: the same for every row's tokens of a shard, so made once."""
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": dtype, "fortran_order": False, "shape": shape})
    return buffer.getvalue()


def tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    """A POSIX tar of `members` in order, read-only files with fixed times and owners: the same members give the
    same bytes, those tarfile writes."""
    chunks = []
    for name, data in members:
        chunks += [member_header(name, len(data)), data, bytes(-len(data) % tarfile.BLOCKSIZE)]
    archive = b"".join(chunks) + bytes(2 * tarfile.BLOCKSIZE)  # two zero blocks end the archive
    return archive + bytes(-len(archive) % tarfile.RECORDSIZE)


def member_header(name: str, size: int) -> bytes:
    """The header block of a tar member: tarfile's template with the member's name, size and checksum set in place.
    tarfile's `addfile` took 45-75 µs a member, most of a webdataset shard's CPU at three members a row; this takes
    about 6. A name or size a plain ustar header cannot hold takes tarfile's PAX header."""
    encoded = name.encode("utf-8")
    if len(encoded) > USTAR_NAME_BYTES or not encoded.isascii() or size >= USTAR_SIZE_LIMIT:
        return tar_info(name, size).tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
    size_field = b"%011o\0" % size
    checksum = TEMPLATE_CHECKSUM + sum(encoded) + sum(size_field)
    return b"".join((encoded, TEMPLATE_BEFORE_SIZE[len(encoded):], size_field, TEMPLATE_BEFORE_CHECKSUM,
                     b"%06o\0 " % checksum, TEMPLATE_AFTER_CHECKSUM))


def tar_info(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = size, TAR_MEMBER_MODE, 0
    return info


USTAR_NAME_BYTES = 100
USTAR_SIZE_LIMIT = 8 ** 11  # 11 octal digits
# The header of an empty, unnamed member, cut around the three fields a member sets: name (bytes 0-99, NUL padded),
# size (124-135) and checksum (148-155, the sum of the header's bytes with its own field counted as spaces).
MEMBER_HEADER_TEMPLATE = tar_info("", 0).tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape")
TEMPLATE_BEFORE_SIZE = MEMBER_HEADER_TEMPLATE[:124]
TEMPLATE_BEFORE_CHECKSUM = MEMBER_HEADER_TEMPLATE[136:148]
TEMPLATE_AFTER_CHECKSUM = MEMBER_HEADER_TEMPLATE[156:]
TEMPLATE_CHECKSUM = (sum(TEMPLATE_BEFORE_SIZE) + sum(TEMPLATE_BEFORE_CHECKSUM) + 8 * ord(" ")
                     + sum(TEMPLATE_AFTER_CHECKSUM))


def tar_members(data: bytes) -> list[tuple[str, bytes]]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as archive:
        return [(info.name, archive.extractfile(info).read()) for info in archive if info.isfile()]


# ---------------------------------------------------------------------------------------------------------------
# parquet: image bytes inside the metadata file
# ---------------------------------------------------------------------------------------------------------------

class ParquetFormat:
    name = "parquet"
    image_type = IMAGE_STRUCT
    samples_only = False  # a reader opens the metadata files, error rows included

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

    def row_problems(self, filesystem, root: str, rows: pa.Table, metadata_relative: str,
                     present: Callable[[str], bool], decode: bool) -> list[str | None]:
        """Per row: with `decode`, why the image bytes it holds do not decode; or None. (The images are in the
        metadata file: when that reads, they are there.)"""
        if not decode:
            return [None] * rows.num_rows
        return [decode_problem(lambda: image["bytes"], f"the image in {metadata_relative}") if is_ok else None
                for image, is_ok in zip(rows.column("image").to_pylist(), ok_mask(rows))]


def ok_mask(rows: pa.Table) -> list[bool]:
    """Which rows have status ok (and so an image)."""
    return [status == "ok" for status in rows.column("status").to_pylist()]


def decode_problem(data: Callable[[], bytes], what: str) -> str | None:
    """None when the bytes `data` reads decode as an image; else what went wrong with `what`."""
    try:
        decode_image(data())
    except FileNotFoundError:
        return f"{what} is missing"
    except (OSError, ValueError, TypeError) as error:  # PIL's UnidentifiedImageError is an OSError
        return f"{what} does not decode ({type(error).__name__})"
    return None


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


# ---------------------------------------------------------------------------------------------------------------
# Writing a shard: sampled rows -> the format's files, then the metadata file
# ---------------------------------------------------------------------------------------------------------------

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
    ("truncation_rate", pa.float64()), ("truncation_target", pa.string()), ("timestep_spacing", pa.string()),
    ("sampler", pa.string()), ("prior_weight", pa.float64()), ("noise", pa.string()), ("image_format", pa.string()),
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
                      EXTENSIONS[settings.image_format], folder, keys_digest(sampled), run_constants(config))
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


def run_constants(config: JobConfig) -> dict:
    """The metadata columns every row of a run shares: the model and the sampling parameters."""
    return {"model": config.model.uri, "steps": config.sampling.steps,
            "guidance_scale": config.sampling.guidance_scale, "truncation_rate": config.sampling.truncation_rate,
            "truncation_target": config.sampling.truncation_target,
            "timestep_spacing": config.sampling.timestep_spacing, "sampler": config.sampling.sampler,
            "prior_weight": config.sampling.prior_weight, "noise": config.sampling.noise,
            "image_format": config.output.image_format}


def metadata_table(sampled: pa.Table, image_columns: dict[str, pa.Array], config: JobConfig) -> pa.Table:
    """The metadata rows of a shard: its sampled rows less the pixels, the format's `image_columns`, the run's
    constants, and the kept input columns last; in the parquet format the schema marks `image` as an HF Image."""
    constants = run_constants(config)
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
