"""One writer at a time: a run holds a lease on its output root from before Ray starts until it has published.

The lease is one small JSON object at `<output root>/_LEASE.json`: an owner token (host, process id and a random
part), when the run started and its last heartbeat. It is created only if it does not exist:

- local outputs: `os.open(..., O_CREAT | O_EXCL)`, which one process wins on any POSIX filesystem;
- S3 outputs: `PutObject` with `If-None-Match: *`, which S3 (and moto's server) refuses with 412 when the object
  exists.

A second run finds the lease and fails at once with a `LeaseHeld` error naming the holder. While it runs, the
holder rewrites its heartbeat every `HEARTBEAT_SECONDS`; a lease whose heartbeat is older than `STALE_SECONDS` (a
killed run), or whose holder ran on this host in a process that no longer exists, is taken over: locally by
renaming it away and checking that the renamed file was the stale one, on S3 by a `PutObject` with `If-Match` on
the stale object's ETag. Before publishing, the run checks that it still holds
the lease (`Lease.check`), so a run that stalled past the timeout and lost its lease publishes nothing.
"""

from __future__ import annotations

import json
import os
import posixpath
import socket
import threading
import time
import uuid
from datetime import datetime, timezone

from vqbatch.config import S3Config
from vqbatch.io.filesystems import is_s3, resolve, s3_client, split_s3_uri

LEASE_NAME = "_LEASE.json"
HEARTBEAT_SECONDS = 10.0  # how often the holder renews its lease
STALE_SECONDS = 120.0  # a lease without a heartbeat for this long belongs to a dead run and is taken over


class LeaseHeld(ValueError):
    """Another run holds the output's lease."""


def now() -> float:
    return time.time()


def iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, timezone.utc).isoformat(timespec="seconds")


class Lease:
    """The lease on one output root; a context manager: acquired on entry, renewed in a thread, released on exit."""

    def __init__(self, uri: str, s3: S3Config):
        self.store = S3LeaseStore(uri, s3) if is_s3(uri) else LocalLeaseStore(resolve(uri, s3)[1])
        self.uri = uri
        self.token = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.started = now()
        self.stopped = threading.Event()
        self.renewer: threading.Thread | None = None

    def record(self) -> bytes:
        return json.dumps({"owner": self.token, "host": socket.gethostname(), "pid": os.getpid(),
                           "started": iso(self.started), "heartbeat": now()}).encode("utf-8")

    def __enter__(self) -> "Lease":
        if not self.store.create(self.record()):
            self.take_over_if_stale()
        self.renewer = threading.Thread(target=self.renew, name="vqbatch-lease", daemon=True)
        self.renewer.start()
        return self

    def take_over_if_stale(self) -> None:
        current = self.store.read()
        if current is None:  # released between our attempt and the read: try once more
            if self.store.create(self.record()):
                return
            current = self.store.read()
        holder, version = current
        age = now() - float(holder.get("heartbeat", 0))
        stale = age >= STALE_SECONDS or died_on_this_host(holder)
        if not stale or not self.store.take_over(version, self.record()):
            raise LeaseHeld(f"output {self.uri} is being written by another run: {holder.get('owner')} (started "
                            f"{holder.get('started')}, last heartbeat {age:.0f} s ago); wait for it to finish, or, "
                            f"if it was killed, retry after its lease goes stale ({STALE_SECONDS:.0f} s without a "
                            f"heartbeat) or delete {LEASE_NAME} from the output")

    def renew(self) -> None:
        while not self.stopped.wait(HEARTBEAT_SECONDS):
            current = self.store.read()
            if current is None or current[0].get("owner") != self.token:
                return  # taken over: `check` fails before publishing
            self.store.renew(current[1], self.record())

    def check(self) -> None:
        """Raise `LeaseHeld` unless this run still holds the lease."""
        current = self.store.read()
        if current is None or current[0].get("owner") != self.token:
            holder = current[0].get("owner") if current else "nobody"
            raise LeaseHeld(f"this run lost its lease on {self.uri} (now held by {holder}) after its heartbeat "
                            f"stopped for {STALE_SECONDS:.0f} s; nothing was published, run it again")

    def __exit__(self, *_) -> None:
        self.stopped.set()
        if self.renewer is not None:
            self.renewer.join()
        current = self.store.read()
        if current is not None and current[0].get("owner") == self.token:
            self.store.delete(current[1])


