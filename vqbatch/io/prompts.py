"""Prompt input: find the Parquet files, check them before any model loads, expand rows into image rows.

Job-level problems (no files, a file that is not Parquet, a missing or mistyped column, no rows at all) raise a
`ValueError` that says what to fix. Row-level problems (a null id, a null or blank prompt, a seed out of range)
become image rows with `status="error"` and a message, and the job goes on.
"""

from __future__ import annotations

import fnmatch
import glob as globbing
import posixpath
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from vqbatch.config import InputConfig, S3Config, SamplingConfig
from vqbatch.io.filesystems import is_s3, list_files, resolve, to_uri
from vqbatch.seeds import SEED_LIMIT, image_seed

GLOB_CHARACTERS = "*?["

# The image rows the sampler receives: one per (input row, image index).
IMAGE_ROW_SCHEMA = pa.schema([
    ("id", pa.string()),
    ("prompt", pa.string()),
    ("image_index", pa.int32()),
    ("seed", pa.int64()),
    ("status", pa.string()),  # "ok" or "error"
    ("error", pa.string()),  # null when ok
])


@dataclass(frozen=True)
class InputFiles:
    """The validated input: concrete file paths (inside `filesystem`), their row count, and whether seeds are given."""

    filesystem: pafs.FileSystem
    paths: tuple[str, ...]
    num_rows: int
    has_seed_column: bool

    @property
    def uris(self) -> list[str]:
        return [to_uri(self.filesystem, path) for path in self.paths]

    def columns(self, config: InputConfig) -> list[str]:
        return [config.id_column, config.prompt_column] + ([config.seed_column] if self.has_seed_column else [])


def open_input(config: InputConfig, s3: S3Config) -> InputFiles:
    """Find every input file and check that each one can be read and has the columns the job needs."""
    filesystem, paths = find_parquet_files(config.paths, s3)
    schemas, num_rows = {}, 0
    for path in paths:
        schemas[path], rows = read_footer(filesystem, path)
        num_rows += rows
    for path, schema in schemas.items():
        check_columns(schema, config, to_uri(filesystem, path))
    check_id_kinds_agree(schemas, config, filesystem)
    if num_rows == 0:
        raise ValueError(f"the input has no rows: {len(paths)} file(s) ({', '.join(map(str, config.paths))}) "
                         "are all empty; give files with at least one prompt")
    return InputFiles(filesystem, tuple(paths), num_rows, seed_column_present(schemas, config, filesystem))


def find_parquet_files(patterns: tuple[str, ...], s3: S3Config) -> tuple[pafs.FileSystem, list[str]]:
    """Expand files, folders (every .parquet file inside, recursively) and globs; all local or all on S3."""
    if len({is_s3(pattern) for pattern in patterns}) > 1:
        raise ValueError(f"input paths mix s3:// and local paths ({', '.join(patterns)}); give one kind")
    found: list[str] = []
    filesystem = None
    for pattern in patterns:
        filesystem, path = resolve(pattern, s3)
        matches = expand_pattern(filesystem, path)
        if not matches:
            raise FileNotFoundError(f"input {pattern!r} matches no Parquet file; give a file, a folder holding "
                                    ".parquet files, or a glob such as 'prompts/*.parquet'")
        found.extend(match for match in matches if match not in found)
    return filesystem, found


def expand_pattern(filesystem: pafs.FileSystem, path: str) -> list[str]:
    if any(character in path for character in GLOB_CHARACTERS):
        return expand_glob(filesystem, path)
    info = filesystem.get_file_info(path)
    if info.type == pafs.FileType.File:
        return [path]
    if info.type == pafs.FileType.Directory:
        return [found for found in list_files(filesystem, path) if found.endswith(".parquet")]
    return []


def expand_glob(filesystem: pafs.FileSystem, pattern: str) -> list[str]:
    if isinstance(filesystem, pafs.LocalFileSystem):
        return sorted(path for path in globbing.glob(pattern, recursive=True) if posixpath.isfile(path))
    root = pattern[:min(pattern.index(c) for c in GLOB_CHARACTERS if c in pattern)].rsplit("/", 1)[0]
    return [path for path in list_files(filesystem, root) if fnmatch.fnmatchcase(path, pattern)]


