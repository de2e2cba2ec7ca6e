import numpy as np
import pytest

from vqbatch.train.shapes import BACKGROUNDS, COLOURS, CORNERS, KINDS, POSITIONS, SIZES, Scene, Shape, ShapesDataset, render


def test_samples_are_deterministic_per_seed_and_index():
    first, again, other = ShapesDataset(50, seed=1), ShapesDataset(50, seed=1), ShapesDataset(50, seed=2)
    assert all(np.array_equal(first[i].image, again[i].image) and first[i].caption == again[i].caption
               for i in range(50))
    assert any(first[i].caption != other[i].caption for i in range(50))


def test_caption_names_every_attribute_of_every_shape():
    scene = Scene((Shape("circle", "red", "top left", "small"), Shape("square", "blue", "bottom right", "large")),
                  "white")
    assert scene.caption() == ("a small red circle at the top left and a large blue square at the bottom right "
                               "on a white background")
    assert Scene((Shape("triangle", "cyan", "center", "large"),), "black").caption() == \
        "a large cyan triangle in the center on a black background"


def test_dataset_covers_the_attribute_grid():
    dataset = ShapesDataset(3000, seed=0, image_size=32)
    scenes = [dataset[i].scene for i in range(len(dataset))]
    shapes = [s for scene in scenes for s in scene.shapes]
    assert {s.kind for s in shapes} == set(KINDS) and {s.colour for s in shapes} == set(COLOURS)
    assert {s.position for s in shapes} == set(POSITIONS) and {s.size for s in shapes} == set(SIZES)
    assert {scene.background for scene in scenes} == set(BACKGROUNDS)
    counts = [len(scene.shapes) for scene in scenes]
    assert 0.25 < counts.count(2) / len(counts) < 0.35 and set(counts) == {1, 2}
    assert all(s.position in CORNERS for scene in scenes if len(scene.shapes) == 2 for s in scene.shapes)


def test_render_paints_the_shape_colour_at_its_position_on_the_background():
    image = render(Scene((Shape("square", "green", "bottom right", "large"),), "black"), side=64)
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8
    assert tuple(image[48, 48]) == COLOURS["green"] and tuple(image[16, 16]) == BACKGROUNDS["black"]
    circle = render(Scene((Shape("circle", "red", "center", "large"),), "white"), side=64)
    square = render(Scene((Shape("square", "red", "center", "large"),), "white"), side=64)
    triangle = render(Scene((Shape("triangle", "red", "center", "large"),), "white"), side=64)
    areas = [np.count_nonzero((im == COLOURS["red"]).all(-1)) for im in (triangle, circle, square)]
    assert areas == sorted(areas)  # a triangle fills half its box, a circle pi/4, a square all of it


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="two_object_fraction"):
        ShapesDataset(10, two_object_fraction=1.5)
    with pytest.raises(IndexError):
        ShapesDataset(10)[10]
