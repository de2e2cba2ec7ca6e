"""The generation fingerprint: what decides a dataset's sampled tokens and images, so that a run can tell whether the
rows a dataset holds are the rows it would sample.

The fingerprint holds the model's identity (its config files' contents and its weight files' sizes, or the hub
revision), the dtype, the sampling parameters, the batch shape every model call is padded to (`compute.batch_size`
and the decode batch it implies, `vqbatch.sampler`), the image encoding, and the sampler's code version
(`vqbatch.__version__` and `SAMPLER_VERSION`). `images_per_prompt` is not part of it: more images per prompt are
more keys. Torch-free and Ray-free.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs

from vqbatch.config import NOOP_MODEL, JobConfig, ModelConfig, S3Config
from vqbatch.hub import cache_root, looks_like_hub_id
from vqbatch.io.filesystems import is_s3, read_bytes, resolve
from vqbatch.sampler import DECODE_BATCH

SAMPLER_VERSION = 2  # raise it whenever a code change makes the same settings sample other tokens or images
CONTENT_HASHED_SUFFIXES = (".json", ".txt", ".model", ".yaml")  # small checkpoint files hashed whole
MAX_HASHED_BYTES = 16 * 2**20  # larger files (weights) are identified by name and size



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
    """What names the weights: the hub revision, or each checkpoint file (content hash, or size for weights)."""
    if model.uri == NOOP_MODEL:
        return {"kind": NOOP_MODEL}
    if not is_s3(model.uri) and looks_like_hub_id(model.uri) and not Path(model.uri).expanduser().exists():
        return {"kind": "hub", "id": model.uri, "revision": hub_revision(model.uri)}
    filesystem, root = resolve(model.uri, s3)
    return {"kind": "files", "files": checkpoint_files(filesystem, root)}


def checkpoint_files(filesystem: pafs.FileSystem, root: str) -> dict[str, str]:
    """{path relative to the checkpoint: "blake2b:<hex>" for config and tokenizer files, "bytes:<size>" else}."""
    selector = pafs.FileSelector(root, recursive=True)
    identity = {}
    for info in filesystem.get_file_info(selector):
        relative = posixpath.relpath(info.path, root)
        if info.type != pafs.FileType.File or relative.startswith(".") or "/." in relative:
            continue
        if relative.endswith(CONTENT_HASHED_SUFFIXES) and info.size <= MAX_HASHED_BYTES:
            digest = hashlib.blake2b(read_bytes(filesystem, info.path), digest_size=16).hexdigest()
            identity[relative] = f"blake2b:{digest}"
        else:
            identity[relative] = f"bytes:{info.size}"
    return dict(sorted(identity.items()))


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
