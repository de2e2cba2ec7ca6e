"""Test-wide settings (one torch thread per process, so tests, Ray workers and servers share the cores fairly) and
shared fixtures."""

import os
import socket

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402  (the thread count must be set before torch starts its pool)

torch.set_num_threads(1)


@pytest.fixture
def offline_hub(monkeypatch, tmp_path):
    """The Hugging Face hub switched off and vqbatch's cache empty: returns the folder hub snapshots are read from."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read once at import
    monkeypatch.setenv("VQBATCH_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "hub"


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def s3_endpoint(monkeypatch, tmp_path):
    """A moto S3 server on loopback, the AWS_* variables pointing boto3 at it, and an empty checkpoint cache."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    for name, value in {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
                        "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                        "VQBATCH_CACHE": str(tmp_path / "cache")}.items():
        monkeypatch.setenv(name, value)
    yield
    server.stop()
