"""Crash and resume, for each output format: `vqbatch generate` killed with SIGKILL mid-run (driver, its local Ray and
its actors), then `generate --resume`: every row exactly once, every image present and decodable, no temporary file
or half-written shard left, the killed run's files adopted rather than sampled again."""

import os
import signal
import subprocess
import sys
import time

import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import ray_started_locally
from vqbatch.cli import main
from vqbatch.config import S3Config
from vqbatch.io.dataset import OutputRoot, read_manifest
from vqbatch.io.filesystems import resolve
from vqbatch.io.images import decode_image
from vqbatch.io.view import read_dataset
from vqbatch.tiny import write_tiny_checkpoint

PROMPTS = 40  # long enough that the kill lands before the last file, even on a quiet machine
FILES_BEFORE_KILL = 3  # metadata files the killed run must have written
STARTUP_LIMIT_S = 300  # a loaded CI machine can take minutes to start Ray and the actor


@pytest.fixture(params=["files", "webdataset", "parquet"])
def job_arguments(tmp_path, request):
    ids = [f"p{i}" for i in range(PROMPTS)]
    prompts = [f"a shape number {i} on a plain background" for i in range(PROMPTS)]
    pq.write_table(pa.table({"id": ids, "prompt": prompts}), tmp_path / "prompts.parquet")
    model = write_tiny_checkpoint(tmp_path / "tiny", seed=0)
    return ["--input", str(tmp_path / "prompts.parquet"), "--output", str(tmp_path / "out"), "--model", str(model),
            "--steps", "30", "--batch-size", "1", "--rows-per-file", "1", "--num-actors", "1",
            "--output-format", request.param]


def start_generate(arguments: list[str]) -> subprocess.Popen:
    """`vqbatch generate` in its own session (so its process group holds it), starting its own local Ray."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("RAY_ADDRESS", None)
    return subprocess.Popen([sys.executable, "-m", "vqbatch.cli", "generate", *arguments], env=env,
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def staged_files(output) -> list[str]:
    """The version's complete shards: their metadata files (each written last, after its images or tar)."""
    folder = output / "versions" / "v0001"
    return sorted(path.name for path in folder.glob("part-*.parquet"))


def wait_for_files(process: subprocess.Popen, output, count: int) -> list[str]:
    deadline = time.monotonic() + STARTUP_LIMIT_S
    while len(staged_files(output)) < count:
        assert process.poll() is None, f"generate ended (code {process.returncode}) before writing {count} files"
        assert time.monotonic() < deadline, f"no {count} metadata files after {STARTUP_LIMIT_S} s"
        time.sleep(0.1)
    return staged_files(output)


def kill_everything(process: subprocess.Popen) -> None:
    """SIGKILL the driver's process group and every process it started (Ray's GCS, raylet, workers, actors),
    found before the kill so that none escapes by being re-parented."""
    started = psutil.Process(process.pid).children(recursive=True)
    os.killpg(process.pid, signal.SIGKILL)
    for child in started:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass
    process.wait(timeout=30)
    psutil.wait_procs(started, timeout=30)


def test_a_run_killed_mid_way_is_finished_by_resume_with_every_row_once(job_arguments, tmp_path, capsys):
    output = tmp_path / "out"
    process = start_generate(job_arguments)
    try:
        before_kill = wait_for_files(process, output, FILES_BEFORE_KILL)
    finally:
        kill_everything(process)
    assert not (output / "manifest.json").exists(), "the run finished before it was killed; make it longer"
    after_kill = staged_files(output)
    assert set(before_kill) <= set(after_kill) and len(after_kill) < PROMPTS
    code = main(["generate", *job_arguments])
    assert code == 2 and "generate --resume" in capsys.readouterr().err  # an unfinished output is not silently reused

    with ray_started_locally():
        code = main(["generate", "--resume", *job_arguments])
    assert code == 0
    progress = capsys.readouterr().out
    assert f"/{PROMPTS - len(after_kill)} images" in progress  # the killed run's rows were adopted, not sampled again

    rows = read_dataset(str(output), images=True).to_pylist()
    keys = [(row["id"], row["image_index"]) for row in rows]
    assert sorted(keys) == sorted((f"p{i}", 0) for i in range(PROMPTS)), "every row exactly once"
    assert all(row["status"] == "ok" and decode_image(row["image"]["bytes"]).shape == (32, 32, 3) for row in rows)
    manifest = read_manifest(OutputRoot(*resolve(str(output), S3Config())))
    published = {shard["file"].rsplit("/", 1)[1] for shard in manifest["metadata_files"]}
    assert set(after_kill) <= published and [v["version"] for v in manifest["versions"]] == [1]
    leftovers = [name for _, _, names in os.walk(output) for name in names if name.endswith(".tmp")]
    assert not leftovers, leftovers
    shards = {path.name for path in (output / "versions" / "v0001").glob("part-*")}  # every shard file published
    assert shards == {path.rsplit("/", 1)[-1] for path in {*manifest["data_files"], *published}}