def read_footer(filesystem: pafs.FileSystem, path: str) -> tuple[pa.Schema, int]:
    """Schema and row count from the Parquet footer, or a ValueError naming the unreadable file."""
    try:
        with filesystem.open_input_file(path) as stream:
            metadata = pq.ParquetFile(stream).metadata
            return metadata.schema.to_arrow_schema(), metadata.num_rows
    except (pa.ArrowInvalid, OSError) as error:
        raise ValueError(f"cannot read input file {to_uri(filesystem, path)} as Parquet ({error}); "
                         "replace or remove it") from None


def check_columns(schema: pa.Schema, config: InputConfig, uri: str) -> None:
    expectations = [("prompt_column", "a string", is_text),
                    ("id_column", "a string or an integer", lambda t: is_text(t) or pa.types.is_integer(t))]
    for setting, wanted, accepts in expectations:
        column = getattr(config, setting)
        if column not in schema.names:
            raise ValueError(f"input file {uri} has no column {column!r} (columns: {', '.join(schema.names)}); "
                             f"add it or set input.{setting} to the column that holds it")
        if not accepts(schema.field(column).type):
            raise ValueError(f"input file {uri}: column {column!r} has type {schema.field(column).type}; "
                             f"it must be {wanted}")
    if config.seed_column in schema.names and not pa.types.is_integer(schema.field(config.seed_column).type):
        raise ValueError(f"input file {uri}: seed column {config.seed_column!r} has type "
                         f"{schema.field(config.seed_column).type}; it must be an integer in [0, 2**63)")


def check_id_kinds_agree(schemas: dict[str, pa.Schema], config: InputConfig, filesystem: pafs.FileSystem) -> None:
    """Ray reads all files as one dataset, so the id column must be text in every file or integer in every file."""
    integer_ids = {path: pa.types.is_integer(schema.field(config.id_column).type) for path, schema in schemas.items()}
    if len(set(integer_ids.values())) > 1:
        example = {is_integer: to_uri(filesystem, path) for path, is_integer in integer_ids.items()}
        raise ValueError(f"id column {config.id_column!r} holds integers in {example[True]} but strings in "
                         f"{example[False]}; give it the same type in every input file")


def is_text(data_type: pa.DataType) -> bool:
    return pa.types.is_string(data_type) or pa.types.is_large_string(data_type) or pa.types.is_null(data_type)


def seed_column_present(schemas: dict[str, pa.Schema], config: InputConfig, filesystem: pafs.FileSystem) -> bool:
    holders = [path for path, schema in schemas.items() if config.seed_column in schema.names]
    if holders and len(holders) != len(schemas):
        missing = sorted(set(schemas) - set(holders))
        raise ValueError(f"seed column {config.seed_column!r} is in some input files but not in "
                         f"{', '.join(to_uri(filesystem, path) for path in missing[:5])}; give it in all files or none")
    return bool(holders)


def expand_rows(table: pa.Table, config: InputConfig, sampling: SamplingConfig) -> pa.Table:
    """One image row per (input row, image index), with its seed and its status; see `vqbatch.seeds`."""
    ids = table.column(config.id_column).to_pylist()
    prompts = table.column(config.prompt_column).to_pylist()
    seeds = table.column(config.seed_column).to_pylist() if config.seed_column in table.column_names else None
    rows = [image_row(row_id, prompt, index, seeds[position] if seeds else None, sampling.base_seed)
            for position, (row_id, prompt) in enumerate(zip(ids, prompts))
            for index in range(sampling.images_per_prompt)]
    return pa.Table.from_pylist(rows, schema=IMAGE_ROW_SCHEMA)


def image_row(row_id, prompt, image_index: int, row_seed: int | None, base_seed: int) -> dict:
    text_id = "" if row_id is None else str(row_id)
    problem = row_problem(row_id, prompt, row_seed)
    seed = None if problem else image_seed(text_id, image_index, base_seed, row_seed)
    return dict(id=text_id, prompt=prompt, image_index=image_index, seed=seed,
                status="error" if problem else "ok", error=problem)


def row_problem(row_id, prompt, row_seed: int | None) -> str | None:
    """Why this input row cannot be sampled, or None."""
    if row_id is None:
        return "id is null"
    if prompt is None:
        return "prompt is null"
    if not prompt.strip():
        return "prompt is empty"
    if row_seed is not None and not 0 <= row_seed < SEED_LIMIT:
        return f"seed {row_seed} is out of range; allowed: integers in [0, 2**63)"
    return None
