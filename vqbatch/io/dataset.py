"""A dataset on disk: its layout, its versions, and publishing them.

Layout under the output root (a local folder or an s3:// prefix):

    versions/v0001/fingerprint.json             the generation fingerprint the version is sampled under; written first
    versions/v0001/part-<keys digest>.parquet   a shard's metadata file, one row per image row, written last of its
                                                shard (`vqbatch.io.formats.metadata_schema`)
    versions/v0001/...                          the shard's images in the output's format (`vqbatch.io.formats`)
    versions/v0001/run.json                     how the run went (`vqbatch.io.run_stats`)
    manifest.json                               written last: the published files (`data_files`, `metadata_files`),
                                                counts, input files, settings and the history of versions
    README.md                                   the dataset card (`vqbatch.io.card`)
    _SUCCESS                                    empty; written after the manifest: the dataset is complete

Every file is written whole (`write_bytes_atomically`) at a name that depends only on its rows' keys, so a retried
writer writes the same names. Only the files the manifest lists are published.

Every run of `generate` or `refresh` writes one version next to the earlier ones. A row is an (id, image_index)
key (`vqbatch.keys`). A run samples only the input keys that no published version of the current fingerprint
holds, and that no complete metadata file already staged in its own version folder holds (files a killed run wrote:
each one was written whole, so it is adopted). Publishing lists the staged files, drops rows already held (a retried
writer may have written a row twice), and writes the manifest: its `metadata_files` are the files of every version
with the current fingerprint, so readers see each key once; `versions` lists every version with its own files,
counts, input files and fingerprint.

The fingerprint (`vqbatch.lineage`) is what decides the sampled tokens and images. A refresh under a changed
fingerprint is refused unless allowed; allowed, it generates every key again as a new version, and the older
versions stay on disk and in the history. Returning to an earlier fingerprint generates only the keys its own
versions lack, and publishes a version even when they lack none: the view is then that fingerprint's rows again.
"""

from __future__ import annotations

import json
import posixpath
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from vqbatch.config import InputConfig, JobConfig, OutputConfig, S3Config, SamplingConfig
from vqbatch.io.card import CARD_NAME, is_dataset_card, write_dataset_card
from vqbatch.io.filesystems import OutputRoot, exists, inside_root, list_files, read_bytes, write_bytes_atomically
from vqbatch.io.formats import (METADATA_SCHEMA, is_metadata_name, is_shard_name, metadata_name, metadata_schema,
                               parquet_bytes, shard_format)
from vqbatch.io.held import HeldBuckets, held_rows
from vqbatch.io.integrity import ShardDamage, inspect_shards
from vqbatch.io.lease import LEASE_NAME
from vqbatch.io.prompts import InputFiles, image_keys
from vqbatch.io.repeats import RepeatedHashes
from vqbatch.keys import KEY_COLUMNS, key_column, key_hashes, keys_digest
from vqbatch.lineage import Fingerprint, fingerprint_changes, generation_fingerprint

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "vqbatch-dataset/1"  # the manifest's "format": what tells vqbatch's manifest from another file
SUCCESS_NAME = "_SUCCESS"
VERSIONS_DIR = "versions"
FINGERPRINT_NAME = "fingerprint.json"
RERUNS_DIR = "reruns"  # default home of reruns (`vqbatch.proof`): datasets of their own under this one
REPORT_DIR = "report"  # where `vqbatch report` writes a local dataset's page (`vqbatch.report`)
REPORT_NAME = "report.html"
CONTACT_SHEET_NAME = "contact_sheet.png"


# ---------------------------------------------------------------------------------------------------------------
# The layout: what vqbatch writes under an output root
# ---------------------------------------------------------------------------------------------------------------

def version_folder(version: int) -> str:
    return f"{VERSIONS_DIR}/v{version:04d}"


