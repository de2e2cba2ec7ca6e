"""`gpu`: one Ray-free command for a GPU machine (written for an H200): correctness on the device, speed, memory.

    python -m benchmarks.run gpu                              # cuda, ITHQ size, float16 and bfloat16, batch 1/8/32
    python -m benchmarks.run gpu --device cpu --size small    # the CPU smoke run

(a) tests       the tests marked `gpu` (`pytest -m gpu tests/test_gpu.py`): CUDA parity with diffusers in float32 with
                CUDA generators, a CPU generator driving a CUDA model, categorical noise equal on CPU and GPU.
(b) speed       random weights of the `--size` architecture, guidance 5, truncation 0.86: per dtype and batch size,
                vqbatch (the engine's sampler: categorical noise from per-image CPU generators, decodes of
                `DECODE_BATCH`) and diffusers' pipeline (one CUDA generator). Each is timed at two step counts, so
                seconds = fixed + steps x per step; images/s is for a 100-step image. Model FLOP utilisation =
                the transformer's FLOPs per step (torch's FlopCounterMode, on a meta-device copy) / per-step time /
                the device's dense peak (`PEAK_TFLOPS`, or `--peak-tflops`).
(c) invariance  the same images sampled in one batch, alone, and alone padded to the batch: tokens and pixels equal?
(d) memory      the peak device memory of each timed vqbatch call (the CUDA allocator's peak; on a CPU the process's
                peak resident set).
It imports no Ray. Of what the H200 image lacks it needs pydantic and diffusers: `benchmarks/wheels.sh` downloads
them as wheels into `.whl/` (git-ignored) to carry there, and `benchmarks/gpu.sh` installs them and runs this.
"""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.pipelines import SIZES, ModelSize, distinct_prompts, pipeline_pair
from benchmarks.report import Report, machine, seconds_of
from vqbatch.batch_size import peak_memory_bytes
from vqbatch.config import SamplingConfig
from vqbatch.models.transformer import VQDiffusionTransformer
from vqbatch.sampler import PipelineModel

GUIDANCE_SCALE, TRUNCATION_RATE, IMAGE_STEPS = 5.0, 0.86, 100
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0}  # dense float16/bfloat16 tensor-core peaks (SXM)
GPU_TESTS = "tests/test_gpu.py"
GIB = 2**30


@dataclass(frozen=True)
class Settings:
    size: str  # a key of benchmarks.pipelines.SIZES
    device: str
    dtypes: tuple[str, ...]
    batch_sizes: tuple[int, ...]
    step_counts: tuple[int, int]  # the two timed step counts: per step = difference / steps between
    invariance_images: int
    invariance_steps: int
    peak_tflops: float | None
    seed: int
    run_tests: bool


# ---------------------------------------------------------------------------------------------------------------
# (a) the tests marked gpu
# ---------------------------------------------------------------------------------------------------------------

def run_gpu_tests() -> dict:
    """pytest -m gpu in a subprocess: its outcome counts ({"passed": 3, ...}) and exit status."""
    command = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", GPU_TESTS]
    done = subprocess.run(command, capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent)
    counts = {word: int(number) for number, word in re.findall(r"(\d+) (passed|failed|skipped|errors?)", done.stdout)}
    return {"exit_status": done.returncode, **counts, "output_tail": done.stdout[-2000:] + done.stderr[-2000:]}


# ---------------------------------------------------------------------------------------------------------------
# (b) speed and (d) memory
# ---------------------------------------------------------------------------------------------------------------

def transformer_flops_per_step(size: ModelSize, batch: int) -> int:
    """FLOPs of one guided transformer forward (2 x batch rows), counted on meta tensors: no memory, no time."""
    with torch.device("meta"):
        model = VQDiffusionTransformer(**size.transformer).eval()
        tokens = torch.zeros((2 * batch, model.num_latent_pixels), dtype=torch.long)
        text = torch.zeros((2 * batch, 77, size.transformer["cross_attention_dim"]))
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(tokens, encoder_hidden_states=text, timestep=1, log_softmax_dtype=torch.float32)
    return counter.get_total_flops()


def peak_tflops(settings: Settings) -> float | None:
    if settings.peak_tflops or not settings.device.startswith("cuda"):
        return settings.peak_tflops
    name = torch.cuda.get_device_name(settings.device)
    return next((peak for gpu, peak in PEAK_TFLOPS.items() if gpu in name), None)


def timed_call(call, device: torch.device) -> tuple[float, int]:
    """Seconds and peak memory bytes of one call."""
    seconds = []
    peak = peak_memory_bytes(lambda: seconds.append(seconds_of(call, str(device))[0]), device)
    return seconds[0], peak


def line_of(run, step_counts: tuple[int, int], device: torch.device) -> tuple[float, float, int]:
    """(fixed seconds, seconds per step, peak bytes) of `run(steps)`, after one warm-up call."""
    run(step_counts[0])
    (few_s, _), (many_s, peak) = (timed_call(lambda: run(steps), device) for steps in step_counts)
    per_step = (many_s - few_s) / (step_counts[1] - step_counts[0])
    return max(0.0, few_s - step_counts[0] * per_step), per_step, peak


