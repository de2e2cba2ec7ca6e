import json

import numpy as np
import pytest

from conftest import published_dataset
from vqbatch.train.detector import (MIN_AREA_FRACTION, count_specks, detect, detector_accuracy, parse_caption, score,
                                    summarize)
from vqbatch.train.shapes import COLOURS, Scene, Shape, ShapesDataset, render


@pytest.mark.parametrize("image_size", [32, 64])
def test_detector_agrees_with_ground_truth_renders(image_size):
    accuracy = detector_accuracy(400, seed=777, image_size=image_size)
    assert accuracy["n"] == 400
    assert accuracy["all"] >= 0.99, accuracy


def add_specks(image: np.ndarray, count: int, side: int, rng: np.random.Generator) -> np.ndarray:
    """`count` square blobs of `side` pixels in palette colours, each on background with a free ring around it."""
    speckled = image.copy()
    background = image[0, 0]
    added = 0
    while added < count:
        y, x = rng.integers(1, image.shape[0] - side - 1, size=2)
        ring = speckled[y - 1:y + side + 1, x - 1:x + side + 1]
        if (ring == background).all() and (image[y - 1:y + side + 1, x - 1:x + side + 1] == background).all():
            speckled[y:y + side, x:x + side] = list(COLOURS.values())[rng.integers(len(COLOURS))]
            added += 1
    return speckled


@pytest.mark.parametrize("image_size", [32, 64])
def test_specks_are_counted_on_renders_and_leave_the_scene_alone(image_size):
    dataset = ShapesDataset(60, seed=31, image_size=image_size)
    rng = np.random.default_rng(0)
    largest_speck = int((MIN_AREA_FRACTION * image_size ** 2) ** 0.5)  # side of the largest square speck
    for index in range(60):
        sample = dataset[index]
        assert count_specks(sample.image) == 0  # a ground-truth render has none
        count, side = index % 4, 1 + index % largest_speck
        speckled = add_specks(sample.image, count, side, rng)
        assert count_specks(speckled) == count, (index, count, side)
        assert score(speckled, sample.scene)["all"]  # specks are not shapes


def test_a_blob_as_big_as_a_shape_is_no_speck():
    image = render(Scene((Shape("circle", "red", "top left", "small"),), "white"), side=32)
    image[20:26, 20:26] = COLOURS["blue"]  # 36 pixels: a shape's size, so an extra shape (count fails), not a speck
    assert count_specks(image) == 0 and not score(image, "a small red circle at the top left on a white background")[
        "count"]
    image[2, 28] = (250, 250, 250)  # near the background colour: not foreground at all
    assert count_specks(image) == 0


def test_scrambled_captions_score_low():
    dataset = ShapesDataset(300, seed=5, image_size=32)
    samples = [dataset[i] for i in range(300)]
    captions = [s.caption for s in samples]
    shuffled = captions[1:] + captions[:1]  # every image gets its neighbour's caption
    summary = summarize([score(s.image, c) for s, c in zip(samples, shuffled)])
    assert summary["all"] < 0.05, summary
    assert summary["colour"] < 0.4 and summary["kind"] < 0.5 and summary["position"] < 0.5, summary


def test_each_wrong_attribute_is_reported_alone():
    image = render(Scene((Shape("circle", "red", "top left", "small"),), "white"), side=64)
    assert score(image, "a small red circle at the top left on a white background")["all"]
    for caption, wrong in [("a small blue circle at the top left on a white background", "colour"),
                           ("a small red square at the top left on a white background", "kind"),
                           ("a small red circle at the bottom right on a white background", "position"),
                           ("a large red circle at the top left on a white background", "size"),
                           ("a small red circle at the top left on a black background", "background")]:
        result = score(image, caption)
        assert [k for k, ok in result.items() if not ok] == [wrong, "all"], (caption, result)


def test_blank_and_two_object_images():
    blank = np.full((32, 32, 3), 255, dtype=np.uint8)
    assert detect(blank) == Scene((), "white")
    assert not score(blank, "a small red circle at the top left on a white background")["count"]
    scene = Scene((Shape("triangle", "yellow", "top right", "large"), Shape("square", "purple", "bottom left", "small")),
                  "black")
    assert detect(render(scene, side=32)) == scene


def test_caption_parser_round_trips_and_rejects_other_text():
    scene = Scene((Shape("circle", "red", "top left", "small"), Shape("square", "cyan", "bottom right", "large")),
                  "black")
    assert parse_caption(scene.caption()) == scene
    assert parse_caption("  A Large green triangle in the center on a white background. ") == \
        Scene((Shape("triangle", "green", "center", "large"),), "white")
    for text in ["a teddy bear playing in the pool", "a small pink circle at the top left on a white background",
                 "a small red circle at the top left"]:
        with pytest.raises(ValueError, match="shapes grammar"):
            parse_caption(text)


