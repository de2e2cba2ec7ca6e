"""Local and S3 filesystems (pyarrow) behind one `(filesystem, path)` pair, and atomic whole-file writes.

An `s3://bucket/key` URI maps to an `S3FileSystem` and the path `bucket/key`; anything else is a local path.
Endpoint, region and credentials come from `S3Config` fields, else the usual AWS environment variables.
"""

from __future__ import annotations

import os
import posixpath
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from urllib.parse import urlparse

import pyarrow.fs as pafs

from vqbatch.config import OutputConfig, S3Config

S3_SCHEME = "s3://"
UPLOAD_THREADS = 8  # S3 uploads at once per `write_files_atomically` call: enough to hide the network's latency
UPLOAD_CHUNK = 64  # files per thread task: a task per file would cost more than uploading a tiny file


def is_s3(uri: str) -> bool:
    return uri.startswith(S3_SCHEME)


def resolve(uri: str, s3: S3Config) -> tuple[pafs.FileSystem, str]:
    """The filesystem holding `uri` and the path of `uri` inside it."""
    if is_s3(uri):
        return s3_filesystem(s3), uri[len(S3_SCHEME):].rstrip("/")
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))


def to_uri(filesystem: pafs.FileSystem, path: str) -> str:
    """The URI a user would write for `path` in `filesystem` (the inverse of `resolve`)."""
    return S3_SCHEME + path if isinstance(filesystem, pafs.S3FileSystem) else path


def s3_settings(s3: S3Config) -> dict:
    """Endpoint, region and credentials: each `S3Config` field, else its AWS environment variable; None when unset.
    Every S3 client of vqbatch (input, output, model download, rerun, verify) is built from these."""
    return {
        "endpoint": s3.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL"),
        "region": s3.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
        "access_key": secret(s3.access_key_id) or os.environ.get("AWS_ACCESS_KEY_ID"),
        "secret_key": secret(s3.secret_access_key) or os.environ.get("AWS_SECRET_ACCESS_KEY"),
        "session_token": secret(s3.session_token) or os.environ.get("AWS_SESSION_TOKEN"),
    }


def s3_filesystem(s3: S3Config) -> pafs.S3FileSystem:
    settings = s3_settings(s3)
    options = dict(region=settings["region"], retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=8))
    if settings["endpoint"]:
        parsed = urlparse(settings["endpoint"] if "://" in settings["endpoint"] else f"https://{settings['endpoint']}")
        options.update(scheme=parsed.scheme, endpoint_override=parsed.netloc)
    if settings["access_key"]:  # else let the AWS SDK find credentials (profile, instance role)
        options.update(access_key=settings["access_key"], secret_key=settings["secret_key"],
                       session_token=settings["session_token"])
    return pafs.S3FileSystem(**options)


def s3_client(s3: S3Config):
    """A boto3 S3 client with the same settings as `s3_filesystem`, for what pyarrow cannot do: objects' checksums
    (`ETag`) and conditional writes (`If-None-Match`)."""
    import boto3
    from botocore.config import Config

    settings = s3_settings(s3)
    endpoint = settings["endpoint"]
    if endpoint and "://" not in endpoint:
        endpoint = f"https://{endpoint}"
    credentials = ({"aws_access_key_id": settings["access_key"], "aws_secret_access_key": settings["secret_key"],
                    "aws_session_token": settings["session_token"]} if settings["access_key"] else {})
    return boto3.client("s3", endpoint_url=endpoint, region_name=settings["region"],
                        config=Config(retries={"max_attempts": 8, "mode": "adaptive"}), **credentials)


def split_s3_uri(uri: str) -> tuple[str, str]:
    """`s3://bucket/some/prefix/` -> ("bucket", "some/prefix")."""
    bucket, _, prefix = uri[len(S3_SCHEME):].partition("/")
    return bucket, prefix.strip("/")


def secret(value) -> str | None:
    return value.get_secret_value() if value is not None else None


def write_bytes_atomically(filesystem: pafs.FileSystem, path: str, data: bytes) -> None:
    """Write a whole file so that readers see either nothing or all of it.

    Locally: write a hidden temporary file next to `path`, then rename it over `path`.
    On S3 an object only becomes visible once its upload completes, so it is written in place.
    """
    make_local_folder(filesystem, posixpath.dirname(path))
    write_into_folder(filesystem, path, data, uuid.uuid4().hex)


