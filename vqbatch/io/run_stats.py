"""How a run went, kept beside its version: images per second over the run and per actor, and actor restarts.

    versions/v0001/run.json   {"started", "seconds", "bin_seconds", "images_per_bin": {actor: [count, ...]},
                               "errors", "actor_restarts"}

The engine builds it from each sampled batch's actor and end time; `vqbatch report` draws it. A version published
from files a killed run left (nothing sampled again) has none.
"""

from __future__ import annotations

import json
import posixpath
from datetime import datetime, timezone

from vqbatch.io.filesystems import OutputRoot, exists, read_bytes, write_bytes_atomically

RUN_STATS_NAME = "run.json"
MAX_BINS = 60  # points per plotted line: the run's time cut into at most this many equal bins
BATCHES_PER_BIN = 3  # at least this many batches per bin on average, so a rate is not one batch's spike


def run_stats(started: float, timeline: list[tuple[str, float, int, int]], restarts: int) -> dict:
    """The run's stats from its batches' (actor id, end time, rows, errors), times in seconds since the epoch."""
    seconds = max([ended - started for _, ended, _, _ in timeline], default=0.0)
    bins = min(MAX_BINS, max(1, len(timeline) // BATCHES_PER_BIN))
    width = max(seconds / bins, 1e-3)
    per_actor: dict[str, list[int]] = {}
    names: dict[str, str] = {}  # Ray's actor id -> "actor 1", "actor 2", ... in the order they first ended a batch
    for actor, ended, rows, _ in timeline:
        name = names.setdefault(actor, f"actor {len(names) + 1}")
        counts = per_actor.setdefault(name, [0] * bins)
        counts[min(bins - 1, int((ended - started) // width))] += rows
    return {"started": datetime.fromtimestamp(started, timezone.utc).isoformat(timespec="seconds"),
            "seconds": round(seconds, 3), "bin_seconds": round(width, 3), "images_per_bin": per_actor,
            "errors": sum(errors for _, _, _, errors in timeline), "actor_restarts": restarts}


def write_run_stats(location: OutputRoot, version_folder: str, stats: dict) -> None:
    path = location.path(posixpath.join(version_folder, RUN_STATS_NAME))
    write_bytes_atomically(location.filesystem, path, json.dumps(stats, indent=1).encode("utf-8"))


def read_run_stats(location: OutputRoot, version_folder: str) -> dict | None:
    """The version's run stats; None when it has none."""
    path = location.path(posixpath.join(version_folder, RUN_STATS_NAME))
    return json.loads(read_bytes(location.filesystem, path)) if exists(location.filesystem, path) else None
