"""`model`: images/s of vqbatch's `VQDiffusionPipeline` against diffusers' at the same settings, same tokens.

Both pipelines hold the same random weights, get the same prompts and one `torch.Generator` seeded alike (the
reference's random stream), and run the same number of steps with classifier-free guidance and truncation. Each
batch size gets one untimed warm-up call per pipeline, then `repeats` timed calls, reference and vqbatch taking
turns so that a change in the machine's load hits both alike. The reference does not return its tokens: a step
callback keeps the last sample, which is the reference's final token grid.

With `compile` set, a third pipeline takes its turn: vqbatch with its transformer compiled
(`VQDiffusionPipeline.compile_transformer(mode)`) on another copy of the same weights; its warm-up call compiles.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from benchmarks.ceiling import reference_ceiling
from benchmarks.pipelines import (SIZES, ModelSize, SamplingSettings, distinct_prompts, matching_pipeline,
                                  pipeline_pair, reference_tokens, transformer_parameters, vqbatch_tokens)
from benchmarks.report import Report, machine, median, seconds_of, timing_of
from vqbatch.tiny import MAX_PROMPT_TOKENS

WARMUP_STEPS = 2  # the warm-up call runs the same batch through this many steps (t = 1 and the t = 0 shortcut)

# Dense half-precision tensor-core peaks (TFLOP/s) from the vendors' data sheets, for the FLOP utilisation estimate.
PEAK_HALF_TFLOPS = {"H100 SXM": 989.0, "H100 PCIe": 756.0, "H100 NVL": 835.0, "H100": 989.0, "H200": 989.0,
                    "A100": 312.0, "L4": 121.0, "A10": 125.0}


@dataclass(frozen=True)
class Settings(SamplingSettings):
    steps: int
    batch_sizes: tuple[int, ...]
    repeats: int
    compile: str | None = None  # torch.compile mode of a third, compiled vqbatch pipeline; None: no such pipeline


def transformer_flops_per_image_step(size: ModelSize, guided: bool) -> float:
    """Multiply-adds x 2 of one transformer forward for one image: the blocks' matmuls, attention, the output layer.

    Per latent token and block: q, k, v, out of self-attention (4 D^2), q and out of cross-attention (2 D^2), the
    4x feed-forward (8 D^2), attention scores and sums over L tokens (2 L D) and T text tokens (2 T D). The text's
    keys and values are left out (once per prompt in vqbatch). Guidance doubles the batch.
    """
    t = size.transformer
    width = t["num_attention_heads"] * t["attention_head_dim"]
    tokens = t["sample_size"] ** 2
    text_tokens = MAX_PROMPT_TOKENS
    per_token_block = 14 * width ** 2 + 2 * tokens * width + 2 * text_tokens * width
    per_token = t["num_layers"] * per_token_block + width * (t["num_vector_embeds"] - 1)
    return 2.0 * per_token * tokens * (2 if guided else 1)


def peak_tflops(device: str, dtype: torch.dtype) -> float | None:
    """The device's dense half-precision peak, or None on CPU, in float32, or for an unknown GPU."""
    if not device.startswith("cuda") or dtype == torch.float32:
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_HALF_TFLOPS.items() if key in name), None)


# Sampling call of one side: (prompts, steps) -> final tokens (B, P)
Side = Callable[[list[str], int], torch.Tensor]
PREFIXES = {"vqbatch": "", "compiled": "compiled_"}  # the result keys of each side measured against the reference


def measure_batch(sides: dict[str, Side], batch: int, settings: Settings) -> dict:
    """One warm-up call per side, then `repeats` rounds in which every side takes its turn; "reference" first."""
    prompts = distinct_prompts(batch)
    warmup_s = {name: seconds_of(lambda: side(prompts, WARMUP_STEPS), settings.device)[0]
                for name, side in sides.items()}
    timings = {name: [] for name in sides}
    same = dict.fromkeys(sides, True)
    for _ in range(settings.repeats):
        tokens = {}
        for name, side in sides.items():
            timing, tokens[name] = timing_of(lambda: side(prompts, settings.steps), settings.device)
            timings[name].append(timing)
        same = {name: same[name] and torch.equal(tokens[name], tokens["reference"]) for name in sides}
    row = {"batch": batch, "steps": settings.steps}
    for name in sides:
        row[f"{name}_s"] = median([t.wall_s for t in timings[name]])
        row[f"{name}_images_per_s"] = batch / row[f"{name}_s"]
        row[f"{name}_cpu_s"] = median([t.cpu_s for t in timings[name]])
        row[f"{name}_times_s"] = [t.wall_s for t in timings[name]]
        row[f"{name}_warmup_s"] = warmup_s[name]
    for name, prefix in PREFIXES.items():
        if name in sides:
            row[f"{prefix}speedup"] = row["reference_s"] / row[f"{name}_s"]
            row[f"{prefix}speedup_cpu_time"] = row["reference_cpu_s"] / row[f"{name}_cpu_s"]
            row[f"{prefix}same_tokens"] = same[name]
    return row


