"""Prompt input: find the Parquet files, check them before any model loads, expand rows into image rows.

A dictionary-encoded column (how pandas stores a categorical) is read as its values, so its type is its values'.

Job-level problems raise a `ValueError` that says what to fix, before any model loads: no files, a file that is not
Parquet or has a corrupt page (every file's job columns are read once, whole), a missing or mistyped column (a
Parquet column has one type, so a non-string prompt is a whole-column problem), no rows at all, ids that are null,
empty, whitespace-only or not valid UTF-8 (an undecodable id shown with escaped bytes could equal another row's id),
and duplicate ids. An id is a row's key: it names its images and seeds, and the dataset holds each (id, image index)
once. So duplicates are rejected rather than renamed (a renamed duplicate would get seeds and file names that
depend on which file was read first), and null ids rather than given a stand-in (one made from the file and row
number would change when the input is moved, renamed or reordered, and a refresh would then add the row again).

Row-level problems become image rows with `status="error"` and a message, and the job goes on: a null,
empty or invisible prompt (only whitespace, control and format characters), a seed out of range, and text that is
not valid UTF-8 (other writers can put any bytes in a Parquet string column, lone UTF-16 surrogates among them;
such values are kept with their bad bytes escaped as `\\xNN`). Emoji, right-to-left text and control characters
inside a visible prompt are sampled as given. Prompts longer than the tokenizer's limit are cut by the sampler,
which marks the row (`prompt_truncated`).
"""

from __future__ import annotations

import fnmatch
import glob as globbing
import posixpath
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from vqbatch.config import InputConfig, S3Config, SamplingConfig
from vqbatch.io.filesystems import is_s3, list_files, resolve, to_uri
from vqbatch.io.repeats import RepeatedHashes
from vqbatch.keys import finalized
from vqbatch.seeds import SEED_LIMIT, image_seed

GLOB_CHARACTERS = "*?["
BATCH_ROWS = 10_000  # input rows read at a time: a huge input file is never in memory whole
DUPLICATES_SHOWN = 5  # duplicate ids named in the job error
UNUSABLE_SHOWN = 5  # row numbers per file named in the unusable-id job error
INVISIBLE_CATEGORIES = ("Cc", "Cf")  # Unicode control and format characters (NUL, BEL, zero-width space, RTL mark)

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
    file_rows: tuple[int, ...]  # rows read from each file: all of them, or fewer in the file `input.limit` ends in

    @property
    def uris(self) -> list[str]:
        return [to_uri(self.filesystem, path) for path in self.paths]

    def columns(self, config: InputConfig) -> list[str]:
        job = [config.id_column, config.prompt_column] + ([config.seed_column] if self.has_seed_column else [])
        return job + [name for name in config.keep_columns if name not in job]

    def batches(self, path: str, columns: list[str], batch_rows: int = BATCH_ROWS) -> Iterator[pa.RecordBatch]:
        """The rows the job reads from the file at `path` (its first `file_rows`), `batch_rows` at a time."""
        left = self.file_rows[self.paths.index(path)]
        with self.filesystem.open_input_file(path) as stream:
            for batch in pq.ParquetFile(stream).iter_batches(batch_rows, columns=columns):
                if left <= 0:
                    return
                yield plain_values(batch.slice(0, left))
                left -= batch.num_rows


def plain_values(batch: pa.RecordBatch) -> pa.RecordBatch:
    """`batch` with each dictionary-encoded column (how pandas stores a categorical) as its plain values."""
    if not any(pa.types.is_dictionary(field.type) for field in batch.schema):
        return batch
    return pa.RecordBatch.from_arrays([column.dictionary_decode() if pa.types.is_dictionary(column.type) else column
                                       for column in batch.columns], names=batch.schema.names)


def plain_type(data_type: pa.DataType) -> pa.DataType:
    """The type a column is read as (`plain_values`): a dictionary-encoded one's value type."""
    return data_type.value_type if pa.types.is_dictionary(data_type) else data_type