class LocalLeaseStore:
    """The lease as a local file, created exclusively."""

    def __init__(self, root: str):
        self.path = os.path.join(root, LEASE_NAME)
        self.made_folder = False  # the output folder did not exist before the lease: released, it goes if empty

    def create(self, data: bytes) -> bool:
        if not os.path.isdir(os.path.dirname(self.path)):
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            self.made_folder = True
        try:
            descriptor = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(descriptor, "wb") as stream:
            stream.write(data)
        return True

    def read(self) -> tuple[dict, str] | None:
        """The lease's record and its version (here: the record's own owner and heartbeat), or None."""
        try:
            with open(self.path, "rb") as stream:
                data, modified = stream.read(), os.fstat(stream.fileno()).st_mtime
        except FileNotFoundError:
            return None
        return parse_record(data, modified), data.decode("utf-8", errors="replace")

    def hidden_temporary(self) -> str:
        folder, name = os.path.split(self.path)
        return os.path.join(folder, f".{name}.{uuid.uuid4().hex}.tmp")

    def renew(self, version: str, data: bytes) -> None:
        """The holder's heartbeat: the new record renamed over the lease, so the file never goes missing."""
        temporary = self.hidden_temporary()
        with open(temporary, "wb") as stream:
            stream.write(data)
        os.replace(temporary, self.path)

    def take_over(self, version: str, data: bytes) -> bool:
        """Replace a stale lease only if it still holds `version`: one contender wins the move aside, and a lease
        that changed in between is put back."""
        if not self.move_aside_if(version):
            return False
        return self.create(data)

    def delete(self, version: str) -> None:
        self.move_aside_if(version)
        if self.made_folder:
            try:
                os.rmdir(os.path.dirname(self.path))  # a run refused before writing leaves no folder behind
            except OSError:  # the run wrote into it
                pass

    def move_aside_if(self, version: str) -> bool:
        """Remove the lease if it holds `version`; True when removed."""
        aside = self.hidden_temporary()
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return False
        with open(aside, "rb") as stream:
            moved = stream.read().decode("utf-8", errors="replace")
        if moved != version:
            try:
                os.link(aside, self.path)  # put it back, unless a new lease was created meanwhile
            except FileExistsError:
                pass
        os.unlink(aside)
        return moved == version


class S3LeaseStore:
    """The lease as an S3 object, created with `If-None-Match: *` and replaced with `If-Match: <ETag>`."""

    def __init__(self, uri: str, s3: S3Config):
        self.client = s3_client(s3)
        self.bucket, prefix = split_s3_uri(uri)
        self.key = f"{prefix}/{LEASE_NAME}" if prefix else LEASE_NAME

    def create(self, data: bytes) -> bool:
        return self.put(data, IfNoneMatch="*")

    def read(self) -> tuple[dict, str] | None:
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=self.key)
        except self.client.exceptions.NoSuchKey:
            return None
        return parse_record(response["Body"].read(), response["LastModified"].timestamp()), response["ETag"]

    def renew(self, version: str, data: bytes) -> None:
        self.put(data, IfMatch=version)

    def take_over(self, version: str, data: bytes) -> bool:
        return self.put(data, IfMatch=version)

    def delete(self, version: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self.key)

    def put(self, data: bytes, **condition: str) -> bool:
        """Whether the conditional write took place; a ValueError naming the output when it cannot be written."""
        from botocore.exceptions import ClientError

        try:
            self.client.put_object(Bucket=self.bucket, Key=self.key, Body=data, **condition)
        except ClientError as error:
            code = error.response.get("Error", {}).get("Code")
            if code in ("PreconditionFailed", "ConditionalRequestConflict", "412", "409"):
                return False
            raise ValueError(f"output.uri: s3://{self.bucket}/{posixpath.dirname(self.key)} cannot be written "
                             f"({code}: {error.response.get('Error', {}).get('Message')}); check that the bucket "
                             "exists and that the s3 settings' credentials may write to it") from None
        return True


def died_on_this_host(holder: dict) -> bool:
    """Whether the lease's holder ran on this machine in a process that is gone (a killed run)."""
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return False
    try:
        os.kill(holder["pid"], 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # it exists, under another user
    return False


def parse_record(data: bytes, modified: float) -> dict:
    """The lease's record; one that does not read (a local lease between its creation and its first write, or a
    damaged one), or whose heartbeat is not a number, counts as beating when its file was last written (`modified`,
    in seconds)."""
    try:
        record = json.loads(data)
    except ValueError:
        record = None
    if not isinstance(record, dict):
        record = {"owner": "an unreadable lease"}
    if not isinstance(record.get("heartbeat"), (int, float)):
        record["heartbeat"] = modified
    return record