def check_output(output: OutputConfig, s3: S3Config) -> OutputRoot:
    """Refuse an output holding files vqbatch did not write, and one that already holds a dataset unless mode is
    overwrite; a refresh adds to what is there and lists nothing."""
    location = OutputRoot.of(output, s3)
    if output.mode != "refresh":
        check_contents(output, output_contents(location))
    return location


def check_contents(output: OutputConfig, contents: OutputContents) -> None:
    """A ValueError naming the first foreign files; or, for a new dataset (mode error), vqbatch's own files."""
    if contents.foreign:
        raise ValueError(f"output {output.uri} holds {len(contents.foreign)} file(s) vqbatch did not write "
                         f"({', '.join(contents.foreign[:3])}{', ...' if len(contents.foreign) > 3 else ''}); vqbatch "
                         "writes a dataset only into an empty folder or over a dataset of its own: move them, or "
                         "choose another output")
    if contents.own and output.mode == "error":
        raise ValueError(f"output {output.uri} already holds a dataset ({', '.join(contents.own[:3])}"
                         f"{', ...' if len(contents.own) > 3 else ''}); choose an empty output, set "
                         "output.mode=overwrite (--overwrite) to replace it, or output.mode=refresh (`vqbatch "
                         "refresh`, `generate --resume`) to add the rows it lacks and finish a killed run")


def prepare_output(output: OutputConfig, s3: S3Config) -> OutputRoot:
    """`check_output`, then clear the output for overwrite: only the files vqbatch wrote there are deleted."""
    if output.mode != "overwrite":
        return check_output(output, s3)
    location = OutputRoot.of(output, s3)
    contents = output_contents(location)
    check_contents(output, contents)
    # the files that make others vqbatch's own go last: an overwrite killed midway leaves files the next one knows
    delete_files(location, sorted(contents.own, key=lambda relative: posixpath.basename(relative) in MARKERS))
    return location


@dataclass(frozen=True)
class OutputContents:
    own: list[str]  # files vqbatch wrote (relative paths): what overwrite deletes
    foreign: list[str]  # files vqbatch did not write: their presence refuses a new dataset or an overwrite


def output_contents(location: OutputRoot) -> OutputContents:
    """Every file under the output root, sorted into vqbatch's own and the foreign ones.

    vqbatch's own: its manifest (one it did not write is refused, `load_manifest`) and, beside it, `_SUCCESS`,
    `vqbatch report`'s page and contact sheet and every file it lists; its dataset card; and, inside a version folder
    that the history records or that holds a `fingerprint.json` (a staged version), the files vqbatch names
    (`part-<hex>.parquet|tar`, `images/<xx>/<hex>_<n>.<ext>`, `fingerprint.json`, `run.json`) and write-temporaries
    (`.<name>.<32 hex>.tmp`). The lease (held by a run) is neither, and rerun datasets under `reruns/` are kept: they
    are datasets of their own.
    """
    files = [posixpath.relpath(path, location.root)
             for path in list_files(location.filesystem, location.root, hidden=True)]
    listed, folders = published_files(location)
    folders |= {posixpath.dirname(relative) for relative in files
                if posixpath.basename(relative) == FINGERPRINT_NAME and VERSION_FOLDER.fullmatch(posixpath.dirname(
                    relative))}
    own, foreign = [], []
    for relative in sorted(files):
        if relative == LEASE_NAME or relative.startswith(f"{RERUNS_DIR}/"):
            continue
        (own if is_own(location, relative, listed, folders) else foreign).append(relative)
    return OutputContents(own, foreign)


VERSION_FOLDER = re.compile(r"versions/v\d{4,}")
NAMED_IN_VERSION = re.compile(r"part-[0-9a-f]+\.(parquet|tar)|images/[0-9a-f]{2}/[0-9a-f]+_\d+\.(png|jpg|webp)"
                              r"|fingerprint\.json|run\.json")
