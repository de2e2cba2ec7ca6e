"""What a run shows: progress lines that parse, a summary that says where to look, and a stderr free of noise."""

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from vqbatch.console import PLAIN_SECONDS, ProgressPrinter
from vqbatch.engine import JobSummary, Progress
from vqbatch.tiny import write_tiny_checkpoint

VQBATCH = str(Path(sys.executable).with_name("vqbatch"))
PLAIN_LINE = re.compile(r"progress: (\d+)/(\d+) images \((\d+)%\), (\d+) errors, ([\d.]+) images/s, ETA (\?|\d+m\d\ds)")
DONE_LINE = re.compile(r"done: (\d+) images \((\d+) ok, (\d+) failed\) in \d+ metadata files, \d+m\d\ds "
                       r"\([\d.]+ images/s\) -> (.+) \(version (\d+)\)")
NOISE = re.compile(r"warning|error|deprecat|traceback|loading weights|\x1b\[", re.IGNORECASE)


def test_a_real_runs_plain_progress_parses_line_by_line_ends_with_the_summary_and_stderr_is_clean(tmp_path):
    model = write_tiny_checkpoint(tmp_path / "tiny", seed=0)
    prompts = [f"a small red circle number {i}" for i in range(11)] + ["   "]  # one row fails: an error is counted
    pq.write_table(pa.table({"id": [f"r{i}" for i in range(12)], "prompt": prompts}), tmp_path / "in.parquet")
    output = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("RAY_ADDRESS", None)
    run = subprocess.run([VQBATCH, "generate", "--input", str(tmp_path / "in.parquet"), "--output", str(output),
                          "--model", str(model), "--steps", "2", "--batch-size", "2", "--rows-per-file", "4",
                          "--gpus-per-actor", "0"],
                         capture_output=True, text=True, env=env, timeout=600)  # stdout is a pipe: plain lines
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert not NOISE.search(run.stderr), run.stderr  # Ray's and transformers' lines went to the log file
    lines = run.stdout.splitlines()
    progress = [PLAIN_LINE.fullmatch(line) for line in lines[:-3]]
    assert progress and all(progress), lines  # every line before the summary is a progress line
    done = [int(match[1]) for match in progress]
    assert done == sorted(done) and done[-1] == 12 and progress[-1][4] == "1"
    summary = DONE_LINE.fullmatch(lines[-3])
    assert summary and summary.groups() == ("12", "11", "1", str(output), "1"), lines[-3]
    assert lines[-2] == f"see the images with their prompts: vqbatch report {output}"
    log_file = Path(re.fullmatch(r"Ray's own messages: (\S+) \(--verbose prints them here\)", lines[-1])[1])
    kept = log_file.read_text()
    assert "core_worker" in kept  # Ray's own lines are kept, not lost
    assert "DeprecationWarning" not in kept  # vqbatch's calls, in the driver and in the actors, use no deprecated API


def progress(done: int, seconds: float, errors: int = 0) -> Progress:
    return Progress(done, 10, seconds, errors)


def test_plain_lines_come_every_few_seconds_and_the_last_one_once():
    stream = io.StringIO()
    printer = ProgressPrinter(stream, "plain")
    for done, seconds in [(0, 1.0), (2, 2.0), (4, PLAIN_SECONDS + 1.5), (6, PLAIN_SECONDS + 2), (10, 9.0),
                          (10, 9.5)]:
        printer(progress(done, seconds))
    assert [PLAIN_LINE.fullmatch(line)[1] for line in stream.getvalue().splitlines()] == ["0", "4", "10"]


def test_a_terminal_line_is_redrawn_in_place_and_ended_before_the_summary():
    stream = io.StringIO()
    printer = ProgressPrinter(stream, "live")
    printer(progress(3, 2.0, errors=1))
    printer(progress(5, 3.0, errors=1))
    printer.summary(JobSummary("out/x", 10, 9, 1, 2, 30.0, {}, 1), None)
    text = stream.getvalue()
    assert text.startswith("\r3/10 images (30%), 1 errors, 1.50 images/s, ETA 0m05s")
    assert "\r5/10 images (50%)" in text and "\n" not in text.split("done:")[0][:-1]
    assert text.splitlines()[-1] == "see the images with their prompts: vqbatch report out/x"


def test_json_progress_is_one_object_per_update_and_the_summary_last():
    stream = io.StringIO()
    printer = ProgressPrinter(stream, "json")
    printer(progress(4, 2.0, errors=2))
    printer.summary(JobSummary("s3://bucket/data", 10, 8, 2, 3, 5.0, {}, 2, actor_restarts=1), Path("/tmp/x.log"))
    first, last = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first == {"event": "progress", "images_done": 4, "images_total": 10, "errors": 2,
                     "images_per_second": 2.0, "eta_seconds": 3.0, "seconds": 2.0}
    assert last["event"] == "done" and last["actor_restarts"] == 1 and last["version"] == 2
    assert last["report_command"] == "vqbatch report s3://bucket/data" and last["log_file"] == "/tmp/x.log"


def test_quiet_prints_only_the_summary():
    stream = io.StringIO()
    printer = ProgressPrinter(stream, "quiet")
    printer(progress(4, 2.0))
    printer.summary(JobSummary("out", 10, 10, 0, 1, 5.0, {}, 1), None)
    assert stream.getvalue().startswith("done: 10 images (10 ok, 0 failed)")


def test_dry_run_says_what_would_run_without_ray_or_writing(tmp_path, capsys):
    import ray

    from vqbatch.cli import main

    pq.write_table(pa.table({"id": [f"r{i}" for i in range(6)], "prompt": ["a red circle"] * 6}),
                   tmp_path / "in.parquet")
    model = write_tiny_checkpoint(tmp_path / "tiny", seed=0)
    output = tmp_path / "out"
    assert main(["generate", "--input", str(tmp_path / "in.parquet"), "--output", str(output), "--model", str(model),
                 "--limit", "4", "--images-per-prompt", "2", "--steps", "3", "--batch-size", "5", "--dry-run"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == "dry run: nothing sampled, written or started"
    assert printed[1].startswith("input        1 file(s), 4 prompts (--limit 4), 8 images: ")
    assert printed[3] == "pending      8 images to sample (0 already held)"
    assert printed[4].startswith("fingerprint  ") and "steps=3" in printed[4]
    assert "per actor" in printed[5] and printed[6] == "batch size   5"
    assert not output.exists() and not ray.is_initialized()
