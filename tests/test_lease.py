"""One writer at a time: the output lease on local files and on moto's S3 server over HTTP."""

import json
import socket
import subprocess
import sys
import time

import boto3
import pytest

from vqbatch.config import S3Config
from vqbatch.io.lease import STALE_SECONDS, Lease, LeaseHeld


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def s3_server():
    """A moto S3 server on loopback; nothing in the environment points at it: the settings are the config's."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


def test_a_held_lease_names_its_holder_and_a_stale_or_dead_one_is_taken_over(tmp_path, s3_server):
    settings = {"endpoint_url": s3_server, "access_key_id": "key", "secret_access_key": "secret",
                "region": "us-east-1"}
    boto3.client("s3", endpoint_url=s3_server, aws_access_key_id="key", aws_secret_access_key="secret",
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
