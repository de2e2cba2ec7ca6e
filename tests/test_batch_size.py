"""`compute.batch_size: auto`: the memory line, the batch it allows, the peak measurement, and the engine's probe."""

import os

import numpy as np
import pytest
import torch

from vqbatch import batch_size
from vqbatch.batch_size import (AUTO_BATCH_LIMIT, PROBE_BATCHES, PROBE_STEPS, MemoryLine, largest_batch,
                                measure_line, memory_share, peak_memory_bytes, probe_batch_size)
from vqbatch.config import ComputeConfig, JobConfig, validate_job_config
from vqbatch.engine import resolve_batch_size
from vqbatch.sampler import PipelineModel, build_model
from vqbatch.tiny import write_tiny_checkpoint

MIB, GIB = 2**20, 2**30
CPU = torch.device("cpu")


def job(model_uri: str, **compute) -> JobConfig:
    return validate_job_config({"input": {"paths": ["prompts.parquet"]},
                                "model": {"uri": model_uri, "compile": "default"},
                                "sampling": {"steps": 50, "timestep_spacing": "skip", "guidance_scale": 3.0},
                                "compute": compute, "output": {"uri": "out"}})


# ---------------------------------------------------------------- arithmetic


def test_line_through_two_peaks():
    line = MemoryLine.through((1, 4), (1 * GIB + 100 * MIB, 1 * GIB + 400 * MIB))
    assert line == MemoryLine(fixed_bytes=1 * GIB, per_image_bytes=100 * MIB)


@pytest.mark.parametrize("budget, expected", [
    (4 * GIB, 30),  # (4096 - 1024) MiB / 100 MiB = 30.7
    (1 * GIB + 100 * MIB, 1),  # exactly one image
    (1 * GIB + 99 * MIB, 1),  # not even one: the smallest batch, left to the out-of-memory splitting
    (512 * MIB, 1),  # less than the weights
    (1024 * GIB, AUTO_BATCH_LIMIT),  # room for thousands: capped
])
def test_largest_batch_that_fits_the_budget(budget, expected):
    assert largest_batch(MemoryLine(1 * GIB, 100 * MIB), budget) == expected


@pytest.mark.parametrize("per_image", [0.0, -3 * MIB])
def test_a_peak_that_does_not_grow_allows_the_limit(per_image):
    assert largest_batch(MemoryLine(1 * GIB, per_image), 2 * GIB, limit=64) == 64


@pytest.mark.parametrize("per_image", [0.0, -3 * MIB])
def test_a_peak_that_does_not_grow_but_exceeds_the_budget_gives_one(per_image):
    # a tiny model's resident peaks can even shrink from batch 1 to 4: the weights alone still decide
    assert largest_batch(MemoryLine(1 * GIB, per_image), 512 * MIB, limit=64) == 1


def test_a_cpu_actor_plans_for_its_share_of_the_node():
    cpus = len(os.sched_getaffinity(0))
    assert memory_share(CPU, ComputeConfig(cpus_per_actor=1)) == pytest.approx(1 / cpus)
    assert memory_share(CPU, ComputeConfig(cpus_per_actor=cpus + 4)) == 1.0


# ---------------------------------------------------------------- measuring


def allocate(mib: int) -> None:
    np.ones(mib * MIB, np.uint8)  # every page written, then freed


def test_peak_resident_memory_sees_a_freed_allocation():
    idle = peak_memory_bytes(lambda: None, CPU)
    busy = peak_memory_bytes(lambda: allocate(160), CPU)
    assert busy - idle >= 150 * MIB


def small_blocks(mib: int) -> list:
    return [np.ones(32 * 1024, np.uint8) for _ in range(32 * mib)]  # 32 KiB each: from the C heap, not mmap


