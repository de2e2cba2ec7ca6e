"""The batch size chosen from memory (`compute.batch_size: auto`), measured rather than guessed.

A probe loads the model as an actor does and samples two small batches the way an actor does (two denoising
steps, then the images decoded), each at its own batch shape, measuring each call's peak memory: the CUDA
allocator's peak on a GPU, the process's peak resident set (Linux's VmHWM) on a CPU. The two peaks fix a line,

    peak bytes = fixed + per_image x batch            (fixed: weights, the decoder, the runtime)

and the batch size is the largest whose peak stays within the actor's budget,

    budget = memory_fraction x device memory x share
    share  = min(1, gpus_per_actor) on a GPU; cpus_per_actor / the node's CPUs on a CPU (actors share host memory)

at least 1 and at most `AUTO_BATCH_LIMIT`. The number of steps does not change the peak: each step frees the last.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vqbatch.config import ComputeConfig, JobConfig, ModelConfig, S3Config, SamplingConfig

PROBE_BATCHES = (1, 4)  # the line's two points; 4 images keep the difference far above the allocator's noise
PROBE_STEPS = 2  # t = 1, a full posterior step, and t = 0, the last step's shortcut
PROBE_PROMPT = "a probe of the memory one batch needs"
AUTO_BATCH_LIMIT = 256  # the largest batch auto picks, however much memory is left


@dataclass(frozen=True)
class MemoryLine:
    """Peak bytes of sampling a batch, as a function of its size."""

    fixed_bytes: float
    per_image_bytes: float

    @classmethod
    def through(cls, batches: tuple[int, int], peaks: tuple[int, int]) -> "MemoryLine":
        (small, large), (small_peak, large_peak) = batches, peaks
        per_image = (large_peak - small_peak) / (large - small)
        return cls(small_peak - per_image * small, per_image)


def largest_batch(line: MemoryLine, budget_bytes: float, limit: int = AUTO_BATCH_LIMIT) -> int:
    """The largest batch in [1, limit] whose peak fits `budget_bytes`; 1 when none does, `limit` when the peak
    does not grow with the batch (no activations worth measuring, e.g. the no-op model) and fits."""
    if line.fixed_bytes > budget_bytes:
        return 1
    if line.per_image_bytes <= 0:
        return limit
    fitting = int((budget_bytes - line.fixed_bytes) // line.per_image_bytes)
    return max(1, min(limit, fitting))


# ---------------------------------------------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------------------------------------------

def peak_memory_bytes(call: Callable[[], Any], device: torch.device) -> int:
    """Peak bytes while `call()` runs: the CUDA allocator's peak on `device`, or the process's peak resident set."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        call()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device)
    if device.type != "cpu":
        raise ValueError(f"batch_size auto measures memory on cpu or cuda devices, got {device}")
    reset_peak_resident()
    call()
    return peak_resident_bytes()


PROC_STATUS, PROC_CLEAR_REFS = Path("/proc/self/status"), Path("/proc/self/clear_refs")


def reset_peak_resident() -> None:
    """Start a new peak: Linux resets VmHWM to the current resident set when "5" is written to clear_refs.

    The C heap's free memory goes back to the system first (glibc's malloc_trim): kept resident, it would serve the
    next call's allocations unseen, and a larger batch would seem to need no more memory than a smaller one.
    """
    if not PROC_CLEAR_REFS.exists():
        raise ValueError("batch_size auto on a CPU reads the peak resident memory from Linux's /proc; this system "
                         "has none: set compute.batch_size to a number")
    release_free_heap()
    PROC_CLEAR_REFS.write_text("5")


def release_free_heap() -> None:
    libc_name = ctypes.util.find_library("c")
    malloc_trim = getattr(ctypes.CDLL(libc_name), "malloc_trim", None) if libc_name else None
    if malloc_trim is not None:  # glibc; other C libraries have no such call
        malloc_trim(0)


def peak_resident_bytes() -> int:
    match = re.search(r"^VmHWM:\s+(\d+) kB", PROC_STATUS.read_text(), re.MULTILINE)
    assert match, "every Linux /proc/<pid>/status has VmHWM"
    return int(match.group(1)) * 1024


def measure_line(sample: Callable[[list[str], list[int]], Any], device: torch.device) -> MemoryLine:
    """The memory line of `sample(prompts, seeds)` from its peaks at `PROBE_BATCHES` images (smallest first)."""
    peaks = tuple(peak_memory_bytes(lambda: sample([PROBE_PROMPT] * batch, list(range(batch))), device)
                  for batch in PROBE_BATCHES)
    return MemoryLine.through(PROBE_BATCHES, peaks)


def device_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def memory_share(device: torch.device, compute: ComputeConfig) -> float:
    """The part of the device's memory one actor may plan for: its part of the GPU, or of the node's CPUs."""
    if device.type == "cuda":
        return min(1.0, compute.gpus_per_actor or 1.0)
    return min(1.0, compute.cpus_per_actor / len(os.sched_getaffinity(0)))


def memory_budget(device: torch.device, compute: ComputeConfig) -> float:
    return compute.memory_fraction * device_memory_bytes(device) * memory_share(device, compute)


# ---------------------------------------------------------------------------------------------------------------
# The probe
# ---------------------------------------------------------------------------------------------------------------

# Builds the actor's model (`vqbatch.sampler.build_model`): it has `sample(prompts, seeds)`, `reshaped(batch_shape)`
# and a `device`.
ModelBuilder = Callable[[ModelConfig, SamplingConfig, int, S3Config], Any]


def probe_batch_size(config: JobConfig, build_model: ModelBuilder) -> int:
    """The batch size for `config`'s model on this process's device; run where an actor would run.

    The probe samples uncompiled (a compiled forward would compile for each probe batch first) and with the
    reference schedule of `PROBE_STEPS` steps; the sampling settings that shape memory (guidance) are the job's.
    """
    model = build_model(config.model.model_copy(update={"compile": None}),
                        config.sampling.model_copy(update={"steps": PROBE_STEPS, "timestep_spacing": "reference"}),
                        max(PROBE_BATCHES), config.s3)
    device = torch.device(model.device)
    line = measure_line(lambda prompts, seeds: model.reshaped(len(prompts)).sample(prompts, seeds), device)
    return largest_batch(line, memory_budget(device, config.compute))