def open_input(config: InputConfig, s3: S3Config) -> InputFiles:
    """Find every input file and check that each one can be read and has the columns the job needs."""
    filesystem, paths = find_parquet_files(config.paths, s3)
    schemas, file_rows = {}, []
    for path in paths:
        schemas[path], rows = read_footer(filesystem, path)
        file_rows.append(rows)
    paths, file_rows = first_rows(paths, file_rows, config.limit)
    num_rows = sum(file_rows)
    for path, schema in schemas.items():
        check_columns(schema, config, to_uri(filesystem, path))
    check_id_kinds_agree(schemas, config, filesystem)
    check_kept_columns_agree(schemas, config, filesystem)
    if num_rows == 0:
        raise ValueError(f"the input has no rows: {len(paths)} file(s) ({', '.join(map(str, config.paths))}) "
                         "are all empty; give files with at least one prompt")
    inputs = InputFiles(filesystem, tuple(paths), num_rows, seed_column_present(schemas, config, filesystem),
                        tuple(file_rows))
    with RepeatedHashes(num_rows) as repeats:  # the ids' hashes, spilled to local disk (`vqbatch.io.repeats`)
        unusable = read_ids(inputs, config, repeats.add)
        check_ids_usable(unusable, config, filesystem)
        check_ids_unique(repeats.repeated(), inputs, config)
    return inputs


def first_rows(paths: list[str], file_rows: list[int], limit: int | None) -> tuple[list[str], list[int]]:
    """The files and row counts that hold the first `limit` rows (all with no limit; empty files kept)."""
    if limit is None:
        return paths, file_rows
    kept_paths, kept_rows, left = [], [], limit
    for path, rows in zip(paths, file_rows):
        if left == 0:
            break
        kept_paths.append(path)
        kept_rows.append(min(rows, left))
        left -= kept_rows[-1]
    return kept_paths, kept_rows


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
    return [path for path in list_files(filesystem, glob_root(pattern)) if fnmatch.fnmatchcase(path, pattern)]


def glob_root(pattern: str) -> str:
    """The folders of a glob before its first wildcard: everything it matches lies below them."""
    return pattern[:min(pattern.index(c) for c in GLOB_CHARACTERS if c in pattern)].rsplit("/", 1)[0]


def read_footer(filesystem: pafs.FileSystem, path: str) -> tuple[pa.Schema, int]:
    """Schema and row count from the Parquet footer, or a ValueError naming the unreadable file."""
    try:
        with filesystem.open_input_file(path) as stream:
            metadata = pq.ParquetFile(stream).metadata
            return metadata.schema.to_arrow_schema(), metadata.num_rows
    except (pa.ArrowInvalid, OSError) as error:
        raise ValueError(f"cannot read input file {to_uri(filesystem, path)} as Parquet ({error}); "
                         "replace or remove it") from None


def read_ids(inputs: InputFiles, config: InputConfig,
             spill: Callable[[np.ndarray], None]) -> dict[str, dict[str, list[int]]]:
    """Hand `spill` the hashes of every batch's ids (`id_hashes`), and return per problem (`id_problem`) and file the
    row numbers (from 0) of the ids that cannot be keys; reading every job column whole finds corrupt pages before
    models load."""
    unusable: dict[str, dict[str, list[int]]] = {}
    for path in inputs.paths:
        start = 0
        for batch in job_column_batches(inputs, config, path):
            keys = id_keys(batch.column(config.id_column))
            spill(id_hashes([key for key in keys if key is not None]))
            for row, key in enumerate(keys):
                problem = id_problem(key)
                if problem:
                    unusable.setdefault(problem, {}).setdefault(path, []).append(start + row)
            start += batch.num_rows
    return unusable


