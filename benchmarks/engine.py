"""`engine`: images/s through the whole Ray Data job against a bare loop over the same pipeline, same machine.

The pipeline (the `--config` size, random weights) is saved as a checkpoint; the job reads a Parquet file of distinct
prompts, samples them on the actor pool, encodes PNGs and writes them with the metadata. The bare loop runs the
actor's own model class (`vqbatch.sampler.PipelineModel`) over the same prompts, seeds and batch size in this process,
with no reading, encoding or writing. Efficiency = engine images/s / bare-loop images/s, both end to end: the whole
job (actor start, model load, publishing) against the bare loop with its model load. The JSON also holds the rates
after start-up (the engine over the second half of its files, the bare loop after its first batch) and when each
file was written: a job that overlaps sampling with writing writes its files one batch after another.

On a CPU-only machine the job gets every core for sampling, as the bare loop does: Ray starts with one logical CPU
more than the machine has, one actor holds all the physical cores (its torch threads), and the light read and write
tasks run on the extra logical CPU, overlapped with sampling.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import torch

from benchmarks.pipelines import SIZES, distinct_prompts, matching_pipeline, reference_pipeline
from benchmarks.report import Report, machine, seconds_of
from vqbatch.config import JobConfig, validate_job_config
from vqbatch.engine import Progress, run_job
from vqbatch.io.dataset import OutputRoot, read_metadata
from vqbatch.sampler import PipelineModel
from vqbatch.seeds import image_seed

GUIDANCE_SCALE, TRUNCATION_RATE, BASE_SEED = 5.0, 0.86, 0


@dataclass(frozen=True)
class Settings:
    size: str
    images: int
    steps: int
    batch: int
    device: str
    dtype: str
    seed: int


def write_prompts(path: Path, count: int) -> list[str]:
    ids = [f"p{index:07d}" for index in range(count)]
    pq.write_table(pa.table({"id": ids, "prompt": distinct_prompts(count)}), path)
    return ids


def job_config(settings: Settings, prompts: Path, checkpoint: Path, output: Path, cpus_per_actor: float) -> JobConfig:
    return validate_job_config({
        "input": {"paths": [str(prompts)]},
        "model": {"uri": str(checkpoint), "dtype": settings.dtype, "device": settings.device},
        "sampling": {"steps": settings.steps, "guidance_scale": GUIDANCE_SCALE, "truncation_rate": TRUNCATION_RATE,
                     "base_seed": BASE_SEED},
        "compute": {"batch_size": settings.batch, "cpus_per_actor": cpus_per_actor, "max_actors": 1},
        "output": {"uri": str(output), "rows_per_file": settings.batch},
    })


def start_ray(device: str) -> float:
    """Start a local Ray; return the CPUs one actor gets (every physical core on a CPU-only run, else one)."""
    cores = os.cpu_count() or 1
    on_cpu = not device.startswith("cuda")
    ray.init(address="local", num_cpus=cores + 1 if on_cpu else cores, include_dashboard=False,
             runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})
    return float(cores) if on_cpu else 1.0


def steady_rate(progress: list[Progress]) -> float | None:
    """Images/s over the second half of the written files: start-up (actor start, model load, the writer's first
    task) is behind by then. None when the job wrote fewer than 4 files or they all came at once (no streaming)."""
    middle, last = progress[len(progress) // 2 - 1] if len(progress) >= 4 else None, progress[-1]
    if middle is None or last.seconds - middle.seconds < 1e-3:
        return None
    return (last.images_done - middle.images_done) / (last.seconds - middle.seconds)


def first_to_last_file_rate(progress: list[Progress]) -> float | None:
    """Images/s from the first written file to the last: the job once its actor runs (Ray's start, the actor's
    imports and the model load are before the first file). None with fewer than two files."""
    first, last = progress[0], progress[-1]
    if len(progress) < 2 or last.seconds - first.seconds < 1e-3:
        return None
    return (last.images_done - first.images_done) / (last.seconds - first.seconds)


def run_engine(config: JobConfig) -> tuple[float | None, float, float, list[Progress]]:
    """(steady images/s, end-to-end images/s, seconds, progress after each file) of one job."""
    progress: list[Progress] = []
    summary = run_job(config, on_progress=progress.append)
    return steady_rate(progress), summary.ok / summary.seconds, summary.seconds, progress


@dataclass(frozen=True)
class BareLoop:
    steady_images_per_s: float  # after the first batch
    end_to_end_images_per_s: float  # model load and first batch included
    tokens: dict  # id -> tokens


def run_bare_loop(config: JobConfig, ids: list[str], prompts: list[str], threads: int) -> BareLoop:
    """The actor's model class called batch after batch in this process: no Ray, no reading, encoding or writing."""
    torch.set_num_threads(threads)
    seeds = [image_seed(row_id, 0, BASE_SEED) for row_id in ids]
    batch, device = config.compute.batch_size, config.model.device
    load_seconds, model = seconds_of(lambda: PipelineModel.load(config.model, config.sampling, batch, config.s3), device)
    tokens, batch_seconds = {}, []
    for start in range(0, len(prompts), batch):
        seconds, (batch_tokens, _) = seconds_of(
            lambda: model.sample(prompts[start:start + batch], seeds[start:start + batch]), device)
        batch_seconds.append(seconds)
        tokens.update(zip(ids[start:start + batch], batch_tokens.tolist()))
    steady_images = len(prompts) - min(batch, len(prompts))
    steady = steady_images / sum(batch_seconds[1:]) if steady_images else len(prompts) / batch_seconds[0]
    return BareLoop(steady, len(prompts) / (load_seconds + sum(batch_seconds)), tokens)


