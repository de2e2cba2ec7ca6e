"""Faults while running: rows that fail alone, out-of-memory batches split in halves, an actor killed mid-run."""

import os
import signal
import threading
import time

import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import ray_started_locally
from vqbatch.config import S3Config, load_job_config
from vqbatch.engine import run_job
from vqbatch.faults import ResilientSampler
from vqbatch.io.dataset import OutputRoot, read_metadata
from vqbatch.io.filesystems import resolve
from vqbatch.sampler import PipelineModel
from vqbatch.tiny import write_tiny_checkpoint

SAMPLING = {"steps": 3, "guidance_scale": 3.0, "truncation_rate": 0.9}
PROMPTS = ["a red circle", "a blue square", "a green triangle", "two cats", "a dog on the beach", "a yellow star",
           "the moon at night", "a pink heart"]
SEEDS = [11, 12, 13, 14, 15, 16, 17, 18]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return str(write_tiny_checkpoint(tmp_path_factory.mktemp("model") / "tiny", seed=0))


@pytest.fixture(scope="module")
def model(tiny_model):
    config = load_job_config(None, {"input.paths": "x", "model.uri": tiny_model, "output.uri": "o",
                                    **{f"sampling.{key}": value for key, value in SAMPLING.items()}})
    return PipelineModel.load(config.model, config.sampling, len(PROMPTS))


@pytest.fixture(scope="module")
def expected_tokens(model):
    tokens, _ = model.sample(PROMPTS, SEEDS)  # the whole batch in one call
    return tokens.tolist()


def failing_when(model, fails):
    """The real model's sample function, raising `fails(prompts)` (an exception or None) before it samples."""
    calls = []

    def sample(prompts, seeds):
        calls.append(len(prompts))
        error = fails(prompts)
        if error is not None:
            raise error
        tokens, _ = model.sample(prompts, seeds)
        return tokens.tolist()
    return sample, calls


# ---------------------------------------------------------------- one actor's sampler, exceptions at the model call

def test_out_of_memory_halves_the_batch_and_keeps_every_rows_tokens(model, expected_tokens):
    sample, calls = failing_when(model, lambda prompts: MemoryError("no room") if len(prompts) > 2 else None)
    sampler = ResilientSampler(sample)
    outcomes = sampler(PROMPTS, SEEDS)
    assert [outcome.error for outcome in outcomes] == [None] * 8
    assert [outcome.value for outcome in outcomes] == expected_tokens
    assert calls == [8, 4, 2, 2, 2, 2] and sampler.max_batch == 2
    sampler(PROMPTS[:3], SEEDS[:3])  # later batches start at the size that fitted
    assert calls[6:] == [2, 1]


def test_a_single_image_out_of_memory_becomes_an_error_row(model, expected_tokens):
    sample, _ = failing_when(model, lambda prompts: MemoryError("no room") if "two cats" in prompts else None)
    outcomes = ResilientSampler(sample)(PROMPTS[:4], SEEDS[:4])
    assert outcomes[3].value is None and outcomes[3].error.startswith("out of memory on a single image (MemoryError")
    assert [outcome.value for outcome in outcomes[:3]] == expected_tokens[:3]


def test_a_row_that_fails_alone_becomes_an_error_and_the_batch_goes_on(model, expected_tokens):
    sample, calls = failing_when(
        model, lambda prompts: ValueError("tokenizer rejects 'a yellow star'") if "a yellow star" in prompts else None)
    outcomes = ResilientSampler(sample)(PROMPTS, SEEDS)
    assert outcomes[5].error == "ValueError: tokenizer rejects 'a yellow star'" and outcomes[5].value is None
    assert [o.value for i, o in enumerate(outcomes) if i != 5] == [t for i, t in enumerate(expected_tokens) if i != 5]
    assert calls == [8] + [1] * 8


def test_a_batch_whose_rows_all_fail_alone_raises_its_own_error(model):
    sample, _ = failing_when(model, lambda prompts: RuntimeError("the model is broken"))
    with pytest.raises(RuntimeError, match="the model is broken"):
        ResilientSampler(sample)(PROMPTS[:3], SEEDS[:3])


# ---------------------------------------------------------------- an actor process killed mid-run, on local Ray

def sampler_actor_pids() -> set[int]:
    """The live worker processes of this test's Ray (it started them: its descendants) running the SampleBatches
    actor (Ray titles them after the class); other Ray instances on the machine are left alone."""
    pids = set()
    for process in psutil.Process().children(recursive=True):
        try:
            if "SampleBatches" in " ".join(process.cmdline()):
                pids.add(process.pid)
        except psutil.NoSuchProcess:
            pass
    return pids


def test_an_actor_killed_mid_run_is_replaced_and_every_row_lands_once(tiny_model, tmp_path):
    ids = [f"row{i:02d}" for i in range(24)]
    pq.write_table(pa.table({"id": ids, "prompt": [PROMPTS[i % 8] for i in range(24)]}), tmp_path / "in.parquet")
    config = load_job_config(None, {"input.paths": str(tmp_path / "in.parquet"), "model.uri": tiny_model,
                                    "output.uri": str(tmp_path / "out"), "sampling.steps": 100,
                                    "compute.batch_size": 2, "output.rows_per_file": 2})
    progress, outcome = [], {}
    with ray_started_locally():
        job = threading.Thread(target=lambda: outcome.update(
            summary=run_job(config, on_progress=progress.append, progress_every=0.05)))
        job.start()
        killed = kill_sampler_while_it_samples(progress, job)
        job.join(timeout=300)
        assert not job.is_alive(), "the job did not finish after its actor was killed"
        assert not psutil.pid_exists(killed) or psutil.Process(killed).status() == psutil.STATUS_ZOMBIE
    rows = read_metadata(OutputRoot(*resolve(str(tmp_path / "out"), S3Config()))).to_pylist()
    assert sorted(row["id"] for row in rows) == ids  # every row exactly once
    assert all(row["status"] == "ok" for row in rows) and outcome["summary"].ok == 24
    # the killed actor itself came back (same Ray actor, a new process), not only a replacement from the pool
    assert outcome["summary"].actor_restarts >= 1


def kill_sampler_while_it_samples(progress: list, job: threading.Thread) -> int:
    """SIGKILL the sampling actor's process once it has sampled a batch and before it has sampled them all. The 24
    rows are one block, which the actor hands on only when every row is sampled, so no metadata file is written yet:
    no time is guessed, the ledger's count (ticked every 0.05 s) says when sampling is under way."""
    deadline = time.monotonic() + 300
    while not any(0 < report.images_done < report.images_total for report in progress):
        assert job.is_alive(), "the job finished before the actor could be killed"
        assert time.monotonic() < deadline, "the actor sampled nothing in 300 s"
        time.sleep(0.02)
    pids = sampler_actor_pids()
    assert pids, "no SampleBatches actor runs"
    killed = min(pids)
    os.kill(killed, signal.SIGKILL)
    return killed
