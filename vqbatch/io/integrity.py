"""Integrity of a published dataset: is every file the manifest publishes there (and, read whole, does each image
decode), and do the manifest's counts hold.

`inspect_shards` reads each published metadata file's keys, statuses and image column, one file at a time, lists
each version folder once (8 bytes per listed path: its 64-bit `vqbatch.keys.key_hashes`; a missing file passes for
present only if its path's hash equals a listed path's, about one chance in 10^5 for ten million files), and asks
the dataset's format which rows lost their image (`row_problems` in `vqbatch.io.formats`): an image file or a tar
that is gone, and with `decode` a tar that does not read or an image that does not decode.
A metadata file that is gone or does not read (a truncated Parquet file) loses every row it held, and one that
reads but holds fewer rows than the manifest counts (rewritten without some) loses those; `lost_input_keys` names
such rows from the input files the manifest records (the keys they expand to that no readable file holds).

`vqbatch verify` reports every lost row as a mismatch naming its problem; `refresh` (`vqbatch.io.dataset`) samples
the lost rows again and records the repair in the manifest.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from vqbatch.config import InputConfig, S3Config, SamplingConfig
from vqbatch.io.filesystems import OutputRoot, exists, inside_root, list_files
from vqbatch.io.formats import shard_format
from vqbatch.io.prompts import image_keys, open_input
from vqbatch.keys import KEY_COLUMNS, key_column, key_hashes

COUNTS = ("rows", "ok", "errors")


@dataclass(frozen=True)
class ShardDamage:
    file: str  # the published metadata file, relative to the output root
    lost: np.ndarray | None  # (N,) bool over the file's rows: those whose image is lost; None: the whole file is
    problem: str  # what is wrong, in words
    rows_gone: int = 0  # rows the manifest counts in the file that it no longer holds (named from the input files)

    @property
    def whole(self) -> bool:
        return self.lost is None


@dataclass(frozen=True)
class Inspection:
    held: pa.Array  # `key_column` of every intact row of the inspected files, in file order
    damaged: tuple[ShardDamage, ...]  # the files with lost rows, or lost whole
    lost_rows: tuple[dict, ...]  # {"id", "image_index", "problem"} of each lost row of a file that still reads
    count_problems: tuple[str, ...]  # files whose rows differ from what the manifest says they hold
    readable: tuple[str, ...]  # the inspected metadata files that read

    @property
    def lost_files(self) -> list[str]:
        return [damage.file for damage in self.damaged if damage.whole]


def inspect_shards(location: OutputRoot, shards: list[dict], output_format: str, decode: bool = False) -> Inspection:
    """Inspect the published metadata files `shards` (manifest summaries: file, rows, ok, errors) of a dataset in
    `output_format`; with `decode`, read every stored image and decode it."""
    listing = Listing(location)
    held, damaged, lost_rows, count_problems, readable = [], [], [], [], []
    for shard in shards:
        table, problem = read_shard(location, shard["file"], output_format, decode)
        if table is None:
            damaged.append(ShardDamage(shard["file"], None, problem))
            continue
        readable.append(shard["file"])
        count_problems += shard_count_problems(shard, table)
        problems = shard_format(output_format).row_problems(location.filesystem, location.root, table, shard["file"],
                                                              listing.present, decode)
        lost = np.array([problem is not None for problem in problems], bool)
        gone = max(0, shard["rows"] - table.num_rows)
        if lost.any() or gone:
            damaged.append(ShardDamage(shard["file"], lost, shard_problem(shard["file"], lost, gone), gone))
            lost_rows += [{"id": row["id"], "image_index": row["image_index"], "problem": problem}
                          for row, problem in zip(table.select(KEY_COLUMNS).to_pylist(), problems) if problem]
        held.append(key_column(table.filter(pa.array(~lost))))
    return Inspection(pa.concat_arrays(held) if held else pa.array([], pa.binary()), tuple(damaged),
                      tuple(lost_rows), tuple(count_problems), tuple(readable))


def shard_problem(relative: str, lost: np.ndarray, gone: int) -> str:
    """What is wrong with a metadata file that still reads: rows that lost their image, rows that are gone."""
    problems = []
    if lost.any():
        problems.append(f"{int(lost.sum())} row(s) of {relative} lost their image")
    if gone:
        problems.append(f"{gone} row(s) the manifest counts in {relative} are gone from it")
    return "; ".join(problems)


def read_shard(location: OutputRoot, relative: str, output_format: str,
               decode: bool) -> tuple[pa.Table | None, str | None]:
    """The columns of a metadata file that inspection needs (the image bytes of the parquet format only to decode
    them), or None and why it does not read."""
    keeps_bytes = shard_format(output_format).image_type != pa.string()
    columns = [*KEY_COLUMNS, "status", *(["image"] if decode or not keeps_bytes else [])]
    try:
        table = pq.read_table(location.path(relative), filesystem=location.filesystem, columns=columns)
    except FileNotFoundError:
        return None, f"metadata file {relative} is missing"
    except (OSError, pa.ArrowException) as error:
        return None, f"metadata file {relative} does not read ({str(error).splitlines()[0]})"
    if not keeps_bytes:
        for path in table.column("image").drop_null().to_pylist():
            inside_root(path, location)
    return table, None


def shard_count_problems(shard: dict, table: pa.Table) -> list[str]:
    """A line when the manifest's counts of a metadata file differ from the rows it holds."""
    ok = pc.sum(pc.equal(table.column("status"), "ok")).as_py() or 0
    held = {"rows": table.num_rows, "ok": ok, "errors": table.num_rows - ok}
    if all(shard.get(name) == held[name] for name in COUNTS):
        return []
    said = ", ".join(f"{shard.get(name)} {name}" for name in COUNTS)
    return [f"the manifest says {shard['file']} holds {said}; it holds {', '.join(f'{held[n]} {n}' for n in COUNTS)}"]


