"""Test-wide settings (one torch thread per process, so tests, Ray workers and servers share the cores fairly) and
shared fixtures."""

import contextlib
import os
import socket
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
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


@pytest.fixture(scope="module")
def moto_server():
    """A moto S3 server on loopback for one test module: its endpoint URL; nothing in the environment points at it."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture(scope="module")
def s3_endpoint(moto_server, tmp_path_factory):
    """The module's moto S3 server with the AWS_* variables pointing boto3 and pyarrow at it, and an empty checkpoint
    cache: its endpoint URL."""
    with pytest.MonkeyPatch.context() as patch:
        for name, value in {"AWS_ENDPOINT_URL": moto_server, "AWS_ACCESS_KEY_ID": "testing",
                            "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                            "VQBATCH_CACHE": str(tmp_path_factory.mktemp("cache"))}.items():
            patch.setenv(name, value)
        yield moto_server


@contextlib.contextmanager
def ray_started_locally():
    """A fresh local Ray on two CPUs for the block (one torch thread per worker), shut down after it."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=256 * 2**20,
             runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}})
    try:
        yield
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def local_ray():
    """A fresh local Ray for one test module."""
    with ray_started_locally():
        yield


def published_dataset(folder, output_format: str, statuses: list[str], images: list[np.ndarray] | None = None,
                      prompts: list[str] | None = None, s3: dict | None = None) -> list[np.ndarray | None]:
    """A dataset of the no-op model in `output_format` at `folder` (an s3:// one with the job's `s3` settings),
    written without Ray by the engine's own writer functions, one row per status: ok rows hold `images` (default:
    noise) and `prompts`; the others the error 'prompt is empty'. Returns each row's pixels (None on errors)."""
    from vqbatch.config import JobConfig
    from vqbatch.io.dataset import prepare_output, publish
    from vqbatch.io.formats import sampled_table, write_shard
    from vqbatch.io.prompts import IMAGE_ROW_SCHEMA

    config = JobConfig(input={"paths": ["unused.parquet"]}, model={"uri": "noop"},
                       output={"uri": str(folder), "format": output_format}, s3=s3 or {})
    images = images or [np.random.default_rng(i).integers(0, 256, (16, 16, 3), np.uint8) for i in range(len(statuses))]
    prompts = prompts or [f"prompt {i} <&>" if status == "ok" else " " for i, status in enumerate(statuses)]
    rows = pa.Table.from_pylist([dict(id=f"r{i}", prompt=prompt, image_index=0, seed=i, status=status,
                                      error=None if status == "ok" else "prompt is empty")
                                 for i, (prompt, status) in enumerate(zip(prompts, statuses))], schema=IMAGE_ROW_SCHEMA)
    pixels = [image if status == "ok" else None for image, status in zip(images, statuses)]
    tokens = [[i] if status == "ok" else None for i, status in enumerate(statuses)]
    publish(prepare_output(config.output, config.s3), [write_shard(sampled_table(rows, tokens, pixels), config)], [],
            config)
    return pixels


SMALL_DATASET_OK = 11  # rows of `small_dataset` with an image; two more are error rows


@pytest.fixture(scope="session")
def small_dataset(tmp_path_factory):
    """The output folder of a small dataset the engine generated on a fresh local Ray with the tiny model (png):
    11 ok rows, one with an id and a prompt that HTML and file names must escape, and 2 error rows."""
    import ray

    from vqbatch.config import load_job_config
    from vqbatch.engine import run_job
    from vqbatch.tiny import write_tiny_checkpoint

    root = tmp_path_factory.mktemp("small-dataset")
    model = write_tiny_checkpoint(root / "tiny", seed=0)
    ids = [f"p{i}" for i in range(10)] + ["odd/id <&>", "blank", "null"]
    prompts = [f"a small red circle number {i}" for i in range(10)] + ['a <b>red</b> circle & "friends"', "  ", None]
    pq.write_table(pa.table({"id": ids, "prompt": pa.array(prompts, pa.string())}), root / "in.parquet")
    config = load_job_config(None, {"input.paths": str(root / "in.parquet"), "model.uri": str(model),
                                    "output.uri": str(root / "out"), "sampling.steps": 2, "compute.batch_size": 4,
                                    "output.rows_per_file": 5, "compute.gpus_per_actor": 0})
    with contextlib.nullcontext() if ray.is_initialized() else ray_started_locally():
        assert run_job(config).ok == SMALL_DATASET_OK
    return root / "out"