def add_utilisation(row: dict, size: ModelSize, settings: Settings, peak: float | None) -> None:
    flops_per_image = transformer_flops_per_image_step(size, settings.guidance_scale > 1) * settings.steps
    for name in ("reference", "vqbatch", "compiled"):
        if f"{name}_images_per_s" not in row:
            continue
        achieved_tflops = row[f"{name}_images_per_s"] * flops_per_image / 1e12
        row[f"{name}_gflops"] = achieved_tflops * 1e3
        if peak:
            row[f"{name}_mfu"] = achieved_tflops / peak


def pipelines(settings: Settings, size: ModelSize) -> tuple[dict[str, Side], object]:
    """The sides to time (the reference, vqbatch, and with `settings.compile` vqbatch compiled), and the reference
    pipeline itself."""
    dtype = getattr(torch, settings.dtype)
    ours, reference = pipeline_pair(size, settings.device, dtype, settings.seed)
    sampling = settings.sampling
    sides = {"reference": lambda prompts, steps: reference_tokens(reference, prompts, steps, sampling),
             "vqbatch": lambda prompts, steps: vqbatch_tokens(ours, prompts, steps, sampling)}
    if settings.compile:
        compiled = matching_pipeline(reference).to(settings.device, dtype).compile_transformer(settings.compile)
        sides["compiled"] = lambda prompts, steps: vqbatch_tokens(compiled, prompts, steps, sampling)
    return sides, reference


def add_ceiling(row: dict, reference, side: Side, settings: Settings) -> None:
    """One more reference call, profiled: the most a same-kernel implementation could gain (`benchmarks.ceiling`)."""
    prompts = distinct_prompts(row["batch"])
    ceiling = reference_ceiling(reference, lambda: side(prompts, settings.steps))
    row["ceiling_same_kernels"] = ceiling.call
    row["forward_ceiling_same_kernels"] = ceiling.forward
    row["reference_forced_share"] = 1 / ceiling.call
    row["reference_forward_forced_share"] = 1 / ceiling.forward


def run(settings: Settings) -> Report:
    size = SIZES[settings.size]
    sides, reference = pipelines(settings, size)
    on_cpu = settings.device == "cpu"
    peak = peak_tflops(settings.device, getattr(torch, settings.dtype))
    compiled_columns = ["compiled_images_per_s", "compiled_speedup", "compiled_speedup_cpu_time",
                        "compiled_same_tokens"] if settings.compile else []
    report = Report("model", asdict(settings), machine(settings.device), columns=[
        "batch", "steps", "reference_images_per_s", "vqbatch_images_per_s", "speedup", "speedup_cpu_time",
        "same_tokens", *(["ceiling_same_kernels", "forward_ceiling_same_kernels"] if on_cpu else []),
        *compiled_columns, "reference_gflops", "vqbatch_gflops"]
        + (["reference_mfu", "vqbatch_mfu"] if peak else []))
    for batch in settings.batch_sizes:
        row = measure_batch(sides, batch, settings)
        add_utilisation(row, size, settings, peak)
        if on_cpu:
            add_ceiling(row, reference, sides["reference"], settings)
        report.rows.append(row)
    report.summary = {
        "transformer_parameters": transformer_parameters(size),
        "transformer_gflop_per_image_step": transformer_flops_per_image_step(size, settings.guidance_scale > 1) / 1e9,
        "peak_tflops": peak,
        "min_speedup": min(row["speedup"] for row in report.rows),
        "all_same_tokens": all(row["same_tokens"] for row in report.rows),
    }
    if settings.compile:
        report.summary["compiled_min_speedup"] = min(row["compiled_speedup"] for row in report.rows)
        report.summary["compiled_all_same_tokens"] = all(row["compiled_same_tokens"] for row in report.rows)
    report.notes += [
        f"config {size.name!r}: transformer {transformer_parameters(size) / 1e6:.1f} M parameters, "
        f"{size.latent_side}x{size.latent_side} latents, {size.num_classes} classes; {settings.dtype} on "
        f"{settings.device}; guidance {settings.guidance_scale}, truncation {settings.truncation_rate}, "
        f"{settings.steps} steps; distinct prompts; median of {settings.repeats} timed call(s) after one warm-up.",
        "speedup = vqbatch images/s / reference images/s (wall clock); speedup_cpu_time = the same ratio in CPU "
        "seconds of this process (the work done, less sensitive to other load on a shared CPU; on a GPU it counts "
        "only the host's share); same_tokens: both pipelines returned identical tokens.",
        *(["ceiling_same_kernels: the largest speedup (CPU) of any implementation that runs the reference's "
           "kernels for what fixes the tokens' bits (GEMMs, attention, convolutions, the random draws), = the "
           "reference call's time / its time in those kernels, from one more reference call under torch.profiler "
           "(the text's cross-attention keys and values counted once per call); forward_ceiling_same_kernels: the "
           "same for one guided transformer forward (no text keys and values); see benchmarks/ceiling.py."]
          if on_cpu else []),
        "GFLOP/s counts the transformer's matmul and attention work only"
        + (f"; MFU against a {peak:g} TFLOP/s dense half-precision peak." if peak else "."),
    ]
    if settings.compile:
        report.notes.append(f"compiled_*: vqbatch with its transformer compiled (torch.compile mode "
                            f"{settings.compile!r}, one static graph per batch size, compiled in the untimed "
                            "warm-up: compiled_warmup_s in the JSON), against the same reference calls.")
    return report