def write_files_atomically(filesystem: pafs.FileSystem, paths: Sequence[str], contents: Callable[[int], bytes]) -> None:
    """`write_bytes_atomically` for many files: file `paths[i]` gets the bytes `contents(i)`.

    Each folder is created once. Local files are written one after another: creating a file is CPU work in the
    kernel, and threads only contend for it (measured: more CPU per file, no shorter wall time). S3 uploads wait on
    the network, so `UPLOAD_THREADS` threads make and upload the files, `UPLOAD_CHUNK` at a time.
    """
    for folder in sorted({posixpath.dirname(path) for path in paths}):
        make_local_folder(filesystem, folder)
    token = uuid.uuid4().hex  # one per call: temporary names stay unique across writers and retries

    def write_chunk(start: int) -> None:
        for index in range(start, min(start + UPLOAD_CHUNK, len(paths))):
            write_into_folder(filesystem, paths[index], contents(index), f"{token}{start}")

    chunks = range(0, len(paths), UPLOAD_CHUNK)
    if isinstance(filesystem, pafs.LocalFileSystem):
        for start in chunks:
            write_chunk(start)
        return
    with ThreadPoolExecutor(UPLOAD_THREADS) as pool:
        for _ in pool.map(write_chunk, chunks):
            pass  # re-raises a failed chunk's error


def make_local_folder(filesystem: pafs.FileSystem, folder: str) -> None:
    """S3 has no folders: an object's key is its whole path."""
    if isinstance(filesystem, pafs.LocalFileSystem):
        filesystem.create_dir(folder, recursive=True)


def write_into_folder(filesystem: pafs.FileSystem, path: str, data: bytes, token: str) -> None:
    """Write one whole file into an existing folder (see `write_bytes_atomically`); `token` makes the temporary
    name unique. Local files go through `os` directly: a third of pyarrow's cost per small file."""
    if isinstance(filesystem, pafs.LocalFileSystem):
        folder, name = posixpath.split(path)
        temporary = posixpath.join(folder, f".{name}.{token}.tmp")
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o666)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(descriptor, view):]
        finally:
            os.close(descriptor)
        os.replace(temporary, path)
    else:
        with filesystem.open_output_stream(path) as stream:
            stream.write(data)


def read_bytes(filesystem: pafs.FileSystem, path: str) -> bytes:
    with filesystem.open_input_stream(path) as stream:
        return stream.read()


def exists(filesystem: pafs.FileSystem, path: str) -> bool:
    return filesystem.get_file_info(path).type != pafs.FileType.NotFound


def list_files(filesystem: pafs.FileSystem, folder: str, recursive: bool = True, hidden: bool = False) -> list[str]:
    """Every file under `folder` (recursively, or only its own files), sorted; hidden (`.`) and marker (`_`) files
    left out unless `hidden`."""
    if filesystem.get_file_info(folder).type != pafs.FileType.Directory:
        return []
    selector = pafs.FileSelector(folder, recursive=recursive)
    return sorted(info.path for info in filesystem.get_file_info(selector) if info.type == pafs.FileType.File
                  and (hidden or not posixpath.basename(info.path).startswith((".", "_"))))


@dataclass(frozen=True)
class OutputRoot:
    filesystem: pafs.FileSystem
    root: str

    @classmethod
    def of(cls, output: OutputConfig, s3: S3Config) -> "OutputRoot":
        return cls(*resolve(output.uri, s3))

    def path(self, relative: str) -> str:
        return posixpath.join(self.root, relative)


def inside_root(relative: str, location: OutputRoot) -> str:
    """`relative` when it names a path inside the output root: relative, normalized, no `..`, no NUL or backslash;
    a ValueError otherwise (an edited or damaged manifest or metadata row must not make vqbatch read, repair or
    delete files elsewhere: an absolute path, `../other`, another bucket)."""
    if (not isinstance(relative, str) or not relative or relative.startswith("/") or "\\" in relative
            or "\x00" in relative or "://" in relative or posixpath.normpath(relative) != relative
            or relative.split("/")[0] == ".."):
        raise ValueError(f"the dataset at {location.root} names {relative!r}, which is not a path inside its output "
                         "root; allowed: paths relative to the root, without '..'. The manifest or a metadata file "
                         "was edited or damaged: restore it, or regenerate the dataset")
    return relative
