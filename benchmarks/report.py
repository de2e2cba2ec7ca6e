"""What every benchmark shares: the machine it ran on, wall-clock timing, and writing results as JSON and markdown."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch

# ---------------------------------------------------------------------------------------------------------------
# The machine
# ---------------------------------------------------------------------------------------------------------------


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo (Linux), else what `platform` knows."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def load_average() -> list[float] | None:
    """1, 5 and 15 minute load averages: how busy the machine was (other processes skew CPU timings)."""
    return [round(value, 2) for value in os.getloadavg()] if hasattr(os, "getloadavg") else None


def machine(device: str) -> dict:
    info = {
        "cpu": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": device,
        "load_average_at_start": load_average(),
    }
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


# ---------------------------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------------------------


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


@dataclass(frozen=True)
class Timing:
    wall_s: float  # wall-clock seconds, all queued device work finished
    cpu_s: float  # CPU seconds of this process, all threads: on a busy shared CPU, the work done, not the waiting


def seconds_of(call: Callable[[], object], device: str) -> tuple[float, object]:
    """Wall-clock seconds of one call (after all queued device work finished) and what it returned."""
    timing, result = timing_of(call, device)
    return timing.wall_s, result


def timing_of(call: Callable[[], object], device: str) -> tuple[Timing, object]:
    synchronize(device)
    started, cpu_started = time.perf_counter(), time.process_time()
    result = call()
    synchronize(device)
    return Timing(time.perf_counter() - started, time.process_time() - cpu_started), result


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


# ---------------------------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Report:
    """One benchmark's results: settings, rows of one table, and notes; written as `<name>.json` and `<name>.md`."""

    benchmark: str
    settings: dict
    machine: dict
    columns: list[str]  # the markdown table's columns, keys of each row
    rows: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    summary: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"benchmark": self.benchmark, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "settings": self.settings, "machine": {**self.machine, "load_average_at_end": load_average()},
                "rows": self.rows, "summary": self.summary, "notes": self.notes}

    def markdown(self) -> str:
        m = self.machine
        where = f"{m['cpu']}, {m['cpu_cores']} cores, torch {m['torch']} ({m['torch_threads']} threads)"
        if "gpu" in m:
            where = f"{m['gpu']} (CUDA {m['cuda']}); host {where}"
        lines = [f"### {self.benchmark}", "", f"Machine: {where}; load average at start "
                 f"{m['load_average_at_start']}, at end {load_average()}.", "",
                 "| " + " | ".join(self.columns) + " |", "|" + " --- |" * len(self.columns)]
        lines += ["| " + " | ".join(format_cell(row.get(column)) for column in self.columns) + " |" for row in self.rows]
        lines += [""] + [f"- {note}" for note in self.notes]
        return "\n".join(lines).rstrip() + "\n"

    def write(self, folder: str | Path, stem: str) -> tuple[Path, Path]:
        """Write `<stem>.json` and `<stem>.md` into `folder`, print both, and return their paths."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        json_path, markdown_path = folder / f"{stem}.json", folder / f"{stem}.md"
        text = json.dumps(self.to_json(), indent=2)
        json_path.write_text(text + "\n", encoding="utf-8")
        markdown_path.write_text(self.markdown(), encoding="utf-8")
        print(text)
        print(self.markdown())
        return json_path, markdown_path


def format_cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)
