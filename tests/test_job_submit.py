"""`ray job submit` of jobs/generate.py against a real `ray start --head` (with its job server) on loopback."""

import os
import shlex
import subprocess
import sys
from pathlib import Path

import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from conftest import free_port
from vqbatch.config import OutputConfig, S3Config
from vqbatch.io.dataset import OutputRoot, read_manifest, read_metadata

REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))


def stop_cluster(temp_dir: str, gcs_port: int) -> None:
    """Kill this test's Ray processes only (`ray stop` would kill every Ray cluster on the machine)."""
    marks = (temp_dir, f":{gcs_port}")
    roots = [process for process in psutil.process_iter(["cmdline"])
             if any(mark in part for part in process.info["cmdline"] or [] for mark in marks)]
    family = {process.pid: process for root in roots for process in [root, *safe_children(root)]}
    for process in family.values():
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(list(family.values()), timeout=20)


def safe_children(process: psutil.Process) -> list[psutil.Process]:
    try:
        return process.children(recursive=True)
    except psutil.NoSuchProcess:
        return []


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A head node with the dashboard (the job server); its address and the environment to talk to it."""
    temp_dir = str(tmp_path_factory.mktemp("rayhead"))
    gcs_port, dashboard_port = free_port(), free_port()
    # the job's `python` must be this interpreter (the cluster's image has vqbatch's dependencies; here, the venv)
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    env = {**os.environ, "PATH": path, "RAY_TMPDIR": temp_dir, "RAY_AUTH_MODE": "disabled",
           "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    command = [RAY, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs_port}",
               "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}",
               f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
               "--num-cpus=2", f"--temp-dir={temp_dir}", "--disable-usage-stats"]
    try:
        started = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
        assert started.returncode == 0, f"ray start failed (job submission needs ray[default]):\n{started.stderr[-3000:]}"
        yield f"http://127.0.0.1:{dashboard_port}", env
    finally:
        stop_cluster(temp_dir, gcs_port)


def test_ray_job_submit_runs_generate_to_completion(ray_head, tmp_path):
    address, env = ray_head
    pq.write_table(pa.table({"id": [f"r{i}" for i in range(6)], "prompt": ["a red circle"] * 5 + [" "]}),
                   tmp_path / "prompts.parquet")
    output = tmp_path / "out"
    job = {"input": {"paths": [str(tmp_path / "prompts.parquet")]}, "model": {"uri": "noop"},
           "sampling": {"images_per_prompt": 2}, "output": {"uri": str(output), "rows_per_file": 4}}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    submit = [RAY, "job", "submit", "--address", address, "--working-dir", ".",
              "--runtime-env", "jobs/runtime_env.yaml", "--",
              "python", "jobs/generate.py", "--config", str(tmp_path / "job.yaml"), "--batch-size", "3"]
    result = subprocess.run(submit, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "succeeded" in result.stdout and "done: 12 images (10 ok, 2 failed)" in result.stdout

    location = OutputRoot.of(OutputConfig(uri=str(output)), S3Config())
    assert read_manifest(location)["rows"] == 12
    metadata = read_metadata(location)
    keys = sorted(zip(metadata.column("id").to_pylist(), metadata.column("image_index").to_pylist()))
    assert keys == sorted((f"r{i}", k) for i in range(6) for k in range(2))
    assert all((output / path).is_file() for path in metadata.column("image").to_pylist() if path)


def readme_cluster_commands() -> list[str]:
    """The README's cluster guide, one command per entry (continuation lines joined, comments dropped)."""
    guide = (REPO / "README.md").read_text().split("## Run on a cluster")[1].split("```bash\n")[1].split("```")[0]
    joined = guide.replace("\\\n", " ")
    return [" ".join(line.split("#")[0].split()) for line in joined.splitlines() if line.split("#")[0].strip()]


def test_the_readme_cluster_guide_runs_on_one_machine_with_the_local_job_config(ray_head, tmp_path):
    """`ray start --head` (the fixture) then the README's `ray job submit ... --config infra/job-local.yaml` as
    written (the output moved into this test's folder), then its `vqbatch report` line."""
    address, env = ray_head
    commands = readme_cluster_commands()
    submit = next(command for command in commands if "infra/job-local.yaml" in command)
    report = next(command for command in commands if command.startswith("vqbatch report"))
    local_output = yaml.safe_load((REPO / "infra" / "job-local.yaml").read_text())["output"]["uri"]
    output = tmp_path / "local-job"
    argv = shlex.split(submit.replace("http://127.0.0.1:8265", address)) + ["--output", str(output)]
    result = subprocess.run([RAY, *argv[1:]], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "succeeded" in result.stdout and "done: 44 images (44 ok, 0 failed)" in result.stdout
    report_argv = shlex.split(report.replace(local_output, str(output)))
    shown = subprocess.run([str(Path(sys.executable).with_name("vqbatch")), *report_argv[1:]], env=env,
                           capture_output=True, text=True, timeout=300)
    assert shown.returncode == 0, shown.stderr
    assert (output / "report" / "report.html").read_text().count('<figure class="sample"') == 44
