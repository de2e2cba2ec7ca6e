"""Where checkpoints come from: a local folder, an `s3://` URI (downloaded once per machine) or a hub id."""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlparse

CACHE_ENV = "VQBATCH_CACHE"


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "vqbatch"))


def local_checkpoint(path_or_uri: str | Path, revision: str | None = None) -> Path:
    """Return a local folder holding the checkpoint named by a local path, an s3:// URI or a hub id.

    `revision` (a branch, tag or commit) picks the version of a hub id; a local folder or an s3:// URI has one.
    """
    text = str(path_or_uri)
    if text.startswith("s3://"):
        return download_s3_folder(text)
    path = Path(text).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ValueError(f"checkpoint path {text!r} is a file; give the checkpoint folder")
        return path
    if looks_like_hub_id(text):
        return download_hub_snapshot(text, revision)
    raise FileNotFoundError(f"checkpoint not found: {text!r} is neither an existing folder, an s3:// URI nor a hub id")


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
                      "without a network, download the checkpoint elsewhere and pass its local path or s3:// URI") from error


def s3_client():
    """A boto3 S3 client honouring AWS_ENDPOINT_URL / AWS_ENDPOINT_URL_S3 and the usual credential variables."""
    import boto3
    from botocore.config import Config

    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    retries = Config(retries={"max_attempts": 8, "mode": "adaptive"})
    return boto3.client("s3", endpoint_url=endpoint, config=retries)


def download_s3_folder(uri: str) -> Path:
    """Download every object under `uri` into the cache once; a finished download is marked and reused."""
    parsed = urlparse(uri)
    bucket, prefix = parsed.netloc, parsed.path.strip("/")
    target = cache_root() / "s3" / bucket / prefix
    done_marker = target / ".vqbatch-complete"
    if done_marker.exists():
        return target
    client = s3_client()
    keys = [obj["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/")
            for obj in page.get("Contents", [])]
    if not keys:
        raise FileNotFoundError(f"no checkpoint files under {uri}")
    for key in keys:
        destination = target / key[len(prefix) + 1:]
        destination.parent.mkdir(parents=True, exist_ok=True)
        partial = destination.with_name(destination.name + ".partial")
        client.download_file(bucket, key, str(partial))
        partial.replace(destination)
    done_marker.touch()
    return target