TEMPORARY = re.compile(r"\.[^/]+\.[0-9a-f]{32}\.tmp")  # `write_bytes_atomically`'s and the lease's temporaries
REPORT_FILES = (f"{REPORT_DIR}/{REPORT_NAME}", f"{REPORT_DIR}/{CONTACT_SHEET_NAME}")
MARKERS = (MANIFEST_NAME, FINGERPRINT_NAME)  # what makes the files beside them vqbatch's own


def published_files(location: OutputRoot) -> tuple[set[str], set[str]]:
    """The files the manifest lists (every version's metadata and data files) with the manifest itself, `_SUCCESS`
    and `vqbatch report`'s page, and the folders they are in ("" for a dataset written without versions); nothing
    without a manifest."""
    if not exists(location.filesystem, location.path(MANIFEST_NAME)):
        return set(), set()
    manifest = load_manifest(location)
    output_format = shard_format(manifest.get("output", {}).get("format", "files"))
    shards = [shard["file"] for entry in (manifest, *manifest.get("versions", []))
              for shard in entry.get("metadata_files", [])]
    lost = [file for entry in manifest.get("versions", []) for file in entry.get("lost_metadata_files", [])]
    listed = {path for relative in shards for path in (relative, *output_format.data_files(relative))}
    folders = {posixpath.dirname(relative) for relative in (*shards, *lost)}
    markers = {MANIFEST_NAME, SUCCESS_NAME, *REPORT_FILES}
    return listed | set(manifest.get("data_files", [])) | markers, folders | {""}


def is_own(location: OutputRoot, relative: str, listed: set[str], folders: set[str]) -> bool:
    """Whether vqbatch wrote the file at `relative` (see `output_contents`); `folders` are the version folders."""
    if relative in listed:
        return True
    if relative == CARD_NAME:
        return is_dataset_card(read_bytes(location.filesystem, location.path(relative)))
    if TEMPORARY.fullmatch(posixpath.basename(relative)) and posixpath.dirname(relative) == "":
        return True
    for rest in (under(relative, folder) for folder in folders):
        if rest is not None and (NAMED_IN_VERSION.fullmatch(rest) or TEMPORARY.fullmatch(posixpath.basename(rest))):
            return True
    return False


def under(relative: str, folder: str) -> str | None:
    """The path of `relative` inside `folder` ("" for the root), or None when it is elsewhere."""
    if not folder:
        return relative
    return relative[len(folder) + 1:] if relative.startswith(f"{folder}/") else None


def delete_files(location: OutputRoot, relatives: list[str]) -> None:
    """Delete the files `relatives`; on a local output, then the folders they leave empty (deepest first)."""
    for relative in relatives:
        location.filesystem.delete_file(location.path(relative))
    if not isinstance(location.filesystem, pafs.LocalFileSystem):
        return  # S3 has no folders: a prefix is gone with its last object
    folders = {posixpath.dirname(relative) for relative in relatives}
    folders = {ancestor for folder in folders for ancestor in ancestors(folder)}
    for folder in sorted(folders, key=lambda folder: folder.count("/"), reverse=True):
        path = location.path(folder)
        if location.filesystem.get_file_info(path).type == pafs.FileType.Directory and not \
                location.filesystem.get_file_info(pafs.FileSelector(path)):
            location.filesystem.delete_dir(path)


def ancestors(folder: str) -> list[str]:
    """`a/b/c` -> [`a/b/c`, `a/b`, `a`]; [] for the root."""
    parts = folder.split("/") if folder else []
    return ["/".join(parts[:end]) for end in range(len(parts), 0, -1)]


