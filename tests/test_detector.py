import numpy as np
import pytest

from vqbatch.train.detector import detect, detector_accuracy, parse_caption, score, summarize
from vqbatch.train.shapes import Scene, Shape, ShapesDataset, render


@pytest.mark.parametrize("image_size", [32, 64])
def test_detector_agrees_with_ground_truth_renders(image_size):
    accuracy = detector_accuracy(400, seed=777, image_size=image_size)
    assert accuracy["n"] == 400
    assert accuracy["all"] >= 0.99, accuracy


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