def id_hashes(keys: list) -> np.ndarray:  # (N,) uint64
    """Python's hash of each id (`id_keys`), mixed (`finalized`) so that its top bits pick a spill file evenly even
    for small integer ids, which hash to themselves; equal ids, equal hashes (in this process)."""
    return finalized(np.fromiter((hash(key) for key in keys), np.int64, len(keys)).view(np.uint64))


def id_problem(key) -> str | None:
    """Why an id (`id_keys`: an int, raw bytes or None) cannot be a row's key, or None."""
    if key is None:
        return "null"
    if isinstance(key, bytes):
        try:
            text = key.decode("utf-8")
        except UnicodeDecodeError:
            return "not valid UTF-8"
        if not text.strip():
            return "empty or whitespace-only"
    return None


def job_column_batches(inputs: InputFiles, config: InputConfig, path: str) -> Iterator[pa.RecordBatch]:
    """The job's columns of one input file, batch by batch, or a ValueError naming the file it cannot read."""
    try:
        yield from inputs.batches(path, inputs.columns(config))
    except (pa.ArrowException, OSError) as error:
        raise ValueError(f"cannot read input file {to_uri(inputs.filesystem, path)} as Parquet ({error}); "
                         "replace or remove it") from None


def id_keys(column: pa.Array) -> list:
    """Integer ids as ints, text ids as their raw bytes (so that text which is not valid UTF-8 still compares)."""
    return column.cast(raw_bytes_type(column.type)).to_pylist() if is_text(column.type) else column.to_pylist()


def check_ids_usable(unusable: dict[str, dict[str, list[int]]], config: InputConfig,
                     filesystem: pafs.FileSystem) -> None:
    """Every id is a key: not null, not empty or whitespace-only, valid UTF-8; one line per problem found."""
    lines = []
    for problem, rows_by_file in unusable.items():
        shown = "; ".join(f"{to_uri(filesystem, path)} ({len(rows)} row(s): {shortened(rows)})"
                          for path, rows in rows_by_file.items())
        lines.append(f"id column {config.id_column!r} is {problem} in {sum(map(len, rows_by_file.values()))} row(s) "
                     f"of {len(rows_by_file)} input file(s), rows counted from 0: {shown}")
    if lines:
        raise ValueError("; ".join(lines) + "; ids name each row's images and seeds, so give every row an id "
                         "or remove those rows (an id is an integer or non-blank UTF-8 text)")


def shortened(rows: list[int]) -> str:
    return ", ".join(map(str, rows[:UNUSABLE_SHOWN])) + (", ..." if len(rows) > UNUSABLE_SHOWN else "")


def check_ids_unique(repeated: np.ndarray, inputs: InputFiles, config: InputConfig) -> None:
    """Ids compare by hash first (`repeated`: the `id_hashes` seen more than once); only the ids behind those (a
    duplicate, or a rare collision) are read again and compared exactly."""
    if not repeated.size:
        return
    counts: Counter = Counter()
    for path in inputs.paths:
        for batch in job_column_batches(inputs, config, path):
            keys = id_keys(batch.column(config.id_column))
            counts.update(keys[row] for row in np.flatnonzero(np.isin(id_hashes(keys), repeated)))
    duplicates = [(key, count) for key, count in counts.items() if count > 1]
    if duplicates:
        shown = ", ".join(f"{shown_text(key)!r} ({count} rows)" for key, count in duplicates[:DUPLICATES_SHOWN])
        raise ValueError(f"id column {config.id_column!r} has {len(duplicates)} duplicate id(s), e.g. {shown}; "
                         "ids name each row's images and seeds, so they must be unique across all input files")