# ---------------------------------------------------------------------------------------------------------------
# Planning a run: which version it writes and which keys it skips
# ---------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class VersionPlan:
    location: OutputRoot
    version: int
    fingerprint: Fingerprint
    history: tuple[dict, ...]  # the published versions, oldest first (the manifest's `versions`)
    held: pa.Array  # `key_column` of the intact rows the published versions of this fingerprint hold
    damaged: tuple[ShardDamage, ...]  # published files of this fingerprint that lost rows (or are lost whole)
    staged: tuple[str, ...]  # complete metadata files a killed run of this version left (adopted)
    done: HeldBuckets  # the held and staged keys (`key_column`), which this run skips
    pending: int  # input keys still to sample
    output_format: str  # how its shards are stored (`output.format`; part of the fingerprint)

    @property
    def folder(self) -> str:
        return version_folder(self.version)

    @property
    def changes_published_fingerprint(self) -> bool:
        """Whether the latest published version has another fingerprint (allowed): this run's fingerprint then
        becomes the published one, even where its earlier versions hold every key and nothing is sampled."""
        return bool(self.history) and self.history[-1]["fingerprint"] != self.fingerprint.digest


def plan_version(config: JobConfig, inputs: InputFiles, allow_new_fingerprint: bool = False) -> VersionPlan:
    """The version this run writes and the keys it skips; a changed fingerprint is a ValueError unless allowed.

    Only `output.mode == "refresh"` looks at what the output holds: `error` found it empty and `overwrite` clears it.
    """
    location = OutputRoot.of(config.output, config.s3)
    fingerprint = generation_fingerprint(config)
    history = tuple(published_versions(location)) if config.output.mode == "refresh" else ()
    if history and history[-1]["fingerprint"] != fingerprint.digest and not allow_new_fingerprint:
        raise ValueError(changed_fingerprint_message(config.output.uri, history[-1], fingerprint))
    version = history[-1]["version"] + 1 if history else 1
    published = inspect_shards(location, current_shards(history, fingerprint), config.output.format)
    staged = tuple(staged_files(location, version, fingerprint)) if config.output.mode == "refresh" else ()
    # each key is published once; only the keys a killed run staged may repeat a held one
    done = HeldBuckets.of(pc.unique(pa.concat_arrays([published.held, read_keys(location, staged)])) if staged
                          else published.held)
    return VersionPlan(location, version, fingerprint, history, published.held, published.damaged, staged, done,
                       count_pending(inputs, config, done), config.output.format)


def published_versions(location: OutputRoot) -> list[dict]:
    """The manifest's version history; [] when nothing is published yet."""
    if not exists(location.filesystem, location.path(MANIFEST_NAME)):
        return []
    manifest = load_manifest(location)
    if not manifest.get("versions"):
        raise ValueError(f"the dataset at {location.root} has no version history (it was written without "
                         "versions, e.g. by `vqbatch rerun`); refresh only datasets written by generate or refresh, "
                         "or regenerate it with --overwrite")
    return manifest["versions"]


def changed_fingerprint_message(uri: str, latest: dict, fingerprint: Fingerprint) -> str:
    changes = fingerprint_changes(latest.get("fingerprint_parts", {}), fingerprint.parts)
    return (f"the generation fingerprint changed: output {uri} holds version {latest['version']} with fingerprint "
            f"{latest['fingerprint']}, this run's is {fingerprint.digest} ({'; '.join(changes) or 'unknown change'}); "
            "pass --allow-new-fingerprint (allow_new_fingerprint=True) to generate every row again as a new "
            "version, or run with the dataset's settings")


def current_shards(history: tuple[dict, ...], fingerprint: Fingerprint) -> list[dict]:
    """The published metadata files of every version generated for `fingerprint`."""
    return [shard for entry in history if entry["fingerprint"] == fingerprint.digest
            for shard in entry["metadata_files"]]


def read_keys(location: OutputRoot, paths: list[str] | tuple[str, ...]) -> pa.Array:
    """`key_column` of every row of the metadata files at `paths` (full paths), in file order."""
    keys = [key_column(pq.read_table(path, filesystem=location.filesystem, columns=KEY_COLUMNS)) for path in paths]
    return pa.concat_arrays(keys) if keys else pa.array([], pa.binary())


