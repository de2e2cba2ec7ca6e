"""`python -m benchmarks.run gpu`: its CPU smoke run (`--device cpu --size small`), where Ray, boto3 and psutil cannot
be imported, as on a GPU machine that has only torch, transformers, safetensors, pyarrow, numpy, pillow and the
carried wheels. Timings are not checked; the structure, the gpu tests' outcome and the batch-shape counts are."""

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from benchmarks.gpu import transformer_flops_per_step
from benchmarks.pipelines import SIZES

ROOT = Path(__file__).resolve().parent.parent
ABSENT = ("ray", "boto3", "botocore", "psutil", "moto")  # installed here, not on the GPU machine


def site_packages_without(absent: tuple[str, ...], into: Path) -> Path:
    """A folder of links to every installed package but `absent` (and their metadata), so a Python started with
    `-S` and this folder on its path finds them truly missing, as probes like `importlib.util.find_spec` expect."""
    site = Path(sysconfig.get_paths()["purelib"])
    into.mkdir()
    for entry in site.iterdir():
        top = entry.name.split("-")[0].split(".")[0].lower()
        if top not in absent and not entry.name.endswith(".pth"):
            (into / entry.name).symlink_to(entry)
    return into


@pytest.mark.slow
def test_the_cpu_smoke_run_writes_every_section_without_ray(tmp_path):
    arguments = ["gpu", "--device", "cpu", "--size", "small", "--batch-sizes", "1", "--step-counts", "1,2",
                 "--invariance-images", "2", "--invariance-steps", "1", "--threads", "1", "--out", str(tmp_path)]
    packages = site_packages_without(ABSENT, tmp_path / "site-packages")
    environment = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{packages}"}
    done = subprocess.run([sys.executable, "-S", "-m", "benchmarks.run", *arguments], cwd=ROOT, env=environment,
                          capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "gpu-small-cpu.json").read_text())
    assert [(row["pipeline"], row["batch"], row["dtype"]) for row in result["rows"]] == \
        [("vqbatch", 1, "float32"), ("diffusers", 1, "float32")]
    for row in result["rows"]:
        assert "error" not in row and row["images_per_s"] > 0 and row["peak_memory_gib"] > 0
        assert row["mfu"] is None  # no known peak for a CPU
    tests = result["summary"]["tests"]
    assert tests["exit_status"] in (0, 5) and tests.get("skipped", 0) >= 4 and "failed" not in tests  # no CUDA
    invariance = result["summary"]["invariance"]["float32"]
    assert invariance["images"] == 2
    assert invariance["padded_tokens_equal"] == invariance["padded_pixels_equal"] == 2  # one shape: the same bits
    assert "speedup vs diffusers" in (tmp_path / "gpu-small-cpu.md").read_text()


def test_flops_are_counted_per_guided_step_and_grow_with_the_batch():
    one, eight = (transformer_flops_per_step(SIZES["small"], batch) for batch in (1, 8))
    parameters_flops = 2 * 2 * SIZES["small"].latent_side ** 2 * 8 * 12 * 512 ** 2  # rough: 2 rows, 8 blocks
    assert eight == pytest.approx(8 * one, rel=0.01) and one > parameters_flops / 4