@pytest.mark.parametrize("output_format", ["files", "webdataset", "parquet"])
def test_evaluate_dataset_reports_each_group(tmp_path, output_format):
    """`vqbatch eval` reads a dataset of any format (its images through `read_dataset`)."""
    from vqbatch.train.adherence import evaluate_dataset, format_report

    dataset = ShapesDataset(40, seed=9, image_size=32)
    samples = [dataset[i] for i in range(40)]
    prompts = [s.caption for s in samples]
    prompts[:10] = prompts[1:11]  # ten images with the wrong caption
    prompts[11] = "a teddy bear playing in the pool"
    statuses = ["error" if i == 12 else "ok" for i in range(40)]
    published_dataset(tmp_path / "out", output_format, statuses, [s.image for s in samples], prompts)
    report = evaluate_dataset(str(tmp_path / "out"))
    assert report["failed_rows"] == 1 and report["unscored_prompts"] == 1
    scored = [i for i in range(40) if i not in (11, 12)]
    two = sum(" and " in prompts[i] for i in scored)  # the prompt decides the group
    assert report["two_object"]["n"] == two and report["one_object"]["n"] == len(scored) - two
    assert report["overall"]["all"] == pytest.approx(
        sum(score(samples[i].image, prompts[i])["all"] for i in scored) / len(scored))
    assert 27 / 38 <= report["overall"]["all"] <= 29 / 38  # 28 right captions; a swap may match by chance
    assert report["overall"]["specks"] == 0.0  # ground-truth renders
    assert "one_object" in format_report(report) and "specks" in format_report(report)


def test_eval_command_prints_the_table(tmp_path, capsys):
    from vqbatch.cli import main

    dataset = ShapesDataset(6, seed=4, image_size=32)
    samples = [dataset[i] for i in range(6)]
    published_dataset(tmp_path / "out", "files", ["ok"] * 6, [s.image for s in samples], [s.caption for s in samples])
    assert main(["eval", "--output", str(tmp_path / "out"), "--detector-check", "20"]) == 0
    printed = capsys.readouterr().out
    assert "overall" in printed and "100.0%" in printed and "detector accuracy on 20" in printed


def test_eval_reads_an_s3_dataset_with_the_s3_settings_of_its_config(moto_server, tmp_path, capsys):
    import boto3

    from vqbatch.cli import main

    settings = {"endpoint_url": moto_server, "access_key_id": "testing", "secret_access_key": "testing",
                "region": "us-east-1"}
    boto3.client("s3", endpoint_url=moto_server, aws_access_key_id="testing", aws_secret_access_key="testing",
                 region_name="us-east-1").create_bucket(Bucket="shapes")
    dataset = ShapesDataset(4, seed=5, image_size=32)
    samples = [dataset[i] for i in range(4)]
    published_dataset("s3://shapes/out", "files", ["ok"] * 4, [s.image for s in samples],
                      [s.caption for s in samples], s3=settings)
    config = tmp_path / "job.yaml"
    config.write_text("s3:\n" + "".join(f"  {key}: {value}\n" for key, value in settings.items()))
    assert main(["eval", "--output", "s3://shapes/out", "--config", str(config), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["overall"]["n"] == 4


class RenderingPipeline:
    """Stands in for VQDiffusionPipeline: 'samples' the exact render of each prompt, or of a fixed wrong scene."""

    def __init__(self, wrong: bool = False):
        self.wrong, self.calls = wrong, []

    def __call__(self, prompts, generator, output_type, **sampling):
        from types import SimpleNamespace

        self.calls.append((len(prompts), len(generator), output_type, sampling))
        scenes = [Scene((Shape("square", "green", "center", "large"),), "black") if self.wrong else parse_caption(p)
                  for p in prompts]
        return SimpleNamespace(images=np.stack([render(s, side=32) / 255.0 for s in scenes]))


def test_generate_and_score_samples_every_prompt_once():
    from vqbatch.train.adherence import evaluation_prompts, generate_and_score

    prompts = evaluation_prompts(10, 5)
    assert len(prompts) == 15 and sum(" and " in p for p in prompts) == 5
    faithful = RenderingPipeline()
    report = generate_and_score(faithful, prompts, batch_size=4, num_inference_steps=7)
    assert report["one_object"]["n"] == 10 and report["two_object"]["n"] == 5 and report["overall"]["all"] == 1.0
    assert [call[:3] for call in faithful.calls] == [(4, 4, "np")] * 3 + [(3, 3, "np")]
    assert faithful.calls[0][3] == {"num_inference_steps": 7}
    assert generate_and_score(RenderingPipeline(wrong=True), prompts)["overall"]["all"] < 0.2
