"""`vqbatch report`: the page opens in a real headless Chromium with every image loaded next to its prompt."""

import json
from pathlib import Path

import boto3
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pytest
from PIL import Image

from conftest import SMALL_DATASET_OK
from headless_chromium import Browser
from vqbatch.cli import main
from vqbatch.config import S3Config
from vqbatch.io.dataset import OutputRoot, read_metadata
from vqbatch.io.filesystems import resolve, s3_filesystem
from vqbatch.report import CONTACT_SHEET_NAME, REPORT_NAME, SHEET_COLUMNS, write_report

ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"  # kept after the run: look at the screenshot
FIGURES = """[...document.querySelectorAll('figure.sample')].map(figure => {
    const image = figure.querySelector('img');
    return {id: figure.dataset.id, prompt: figure.querySelector('.prompt').textContent,
            key: figure.querySelector('.key').textContent, alt: image.alt,
            loaded: image.complete && image.naturalWidth > 0, width: image.naturalWidth,
            shown: image.getBoundingClientRect().width};
})"""


def ok_prompts(output) -> dict[str, str]:
    metadata = read_metadata(OutputRoot(*resolve(str(output), S3Config())))
    ok = metadata.filter(pc.field("status") == "ok")
    return dict(zip(ok.column("id").to_pylist(), ok.column("prompt").to_pylist()))


def test_the_report_opens_in_headless_chromium_with_every_image_loaded_next_to_its_prompt(small_dataset, tmp_path):
    files = write_report(str(small_dataset), tmp_path / "report", sample=100)
    ARTIFACTS.mkdir(exist_ok=True)
    with Browser(tmp_path / "profile") as browser:
        browser.open(files.html.as_uri())
        figures = browser.evaluate(FIGURES)
        plots = browser.evaluate("document.querySelectorAll('svg polyline').length")
        page_text = browser.evaluate("document.body.innerText")
        browser.screenshot(ARTIFACTS / "report-screenshot.png")
        problems, requested = browser.problems(), browser.requested_urls()
    assert problems == []  # no console error or warning, no exception, no failed load
    assert all(url.startswith(("file:", "data:")) for url in requested), requested  # nothing from the network
    prompts = ok_prompts(small_dataset)
    assert len(figures) == files.images == SMALL_DATASET_OK == len(prompts)
    for figure in figures:
        assert figure["loaded"] and figure["width"] > 0 and figure["shown"] >= 100, figure
        assert figure["prompt"] == figure["alt"] == prompts[figure["id"]]  # escaped in HTML, shown as written
        assert figure["key"].startswith(f"{figure['id']} · image 0 · seed ")
    assert sorted(figure["id"] for figure in figures) == sorted(prompts)
    assert plots >= 1  # images/s over the run, drawn
    assert "prompt is empty" in page_text and "prompt is null" in page_text  # the most frequent errors
    assert Image.open(ARTIFACTS / "report-screenshot.png").size[1] > 900  # the whole page, not only the window


def test_the_contact_sheet_is_a_grid_of_the_sample(small_dataset, tmp_path):
    files = write_report(str(small_dataset), tmp_path, sample=9, seed=3)
    assert files.images == 9 and files.html.name == REPORT_NAME and files.contact_sheet.name == CONTACT_SHEET_NAME
    sheet = Image.open(files.contact_sheet)
    rows = -(-9 // SHEET_COLUMNS)
    assert sheet.width % SHEET_COLUMNS == 0 and sheet.height % rows == 0 and sheet.height // rows > 160
    again = write_report(str(small_dataset), tmp_path / "again", sample=9, seed=3)
    assert again.html.read_text() == files.html.read_text()  # the same seed shows the same images


def test_report_of_an_s3_dataset_from_the_command_line(small_dataset, s3_endpoint, tmp_path, capsys):
    filesystem = s3_filesystem(S3Config())
    boto3.client("s3").create_bucket(Bucket="reports")
    pafs.copy_files(str(small_dataset), "reports/small", destination_filesystem=filesystem)
    assert main(["report", "s3://reports/small", "--to", str(tmp_path / "r"), "--sample", "4"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith(f"open {tmp_path / 'r' / REPORT_NAME} (4 images")
    assert (tmp_path / "r" / REPORT_NAME).read_text().count('<figure class="sample"') == 4


@pytest.mark.parametrize("sample", [0, -3])
def test_a_sample_that_is_not_positive_is_refused(small_dataset, tmp_path, sample, capsys):
    assert main(["report", str(small_dataset), "--sample", str(sample), "--to", str(tmp_path)]) == 2
    assert f"--sample must be a positive number of images, got {sample}" in capsys.readouterr().err


def test_report_defaults_to_a_folder_inside_a_local_output(small_dataset):
    files = write_report(str(small_dataset), sample=2)
    assert files.html == small_dataset / "report" / REPORT_NAME
    assert json.loads((small_dataset / "manifest.json").read_text())["rows"] == SMALL_DATASET_OK + 2