def staged_files(location: OutputRoot, version: int, fingerprint: Fingerprint) -> list[str]:
    """The complete metadata files a killed run of this version and fingerprint left; [] for another fingerprint."""
    if staged_fingerprint(location, version) != fingerprint.digest:
        return []
    return shard_metadata_files(location, version_folder(version))


def shard_metadata_files(location: OutputRoot, folder: str) -> list[str]:
    """The metadata files (full paths) of the shards in a version's `folder` (relative to the root)."""
    return [path for path in list_files(location.filesystem, location.path(folder), recursive=False)
            if is_metadata_name(posixpath.basename(path))]


def staged_fingerprint(location: OutputRoot, version: int) -> str | None:
    path = location.path(f"{version_folder(version)}/{FINGERPRINT_NAME}")
    if not exists(location.filesystem, path):
        return None
    return json.loads(read_bytes(location.filesystem, path))["fingerprint"]


def count_pending(inputs: InputFiles, config: JobConfig, done: HeldBuckets) -> int:
    """How many (id, image_index) keys the input expands to that `done` lacks; one input file in memory at a time,
    and none read when nothing is done (every row expands to `images_per_prompt` keys)."""
    if not done.count:
        return inputs.num_rows * config.sampling.images_per_prompt
    return sum(len(pending_image_rows(pa.Table.from_batches([batch]), config.input, config.sampling, done))
               for path in inputs.paths for batch in inputs.batches(path, inputs.columns(config.input)))


def pending_image_rows(table: pa.Table, config: InputConfig, sampling: SamplingConfig, done: HeldBuckets,
                       fetch: Callable = lambda bucket: bucket) -> np.ndarray:  # (M,) int64
    """Where in `expand_rows(table, ...)` the image rows whose (id, image_index) key `done` lacks are, in order:
    found from the keys alone (`image_keys`), so a run never expands a row it skips. `fetch` turns a bucket's
    handle into its keys (`held.held_rows`)."""
    if not done.count:
        return np.arange(table.num_rows * sampling.images_per_prompt)
    return np.flatnonzero(~held_rows(key_column(image_keys(table, config, sampling)), done, fetch))


# ---------------------------------------------------------------------------------------------------------------
# Running and publishing a version
# ---------------------------------------------------------------------------------------------------------------

def start_version(plan: VersionPlan) -> None:
    """Ready this version's folder: drop what a run of another fingerprint staged there and any temporary files
    a killed writer left, then record the fingerprint (before any row is written)."""
    filesystem = plan.location.filesystem
    folder = plan.location.path(plan.folder)
    if exists(filesystem, folder) and staged_fingerprint(plan.location, plan.version) != plan.fingerprint.digest:
        delete_files(plan.location, [relative for relative in output_contents(plan.location).own
                                     if relative.startswith(f"{plan.folder}/")])
    remove_temporary_files(filesystem, folder)
    remove_temporary_files(filesystem, plan.location.root, recursive=False)
    record = {"version": plan.version, "fingerprint": plan.fingerprint.digest, "parts": plan.fingerprint.parts}
    write_bytes_atomically(filesystem, posixpath.join(folder, FINGERPRINT_NAME),
                           json.dumps(record, indent=2, ensure_ascii=False).encode("utf-8"))


def remove_temporary_files(filesystem: pafs.FileSystem, folder: str, recursive: bool = True) -> None:
    """Delete the hidden `.<name>.<uuid>.tmp` files of `write_bytes_atomically` (local outputs only have them)."""
    if filesystem.get_file_info(folder).type != pafs.FileType.Directory:
        return
    for info in filesystem.get_file_info(pafs.FileSelector(folder, recursive=recursive)):
        name = posixpath.basename(info.path)
        if info.type == pafs.FileType.File and name.startswith(".") and name.endswith(".tmp"):
            filesystem.delete_file(info.path)


