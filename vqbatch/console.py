"""What a run shows its user: live progress, the final summary, and only vqbatch's own messages.

    progress    a line redrawn in place on a terminal (at least every `LIVE_SECONDS`); a plain line every
                `PLAIN_SECONDS` when stdout is not a terminal; one JSON object per update with --json-progress;
                nothing with --quiet. Then the summary: the output, the elapsed time and the `report` command.
    messages    vqbatch's own (the `vqbatch` logger) on stderr.
    the rest    Ray's and transformers' lines (Ray's start-up notes, its C++ core's log lines, actors' output)
                go to a log file named in the summary, unless --verbose; Ray keeps its own log files as well.
"""

from __future__ import annotations

import io
import json
import logging
import os
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import TextIO

LIVE_SECONDS = 1.0  # the engine's progress tick: a terminal line is redrawn at least this often
PLAIN_SECONDS = 5.0  # a plain progress line at most this often (and the last one always)
LOG_FOLDER = Path(tempfile.gettempdir()) / "vqbatch" / "logs"


def progress_mode(quiet: bool, json_progress: bool, stream: TextIO) -> str:
    if quiet:
        return "quiet"
    if json_progress:
        return "json"
    return "live" if stream.isatty() else "plain"


class ProgressPrinter:
    """Prints each `engine.Progress` on `stream` as `mode` says: live, plain, json or quiet."""

    def __init__(self, stream: TextIO, mode: str):
        self.stream, self.mode = stream, mode
        self.last_plain = (-PLAIN_SECONDS, -1)  # (seconds, images done) of the last plain line
        self.drawn = False  # a live line is on screen and needs its newline before anything else

    def __call__(self, progress) -> None:
        if self.mode == "json":
            self.write(json.dumps(progress_record(progress)) + "\n")
        elif self.mode == "live":
            self.write(f"\r{progress_text(progress)}\x1b[K")
            self.drawn = True
        elif self.mode == "plain" and self.plain_line_due(progress):
            self.last_plain = (progress.seconds, progress.images_done)
            self.write(f"progress: {progress_text(progress)}\n")

    def plain_line_due(self, progress) -> bool:
        seconds, done = self.last_plain
        if progress.images_done == progress.images_total:
            return done != progress.images_done  # the last line once
        return progress.seconds - seconds >= PLAIN_SECONDS

    def summary(self, summary, log_file: Path | None, report: Path | None = None) -> None:
        """The run's last lines: what it wrote, how long it took, and how to look at it: the `report` command, or
        the report page itself when the run wrote one."""
        if self.drawn:
            self.write("\n")
        record = summary_record(summary, log_file, report)
        if self.mode == "json":
            self.write(json.dumps(record) + "\n")
            return
        restarts = summary.actor_restarts
        look = f"open {report}" if report else record["report_command"]
        text = (f"done: {summary.rows} images ({summary.ok} ok, {summary.errors} failed) in "
                f"{summary.metadata_files} metadata files, {format_seconds(summary.seconds)} "
                f"({record['images_per_second']:.2f} images/s)"
                f"{f', {restarts} actor restart(s)' if restarts else ''} -> {summary.output_uri} "
                f"(version {summary.version})\n"
                f"see the images with their prompts: {look}\n")
        if log_file is not None:
            text += f"Ray's own messages: {log_file} (--verbose prints them here)\n"
        self.write(text)

    def write(self, text: str) -> None:
        self.stream.write(text)
        self.stream.flush()


def progress_text(progress) -> str:
    eta = progress.eta_seconds
    share = 100 * progress.images_done / progress.images_total if progress.images_total else 100.0
    return (f"{progress.images_done}/{progress.images_total} images ({share:.0f}%), {progress.errors} errors, "
            f"{progress.images_per_second:.2f} images/s, ETA {'?' if eta is None else format_seconds(eta)}")


def progress_record(progress) -> dict:
    eta = progress.eta_seconds
    return {"event": "progress", "images_done": progress.images_done, "images_total": progress.images_total,
            "errors": progress.errors, "images_per_second": round(progress.images_per_second, 3),
            "eta_seconds": None if eta is None else round(eta, 1), "seconds": round(progress.seconds, 1)}


def summary_record(summary, log_file: Path | None, report: Path | None = None) -> dict:
    rate = summary.rows / summary.seconds if summary.seconds > 0 else 0.0
    return {"event": "done", "output": summary.output_uri, "version": summary.version, "images": summary.rows,
            "ok": summary.ok, "errors": summary.errors, "metadata_files": summary.metadata_files,
            "seconds": round(summary.seconds, 1), "images_per_second": round(rate, 3),
            "actor_restarts": summary.actor_restarts, "report_command": f"vqbatch report {summary.output_uri}",
            "report": None if report is None else str(report), "log_file": None if log_file is None else str(log_file)}


def format_seconds(seconds: float) -> str:
    minutes, seconds = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{seconds:02d}s" if hours else f"{minutes}m{seconds:02d}s"


# ---------------------------------------------------------------------------------------------------------------
# Messages: vqbatch's on stderr, everything else in a log file
# ---------------------------------------------------------------------------------------------------------------

@contextmanager
def own_messages_only(verbose: bool) -> Iterator[Path | None]:
    """For the block, the `vqbatch` logger prints on stderr and, unless `verbose`, everything else written to stderr
    (file descriptor 2: Ray's Python loggers and warnings, its C++ core's ERROR lines, actors' forwarded output)
    goes to a new log file, whose path is yielded (None when verbose)."""
    log_file = None if verbose else new_log_file()
    with (stderr_into(log_file) if log_file else keep_stderr()) as terminal:
        handler = logging.StreamHandler(terminal)
        handler.setFormatter(logging.Formatter("vqbatch: %(message)s"))
        logger = logging.getLogger("vqbatch")
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
        try:
            yield log_file
        finally:
            logger.removeHandler(handler)


def new_log_file() -> Path:
    LOG_FOLDER.mkdir(parents=True, exist_ok=True)
    return LOG_FOLDER / f"run-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}-{os.getpid()}.log"


@contextmanager
def keep_stderr() -> Iterator[TextIO]:
    yield sys.stderr


@contextmanager
def stderr_into(log_file: Path) -> Iterator[TextIO]:
    """Point file descriptor 2 and `sys.stderr` at `log_file`; yield a stream to the stderr they had before."""
    sys.stderr.flush()
    saved = os.dup(2)
    terminal = os.fdopen(os.dup(2), "w", buffering=1) if writes_to_descriptor_2(sys.stderr) else sys.stderr
    before = sys.stderr
    with open(log_file, "a", buffering=1, encoding="utf-8") as log:
        os.dup2(log.fileno(), 2)
        sys.stderr = log
        try:
            yield terminal
        finally:
            log.flush()
            os.dup2(saved, 2)
            os.close(saved)
            sys.stderr = before
            if terminal is not before:
                terminal.close()


def writes_to_descriptor_2(stream: TextIO) -> bool:
    """False for stand-ins such as pytest's captured stderr, which have no descriptor (or another one)."""
    try:
        return stream.fileno() == 2
    except (AttributeError, OSError, io.UnsupportedOperation):
        return False
