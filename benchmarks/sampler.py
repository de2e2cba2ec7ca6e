"""`sampler`: time against steps for vqbatch's fewer-step sampler (`timestep_spacing="skip"`) vs the reference.

The reference runs its full chain (`num_inference_steps` = the training chain's length, 100 for ITHQ). vqbatch runs
the same prompts with the skipping schedule at each step count; at the full length the skipping schedule is the
reference's own, so that row must also return the reference's tokens.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from benchmarks.pipelines import (SIZES, SamplingSettings, distinct_prompts, pipeline_pair, reference_tokens,
                                  vqbatch_tokens)
from benchmarks.report import Report, Timing, machine, timing_of

WARMUP_STEPS = 2


@dataclass(frozen=True)
class Settings(SamplingSettings):
    step_counts: tuple[int, ...]
    batch: int


def row(pipeline: str, steps: int, timing: Timing, batch: int, reference: Timing, same: bool | None) -> dict:
    return {"pipeline": pipeline, "steps": steps, "seconds": timing.wall_s, "cpu_seconds": timing.cpu_s,
            "images_per_s": batch / timing.wall_s, "speedup_vs_reference_full": reference.wall_s / timing.wall_s,
            "speedup_cpu_time": reference.cpu_s / timing.cpu_s, "same_tokens_as_reference": same}


def run(settings: Settings) -> Report:
    size = SIZES[settings.size]
    full_chain = size.num_train_timesteps
    if max(settings.step_counts) > full_chain:
        raise ValueError(f"step counts must be at most the {settings.size!r} chain's {full_chain} steps; got "
                         f"{list(settings.step_counts)}")
    ours, reference_pipe = pipeline_pair(size, settings.device, getattr(torch, settings.dtype), settings.seed)
    prompts, sampling = distinct_prompts(settings.batch), settings.sampling
    reference_tokens(reference_pipe, prompts, WARMUP_STEPS, sampling)
    vqbatch_tokens(ours, prompts, WARMUP_STEPS, sampling, "skip")
    reference, theirs = timing_of(lambda: reference_tokens(reference_pipe, prompts, full_chain, sampling),
                                  settings.device)
    report = Report("sampler", asdict(settings), machine(settings.device), columns=[
        "pipeline", "steps", "seconds", "images_per_s", "speedup_vs_reference_full", "speedup_cpu_time",
        "same_tokens_as_reference"])
    report.rows.append(row("reference", full_chain, reference, settings.batch, reference, None))
    for steps in settings.step_counts:
        timing, mine = timing_of(lambda: vqbatch_tokens(ours, prompts, steps, sampling, "skip"), settings.device)
        same = torch.equal(theirs, mine) if steps == full_chain else None
        report.rows.append(row("vqbatch skip", steps, timing, settings.batch, reference, same))
    report.summary = {"reference_seconds": reference.wall_s,
                      "speedups": {r["steps"]: r["speedup_vs_reference_full"] for r in report.rows[1:]}}
    report.notes += [
        f"config {settings.size!r}, batch {settings.batch}, guidance {settings.guidance_scale}, truncation "
        f"{settings.truncation_rate}, {settings.dtype} on {settings.device}; one timed call each after a warm-up; "
        "speedup_cpu_time: the same ratio in CPU seconds of this process.",
        f"vqbatch skip: `timestep_spacing=\"skip\"`, n timesteps spread over the whole {full_chain}-step "
        f"chain with jump posteriors; at n = {full_chain} it is the reference schedule (same tokens expected).",
        "Sample quality at fewer steps is not measured here (random weights).",
    ]
    return report
