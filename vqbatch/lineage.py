"""The generation fingerprint: what decides a dataset's sampled tokens and images, so that a run can tell whether the
rows a dataset holds are the rows it would sample.

The fingerprint holds the model's identity, the dtype, the sampling parameters, the batch shape every model call
is padded to (`compute.batch_size` and the decode batch it implies, `vqbatch.sampler`), the encoding (image and
output formats, and the input columns every row carries, `input.keep_columns`), and the sampler's code version
(`vqbatch.__version__` and `SAMPLER_VERSION`). `images_per_prompt` is not part of it: more images per prompt are
more keys. Torch-free and Ray-free.

The model's identity is its content: the SHA-256 of every file of a local checkpoint (weights, tokenizer and
configs), read in chunks and kept in a per-machine cache keyed by the file's path, size, times and inode, so a
multi-GB checkpoint is hashed once; the SHA-256 checksums, else ETags, of an s3:// checkpoint's objects; a hub id's
resolved commit. A model with other weights of the same shapes is another fingerprint. Every actor compares the
checkpoint it is about to load with the planned identity (`check_model_unchanged`).
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

from vqbatch.config import NOOP_MODEL, JobConfig, ModelConfig, S3Config
from vqbatch.hub import cache_root, is_hidden, looks_like_hub_id, s3_checkpoint_objects
from vqbatch.io.filesystems import is_s3, s3_client
from vqbatch.sampler import DECODE_BATCH

SAMPLER_VERSION = 2  # raise it whenever a code change makes the same settings sample other tokens or images
HASH_CACHE_NAME = "file-digests.sqlite3"  # under `vqbatch.hub.cache_root()`


@dataclass(frozen=True)
class Fingerprint:
    parts: dict  # {"model": ..., "sampling": ..., "encoding": ..., "code": ...}, JSON values only

    @property
    def digest(self) -> str:
        text = json.dumps(self.parts, sort_keys=True, ensure_ascii=False)
        return hashlib.blake2b(text.encode("utf-8"), digest_size=8).hexdigest()


def generation_fingerprint(config: JobConfig) -> Fingerprint:
    import vqbatch

    sampling = config.sampling.model_dump(mode="json")
    sampling.pop("images_per_prompt")
    encoding = {"image_format": config.output.image_format, "image_quality": config.output.image_quality,
                "format": config.output.format}
    if config.input.keep_columns:  # every published row carries the same input columns (none: no key, as before)
        encoding["keep_columns"] = list(config.input.keep_columns)
    return Fingerprint({"model": {**model_identity(config.model, config.s3), "dtype": config.model.dtype},
                        "sampling": sampling, "shape": batch_shape_part(config.compute.batch_size),
                        "encoding": encoding,
                        "code": {"vqbatch": vqbatch.__version__, "sampler": SAMPLER_VERSION}})


def batch_shape_part(batch_size: int | str) -> dict:
    """The shape of every model call: the batch size (or "auto", decided per run from memory) and the decode batch."""
    if batch_size == "auto":
        return {"batch_size": "auto"}
    return {"batch_size": batch_size, "decode_batch": min(DECODE_BATCH, batch_size)}


def recorded_batch_shape(manifest: dict) -> int | None:
    """The batch shape the dataset's current rows were sampled at: from the latest version's fingerprint, else
    (`auto`) the size that run chose; None for datasets written before vqbatch recorded it."""
    latest = manifest["versions"][-1] if manifest.get("versions") else {}
    shape = latest.get("fingerprint_parts", {}).get("shape", {}).get("batch_size")
    return shape if isinstance(shape, int) else latest.get("batch_size")


def model_identity(model: ModelConfig, s3: S3Config) -> dict:
    """What names the weights: the hub revision, or each checkpoint file's content (`checkpoint_files`, or
    `vqbatch.hub.s3_checkpoint_objects` for an s3:// checkpoint)."""
    if model.uri == NOOP_MODEL:
        return {"kind": NOOP_MODEL}
    if is_s3(model.uri):
        objects = s3_checkpoint_objects(model.uri, s3_client(s3))
        return {"kind": "files", "files": {relative: item.content_id for relative, item in objects.items()}}
    folder = Path(model.uri).expanduser()
    if looks_like_hub_id(model.uri) and not folder.exists():
        return {"kind": "hub", "id": model.uri, "revision": hub_revision(model.uri)}
    return {"kind": "files", "files": checkpoint_files(folder)}


