"""`dataplane`: the whole Ray Data job with the no-op model (`model.uri = "noop"`) over 10k, 100k and 1M prompts.

The no-op model returns a fixed tiny image per row, so the job measures the data plane alone: reading prompts,
expanding rows and deriving seeds, moving batches through the actor, encoding and writing one PNG per row and one
metadata file per `rows_per_file` rows, and publishing the manifest. The prompts are generated on the fly as Parquet
files of `ROWS_PER_INPUT_FILE` rows (a sharded input, as a real prompt set is). Each prompt count runs in a fresh
driver process on a fresh local Ray, first warmed by an untimed job of `WARM_UP_PROMPTS` prompts (as a long-running
cluster is: worker processes started, their imports done), then timed; peak resident memory of the driver and of
the Ray workers is sampled throughout the timed job (`benchmarks.memory`). Memory is flat when the peaks at 1M
prompts match those at 10k. Outputs are deleted only at the end: creating files where many were just deleted is
slower on ext4, and a real job writes to fresh storage.
"""

from __future__ import annotations

import multiprocessing
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from benchmarks.memory import PeakMemory
from benchmarks.report import Report, machine
from vqbatch.config import NOOP_MODEL, JobConfig, validate_job_config
from vqbatch.engine import Progress, connect_ray, run_job

ROWS_PER_INPUT_FILE = 10_000
WARM_UP_PROMPTS = 2_000
NOOP_ACTOR_CPUS = 0.5
PROMPT_WORDS = ("red", "green", "blue", "circle", "square", "triangle", "small", "large", "left", "right")


@dataclass(frozen=True)
class Settings:
    row_counts: tuple[int, ...]
    batch: int
    rows_per_file: int
    output_format: str = "files"  # output.format of every job
    refresh_rows: int = 0  # then new prompts added to the largest dataset by a refresh (0: no refresh)


def prompt_of(index: int) -> str:
    """A short distinct prompt: words picked by the digits of `index`."""
    return " ".join(PROMPT_WORDS[int(digit)] for digit in f"{index:08d}")


def write_prompt_files(folder: Path, count: int, first: int = 0) -> Path:
    """`count` prompts with ids from `first` on, in files of `ROWS_PER_INPUT_FILE` rows."""
    folder.mkdir(parents=True)
    for start in range(first, first + count, ROWS_PER_INPUT_FILE):
        indices = range(start, min(start + ROWS_PER_INPUT_FILE, first + count))
        pq.write_table(pa.table({"id": [f"row-{i:08d}" for i in indices], "prompt": [prompt_of(i) for i in indices]}),
                       folder / f"part-{start // ROWS_PER_INPUT_FILE:05d}.parquet")
    return folder


def job_config(settings: Settings, prompts: Path | list[Path], output: Path, mode: str = "error") -> JobConfig:
    return validate_job_config({
        "input": {"paths": [str(path) for path in (prompts if isinstance(prompts, list) else [prompts])]},
        "model": {"uri": NOOP_MODEL},
        # the no-op model stands in for a GPU model, whose actor needs little of the host's CPU: one actor on half
        # a CPU leaves the rest of the node to the read and write tasks
        "compute": {"batch_size": settings.batch, "cpus_per_actor": NOOP_ACTOR_CPUS, "max_actors": 1},
        "output": {"uri": str(output), "rows_per_file": settings.rows_per_file, "format": settings.output_format,
                   "mode": mode},
    })


def measure(settings: Settings, count: int, scratch: Path) -> dict:
    """Generate a dataset of `count` prompts, timed and measured, after an untimed warm-up job."""
    prompts = write_prompt_files(scratch / f"prompts-{count}", count)
    warm_up = write_prompt_files(scratch / f"warm-up-{count}", WARM_UP_PROMPTS)
    connect_ray()
    try:
        run_job(job_config(settings, warm_up, scratch / f"warm-up-out-{count}"))
        return {"job": "generate", **timed_job(job_config(settings, prompts, scratch / f"out-{count}"), count)}
    finally:
        ray.shutdown()


def measure_refresh(settings: Settings, count: int, scratch: Path) -> dict:
    """Refresh the dataset of `count` prompts with `settings.refresh_rows` new ones (the input is all of them), on a
    fresh local Ray warmed by a refresh that adds nothing: the published keys are read and skipped, the new rows
    sampled."""
    prompts = scratch / f"prompts-{count}"
    added = write_prompt_files(scratch / f"added-{count}", settings.refresh_rows, first=count)
    output = scratch / f"out-{count}"
    connect_ray()
    try:
        run_job(job_config(settings, prompts, output, mode="refresh"))  # warm-up: nothing to add, Ray not used
        return {"job": f"refresh +{settings.refresh_rows}",
                **timed_job(job_config(settings, [prompts, added], output, mode="refresh"), settings.refresh_rows)}
    finally:
        ray.shutdown()