def check_columns(schema: pa.Schema, config: InputConfig, uri: str) -> None:
    expectations = [("prompt_column", "a string", is_text),
                    ("id_column", "a string or an integer", lambda t: is_text(t) or pa.types.is_integer(t))]
    for setting, wanted, accepts in expectations:
        column = getattr(config, setting)
        if column not in schema.names:
            raise ValueError(f"input file {uri} has no column {column!r} (columns: {', '.join(schema.names)}); "
                             f"add it or set input.{setting} to the column that holds it")
        if not accepts(plain_type(schema.field(column).type)):
            raise ValueError(f"input file {uri}: column {column!r} has type {schema.field(column).type}; "
                             f"it must be {wanted}")
    seed_type = plain_type(schema.field(config.seed_column).type) if config.seed_column in schema.names else None
    if seed_type is not None and not pa.types.is_integer(seed_type):
        raise ValueError(f"input file {uri}: seed column {config.seed_column!r} has type "
                         f"{schema.field(config.seed_column).type}; it must be an integer in [0, 2**63)")


def check_id_kinds_agree(schemas: dict[str, pa.Schema], config: InputConfig, filesystem: pafs.FileSystem) -> None:
    """Ray reads all files as one dataset, so the id column must be text in every file or integer in every file."""
    integer_ids = {path: pa.types.is_integer(plain_type(schema.field(config.id_column).type))
                   for path, schema in schemas.items()}
    if len(set(integer_ids.values())) > 1:
        example = {is_integer: to_uri(filesystem, path) for path, is_integer in integer_ids.items()}
        raise ValueError(f"id column {config.id_column!r} holds integers in {example[True]} but strings in "
                         f"{example[False]}; give it the same type in every input file")


def check_kept_columns_agree(schemas: dict[str, pa.Schema], config: InputConfig, filesystem: pafs.FileSystem) -> None:
    """Each kept column is in every file, with one type: the output's rows all carry it."""
    for name in config.keep_columns:
        types = {}
        for path, schema in schemas.items():
            if name not in schema.names:
                raise ValueError(f"input.keep_columns: input file {to_uri(filesystem, path)} has no column {name!r} "
                                 f"(columns: {', '.join(schema.names)}); keep only columns every input file has")
            types.setdefault(str(plain_type(schema.field(name).type)), to_uri(filesystem, path))
        if len(types) > 1:
            shown = "; ".join(f"{kind} in {uri}" for kind, uri in types.items())
            raise ValueError(f"input.keep_columns: column {name!r} has different types across input files ({shown}); "
                             "give it one type in every file")


def is_text(data_type: pa.DataType) -> bool:
    return pa.types.is_string(data_type) or pa.types.is_large_string(data_type) or pa.types.is_null(data_type)


def raw_bytes_type(text_type: pa.DataType) -> pa.DataType:
    """The binary type a text column casts to without checking its UTF-8."""
    return pa.large_binary() if pa.types.is_large_string(text_type) else pa.binary()


def shown_text(value) -> str:
    """Text for messages and output columns: bytes decoded as UTF-8, any bad byte escaped as \\xNN."""
    return value.decode("utf-8", errors="backslashreplace") if isinstance(value, bytes) else str(value)


def decoded_column(column: pa.ChunkedArray, name: str) -> tuple[list, list[str | None]]:
    """A column's Python values, and per value why it is not valid UTF-8 (None if it is, or is not text).

    pyarrow raises on the first bad value when it converts a whole string column, so text is decoded value by
    value from its raw bytes; a bad value is kept with its bad bytes escaped (`shown_text`).
    """
    if not is_text(column.type) or pa.types.is_null(column.type):
        return column.to_pylist(), [None] * len(column)
    values, problems = [], []
    for raw in column.cast(raw_bytes_type(column.type)).to_pylist():
        try:
            values.append(None if raw is None else raw.decode("utf-8"))
            problems.append(None)
        except UnicodeDecodeError as error:
            values.append(shown_text(raw))
            problems.append(f"{name} is not valid UTF-8 ({error.reason} at byte {error.start}: "
                            f"{raw[error.start:error.end]!r}); stored with its bad bytes escaped")
    return values, problems