def publish_version(plan: VersionPlan, input_uris: list[str], config: JobConfig) -> dict:
    """Publish every complete metadata file staged in this version's folder, each key once, and return the manifest.

    Rows whose key an earlier file (or an earlier version of this fingerprint) already holds are dropped: a file
    holding some is rewritten without them under its new rows' name (before any file is deleted), and files left
    with nothing new are deleted.
    """
    shards = deduplicated_shards(plan)
    entry = {"version": plan.version, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
             "fingerprint": plan.fingerprint.digest, "fingerprint_parts": plan.fingerprint.parts,
             "rows_added": sum(shard["rows"] for shard in shards), "rows_ok": sum(shard["ok"] for shard in shards),
             "rows_failed": sum(shard["errors"] for shard in shards), "input_files": input_uris,
             "batch_size": config.compute.batch_size, "metadata_files": shards}
    if plan.damaged:
        entry["repair"] = repair_record(plan.damaged)
    versions = (*repaired_history(plan), entry)
    manifest = publish(plan.location, current_shards(versions, plan.fingerprint), input_uris, config,
                       versions=list(versions))
    remove_damaged_files(plan)
    return manifest


def deduplicated_shards(plan: VersionPlan) -> list[dict]:
    """Summaries of this version's staged files, cut so that each key not held already appears once."""
    location, output_format = plan.location, shard_format(plan.output_format)
    staged = [posixpath.relpath(path, location.root) for path in shard_metadata_files(location, plan.folder)]
    shards = {}
    for file, new in new_rows(plan, staged):
        if not new.any():
            continue
        relative = (file.relative if new.all() else
                    rewrite_without(location, file.relative, pa.array(new), plan.folder, plan.output_format))
        rows, ok = int(new.sum()), int(file.ok[new].sum())
        shards[relative] = {"file": relative, "rows": rows, "ok": ok, "errors": rows - ok, "version": plan.version}
    published = {name for relative in shards for name in (relative, *output_format.data_files(relative))}
    for path in list_files(location.filesystem, location.path(plan.folder), recursive=False):
        if is_shard_name(posixpath.basename(path)) and posixpath.relpath(path, location.root) not in published:
            location.filesystem.delete_file(path)  # rows held already, or a tar whose metadata was never written
    return [shards[relative] for relative in sorted(shards)]


@dataclass(frozen=True)
class StagedFile:
    """A staged metadata file, reduced to what publishing needs: its rows' keys and which rows are ok."""

    relative: str  # path under the output root
    keys: pa.Array  # (N,) `key_column` of its rows
    ok: np.ndarray  # (N,) bool: the rows whose status is "ok"

    @classmethod
    def read(cls, location: OutputRoot, relative: str) -> "StagedFile":
        table = pq.read_table(location.path(relative), filesystem=location.filesystem, columns=[*KEY_COLUMNS, "status"])
        ok = pc.fill_null(pc.equal(table.column("status"), "ok"), False).to_numpy(zero_copy_only=False)
        return cls(relative, key_column(table), ok)


def new_rows(plan: VersionPlan, staged: list[str]) -> Iterator[tuple[StagedFile, np.ndarray]]:
    """Each staged file (relative paths `staged`), read one at a time, and which of its rows (bool (N,)) hold a key
    that neither `plan.held` nor an earlier row holds (in file order, the first row of a key wins).

    A first pass spills every key's hash to local disk (`RepeatedHashes`), so the driver's memory does not grow with
    the rows; the second reads the files again and compares exactly only the keys behind a hash that occurs more
    than once (a duplicate, or a collision).
    """
    with RepeatedHashes(plan.done.count + plan.pending) as repeats:
        for held in held_slices(plan.held):
            repeats.add(key_hashes(held))
        for relative in staged:
            repeats.add(key_hashes(StagedFile.read(plan.location, relative).keys))
        repeated = repeats.repeated()
    seen = {key for held in (held_slices(plan.held) if repeated.size else [])
            for key in held.filter(pa.array(np.isin(key_hashes(held), repeated))).to_pylist()}
    for relative in staged:
        file = StagedFile.read(plan.location, relative)
        new = np.ones(len(file.keys), bool)
        suspects = np.flatnonzero(np.isin(key_hashes(file.keys), repeated)) if repeated.size else []
        for position, key in zip(suspects, file.keys.take(pa.array(suspects, pa.int64())).to_pylist()):
            new[position] = key not in seen
            seen.add(key)
        yield file, new


