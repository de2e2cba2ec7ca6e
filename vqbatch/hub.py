"""Where checkpoints come from: a local folder, an `s3://` URI (downloaded once per machine and content) or a hub id.

An s3:// checkpoint is read with the job's S3 settings (`vqbatch.io.filesystems.s3_client`, the one resolver of
input, output, model, rerun and verify). It is downloaded into `cache_root()/s3/<bucket>/<prefix>/content-<digest>`,
the digest taken over its objects' content ids (`s3_checkpoint_objects`): a changed object is a new download, an
unchanged checkpoint reuses the finished one. Each object is fetched only while its ETag is still the one listed,
into a hidden folder that is renamed into place when whole, so two processes on one machine see either no folder
or a whole one (the slower one drops its copy).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import NamedTuple

from vqbatch.config import S3Config
from vqbatch.io.filesystems import s3_client, split_s3_uri

CACHE_ENV = "VQBATCH_CACHE"
DOWNLOAD_CHUNK = 8 * 2**20  # bytes copied at a time from an S3 object into its file


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "vqbatch"))


def local_checkpoint(path_or_uri: str | Path, revision: str | None = None, s3: S3Config | None = None,
                     allow_patterns: list[str] | None = None) -> Path:
    """Return a local folder holding the checkpoint named by a local path, an s3:// URI or a hub id.

    `revision` (a branch, tag or commit) picks the version of a hub id; a local folder or an s3:// URI has one.
    `s3` holds the S3 settings of an s3:// URI (default: the AWS environment variables alone). `allow_patterns`
    fetches only the matching files of a hub snapshot.
    """
    text = str(path_or_uri)
    if text.startswith("s3://"):
        return download_s3_folder(text, s3 or S3Config())
    path = Path(text).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ValueError(f"checkpoint path {text!r} is a file; give the checkpoint folder")
        return path
    if looks_like_hub_id(text):
        return download_hub_snapshot(text, revision, allow_patterns)
    raise FileNotFoundError(f"checkpoint not found: {text!r} is neither an existing folder, an s3:// URI nor a hub id")


def component_folder(path_or_uri: str | Path, subfolder: str | None, revision: str | None = None) -> Path:
    """The local folder of one component: `subfolder` of the checkpoint (of a hub snapshot only its files are
    fetched, not the other components' weights), or the checkpoint itself."""
    patterns = [f"{subfolder.strip('/')}/*"] if subfolder else None
    folder = local_checkpoint(path_or_uri, revision=revision, allow_patterns=patterns)
    return folder / subfolder if subfolder else folder


def looks_like_hub_id(text: str) -> bool:
    parts = text.split("/")
    return len(parts) == 2 and all(parts) and not text.startswith((".", "/", "~"))


def download_hub_snapshot(repo_id: str, revision: str | None = None,
                          allow_patterns: list[str] | None = None) -> Path:
    """The hub snapshot of `repo_id` at `revision` (default main) through huggingface_hub's cache under
    cache_root()/hub; `allow_patterns` fetches only the matching files (the preflight's configs). HF_HUB_OFFLINE=1
    reads the cache only."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, revision=revision, cache_dir=cache_root() / "hub",
                                      allow_patterns=allow_patterns))
    except Exception as error:  # the hub raises many kinds of network and lookup errors
        at = f" at revision {revision!r}" if revision else ""
        raise OSError(f"could not fetch {repo_id!r}{at} from the Hugging Face hub ({type(error).__name__}: {error}); "
                      "without a network, download the checkpoint elsewhere and pass its local path or s3:// URI"
                      ) from error


# ---------------------------------------------------------------------------------------------------------------
# s3:// checkpoints
# ---------------------------------------------------------------------------------------------------------------

class S3Object(NamedTuple):
    key: str
    etag: str  # as S3 gives it, quoted: what a conditional GET names
    content_id: str  # "sha256:<hex>" from the object's full-object SHA-256 checksum, else "etag:<ETag>"


def s3_checkpoint_objects(uri: str, client) -> dict[str, S3Object]:
    """{path relative to the checkpoint: its object} of every object under `uri` but hidden (`.`) files, sorted."""
    bucket, prefix = split_s3_uri(uri)
    start = f"{prefix}/" if prefix else ""
    objects = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=start):
        for listed in page.get("Contents", []):
            relative = listed["Key"][len(start):]
            if relative and not relative.endswith("/") and not is_hidden(relative):
                objects[relative] = S3Object(listed["Key"], listed["ETag"], content_id(client, bucket, listed))
    return dict(sorted(objects.items()))


def content_id(client, bucket: str, listed: dict) -> str:
    """What names a listed object's bytes: its SHA-256 checksum when it was stored with one for the whole object
    (the same "sha256:<hex>" a local file of those bytes gets), else its ETag."""
    if "SHA256" in listed.get("ChecksumAlgorithm", []):
        checksum = client.head_object(Bucket=bucket, Key=listed["Key"], ChecksumMode="ENABLED").get("ChecksumSHA256")
        if checksum and "-" not in checksum:  # "<base64>-<parts>" is a checksum of the parts' checksums
            return f"sha256:{base64.b64decode(checksum).hex()}"
    return f"etag:{listed['ETag'].strip(chr(34))}"


def is_hidden(relative: str) -> bool:
    return any(part.startswith(".") for part in relative.split("/"))


def objects_digest(objects: dict[str, S3Object]) -> str:
    identities = {relative: item.content_id for relative, item in objects.items()}
    return hashlib.sha256(json.dumps(identities, sort_keys=True).encode("utf-8")).hexdigest()[:32]


def download_s3_folder(uri: str, s3: S3Config) -> Path:
    """The local copy of every object under `uri`, in a cache folder named by their content ids; downloaded once."""
    client = s3_client(s3)
    objects = s3_checkpoint_objects(uri, client)
    if not objects:
        raise FileNotFoundError(f"no checkpoint files under {uri}")
    bucket, prefix = split_s3_uri(uri)
    target = cache_root() / "s3" / bucket / prefix / f"content-{objects_digest(objects)}"
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.{uuid.uuid4().hex}.partial")
    try:
        for relative, item in objects.items():
            download_object(client, bucket, item, partial / relative, uri)
        move_into_place(partial, target)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return target


def download_object(client, bucket: str, item: S3Object, destination: Path, uri: str) -> None:
    """Copy one object into `destination`, only while its ETag is the listed one (else the checkpoint is changing)."""
    from botocore.exceptions import ClientError

    destination.parent.mkdir(parents=True, exist_ok=True)
    try:
        body = client.get_object(Bucket=bucket, Key=item.key, IfMatch=item.etag)["Body"]
    except ClientError as error:
        if error.response.get("Error", {}).get("Code") not in ("PreconditionFailed", "412"):
            raise
        raise OSError(f"model.uri: s3://{bucket}/{item.key} of checkpoint {uri} changed while it was downloaded; "
                      "run again once the checkpoint's upload is finished") from None
    with body, destination.open("wb") as file:
        shutil.copyfileobj(body, file, DOWNLOAD_CHUNK)


def move_into_place(partial: Path, target: Path) -> None:
    """Rename the whole download to its cache name; when another process got there first, keep its copy."""
    try:
        partial.rename(target)
    except OSError:
        if not target.is_dir():
            raise