def test_heap_memory_freed_earlier_does_not_hide_a_calls_growth():
    blocks, last = small_blocks(128), np.ones(32 * 1024, np.uint8)  # `last` keeps the heap from shrinking by itself
    del blocks  # 128 MiB free yet resident: without trimming, the next call would reuse it unseen
    idle = peak_memory_bytes(lambda: None, CPU)
    busy = peak_memory_bytes(lambda: small_blocks(128), CPU)
    assert busy - idle >= 100 * MIB
    del last


def test_measured_line_finds_the_bytes_per_image():
    line = measure_line(lambda prompts, seeds: allocate(48 * len(prompts)), CPU)
    assert line.per_image_bytes == pytest.approx(48 * MIB, rel=0.1)
    assert line.fixed_bytes > 0


# ---------------------------------------------------------------- the probe and the engine


class FakeModel:
    """Peaks at 1 GiB + 100 MiB per image (reported by the patched meter below), on the CPU."""

    device = "cpu"

    def __init__(self, model, sampling, batch_shape):
        self.built_with = (model, sampling)
        self.batches = []

    def reshaped(self, batch_shape):
        return self

    def sample(self, prompts, seeds):
        self.batches.append(len(prompts))


def test_probe_measures_the_actors_model_uncompiled_over_two_steps(monkeypatch):
    built = []

    def build(model, sampling, batch_shape, s3):
        assert s3 is config.s3  # the job's S3 settings reach model loading
        built.append(FakeModel(model, sampling, batch_shape))
        return built[-1]

    def fake_peak(call, device):
        call()
        return 1 * GIB + 100 * MIB * built[-1].batches[-1]

    monkeypatch.setattr(batch_size, "peak_memory_bytes", fake_peak)
    monkeypatch.setattr(batch_size, "device_memory_bytes", lambda device: 8 * GIB)
    config = job("some/model", batch_size="auto", memory_fraction=0.5, cpus_per_actor=10_000)  # share 1: 4 GiB
    assert probe_batch_size(config, build) == 30
    model, sampling = built[0].built_with
    assert model.compile is None and model.uri == "some/model"
    assert (sampling.steps, sampling.timestep_spacing, sampling.guidance_scale) == (PROBE_STEPS, "reference", 3.0)
    assert built[0].batches == list(PROBE_BATCHES)


def test_the_engine_routes_the_compile_mode_to_the_pipeline(tmp_path, monkeypatch):
    from vqbatch.pipeline import VQDiffusionPipeline

    modes = []
    monkeypatch.setattr(VQDiffusionPipeline, "compile_transformer", lambda pipe, mode: modes.append(mode))
    checkpoint = str(write_tiny_checkpoint(tmp_path / "tiny"))
    config = job(checkpoint)
    PipelineModel.load(config.model.model_copy(update={"compile": "reduce-overhead"}), config.sampling, 2)
    PipelineModel.load(config.model.model_copy(update={"compile": None}), config.sampling, 2)
    assert modes == ["reduce-overhead"]


def test_engine_resolves_auto_in_a_ray_task_with_the_tiny_model(local_ray, tmp_path):
    checkpoint = str(write_tiny_checkpoint(tmp_path / "tiny"))
    auto = job(checkpoint, batch_size="auto", memory_fraction=0.5)
    resolved = resolve_batch_size(auto, num_gpus=0.0)
    assert isinstance(resolved.compute.batch_size, int) and 1 <= resolved.compute.batch_size <= AUTO_BATCH_LIMIT
    assert resolved.model_copy(update={"compute": auto.compute}) == auto  # nothing else changed
    starved = job(checkpoint, batch_size="auto", memory_fraction=1e-6)  # under a kilobyte: below the weights
    assert resolve_batch_size(starved, num_gpus=0.0).compute.batch_size == 1
    fixed = job(checkpoint, batch_size=3)
    assert resolve_batch_size(fixed, num_gpus=0.0) is fixed


def test_noop_model_gets_the_limit():
    model = build_model(job("noop").model, job("noop").sampling, 1)
    assert probe_batch_size(job("noop", batch_size="auto"), lambda m, s, b, s3: model) == AUTO_BATCH_LIMIT