def seed_column_present(schemas: dict[str, pa.Schema], config: InputConfig, filesystem: pafs.FileSystem) -> bool:
    holders = [path for path, schema in schemas.items() if config.seed_column in schema.names]
    if holders and len(holders) != len(schemas):
        missing = sorted(set(schemas) - set(holders))
        raise ValueError(f"seed column {config.seed_column!r} is in some input files but not in "
                         f"{', '.join(to_uri(filesystem, path) for path in missing[:5])}; give it in all files or none")
    return bool(holders)


def image_keys(table: pa.Table, config: InputConfig, sampling: SamplingConfig) -> pa.Table:
    """The (id, image_index) key of each image row `expand_rows` makes of `table`, in the same order, without its
    per-row work: what a run checks against the keys it skips before it expands a row."""
    ids = table.column(config.id_column).cast(pa.string())  # integers as their decimal text, as `image_row` writes
    positions, indices = image_positions(table.num_rows, sampling.images_per_prompt)
    return pa.table({"id": ids.take(pa.array(positions)), "image_index": pa.array(indices, pa.int32())})


def image_positions(rows: int, images_per_prompt: int,
                    selected: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:  # (M,), (M,)
    """The input row and image index of each image row: all `rows * images_per_prompt` of them, row by row, or
    those at `selected` (positions in that order)."""
    flat = np.arange(rows * images_per_prompt) if selected is None else selected
    return np.divmod(flat, images_per_prompt)


def expand_rows(table: pa.Table, config: InputConfig, sampling: SamplingConfig,
                selected: np.ndarray | None = None) -> pa.Table:
    """One image row per (input row, image index), with its seed and its status (see `vqbatch.seeds`); with
    `selected`, only the image rows at those positions of the whole expansion (`image_keys` gives its keys)."""
    assert table.column(config.id_column).null_count == 0, "open_input rejects null ids"
    positions, indices = image_positions(table.num_rows, sampling.images_per_prompt, selected)
    taken = table.take(pa.array(positions))  # each input row once per image row it makes
    ids = taken.column(config.id_column).to_pylist()  # valid UTF-8: open_input rejects other ids
    prompts, prompt_problems = decoded_column(taken.column(config.prompt_column), "prompt")
    seeds = taken.column(config.seed_column).to_pylist() if config.seed_column in taken.column_names else None
    rows = [image_row(row_id, prompt, index, seeds[position] if seeds else None, sampling.base_seed,
                      prompt_problems[position])
            for position, (row_id, prompt, index) in enumerate(zip(ids, prompts, indices.tolist()))]
    image_rows = pa.Table.from_pylist(rows, schema=IMAGE_ROW_SCHEMA)
    for name in config.keep_columns:
        image_rows = image_rows.append_column(taken.schema.field(name), taken.column(name))
    return image_rows


def image_row(row_id, prompt, image_index: int, row_seed: int | None, base_seed: int,
              text_problem: str | None = None) -> dict:
    text_id = str(row_id)
    problem = text_problem or row_problem(prompt, row_seed)
    seed = None if problem else image_seed(text_id, image_index, base_seed, row_seed)
    return dict(id=text_id, prompt=prompt, image_index=image_index, seed=seed,
                status="error" if problem else "ok", error=problem)


def row_problem(prompt, row_seed: int | None) -> str | None:
    """Why this input row cannot be sampled, or None."""
    if prompt is None:
        return "prompt is null"
    if not prompt.strip():
        return "prompt is empty"
    if is_invisible(prompt):
        return f"prompt has only whitespace, control and format characters ({prompt[:20]!r}); nothing to draw"
    if row_seed is not None and not 0 <= row_seed < SEED_LIMIT:
        return f"seed {row_seed} is out of range; allowed: integers in [0, 2**63)"
    return None


def is_invisible(text: str) -> bool:
    if text.isprintable():  # no control, format or non-space separator character: settles most prompts in C
        return text.isspace() or not text
    return all(character.isspace() or unicodedata.category(character) in INVISIBLE_CATEGORIES for character in text)
