"""The Ray Data job: read prompts -> expand to image rows -> sample on an actor pool -> write images and metadata.

    from_items(input file paths)                       one block per input file
      -> map_batches(read_pending_rows)                read tasks (CPU): one row per (prompt, image index) the output
                                                       lacks, with its seed and status
      -> map_batches(SampleBatches, actor pool)        the model, loaded once per actor: tokens + pixels
      -> map_batches(write_shard, rows_per_file)       CPU tasks: encode images, write files and one metadata file
      -> driver: progress (each second from `BatchLedger`, and per metadata file), then the manifest and `_SUCCESS`

Each run writes one version of the dataset (`vqbatch.io.dataset`): it skips the rows the output already holds for
the same generation fingerprint and the rows a killed run of the same version already wrote, and publishes by
writing the manifest last.

This is the only module that talks to Ray Data. Everything a job needs is checked before Ray starts and before any
model loads (`open_input`, `prepare_output`, `vqbatch.preflight`).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
import ray.data

from vqbatch.batch_size import probe_batch_size
from vqbatch.config import ComputeConfig, InputConfig, JobConfig, OutputConfig, SamplingConfig
from vqbatch.faults import ResilientSampler
from vqbatch.io.dataset import (VersionPlan, check_output, pending_image_rows, plan_version, prepare_output,
                                publish_version, start_version)
from vqbatch.io.filesystems import OutputRoot, is_s3
from vqbatch.io.formats import check_kept_columns, sampled_table, write_shard
from vqbatch.io.held import HeldBuckets
from vqbatch.io.lease import Lease
from vqbatch.io.prompts import InputFiles, expand_rows, open_input
from vqbatch.io.run_stats import run_stats, write_run_stats
from vqbatch.keys import KEY_COLUMNS, key_column
from vqbatch.preflight import check_checkpoint, check_output_location
from vqbatch.sampler import build_model, sample_rows

LOG = logging.getLogger("vqbatch")  # what the driver tells the user; the CLI prints it (Ray's own lines go elsewhere)
SHARD_SCHEMA = pa.schema([("file", pa.string()), ("rows", pa.int64()), ("ok", pa.int64()), ("errors", pa.int64())])


# ---------------------------------------------------------------------------------------------------------------
# The actor
# ---------------------------------------------------------------------------------------------------------------

class SampleBatches:
    """The actor: loads the model once, then samples whole batches of image rows; error rows pass through.

    `identity` is the model part of the run's planned fingerprint: a checkpoint whose files or objects were replaced
    since planning is refused when the actor loads it (`vqbatch.lineage.check_model_unchanged`), once per actor, so
    the job fails instead of publishing rows of two models under one fingerprint.

    Sampling goes through a `ResilientSampler`: a row that fails on its own becomes an error row with its message,
    and a batch that runs out of memory is sampled in smaller chunks (`vqbatch.faults`).
    """

    def __init__(self, config: JobConfig, ledger: ray.actor.ActorHandle, identity: dict):
        self.ledger = ledger
        self.actor = ray.get_runtime_context().get_actor_id()
        ledger.actor_started.remote(self.actor)
        self.model = build_model(config.model, config.sampling, config.compute.batch_size, config.s3, identity)
        self.sampler = ResilientSampler(self.sample_rows)

    def __call__(self, rows: pa.Table) -> pa.Table:
        batch = batch_key(rows)
        attempt = ray.get(self.ledger.begin.remote(batch))
        if attempt > MAX_BATCH_ATTEMPTS:
            first = (rows.column("id")[0].as_py(), rows.column("image_index")[0].as_py())
            raise RuntimeError(f"the batch starting at (id, image_index) {first!r} was started {attempt - 1} times "
                               "and every actor that sampled it died; failing the job instead of killing more actors")
        sampled = self.sample_batch(rows)
        errors = sampled.num_rows - (pc.sum(pc.equal(sampled.column("status"), "ok")).as_py() or 0)
        self.ledger.end.remote(batch, self.actor, time.time(), sampled.num_rows, errors)
        return sampled

    def sample_batch(self, rows: pa.Table) -> pa.Table:
        statuses, errors, prompts, seeds = (rows.column(name).to_pylist()
                                            for name in ("status", "error", "prompt", "seed"))
        ok = [position for position, status in enumerate(statuses) if status == "ok"]
        tokens, pixels, truncated = [None] * rows.num_rows, [None] * rows.num_rows, [None] * rows.num_rows
        outcomes = self.sampler([prompts[i] for i in ok], [seeds[i] for i in ok])
        for position, outcome in zip(ok, outcomes):
            if outcome.error:
                statuses[position], errors[position] = "error", outcome.error
            else:
                tokens[position], pixels[position], truncated[position] = outcome.value
        rows = rows.set_column(rows.schema.get_field_index("status"), "status", pa.array(statuses, pa.string()))
        rows = rows.set_column(rows.schema.get_field_index("error"), "error", pa.array(errors, pa.string()))
        return sampled_table(rows, tokens, pixels, truncated)

    def sample_rows(self, prompts: list[str], seeds: list[int]) -> list[tuple[list[int], np.ndarray, bool | None]]:
        """The rows sampled at the job's batch shape; once memory ran out, at the smaller batch the sampler now
        uses (a new shape: on a GPU those rows may then differ from a rerun at the job's shape)."""
        shape = min(self.model.batch_shape, self.sampler.max_batch or self.model.batch_shape)
        return sample_rows(self.model.reshaped(shape), prompts, seeds)


MAX_BATCH_ATTEMPTS = 4  # a batch is sampled at most this often: its first try and 3 more after actors died on it


def batch_key(rows: pa.Table) -> bytes:
    """The batch's first (id, image_index) key (`key_column`): a retried batch is the same block, so it has the same
    key."""
    return key_column(rows.slice(0, 1).select(KEY_COLUMNS))[0].as_py()


@ray.remote(num_cpus=0, max_restarts=-1)
class BatchLedger:
    """What the sampling actors did, told by the actors themselves: each batch's attempts (so a batch that kills
    every actor it lands on fails the job instead of looping), each batch's rows and errors when it ends (live
    progress; a retried batch counts once), and how often Ray restarted an actor whose process died."""

    def __init__(self):
        self.attempts: dict[bytes, int] = {}
        self.ended: dict[bytes, tuple[str, float, int, int]] = {}  # batch -> (actor, end time, rows, errors)
        self.actors: set[str] = set()  # ids of the sampling actors that have started
        self.restarted = 0
        self.rows, self.errors = 0, 0  # of the batches in `ended`

    def actor_started(self, actor: str) -> None:
        """Ray restarts an actor whose process died under the same id: an id seen again is a restart."""
        if actor in self.actors:
            self.restarted += 1
        self.actors.add(actor)

    def begin(self, batch: bytes) -> int:
        """The attempt this is: 1 the first time `batch` is sampled."""
        self.attempts[batch] = self.attempts.get(batch, 0) + 1
        return self.attempts[batch]

    def end(self, batch: bytes, actor: str, ended: float, rows: int, errors: int) -> None:
        if batch not in self.ended:
            self.rows, self.errors = self.rows + rows, self.errors + errors
        self.ended[batch] = (actor, ended, rows, errors)

    def totals(self) -> tuple[int, int]:
        """(rows, error rows) of every batch sampled so far."""
        return self.rows, self.errors

    def restarts(self) -> int:
        return self.restarted

    def timeline(self) -> list[tuple[str, float, int, int]]:
        """(actor, end time, rows, errors) of every batch, in end order."""
        return sorted(self.ended.values(), key=lambda entry: entry[1])


# ---------------------------------------------------------------------------------------------------------------
# The job
# ---------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Progress:
    images_done: int  # images sampled (ok or error); after each metadata file, the images written so far
    images_total: int  # images this run samples
    seconds: float  # since sampling started (Ray up, output ready)
    errors: int = 0  # error rows among images_done

    @property
    def images_per_second(self) -> float:
        return self.images_done / self.seconds if self.seconds > 0 else 0.0

    @property
    def eta_seconds(self) -> float | None:
        rate = self.images_per_second
        return (self.images_total - self.images_done) / rate if rate > 0 else None


@dataclass(frozen=True)
class JobSummary:
    output_uri: str
    rows: int  # rows this run added (its version's rows); 0 when the output already held every row
    ok: int
    errors: int
    metadata_files: int
    seconds: float
    manifest: dict | None  # the published manifest; None when nothing was added
    version: int | None = None  # the version this run published; None when nothing was added
    actor_restarts: int = 0  # sampling actors whose process died and was started again


def run_job(config: JobConfig, on_progress: Callable[[Progress], None] | None = None,
            ray_address: str | None = None, allow_new_fingerprint: bool = False,
            progress_every: float | None = None) -> JobSummary:
    """Check the input, the output and the checkpoint against the sampling settings, then sample the rows the output
    lacks on Ray and publish them as a new version of the dataset (see `vqbatch.io.dataset`).

    `output.mode`: `error` needs an empty output, `overwrite` replaces the dataset (cleared only once Ray is up and
    the actor pool fits), `refresh` adds to it and finishes a killed run. A refresh under a changed generation
    fingerprint is a ValueError unless `allow_new_fingerprint`. Ray is not started when there is nothing to sample.

    `on_progress` is called after each metadata file is written and, with `progress_every`, also every that many
    seconds with the images the actors have sampled so far.

    The run holds the output's lease (`vqbatch.io.lease`) from before planning until it has published: a second
    run on the same output fails at once with `LeaseHeld`, naming the holder.
    """
    inputs = check_sources(config)
    with Lease(config.output.uri, config.s3) as lease:
        plan = plan_version(config, inputs, allow_new_fingerprint)
        if not plan.pending and not plan.staged and not plan.damaged and not plan.changes_published_fingerprint:
            return JobSummary(config.output.uri, 0, 0, 0, 0, 0.0, None)
        for damage in plan.damaged:
            LOG.warning(f"repairing: {damage.problem}; the rows lost are sampled again")
        started, restarts = time.monotonic(), 0
        if plan.pending:
            config, restarts = sample_version(config, inputs, plan,
                                              ProgressReport(plan.pending, on_progress, progress_every),
                                              ray_address)  # `auto` batch size resolved
        else:  # a killed run wrote every row, a repair finds nothing to sample again, or an earlier fingerprint's
            # versions hold every key again: publish
            start_version(plan)
        lease.check()
        manifest = publish_version(plan, inputs.uris, config)
    added = manifest["versions"][-1]
    return JobSummary(config.output.uri, added["rows_added"], added["rows_ok"], added["rows_failed"],
                      len(added["metadata_files"]), time.monotonic() - started, manifest, plan.version, restarts)


def check_job(config: JobConfig, allow_new_fingerprint: bool = False) -> tuple[InputFiles, VersionPlan]:
    """Every check a job makes before Ray starts (input, checkpoint, output, fingerprint), and what it would write;
    nothing is written. `vqbatch generate --dry-run` prints it."""
    inputs = check_sources(config)
    return inputs, plan_version(config, inputs, allow_new_fingerprint)


def check_sources(config: JobConfig) -> InputFiles:
    """The checks before the output's lease is taken: the input, the checkpoint and the output."""
    check_kept_columns(config.input)
    inputs = open_input(config.input, config.s3)
    check_checkpoint(config.model, config.sampling, config.s3)
    check_output_location(config)
    check_output(config.output, config.s3)
    return inputs


def refresh(config: JobConfig, on_progress: Callable[[Progress], None] | None = None,
            ray_address: str | None = None, allow_new_fingerprint: bool = False,
            progress_every: float | None = None) -> JobSummary:
    """`run_job` in `output.mode=refresh`: add the rows the output lacks for this fingerprint as a new version."""
    refreshing = config.model_copy(update={"output": config.output.model_copy(update={"mode": "refresh"})})
    return run_job(refreshing, on_progress, ray_address, allow_new_fingerprint, progress_every)


def sample_version(config: JobConfig, inputs: InputFiles, plan: VersionPlan, report: "ProgressReport",
                   ray_address: str | None) -> tuple[JobConfig, int]:
    """Start Ray, ready the output and the version's folder, and write the pending rows' files into it; record how
    the actors went (`vqbatch.io.run_stats`). Returns `config` with the batch size the run sampled at (`auto`
    resolved) and how many times an actor was restarted."""
    connect_ray(ray_address)
    check_output_reachable(config.output)
    num_gpus, pool = actor_pool(config.compute)
    config = resolve_batch_size(config, num_gpus)
    prepare_output(config.output, config.s3)
    start_version(plan)
    ledger = BatchLedger.remote()
    started = time.time()
    with report.ticking(ledger):
        for shard in build_dataset(config, inputs, num_gpus, pool, plan, ledger).iter_rows():
            report.file_written(shard["rows"], shard["errors"])
    restarts, timeline = ray.get([ledger.restarts.remote(), ledger.timeline.remote()])
    write_run_stats(OutputRoot.of(config.output, config.s3), plan.folder, run_stats(started, timeline, restarts))
    ray.kill(ledger)
    return config, restarts


class ProgressReport:
    """Calls `on_progress` after each written file and, with `every`, from a thread every `every` seconds; images
    done are the most of the written ones and those the ledger counts sampled, so they never go back."""

    def __init__(self, total: int, on_progress: Callable[[Progress], None] | None, every: float | None):
        self.total, self.on_progress, self.every = total, on_progress, every
        self.started = time.monotonic()
        self.written, self.sampled = (0, 0), (0, 0)  # (images, error images)
        self.lock = threading.Lock()

    def file_written(self, rows: int, errors: int) -> None:
        with self.lock:
            self.written = (self.written[0] + rows, self.written[1] + errors)
            self.tell()

    def tell(self) -> None:
        if self.on_progress:
            done, errors = max(self.written, self.sampled)
            self.on_progress(Progress(done, self.total, time.monotonic() - self.started, errors))

    @contextmanager
    def ticking(self, ledger: ray.actor.ActorHandle) -> Iterator[None]:
        self.started = time.monotonic()
        stop = threading.Event()
        ticker = threading.Thread(target=self.tick, args=(ledger, stop), daemon=True)
        if self.on_progress and self.every:
            ticker.start()
        try:
            yield
        finally:
            stop.set()
            if ticker.is_alive():
                ticker.join()

    def tick(self, ledger: ray.actor.ActorHandle, stop: threading.Event) -> None:
        while not stop.wait(self.every):
            sampled = tuple(ray.get(ledger.totals.remote()))
            with self.lock:
                if not stop.is_set():
                    self.sampled = max(self.sampled, sampled)
                    self.tell()


def build_dataset(config: JobConfig, inputs: InputFiles, num_gpus: float, pool: ray.data.ActorPoolStrategy,
                  plan: VersionPlan, ledger: ray.actor.ActorHandle) -> ray.data.Dataset:
    """The lazy Ray Data chain; executing it writes every image and metadata file and yields one row per file."""
    configure_data_context(ray.data.DataContext.get_current())
    return (
        ray.data.from_items([{"path": path} for path in inputs.paths], override_num_blocks=len(inputs.paths))
        .map_batches(read_pending_rows, fn_kwargs=dict(inputs=inputs, config=config.input, sampling=config.sampling,
                                                       done=plan.done.map(ray.put)),
                     batch_format="pyarrow", batch_size=1)
        # Blocks of a few actor batches (`rows_per_block`): without it an actor call takes a whole input block (a
        # 10k-row file is one block), and Ray Data hands its output on only when the call ends: no writing overlaps
        # sampling, progress comes at the end, and the block's pixels pile up in the actor. Ray Data runs it inside
        # the read task only while the read keeps Ray's default task options (see the faults below).
        .repartition(target_num_rows_per_block=rows_per_block(config.compute.batch_size))
        .map_batches(SampleBatches, compute=pool,
                     fn_constructor_kwargs=dict(config=config, ledger=ledger, identity=plan.fingerprint.parts["model"]),
                     batch_size=config.compute.batch_size, batch_format="pyarrow",
                     num_gpus=num_gpus, num_cpus=config.compute.cpus_per_actor)
        .map_batches(write_shard_rows, fn_kwargs=dict(config=config, folder=plan.folder),
                     batch_size=config.output.rows_per_file, batch_format="pyarrow", num_cpus=WRITE_TASK_CPUS)
    )


def rows_per_block(batch_size: int) -> int:
    """Rows per block the actors take: whole batches, about `BLOCK_ROWS`, at most `MAX_BATCHES_PER_BLOCK` of them."""
    return batch_size * max(1, min(MAX_BATCHES_PER_BLOCK, BLOCK_ROWS // batch_size))


# The driver holds memory for every block and task of the dataset until the dataset finishes: measured, mostly in
# Ray's native core worker rather than Python objects (tracemalloc saw 0.35 MiB of Python heap grow over 450k rows of
# a 600k-prompt job; Ray Data's per-block statistics, ray-project/ray#66016, are part of it). Fewer, larger blocks
# divide it: with the no-op model's batches of 1000 rows, the driver's peak grew +24 MiB from 1M to 4M prompts with
# 4096-row blocks and +10 MiB with 16384-row blocks (which also ran 16% faster). Ray Data still calls the actor one
# batch at a time, and hands an output block on once it reaches its target size (128 MiB), so a block of large
# images does not pile up. An actor that dies loses at most the block it was sampling, so a block holds at most
# `MAX_BATCHES_PER_BLOCK` batches (a GPU actor's batch of 16 makes blocks of 256 rows).
BLOCK_ROWS = 16384
MAX_BATCHES_PER_BLOCK = 16

# Half a CPU per write task, so two write at once on each CPU the actor pool leaves: an S3 writer mostly waits on
# uploads, and actors that sample on GPUs (or the no-op model) leave their own CPUs idle for writers to use.
WRITE_TASK_CPUS = 0.5

# Faults while running, set deliberately rather than left to chance:
# - An actor process that dies (killed, segfault, node lost) is restarted without limit (Ray Data's actor pool
#   default, `max_restarts=-1`): a long job on preemptible nodes loses many. The batch it was sampling is retried on
#   a live actor; `BatchLedger` counts each batch's attempts, and a batch that killed the actors of
#   `MAX_BATCH_ATTEMPTS` tries fails the job instead of looping. (The per-call Ray options that bounded retries
#   are deprecated since Ray 2.60.) Ray logs that such an actor's constructor arguments sit in the object store
#   (ray-project/ray#53727): Ray Data itself puts the operator's function and context there (#57733); they are
#   owned by this driver, so a restart finds them while the job runs (tests/test_faults.py kills an actor and
#   checks it was restarted).
# - Errors the actor raises are not retried (`actor_task_retry_on_errors=False`): `ResilientSampler` already turned
#   the row-level and out-of-memory ones into error rows or smaller batches, so what is left is not transient.
# - Reads and writes go through pyarrow's S3 client, which retries transient S3 errors with exponential backoff
#   (`filesystems.s3_filesystem`). A write that still fails with an `OSError` is tried again in its task, up to
#   `WRITE_ATTEMPTS` times (same file names, so a retry overwrites rather than duplicates). Read tasks keep Ray's
#   default options, with no retry of their own: any task option on the read stops Ray Data from fusing the
#   repartition into it, and the repartition then runs as separate one-CPU tasks that, with the read, hold every
#   CPU the actors leave, so no file is written before the whole input is read (measured: the first metadata file
#   of a 1M-prompt job came after 100 s, not 15-20 s). A read that still fails fails the job, and `refresh` picks
#   it up where it stopped.
# - No block may be dropped (`max_errored_blocks=0`): a row never vanishes silently; the job fails instead.
WRITE_ATTEMPTS = 4
WRITE_RETRY_SECONDS = 1.0  # before the second try; doubled before each further one


def configure_data_context(context: ray.data.DataContext) -> None:
    context.enable_progress_bars = False  # the caller reports progress per file
    context.actor_task_retry_on_errors = False
    context.max_errored_blocks = 0


def read_pending_rows(files: pa.Table, inputs: InputFiles, config: InputConfig, sampling: SamplingConfig,
                      done: HeldBuckets) -> Iterator[pa.Table]:
    """The image rows of each input file in `files` (a `path` column), a batch of input rows at a time:
    `expand_rows`, less the rows whose key is in `done` (held or staged already), which are found by their keys
    and never expanded. `done`'s buckets are in Ray's object store: the task fetches one at a time
    (`vqbatch.io.held`), never every held key.

    The engine reads the files itself rather than through `ray.data.read_parquet`: `open_input` has already listed
    and checked them, and Ray's listing task and its size-balanced buckets (every small file in one read task) cost
    seconds per job and hold a whole input in one long-lived task.
    """
    for path in files.column("path").to_pylist():
        for batch in inputs.batches(path, inputs.columns(config)):
            table = pa.Table.from_batches([batch])
            yield expand_rows(table, config, sampling, pending_image_rows(table, config, sampling, done, ray.get))


def write_shard_rows(sampled: pa.Table, config: JobConfig, folder: str) -> pa.Table:
    rows = [write_shard_retrying(sampled, config, folder)] if sampled.num_rows else []
    return pa.Table.from_pylist(rows, schema=SHARD_SCHEMA)


def write_shard_retrying(sampled: pa.Table, config: JobConfig, folder: str) -> dict:
    """`write_shard`, tried again after an `OSError` (see the faults above); the last error is raised."""
    for attempt in range(1, WRITE_ATTEMPTS + 1):
        try:
            return write_shard(sampled, config, folder)
        except OSError:
            if attempt == WRITE_ATTEMPTS:
                raise
            time.sleep(WRITE_RETRY_SECONDS * 2 ** (attempt - 1))


def actor_pool(compute: ComputeConfig) -> tuple[float, ray.data.ActorPoolStrategy]:
    """GPUs per actor and the pool: one actor per GPU on GPU clusters; on CPU, leave one CPU for read/write tasks."""
    resources = ray.cluster_resources()
    cpus, gpus = resources.get("CPU", 0.0), resources.get("GPU", 0.0)
    gpus_per_actor = compute.gpus_per_actor if compute.gpus_per_actor is not None else (1.0 if gpus else 0.0)
    if gpus_per_actor:
        if not gpus:
            LOG.warning(f"asking {gpus_per_actor} GPU per actor but the cluster has none yet; the job waits for "
                        "GPU nodes (set compute.gpus_per_actor=0 to sample on CPU)")
        default_size = max(1, int(gpus // gpus_per_actor))
    else:
        default_size = max(1, int((cpus - 1) // compute.cpus_per_actor))
        check_cpu_left(compute, compute.max_actors or default_size, cpus)
    max_size = compute.max_actors or max(default_size, compute.min_actors)
    return gpus_per_actor, ray.data.ActorPoolStrategy(min_size=compute.min_actors, max_size=max_size)


def resolve_batch_size(config: JobConfig, num_gpus: float) -> JobConfig:
    """`config` with a number for `compute.batch_size: auto`: measured once, before any actor starts, by a Ray task
    holding one actor's resources (`vqbatch.batch_size`); blocks are then cut to that size like any other."""
    if config.compute.batch_size != "auto":
        return config
    probe = ray.remote(max_calls=1)(probe_batch_size)  # its worker then exits: the memory goes back to the actors
    probe = probe.options(num_gpus=num_gpus, num_cpus=config.compute.cpus_per_actor)
    batch_size = ray.get(probe.remote(config, build_model))
    LOG.info(f"batch size {batch_size}, chosen from memory")
    return config.model_copy(update={"compute": config.compute.model_copy(update={"batch_size": batch_size})})


def check_cpu_left(compute: ComputeConfig, max_actors: int, cpus: float) -> None:
    """A CPU actor pool holding every CPU starves the read and write tasks and the job never ends."""
    if max_actors * compute.cpus_per_actor > cpus - 1:
        raise ValueError(f"compute: max_actors={max_actors} x cpus_per_actor={compute.cpus_per_actor} CPU would take "
                         f"every CPU of the cluster ({cpus:g}) and leave none for reading and writing; allowed: "
                         f"max_actors x cpus_per_actor <= {cpus - 1:g}")


def check_output_reachable(output: OutputConfig) -> None:
    """Writers run on every node: a local output on a cluster of more than one node must be a shared filesystem."""
    nodes = [node for node in ray.nodes() if node["Alive"]]
    if len(nodes) > 1 and not is_s3(output.uri) and not output.shared_filesystem:
        raise ValueError(f"output {output.uri!r} is a local path but the Ray cluster has {len(nodes)} nodes: each "
                         "node's writers would write to their own disk; give an s3:// output, or set "
                         "output.shared_filesystem: true if every node mounts this path (NFS, Lustre, ...)")


# Ray returns task results under `max_direct_call_object_size` bytes (100 KiB by default) inline to their owner, the
# driver, which keeps them in its own heap. A block of prompt rows is that small, and with the default the driver
# grew by about the size of every prompt read (measured: 453 -> 478 MiB over 300k prompts, 8 MiB with this limit),
# so it could not stay flat as a job grows. With it, blocks live in the object store, under Ray Data's memory budget.
# Clusters set the same through the RAY_max_direct_call_object_size environment variable (infra/Dockerfile).
LOCAL_RAY_SYSTEM_CONFIG = {"max_direct_call_object_size": 1024}


def connect_ray(address: str | None = None) -> None:
    """Join the cluster at `address` (or RAY_ADDRESS); "auto" finds a running one; otherwise start a local one."""
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        try:
            ray.init(address=address)
            return
        except ConnectionError:
            if address != "auto":
                raise
    ray.init(address="local", include_dashboard=False, _system_config=dict(LOCAL_RAY_SYSTEM_CONFIG))  # Ray adds keys