def same_tokens_fraction(config: JobConfig, bare_tokens: dict) -> float:
    rows = read_metadata(OutputRoot.of(config.output, config.s3)).select(["id", "tokens"]).to_pylist()
    return float(np.mean([bare_tokens[row["id"]] == row["tokens"] for row in rows]))


def run(settings: Settings) -> Report:
    report = Report("engine", asdict(settings), machine(settings.device), columns=[
        "images", "steps", "batch", "bare_loop_images_per_s", "engine_images_per_s", "efficiency", "running_efficiency",
        "streamed",
        "first_file_s", "engine_seconds", "same_tokens_fraction"])
    with tempfile.TemporaryDirectory(prefix="vqbatch-bench-") as scratch:
        folder = Path(scratch)
        checkpoint = matching_pipeline(reference_pipeline(SIZES[settings.size], settings.seed)) \
            .save_pretrained(folder / "checkpoint")
        ids = write_prompts(folder / "prompts.parquet", settings.images)
        cpus_per_actor = start_ray(settings.device)
        try:
            config = job_config(settings, folder / "prompts.parquet", checkpoint, folder / "out", cpus_per_actor)
            steady, end_to_end, seconds, progress = run_engine(config)
        finally:
            ray.shutdown()
        bare = run_bare_loop(config, ids, distinct_prompts(settings.images), int(cpus_per_actor))
        same = same_tokens_fraction(config, bare.tokens)
    efficiency = end_to_end / bare.end_to_end_images_per_s
    running = first_to_last_file_rate(progress)
    running_efficiency = running / bare.steady_images_per_s if running else None
    report.rows.append({"images": settings.images, "steps": settings.steps, "batch": settings.batch,
                        "bare_loop_images_per_s": bare.end_to_end_images_per_s, "engine_images_per_s": end_to_end,
                        "efficiency": efficiency, "running_efficiency": running_efficiency,
                        "streamed": steady is not None,
                        "first_file_s": progress[0].seconds, "engine_seconds": seconds, "same_tokens_fraction": same,
                        "bare_loop_after_first_batch_images_per_s": bare.steady_images_per_s,
                        "engine_second_half_images_per_s": steady,
                        "files_written_at": [[round(p.seconds, 2), p.images_done] for p in progress]})
    report.summary = {"efficiency": efficiency, "running_efficiency": running_efficiency,
                      "cpus_per_actor": cpus_per_actor, "streamed": steady is not None}
    report.notes += [
        f"config {settings.size!r}, {settings.dtype} on {settings.device}, guidance {GUIDANCE_SCALE}, truncation "
        f"{TRUNCATION_RATE}, one image per prompt, PNG output, one metadata file per batch.",
        f"the actor held {cpus_per_actor:g} CPU(s); the bare loop ran {int(cpus_per_actor)} torch thread(s).",
        "efficiency = engine images/s (the whole job: actor start, model load, publishing) / bare-loop images/s "
        "(model load included); running_efficiency = engine images/s from its first file to its last / bare-loop "
        "images/s after its first batch: the job once its actor samples, without the fixed start-up (Ray, the "
        "actor's imports, the model load) that a long job spreads thin; streamed: the job wrote its files one after "
        "another rather than all at the end; first_file_s: seconds to the first file; same_tokens_fraction: images "
        "whose tokens equal the bare loop's.",
    ]
    if steady is None:
        report.notes.append("the job's files all came at once, at its end: sampling did not overlap writing.")
    return report
