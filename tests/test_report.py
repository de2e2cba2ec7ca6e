"""`vqbatch report`: the page opens in a real headless Chromium with every image loaded next to its prompt."""

import base64
import html
import json
import re
from pathlib import Path

import boto3
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pytest
from PIL import Image

from conftest import SMALL_DATASET_OK, published_dataset
from headless_chromium import Browser
from system_packages import apt_install
from vqbatch.choices import OUTPUT_FORMATS
from vqbatch.cli import main
from vqbatch.config import JobConfig, S3Config
from vqbatch.io.dataset import OutputRoot, prepare_output, publish, read_metadata
from vqbatch.io.filesystems import resolve, s3_filesystem
from vqbatch.io.formats import sampled_table, write_shard
from vqbatch.io.images import decode_image
from vqbatch.io.prompts import IMAGE_ROW_SCHEMA
from vqbatch.report import (CONTACT_SHEET_NAME, PLOT_WIDTH, REPORT_NAME, SHEET_COLUMNS, SHEET_FONT, SHEET_IMAGE,
                            caption_font, speed_plot, write_report)

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


def polylines(svg: str) -> list[list[tuple[float, float]]]:
    return [[tuple(map(float, point.split(","))) for point in points.split()]
            for points in re.findall(r'<polyline [^>]*points="([^"]*)"', svg)]


@pytest.mark.parametrize("images_per_bin", [{"actor 1": [18]}, {"actor 1": [4, 8, 0], "actor 2": [0, 4, 4]}])
def test_each_speed_line_is_drawn_across_the_run_even_with_one_time_bin(images_per_bin):
    bins = len(images_per_bin["actor 1"])
    stats = {"seconds": 6.0 * bins, "bin_seconds": 6.0, "images_per_bin": images_per_bin, "actor_restarts": 0}
    lines = polylines(speed_plot(1, stats))
    assert len(lines) == (1 if len(images_per_bin) == 1 else 1 + len(images_per_bin))  # all actors, then each one
    for line in lines:
        xs = [x for x, _ in line]
        assert xs == sorted(xs) and xs[-1] - xs[0] > PLOT_WIDTH / 2  # a visible line over the whole run
    total = [sum(counts) / 6.0 for counts in zip(*images_per_bin.values())]
    heights = [y for _, y in lines[0]][::2]  # one level per bin: the higher the rate, the higher the line
    assert sorted(range(bins), key=lambda i: heights[i]) == sorted(range(bins), key=lambda i: -total[i])


@pytest.mark.parametrize("output_format", OUTPUT_FORMATS)
def test_the_report_shows_the_stored_images_of_every_output_format(output_format, tmp_path):
    pixels = published_dataset(tmp_path / "out", output_format, ["ok", "error", "ok", "ok"])
    files = write_report(str(tmp_path / "out"), tmp_path / "report")
    shown = re.findall(r'<figure class="sample" data-id="([^"]*)"><img src="data:image/png;base64,([^"]*)" '
                       r'alt="([^"]*)">', files.html.read_text())
    assert files.images == len(shown) == 3
    for row_id, data, prompt in shown:
        number = int(row_id[1:])
        np.testing.assert_array_equal(decode_image(base64.b64decode(data)), pixels[number])
        assert html.unescape(prompt) == f"prompt {number} <&>"
    assert Image.open(files.contact_sheet).size[1] > SHEET_IMAGE



@pytest.mark.parametrize("output_format", OUTPUT_FORMATS)
def test_the_report_of_a_dataset_without_an_image_shows_its_errors(output_format, tmp_path):
    published_dataset(tmp_path / "out", output_format, ["error"] * 3)
    files = write_report(str(tmp_path / "out"), tmp_path / "report")
    page = files.html.read_text()
    assert files.images == 0 and '<figure class="sample"' not in page
    assert "<p>0 ok, 3 errors.</p>" in page and "<tr><td>3</td><td>prompt is empty</td></tr>" in page
    assert Image.open(files.contact_sheet).size[0] > 0


def test_contact_sheet_captions_draw_letters_beyond_ascii():
    def is_sheet_font(font) -> bool:
        return str(getattr(font, "path", "")).endswith(SHEET_FONT)

    font = caption_font()
    if not is_sheet_font(font) and apt_install("fonts-dejavu-core"):
        font = caption_font()
    if not is_sheet_font(font):
        pytest.skip(f"the system has no {SHEET_FONT} and this user cannot install fonts-dejavu-core")

    def glyph(text: str) -> bytes:
        return bytes(font.getmask(text))

    missing = glyph("\U0010fffd")  # a code point no font draws: the box shown for a missing letter
    assert all(glyph(letter) != missing for letter in "éüñçøßÅΩЖ—…")
