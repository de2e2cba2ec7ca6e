"""The README's main-job command: `vqbatch demo` on a fresh local Ray, the bundled prompts and the shipped model."""

import pytest
import ray

from vqbatch.cli import main
from vqbatch.config import S3Config
from vqbatch.io.dataset import OutputRoot, read_manifest
from vqbatch.io.filesystems import resolve
from vqbatch.train.adherence import evaluate_dataset

BUNDLED_PROMPTS = 44  # vqbatch/data/prompts.parquet: 32 in the shapes grammar, 12 free-form
FREE_FORM_PROMPTS = 12


@pytest.fixture
def fresh_ray():
    assert not ray.is_initialized()  # the demo starts its own local Ray, as on a user's machine
    yield
    ray.shutdown()


def test_demo_writes_a_dataset_whose_images_follow_their_prompts(tmp_path, fresh_ray, capsys):
    output = tmp_path / "demo"
    assert main(["demo", "--output", str(output)]) == 0
    last_lines = capsys.readouterr().out.splitlines()[-2:]  # the summary, then the log file
    assert last_lines[0] == f"see the images with their prompts: open {output / 'report' / 'report.html'}"
    assert (output / "report" / "report.html").read_text().count('<figure class="sample"') == BUNDLED_PROMPTS
    manifest = read_manifest(OutputRoot(*resolve(str(output), S3Config())))
    assert len(manifest["versions"]) == 1
    report = evaluate_dataset(str(output))
    assert report["failed_rows"] == 0
    assert report["unscored_prompts"] == FREE_FORM_PROMPTS
    assert report["one_object"]["n"] + report["two_object"]["n"] + FREE_FORM_PROMPTS == BUNDLED_PROMPTS
    # the shipped model at the demo's setting got 96% of one-object prompts all right on 100 held-out prompts
    assert report["one_object"]["all"] >= 0.7, report