class ModelChanged(ValueError):
    """The checkpoint an actor is about to load is not the one the run fingerprinted."""


def check_model_unchanged(model: ModelConfig, s3: S3Config, planned: dict) -> None:
    """Refuse to load a checkpoint whose identity (`model_identity`, cheap: the per-machine digest cache, the S3
    listing's checksums) is no longer `planned`, the model part of the run's fingerprint: its files or objects were
    replaced since the run was planned, and its rows would mix two models under one fingerprint."""
    current = {**model_identity(model, s3), "dtype": model.dtype}
    changes = fingerprint_changes(planned, current)
    if changes:
        raise ModelChanged(f"model.uri: checkpoint {model.uri} changed since the run was planned "
                           f"({'; '.join(changes)}); refusing to sample rows that would mix two models under one "
                           "fingerprint, nothing is published; run again once the checkpoint is written")


def checkpoint_files(folder: Path) -> dict[str, str]:
    """{path relative to the checkpoint: "sha256:<hex>" of its bytes} for every file but hidden (`.`) ones: weights,
    tokenizer and configs alike. Each file is hashed once per machine and version (`file_digest`)."""
    files = sorted(path for path in folder.rglob("*")
                   if path.is_file() and not is_hidden(path.relative_to(folder).as_posix()))
    with closing(open_hash_cache()) as cache:
        return {path.relative_to(folder).as_posix(): file_digest(path, cache) for path in files}


def open_hash_cache() -> sqlite3.Connection:
    """The machine's cache of file digests (`cache_root()/HASH_CACHE_NAME`): one row per absolute path, with the
    file's `stat_key` when it was hashed. SQLite's locking keeps processes hashing at once from corrupting it."""
    path = cache_root() / HASH_CACHE_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    cache = sqlite3.connect(path, timeout=60, isolation_level=None)  # autocommit: each statement is one transaction
    cache.execute("CREATE TABLE IF NOT EXISTS digests (path TEXT PRIMARY KEY, stat TEXT NOT NULL, "
                  "digest TEXT NOT NULL)")
    return cache


def file_digest(path: Path, cache: sqlite3.Connection) -> str:
    """"sha256:<hex>" of the file's bytes, read in chunks; taken from `cache` while the file's path and `stat_key`
    are those it was hashed at."""
    path = path.resolve()
    before = stat_key(path)
    cached = cache.execute("SELECT digest FROM digests WHERE path = ? AND stat = ?", (str(path), before)).fetchone()
    if cached:
        return cached[0]
    with path.open("rb") as file:
        digest = f"sha256:{hashlib.file_digest(file, 'sha256').hexdigest()}"
    if stat_key(path) != before:
        raise ValueError(f"model.uri: checkpoint file {path} changed while it was hashed; run again once the "
                         "checkpoint is written")
    cache.execute("INSERT OR REPLACE INTO digests VALUES (?, ?, ?)", (str(path), before, digest))
    return digest


def stat_key(path: Path) -> str:
    """Size, modification and change times (ns) and inode: a file written again, in place or renamed over, differs
    in one of them (the change time cannot be set back by copying tools)."""
    info = path.stat()
    return f"{info.st_size}:{info.st_mtime_ns}:{info.st_ctime_ns}:{info.st_ino}"


def hub_revision(repo_id: str) -> str:
    """The commit the hub id resolves to: the local cache's `main` ref, else asked from the hub."""
    cached = cache_root() / "hub" / f"models--{repo_id.replace('/', '--')}" / "refs" / "main"
    if cached.is_file():
        return cached.read_text().strip()
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    try:
        return HfApi().model_info(repo_id).sha
    except (HfHubHTTPError, OfflineModeIsEnabled, OSError) as error:
        raise ValueError(f"cannot tell which revision of {repo_id!r} the job would use ({error}); pass a local "
                         "checkpoint folder or an s3:// URI instead") from None


def fingerprint_changes(old: dict, new: dict, prefix: str = "") -> list[str]:
    """'sampling.steps: 3 -> 4' for every leaf that differs between two fingerprints' parts."""
    changes = []
    for key in sorted(set(old) | set(new)):
        before, after = old.get(key), new.get(key)
        if isinstance(before, dict) and isinstance(after, dict):
            changes += fingerprint_changes(before, after, f"{prefix}{key}.")
        elif before != after:
            changes.append(f"{prefix}{key}: {before!r} -> {after!r}")
    return changes