def timed_job(config: JobConfig, count: int) -> dict:
    """Run one job that must add `count` ok rows: its time, rate, CPU and peak memory."""
    progress: list[Progress] = []
    cpu_before = tree_cpu_seconds()
    with PeakMemory() as memory:
        summary = run_job(config, on_progress=progress.append)
    cpu_seconds = cpu_seconds_since(cpu_before)
    if summary.ok != count:
        raise RuntimeError(f"the no-op job wrote {summary.ok} images for {count} new prompts")
    peaks = memory.peaks
    first, last = progress[0], progress[-1]
    steady = (last.images_done - first.images_done) / (last.seconds - first.seconds) if len(progress) > 1 else None
    return {"prompts": count, "seconds": summary.seconds, "rows_per_s": count / summary.seconds,
            "first_file_s": first.seconds, "steady_rows_per_s": steady, "cpu_ms_per_row": 1000 * cpu_seconds / count,
            "metadata_files": summary.metadata_files, "driver_start_mib": peaks.driver_start_mib,
            "driver_peak_mib": peaks.driver_mib,
            "largest_worker_peak_mib": peaks.largest_worker_mib,
            "largest_worker_private_peak_mib": peaks.largest_worker_private_mib,
            "largest_worker": peaks.largest_worker_name,
            "workers_peak_mib": peaks.workers_total_mib, "workers_private_peak_mib": peaks.workers_private_mib,
            "tree_peak_mib": peaks.tree_total_mib, "worker_processes": peaks.workers_seen}


def measure_in_a_fresh_driver(measurement, settings: Settings, count: int, scratch: Path) -> dict:
    """`measurement` (`measure`, `measure_refresh`) in a new Python process: the driver's memory at one prompt count
    then owes nothing to the jobs and Ray sessions of the counts before it (a Ray driver keeps some memory across
    `ray.shutdown`)."""
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as driver:
        return driver.submit(measurement, settings, count, scratch).result()


def tree_cpu_seconds() -> dict[int, float]:
    """CPU seconds (user + system) so far of this process and of every live descendant (Ray's processes), by pid."""
    seconds = {}
    for process in [psutil.Process(), *psutil.Process().children(recursive=True)]:
        try:
            times = process.cpu_times()
        except (psutil.NoSuchProcess, psutil.AccessDenied):  # it ended between listing and reading
            continue
        seconds[process.pid] = times.user + times.system
    return seconds


def cpu_seconds_since(before: dict[int, float]) -> float:
    """CPU seconds the process tree used since `before`, over the processes alive now (one that exited in between
    is left out, rather than subtracting its earlier time)."""
    return sum(seconds - before.get(pid, 0.0) for pid, seconds in tree_cpu_seconds().items())


def run(settings: Settings) -> Report:
    report = Report("dataplane", asdict(settings), machine("cpu"), columns=[
        "job", "prompts", "seconds", "rows_per_s", "first_file_s", "steady_rows_per_s", "cpu_ms_per_row",
        "driver_start_mib", "driver_peak_mib",
        "largest_worker_peak_mib", "largest_worker_private_peak_mib", "largest_worker", "workers_peak_mib",
        "workers_private_peak_mib", "tree_peak_mib", "worker_processes"])
    with tempfile.TemporaryDirectory(prefix="vqbatch-dataplane-") as scratch:
        for count in settings.row_counts:
            report.rows.append(measure_in_a_fresh_driver(measure, settings, count, Path(scratch)))
            print(report.rows[-1], flush=True)
        if settings.refresh_rows:
            report.rows.append(measure_in_a_fresh_driver(measure_refresh, settings, max(settings.row_counts),
                                                         Path(scratch)))
            print(report.rows[-1], flush=True)
    generated = [row for row in report.rows if row["job"] == "generate"]
    first, last = generated[0], generated[-1]
    report.summary = {
        "min_rows_per_s": min(row["rows_per_s"] for row in generated),
        "driver_peak_growth": last["driver_peak_mib"] / first["driver_peak_mib"],
        "driver_peak_growth_mib": last["driver_peak_mib"] - first["driver_peak_mib"],
        "driver_growth_during_job_mib": [row["driver_peak_mib"] - row["driver_start_mib"] for row in report.rows],
        "largest_worker_peak_growth": last["largest_worker_peak_mib"] / first["largest_worker_peak_mib"],
        "largest_worker_private_peak_growth":
            last["largest_worker_private_peak_mib"] / first["largest_worker_private_peak_mib"],
    }
    report.notes += [
        f"no-op model ({NOOP_MODEL!r}): 8x8 grey PNG per row; one image per prompt; {settings.batch} rows per actor "
        f"call; output format {settings.output_format!r}, {settings.rows_per_file} rows per shard; input written as "
        f"{ROWS_PER_INPUT_FILE}-row Parquet files; output on the local disk; one actor on {NOOP_ACTOR_CPUS} CPU (a fresh local Ray per run).",
        f"rows_per_s = prompts / job seconds, on a local Ray warmed by a {WARM_UP_PROMPTS}-prompt job (actor start, "
        "planning, reading, writing and the manifest included); first_file_s: seconds to the first metadata file; "
        "steady_rows_per_s: rows per second from the first metadata file to the last; cpu_ms_per_row: CPU time of the "
        "driver and every Ray process during the job, per row: on n idle cores the rate would be about "
        "1000 n / cpu_ms_per_row. "
        "Memory: peak resident set sampled every 0.25 s (driver_start_mib: the driver when the timed job starts, "
        "after the warm-up job); workers_peak_mib sums all Ray worker processes (shared object-store pages count "
        "once per process that touched them); *_private_* leave shared pages out (a worker's own heap).",
    ]
    return report