HELD_SLICE = 1 << 16  # held keys hashed at a time when publishing: their hashes never all in memory at once


def held_slices(held: pa.Array) -> Iterator[pa.Array]:
    return (held.slice(start, HELD_SLICE) for start in range(0, len(held), HELD_SLICE))


def rewrite_without(location: OutputRoot, relative: str, keep: pa.Array, folder: str, output_format: str) -> str:
    """Write the kept rows of a shard (its data first, its metadata file last) into `folder` as a shard named by
    their keys; return its metadata file's relative path."""
    table = pq.read_table(location.path(relative), filesystem=location.filesystem).filter(keep)
    rewritten = posixpath.join(folder, metadata_name(keys_digest(table)))
    table = shard_format(output_format).rewrite(location.filesystem, location.root, table, relative, rewritten)
    write_bytes_atomically(location.filesystem, location.path(rewritten), parquet_bytes(table))
    return rewritten


# ---------------------------------------------------------------------------------------------------------------
# Repair: published files that are gone
# ---------------------------------------------------------------------------------------------------------------

def repair_record(damaged: tuple[ShardDamage, ...]) -> dict:
    """What a version records of the repair it made: the files found lost, with lost images or with rows gone, and
    why."""
    return {"lost_metadata_files": [damage.file for damage in damaged if damage.whole],
            "metadata_files_with_lost_images": [damage.file for damage in damaged
                                                if not damage.whole and damage.lost.any()],
            "metadata_files_with_rows_gone": [damage.file for damage in damaged if damage.rows_gone],
            "rows_lost": {damage.file: None if damage.whole else int(damage.lost.sum()) + damage.rows_gone
                          for damage in damaged},
            "problems": [damage.problem for damage in damaged]}


def repaired_history(plan: VersionPlan) -> list[dict]:
    """The published versions without the lost rows: a metadata file lost whole leaves its version's list (named
    in its `lost_metadata_files`), and one whose rows lost their images, or that holds fewer rows than it did, is
    written again, in its own folder, without the lost rows (so its counts are what it holds). Their keys are
    sampled again by this run."""
    damage = {damage.file: damage for damage in plan.damaged}
    history = []
    for entry in plan.history:
        shards, lost = [], list(entry.get("lost_metadata_files", []))
        for shard in entry["metadata_files"]:
            if shard["file"] not in damage:
                shards.append(shard)
            elif damage[shard["file"]].whole or damage[shard["file"]].lost.all():
                lost.append(shard["file"])
            else:
                shards.append(kept_shard(plan, shard, ~damage[shard["file"]].lost))
        history.append({**entry, "metadata_files": shards, **({"lost_metadata_files": lost} if lost else {})})
    return history


def kept_shard(plan: VersionPlan, shard: dict, keep: np.ndarray) -> dict:
    """The summary of `shard` written again with only its `keep` rows (bool (N,)) beside the original."""
    location = plan.location
    folder = posixpath.dirname(shard["file"])
    relative = rewrite_without(location, shard["file"], pa.array(keep), folder, plan.output_format)
    statuses = pq.read_table(location.path(relative), filesystem=location.filesystem, columns=["status"])
    ok = statuses.column("status").to_pylist().count("ok")
    return {**shard, "file": relative, "rows": statuses.num_rows, "ok": ok, "errors": statuses.num_rows - ok}


