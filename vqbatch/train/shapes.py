"""The procedural shapes dataset: captioned images of coloured shapes, each with its ground-truth scene.

A scene is one or two shapes on a plain background. Every shape has a kind, a colour, a position and a size,
and the caption names all of them ("a small red circle at the top left on a white background"). Sample `i` of a
`ShapesDataset` depends only on `(seed, i)`, so the dataset needs no storage and is the same on every machine.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

KINDS = ("circle", "square", "triangle")
COLOURS = {  # name -> RGB; far apart from each other and from both backgrounds
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 230),
    "yellow": (240, 210, 20),
    "purple": (140, 50, 200),
    "cyan": (20, 200, 210),
}
BACKGROUNDS = {"white": (255, 255, 255), "black": (0, 0, 0)}
POSITIONS = {  # name -> centre (x, y) as fractions of the image side
    "top left": (0.25, 0.25),
    "top right": (0.75, 0.25),
    "center": (0.5, 0.5),
    "bottom left": (0.25, 0.75),
    "bottom right": (0.75, 0.75),
}
CORNERS = ("top left", "top right", "bottom left", "bottom right")  # where two-object scenes put their shapes
SIZES = {"small": 0.11, "large": 0.19}  # name -> half side of the shape's bounding box, as a fraction of the side


@dataclass(frozen=True)
class Shape:
    kind: str
    colour: str
    position: str
    size: str

    def phrase(self) -> str:
        where = "in the center" if self.position == "center" else f"at the {self.position}"
        return f"a {self.size} {self.colour} {self.kind} {where}"


@dataclass(frozen=True)
class Scene:
    shapes: tuple[Shape, ...]  # in reading order of their positions
    background: str

    def caption(self) -> str:
        return " and ".join(shape.phrase() for shape in self.shapes) + f" on a {self.background} background"


@dataclass(frozen=True)
class ShapesSample:
    image: np.ndarray  # (H, W, 3) uint8
    caption: str
    scene: Scene


# ---------------------------------------------------------------- drawing

def shape_mask(kind: str, centre: tuple[float, float], half: float, side: int) -> np.ndarray:
    """Pixels (by their centres) inside a shape whose bounding box is the square `centre +- half`; (side, side) bool."""
    coords = (np.arange(side) + 0.5) / side
    x, y = coords[None, :] - centre[0], coords[:, None] - centre[1]
    if kind == "circle":
        return x * x + y * y <= half * half
    if kind == "square":
        return (np.abs(x) <= half) & (np.abs(y) <= half)
    if kind == "triangle":  # apex at the top centre, base along the bottom edge
        depth = (y + half) / (2 * half)  # 0 at the apex, 1 at the base
        return (depth >= 0) & (depth <= 1) & (np.abs(x) <= half * depth)
    raise ValueError(f"unknown shape kind {kind!r}; allowed: {', '.join(KINDS)}")


def render(scene: Scene, side: int = 64, offsets: np.ndarray | None = None) -> np.ndarray:
    """Draw a scene as a (side, side, 3) uint8 image; `offsets` (n_shapes, 2) shift each centre (fractions)."""
    image = np.empty((side, side, 3), dtype=np.uint8)
    image[:] = BACKGROUNDS[scene.background]
    for index, shape in enumerate(scene.shapes):
        shift = offsets[index] if offsets is not None else (0.0, 0.0)
        centre = (POSITIONS[shape.position][0] + shift[0], POSITIONS[shape.position][1] + shift[1])
        image[shape_mask(shape.kind, centre, SIZES[shape.size], side)] = COLOURS[shape.colour]
    return image


# ---------------------------------------------------------------- sampling scenes

def random_shape(rng: np.random.Generator, position: str) -> Shape:
    return Shape(kind=KINDS[rng.integers(len(KINDS))], colour=list(COLOURS)[rng.integers(len(COLOURS))],
                 position=position, size=list(SIZES)[rng.integers(len(SIZES))])


def random_scene(rng: np.random.Generator, two_object_fraction: float) -> Scene:
    """One shape anywhere, or (with `two_object_fraction`) two shapes in two different corners."""
    background = list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
    if rng.random() < two_object_fraction:
        first, second = sorted(rng.choice(len(CORNERS), size=2, replace=False))
        return Scene((random_shape(rng, CORNERS[first]), random_shape(rng, CORNERS[second])), background)
    return Scene((random_shape(rng, list(POSITIONS)[rng.integers(len(POSITIONS))]),), background)


class ShapesDataset:
    """`length` captioned scenes; item `i` is drawn from a generator seeded with `(seed, i)`.

    `jitter` moves each shape's centre by up to that fraction of the side in x and y, so the same caption
    has slightly different images.
    """

    def __init__(self, length: int, *, seed: int = 0, image_size: int = 64, two_object_fraction: float = 0.3,
                 jitter: float = 0.02):
        if length < 1:
            raise ValueError(f"length must be at least 1, got {length}")
        if image_size < 16:
            raise ValueError(f"image_size must be at least 16 pixels, got {image_size}")
        if not 0.0 <= two_object_fraction <= 1.0:
            raise ValueError(f"two_object_fraction must be in [0, 1], got {two_object_fraction}")
        if not 0.0 <= jitter <= 0.05:
            raise ValueError(f"jitter must be in [0, 0.05] (larger shifts can make shapes touch), got {jitter}")
        self.length, self.seed, self.image_size = length, seed, image_size
        self.two_object_fraction, self.jitter = two_object_fraction, jitter

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> ShapesSample:
        if not -self.length <= index < self.length:
            raise IndexError(f"index {index} out of range for a dataset of {self.length}")
        rng = np.random.default_rng([self.seed, index % self.length])
        scene = random_scene(rng, self.two_object_fraction)
        offsets = rng.uniform(-self.jitter, self.jitter, size=(len(scene.shapes), 2))
        return ShapesSample(render(scene, self.image_size, offsets), scene.caption(), scene)
