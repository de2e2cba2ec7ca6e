"""`engine`: images/s through the whole Ray Data job against a bare loop over the same pipeline, same machine.

The pipeline (the `--config` size, random weights) is saved as a checkpoint; the job reads a Parquet file of distinct
prompts, samples them on the actor pool, encodes PNGs and writes them with the metadata. The bare loop runs the
actor's own model class (`vqbatch.engine.PipelineModel`) over the same prompts, seeds and batch size in this process,
with no reading, encoding or writing. Efficiency = engine images/s / bare-loop images/s, both in steady state (the
engine's rate between its first and last written file; the bare loop after one warm-up batch); the engine's
end-to-end rate, actor start and model load included, is reported beside it.

On a CPU-only machine the job gets every core for sampling, as the bare loop does: Ray starts with one logical CPU
more than the machine has, one actor holds all the physical cores (its torch threads), and the light read and write
tasks run on the extra logical CPU, overlapped with sampling.
"""

from __future__ import annotations

import os
import tempfile
import time
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
from vqbatch.engine import PipelineModel, Progress, run_job
from vqbatch.io.dataset import OutputRoot, read_metadata
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


def steady_rate(progress: list[Progress]) -> float:
    """Images/s between the first and the last written file (actor start and model load left out)."""
    first, last = progress[0], progress[-1]
    if last.seconds <= first.seconds:
        return last.images_per_second
    return (last.images_done - first.images_done) / (last.seconds - first.seconds)


def run_engine(config: JobConfig) -> tuple[float, float, float]:
    """(steady images/s, end-to-end images/s, seconds) of one job."""
    progress: list[Progress] = []
    summary = run_job(config, on_progress=progress.append)
    return steady_rate(progress), summary.ok / summary.seconds, summary.seconds


def run_bare_loop(config: JobConfig, ids: list[str], prompts: list[str], threads: int) -> tuple[float, dict]:
    """(images/s after one warm-up batch, tokens by id) of the actor's model class called in a plain loop."""
    torch.set_num_threads(threads)
    model = PipelineModel(config.model, config.sampling)
    seeds = [image_seed(row_id, 0, BASE_SEED) for row_id in ids]
    batch = config.compute.batch_size
    model.sample(prompts[:batch], seeds[:batch])  # warm-up
    tokens = {}

    def loop():
        for start in range(0, len(prompts), batch):
            batch_tokens, _ = model.sample(prompts[start:start + batch], seeds[start:start + batch])
            tokens.update(zip(ids[start:start + batch], batch_tokens.tolist()))

    seconds, _ = seconds_of(loop, config.model.device)
    return len(prompts) / seconds, tokens


def same_tokens_fraction(config: JobConfig, bare_tokens: dict) -> float:
    rows = read_metadata(OutputRoot.of(config.output, config.s3)).select(["id", "tokens"]).to_pylist()
    return float(np.mean([bare_tokens[row["id"]] == row["tokens"] for row in rows]))


def run(settings: Settings) -> Report:
    report = Report("engine", asdict(settings), machine(settings.device), columns=[
        "images", "steps", "batch", "bare_loop_images_per_s", "engine_images_per_s", "efficiency",
        "engine_end_to_end_images_per_s", "engine_seconds", "same_tokens_fraction"])
    with tempfile.TemporaryDirectory(prefix="vqbatch-bench-") as scratch:
        folder = Path(scratch)
        checkpoint = matching_pipeline(reference_pipeline(SIZES[settings.size], settings.seed)) \
            .save_pretrained(folder / "checkpoint")
        ids = write_prompts(folder / "prompts.parquet", settings.images)
        cpus_per_actor = start_ray(settings.device)
        try:
            config = job_config(settings, folder / "prompts.parquet", checkpoint, folder / "out", cpus_per_actor)
            started = time.monotonic()
            steady, end_to_end, seconds = run_engine(config)
            print(f"engine: {seconds:.1f} s ({time.monotonic() - started:.1f} s with publishing)")
        finally:
            ray.shutdown()
        bare, bare_tokens = run_bare_loop(config, ids, distinct_prompts(settings.images), int(cpus_per_actor))
        same = same_tokens_fraction(config, bare_tokens)
    report.rows.append({"images": settings.images, "steps": settings.steps, "batch": settings.batch,
                        "bare_loop_images_per_s": bare, "engine_images_per_s": steady, "efficiency": steady / bare,
                        "engine_end_to_end_images_per_s": end_to_end, "engine_seconds": seconds,
                        "same_tokens_fraction": same})
    report.summary = {"efficiency": steady / bare, "end_to_end_efficiency": end_to_end / bare,
                      "cpus_per_actor": cpus_per_actor}
    report.notes += [
        f"config {settings.size!r}, {settings.dtype} on {settings.device}, guidance {GUIDANCE_SCALE}, truncation "
        f"{TRUNCATION_RATE}, one image per prompt, PNG output, one metadata file per batch.",
        f"the actor held {cpus_per_actor:g} CPU(s); the bare loop ran {int(cpus_per_actor)} torch thread(s).",
        "efficiency = engine steady-state images/s / bare-loop images/s; end-to-end includes actor start and model "
        "load; same_tokens_fraction: images whose tokens equal the bare loop's for the same seed.",
    ]
    return report