def speed_rows(ours, reference, settings: Settings, dtype: str, flops: dict[int, int]) -> list[dict]:
    device, peak = torch.device(settings.device), peak_tflops(settings)
    rows = []
    for batch in settings.batch_sizes:
        prompts = distinct_prompts(batch)
        seeds = list(range(settings.seed, settings.seed + batch))
        samplers = {"vqbatch": lambda steps: engine_sampler(ours, steps, batch).sample(prompts, seeds),
                    "diffusers": lambda steps: reference(prompts, num_inference_steps=steps,
                                                         guidance_scale=GUIDANCE_SCALE, truncation_rate=TRUNCATION_RATE,
                                                         generator=torch.Generator(device).manual_seed(settings.seed),
                                                         output_type="np")}
        for name, run in samplers.items():
            row = {"dtype": dtype, "batch": batch, "pipeline": name}
            try:
                fixed, per_step, peak_bytes = line_of(run, settings.step_counts, device)
            except RuntimeError as error:  # e.g. out of memory, or a dtype the reference cannot run: noted, not fatal
                rows.append({**row, "error": f"{type(error).__name__}: {str(error)[:200]}"})
                continue
            image_s = (fixed + IMAGE_STEPS * per_step) / batch
            utilisation = flops[batch] / per_step / (peak * 1e12) if peak else None
            rows.append({**row, "step_ms": 1e3 * per_step, "fixed_s": fixed, "images_per_s": 1 / image_s,
                         "mfu": utilisation, "peak_memory_gib": peak_bytes / GIB})
    return rows


def engine_sampler(pipe, steps: int, batch_shape: int) -> PipelineModel:
    sampling = SamplingConfig(steps=steps, guidance_scale=GUIDANCE_SCALE, truncation_rate=TRUNCATION_RATE,
                              noise="categorical")
    return PipelineModel(pipe, sampling, batch_shape)


# ---------------------------------------------------------------------------------------------------------------
# (c) tokens and pixels across batch shapes
# ---------------------------------------------------------------------------------------------------------------

def invariance(ours, settings: Settings) -> dict:
    """Images sampled in one batch of N, each alone (shape 1), and each alone padded to N: how many agree."""
    count = settings.invariance_images
    prompts, seeds = distinct_prompts(count), list(range(settings.seed, settings.seed + count))
    padded_model = engine_sampler(ours, settings.invariance_steps, count)
    alone_model = engine_sampler(ours, settings.invariance_steps, 1)
    batch_tokens, batch_pixels = padded_model.sample(prompts, seeds)
    alone = [alone_model.sample([prompt], [seed]) for prompt, seed in zip(prompts, seeds)]
    padded = [padded_model.sample([prompt], [seed]) for prompt, seed in zip(prompts, seeds)]
    result = {"images": count, "steps": settings.invariance_steps}
    for name, runs in (("padded", padded), ("unpadded", alone)):
        result[f"{name}_tokens_equal"] = sum(np.array_equal(t[0], batch_tokens[i]) for i, (t, _) in enumerate(runs))
        result[f"{name}_pixels_equal"] = sum(np.array_equal(p[0], batch_pixels[i]) for i, (_, p) in enumerate(runs))
    return result


# ---------------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------------

@torch.no_grad()
def run(settings: Settings) -> Report:
    tests = run_gpu_tests() if settings.run_tests else {"not_run": "--no-tests"}
    size = SIZES[settings.size]
    ours, reference = pipeline_pair(size, seed=settings.seed)  # float32 on the CPU, then cast to each dtype in turn
    flops = {batch: transformer_flops_per_step(size, batch) for batch in settings.batch_sizes}
    rows, invariant = [], {}
    for dtype in settings.dtypes:
        ours.to(device=settings.device, dtype=getattr(torch, dtype))
        reference.to(device=settings.device, dtype=getattr(torch, dtype))
        rows += speed_rows(ours, reference, settings, dtype, flops)
        invariant[dtype] = invariance(ours, settings)
    report = Report("gpu", asdict(settings), machine(settings.device), columns=[
        "dtype", "batch", "pipeline", "step_ms", "fixed_s", "images_per_s", "mfu", "peak_memory_gib", "error"],
        rows=rows)
    report.summary = {"tests": tests, "invariance": invariant, "transformer_flops_per_step": flops,
                      "speedup_vs_diffusers": speedups(rows)}
    report.notes += notes(settings, tests, invariant, report.summary["speedup_vs_diffusers"])
    return report


def speedups(rows: list[dict]) -> dict[str, float]:
    """vqbatch images/s / diffusers images/s per `dtype/batch`."""
    rates = {(row["dtype"], row["batch"], row["pipeline"]): row.get("images_per_s") for row in rows}
    return {f"{dtype}/{batch}": rates[(dtype, batch, "vqbatch")] / rates[(dtype, batch, "diffusers")]
            for dtype, batch, pipeline in rates
            if pipeline == "vqbatch" and rates[(dtype, batch, "vqbatch")] and rates.get((dtype, batch, "diffusers"))}


def notes(settings: Settings, tests: dict, invariant: dict, speedup: dict) -> list[str]:
    counts = ", ".join(f"{tests[key]} {key}" for key in ("passed", "failed", "skipped", "errors", "error")
                       if key in tests)
    lines = [f"size {settings.size!r}, guidance {GUIDANCE_SCALE}, truncation {TRUNCATION_RATE}; images/s for a "
             f"{IMAGE_STEPS}-step image from timed runs of {settings.step_counts[0]} and {settings.step_counts[1]} "
             "steps; mfu against the dense peak of "
             f"{peak_tflops(settings) or 'an unknown device (no mfu)'} TFLOP/s.",
             f"(a) tests marked gpu: {counts or tests}.",
             "speedup vs diffusers (images/s): " + ", ".join(f"{key} {value:.2f}x" for key, value in speedup.items())]
    for dtype, result in invariant.items():
        lines.append(f"(c) {dtype}, {result['images']} images, {result['steps']} steps, against one batch: alone "
                     f"padded to the batch {result['padded_tokens_equal']} tokens / {result['padded_pixels_equal']} "
                     f"images equal; alone unpadded {result['unpadded_tokens_equal']} / "
                     f"{result['unpadded_pixels_equal']}.")
    return lines