def manifest_count_problems(manifest: dict) -> list[str]:
    """A line per total (rows, ok, errors) of the manifest that differs from the sum over its metadata files."""
    problems = []
    for name in COUNTS:
        listed = sum(shard.get(name, 0) for shard in manifest["metadata_files"])
        if manifest.get(name) != listed:
            problems.append(f"the manifest says the dataset holds {manifest.get(name)} {name}; its metadata files "
                            f"list {listed}")
    return problems


class Listing:
    """Which files exist under the output root, from one recursive listing per version folder (`versions/vNNNN`),
    kept as the sorted 64-bit hashes of the listed paths."""

    def __init__(self, location: OutputRoot):
        self.location = location
        self.folders: dict[str, np.ndarray] = {}  # version folder -> (M,) uint64 sorted path hashes

    def present(self, relative: str) -> bool:
        parts = relative.split("/", 2)
        if len(parts) < 3:  # a file at the root (datasets written without versions): ask for it alone
            return exists(self.location.filesystem, self.location.path(relative))
        hashes, target = self.folder("/".join(parts[:2])), path_hashes([relative])[0]
        position = np.searchsorted(hashes, target)
        return bool(position < len(hashes) and hashes[position] == target)

    def folder(self, folder: str) -> np.ndarray:
        if folder not in self.folders:
            filesystem, path = self.location.filesystem, self.location.path(folder)
            listed = list_files(filesystem, path) if filesystem.get_file_info(path).type == pafs.FileType.Directory \
                else []
            self.folders[folder] = np.sort(path_hashes([posixpath.relpath(file, self.location.root)
                                                        for file in listed]))
        return self.folders[folder]


def path_hashes(paths: list[str]) -> np.ndarray:  # (N,) uint64
    return key_hashes(pa.array([path.encode("utf-8", "surrogatepass") for path in paths], pa.binary()))


def lost_input_keys(manifest: dict, found: pa.Array, s3: S3Config) -> list[tuple[str, int]]:
    """The (id, image_index) keys the input files of the current fingerprint's versions expand to that `found`
    (`key_column` of the rows still held or already named) lacks: the rows of metadata files that are gone."""
    settings = InputConfig(**{**manifest.get("input", {}), "paths": current_input_files(manifest)})
    sampling = SamplingConfig(**manifest["sampling"])
    inputs = open_input(settings, s3)
    lost = []
    for path in inputs.paths:
        for batch in inputs.batches(path, inputs.columns(settings)):
            rows = image_keys(pa.Table.from_batches([batch]), settings, sampling)
            missing = rows.filter(pc.invert(pc.is_in(key_column(rows), value_set=found)))
            lost += zip(missing.column("id").to_pylist(), missing.column("image_index").to_pylist())
    return lost


def current_input_files(manifest: dict) -> list[str]:
    """The input files of every version generated under the latest version's fingerprint (or the manifest's own
    list, for datasets written without versions)."""
    versions = manifest.get("versions") or []
    if not versions:
        return list(manifest["input_files"])
    latest = versions[-1]["fingerprint"]
    files = [uri for entry in versions if entry["fingerprint"] == latest for uri in entry["input_files"]]
    return list(dict.fromkeys(files))