def remove_damaged_files(plan: VersionPlan) -> None:
    """Once the repaired manifest is published: delete what is left of the damaged shards (metadata files that no
    longer read or were written again, and their data files). Image files of a lost metadata file's rows stay: no
    readable file names them."""
    filesystem = plan.location.filesystem
    for damage in plan.damaged:
        for relative in {damage.file, *shard_format(plan.output_format).data_files(damage.file)}:
            if exists(filesystem, plan.location.path(relative)):
                filesystem.delete_file(plan.location.path(relative))


# ---------------------------------------------------------------------------------------------------------------
# The manifest: what is published
# ---------------------------------------------------------------------------------------------------------------

def publish(location: OutputRoot, shards: list[dict], input_uris: list[str], config: JobConfig,
            versions: list[dict] | None = None) -> dict:
    """Write the manifest and the dataset card (`vqbatch.io.card`), then the `_SUCCESS` marker: the dataset is
    visible to readers from here on.

    `shards` are the files readers see; `versions` is the history of versions (see `VersionPlan` above).
    """
    manifest = {
        "format": MANIFEST_FORMAT,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "rows": sum(shard["rows"] for shard in shards),
        "ok": sum(shard["ok"] for shard in shards),
        "errors": sum(shard["errors"] for shard in shards),
        "metadata_files": sorted(shards, key=lambda shard: shard["file"]),
        "data_files": data_files(shards, config.output.format),
        "input_files": input_uris,
        "input": config.input.model_dump(mode="json", exclude={"paths"}),  # how its rows were read (column names)
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
    """The files a reader of `output_format` opens, under the output root: the published view, oldest first. A
    shard without an ok row has no sample in a format that holds only samples (its tar is empty): it is left out,
    as HF `datasets` infers a webdataset's columns from the first tar and fails on an empty one."""
    reader = shard_format(output_format)
    return [path for shard in sorted(shards, key=lambda shard: shard["file"]) if shard["ok"] or not reader.samples_only
            for path in reader.data_files(shard["file"])]


def read_manifest(location: OutputRoot) -> dict:
    """The published manifest; a ValueError when it names a file outside the output root."""
    if not exists(location.filesystem, location.path(SUCCESS_NAME)):
        raise FileNotFoundError(f"no published dataset at {location.root}: {SUCCESS_NAME} is missing")
    return load_manifest(location)


def load_manifest(location: OutputRoot) -> dict:
    """`manifest.json`, every file it names checked to lie inside the output root (`inside_root`); a ValueError when
    vqbatch did not write it (not a JSON object of `MANIFEST_FORMAT`)."""
    try:
        manifest = json.loads(read_bytes(location.filesystem, location.path(MANIFEST_NAME)))
    except (UnicodeDecodeError, json.JSONDecodeError):
        manifest = None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"the {MANIFEST_NAME} at {location.root} is not a vqbatch manifest (a JSON object with "
                         f"\"format\": \"{MANIFEST_FORMAT}\"): vqbatch did not write it, or it is damaged; vqbatch "
                         "neither reads nor replaces this output: move the file, or choose another output")
    for entry in (manifest, *manifest.get("versions", [])):
        for shard in entry.get("metadata_files", []):
            inside_root(shard["file"], location)
    for path in manifest.get("data_files", []):
        inside_root(path, location)
    return manifest


def read_metadata(location: OutputRoot, files: list[str] | None = None) -> pa.Table:
    """Every published metadata row (the files the manifest lists, or the relative paths `files`), as one table."""
    if files is None:
        files = [shard["file"] for shard in read_manifest(location)["metadata_files"]]
    tables = [pq.read_table(location.path(relative), filesystem=location.filesystem) for relative in files]
    return pa.concat_tables(tables, promote_options="default") if tables else METADATA_SCHEMA.empty_table()
