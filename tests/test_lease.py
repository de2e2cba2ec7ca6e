"""One writer at a time: the output lease on local files and on moto's S3 server over HTTP."""

import json
import os
import socket
import subprocess
import sys
import time

import boto3
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray

from vqbatch.config import S3Config, load_job_config
from vqbatch.engine import run_job
from vqbatch.io.lease import LEASE_NAME, STALE_SECONDS, Lease, LeaseHeld


def test_a_held_lease_names_its_holder_and_a_stale_or_dead_one_is_taken_over(tmp_path, moto_server):
    settings = {"endpoint_url": moto_server, "access_key_id": "key", "secret_access_key": "secret",
                "region": "us-east-1"}
    boto3.client("s3", endpoint_url=moto_server, aws_access_key_id="key", aws_secret_access_key="secret",
                 region_name="us-east-1").create_bucket(Bucket="leases")
    for uri, s3 in ((str(tmp_path / "out"), S3Config()), ("s3://leases/out", S3Config(**settings))):
        with Lease(uri, s3) as first:
            with pytest.raises(LeaseHeld, match=f"being written by another run: {first.token}"):
                Lease(uri, s3).__enter__()
            first.check()
        stale = Lease(uri, s3)
        stale.store.create(json.dumps({"owner": "dead-run", "heartbeat": time.time() - STALE_SECONDS - 1}).encode())
        with Lease(uri, s3) as taker:
            taker.check()
        assert stale.store.read() is None  # released
        finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                                  text=True, check=True)
        killed = {"owner": "killed-run", "host": socket.gethostname(), "pid": int(finished.stdout),
                  "heartbeat": time.time()}
        stale.store.create(json.dumps(killed).encode())  # a fresh heartbeat, but its process is gone
        with Lease(uri, s3) as taker:
            taker.check()
            stale.store.renew(stale.store.read()[1], json.dumps({"owner": "intruder", "heartbeat": 0}).encode())
            with pytest.raises(LeaseHeld, match="lost its lease"):
                taker.check()


def test_a_lease_that_does_not_read_yet_is_held_until_its_file_goes_stale(tmp_path, moto_server):
    settings = {"endpoint_url": moto_server, "access_key_id": "key", "secret_access_key": "secret",
                "region": "us-east-1"}
    client = boto3.client("s3", endpoint_url=moto_server, aws_access_key_id="key", aws_secret_access_key="secret",
                          region_name="us-east-1")
    client.create_bucket(Bucket="unread-leases")
    client.put_object(Bucket="unread-leases", Key=f"out/{LEASE_NAME}", Body=b"")
    output = tmp_path / "out"
    output.mkdir()
    (output / LEASE_NAME).write_bytes(b"")  # another run's lease between its exclusive creation and its write
    for uri, s3 in ((str(output), S3Config()), ("s3://unread-leases/out", S3Config(**settings))):
        with pytest.raises(LeaseHeld, match="another run: an unreadable lease"):
            Lease(uri, s3).__enter__()
    (output / LEASE_NAME).write_text(json.dumps({"owner": "hand-written", "heartbeat": "2020-01-01T00:00:00"}))
    with pytest.raises(LeaseHeld, match="another run: hand-written"):  # its heartbeat: when the file was written
        Lease(str(output), S3Config()).__enter__()
    written = time.time() - STALE_SECONDS - 1
    os.utime(output / LEASE_NAME, (written, written))  # nothing wrote it for longer than the timeout
    with Lease(str(output), S3Config()) as taker:
        taker.check()


def test_an_s3_output_that_cannot_be_written_is_refused_before_ray_starts(tmp_path, moto_server):
    pq.write_table(pa.table({"id": ["a"], "prompt": ["a red circle"]}), tmp_path / "prompts.parquet")
    config = load_job_config(None, {"input.paths": [str(tmp_path / "prompts.parquet")], "model.uri": "noop",
                                    "output.uri": "s3://no-such-bucket/out", "s3.endpoint_url": moto_server,
                                    "s3.access_key_id": "key", "s3.secret_access_key": "secret",
                                    "s3.region": "us-east-1"})
    with pytest.raises(ValueError, match=r"s3://no-such-bucket/out cannot be written \(NoSuchBucket: "):
        run_job(config)
    assert not ray.is_initialized()
