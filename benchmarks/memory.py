"""Peak resident memory of this process and of every process it started (a local Ray's raylet and workers).

A background thread samples the process tree with psutil every `interval` seconds. Ray's worker processes name
themselves `ray::<task or actor>`; the other children (raylet, GCS, agents) are Ray's own services.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import psutil

MIB = 2**20


@dataclass
class Peaks:
    driver_mib: float = 0.0  # this process
    driver_start_mib: float = 0.0  # this process at the first sample
    largest_worker_mib: float = 0.0  # the largest single Ray worker process
    largest_worker_private_mib: float = 0.0  # the same, less shared pages (Ray's object store, mapped files)
    largest_worker_name: str = ""  # the process name (`ray::<task or actor>`) of the largest private peak
    workers_total_mib: float = 0.0  # all Ray worker processes together
    workers_private_mib: float = 0.0  # all Ray worker processes together, less shared pages
    tree_total_mib: float = 0.0  # this process and every descendant (shared pages counted once per process)
    workers_seen: int = 0  # distinct worker processes sampled


def process_name(process: psutil.Process) -> str:
    """Ray's title for a worker (`ray::MapWorker(MapBatches(SampleBatches))`): the first word of its command line
    (`name()` is cut at 15 characters)."""
    try:
        return " ".join(process.cmdline()[:1]).split(" ")[0]
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return ""


def resident_mib(process: psutil.Process) -> tuple[float, float] | None:
    """(resident, private) MiB: private leaves out shared pages, such as Ray's object store that workers map."""
    try:
        memory = process.memory_info()
    except (psutil.NoSuchProcess, psutil.AccessDenied):  # it ended between listing and reading
        return None
    return memory.rss / MIB, (memory.rss - getattr(memory, "shared", 0)) / MIB


def is_worker(process: psutil.Process) -> bool:
    try:
        return process.name().startswith("ray::") or any(part.startswith("ray::") for part in process.cmdline()[:1])
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


class PeakMemory:
    """`with PeakMemory() as memory: ...`, then `memory.peaks`."""

    def __init__(self, interval: float = 0.25):
        self.interval = interval
        self.peaks = Peaks()
        self.driver = psutil.Process()
        self.workers: set[int] = set()
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self.sample_until_stopped, daemon=True)

    def __enter__(self) -> "PeakMemory":
        self.sample()
        self.thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stopped.set()
        self.thread.join()
        self.sample()

    def sample_until_stopped(self) -> None:
        while not self.stopped.wait(self.interval):
            self.sample()

    def sample(self) -> None:
        driver = (resident_mib(self.driver) or (0.0, 0.0))[0]
        workers, others = [], []
        for child in self.driver.children(recursive=True):
            sizes = resident_mib(child)
            if sizes is None:
                continue
            if is_worker(child):
                workers.append(sizes)
                self.workers.add(child.pid)
                if sizes[1] > self.peaks.largest_worker_private_mib:
                    self.peaks.largest_worker_name = process_name(child)
            else:
                others.append(sizes[0])
        resident, private = [rss for rss, _ in workers], [own for _, own in workers]
        p = self.peaks
        p.driver_start_mib = p.driver_start_mib or driver
        p.driver_mib = max(p.driver_mib, driver)
        p.largest_worker_mib = max(p.largest_worker_mib, max(resident, default=0.0))
        p.largest_worker_private_mib = max(p.largest_worker_private_mib, max(private, default=0.0))
        p.workers_total_mib = max(p.workers_total_mib, sum(resident))
        p.workers_private_mib = max(p.workers_private_mib, sum(private))
        p.tree_total_mib = max(p.tree_total_mib, driver + sum(resident) + sum(others))
        p.workers_seen = len(self.workers)
