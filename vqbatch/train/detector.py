"""A deterministic attribute detector: what an image of shapes shows, read from its pixels, scored against a caption.

Detection: the background is the median border colour; foreground pixels are those far from it; each connected
foreground component bigger than a speck is one shape. A shape's colour is the median of its most contrasting
half of pixels, and its outline is where the image is at least half way from the background to that colour (the
edge a soft or blurred image still has in the right place). The palette colour nearest its colour names it; its
kind comes from its outline (a triangle is much thinner in the top half of its bounding box than in the bottom
half; otherwise it is a square or a circle by which of the two ideal shapes, drawn by the dataset's own
`shape_mask` at the outline's box size, fills that box by the nearer share: at small sizes a drawn circle fills
much more than pi/4 of its box); its position is the named position nearest its box centre and its size is its box
side against the midpoint of the two sizes. Nothing is learned, so the detector cannot be fooled into agreeing with
a caption.

Specks: the foreground components too small to be a shape (below `MIN_AREA_FRACTION` of the image: at most 4
pixels at 32, where the smallest shape covers over 20), which detection leaves out. A ground-truth render has none; a sampled image
has them where single tokens came out in a shape's colour on the background (what strong guidance did to the first
default model), and `count_specks` counts them apart from the attributes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from vqbatch.train.shapes import (BACKGROUNDS, COLOURS, KINDS, POSITIONS, SIZES, Scene, Shape, ShapesDataset,
                                  shape_mask)

ATTRIBUTES = ("count", "background", "kind", "colour", "position", "size")
FOREGROUND_DISTANCE = 90.0  # RGB distance from the background above which a pixel belongs to a shape
MIN_AREA_FRACTION = 0.004  # components smaller than this share of the image are specks, not shapes
TRIANGLE_TAPER = 0.6  # a triangle's top half holds less than this share of its bottom half's pixels (~1/3)
SIZE_THRESHOLD = SIZES["small"] + SIZES["large"]  # box side (fraction) between a small and a large shape


@dataclass(frozen=True)
class Component:
    mask: np.ndarray  # (H, W) bool
    colour: np.ndarray  # (3,) median RGB


# ---------------------------------------------------------------- pixels -> components

def label_components(mask: np.ndarray) -> np.ndarray:
    """4-connected components of a bool mask by min-label propagation; (H, W) int, -1 off the mask."""
    height, width = mask.shape
    big = height * width
    labels = np.where(mask, np.arange(big).reshape(height, width), big)
    while True:
        padded = np.pad(labels, 1, constant_values=big)
        neighbours = np.minimum.reduce([padded[:-2, 1:-1], padded[2:, 1:-1], padded[1:-1, :-2], padded[1:-1, 2:]])
        updated = np.where(mask, np.minimum(labels, neighbours), big)
        if np.array_equal(updated, labels):
            return np.where(mask, labels, -1)
        labels = updated


def nearest_name(value: np.ndarray, table: dict[str, tuple]) -> str:
    names = list(table)
    distances = np.linalg.norm(np.asarray([table[n] for n in names], dtype=np.float64) - value, axis=1)
    return names[int(np.argmin(distances))]


def background_colour(image: np.ndarray) -> np.ndarray:
    border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]]).astype(np.float64)  # (4*side, 3)
    return np.median(border, axis=0)


def foreground_regions(image: np.ndarray,
                       background: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Each pixel's distance from the background (H, W), the foreground components' labels (H, W), their ids (C,)
    and whether each is big enough to be a shape (C,) bool."""
    contrast = np.linalg.norm(image.astype(np.float64) - background, axis=-1)  # (H, W)
    labels = label_components(contrast > FOREGROUND_DISTANCE)
    ids, areas = np.unique(labels[labels >= 0], return_counts=True)
    return contrast, labels, ids, areas >= MIN_AREA_FRACTION * labels.size


def shape_components(image: np.ndarray, background: np.ndarray) -> list[Component]:
    contrast, labels, ids, big = foreground_regions(image, background)
    pixels = image.astype(np.float64)
    return [half_contrast_component(labels == i, pixels, contrast, background) for i in ids[big]]


def count_specks(image: np.ndarray) -> int:
    """How many stray specks an (H, W, 3) uint8 image shows: foreground blobs too small to be a shape."""
    big = foreground_regions(image, background_colour(image))[3]
    return int(np.count_nonzero(~big))


def half_contrast_component(region: np.ndarray, pixels: np.ndarray, contrast: np.ndarray,
                            background: np.ndarray) -> Component:
    """The shape inside a foreground region: its core colour, and the pixels at least half way to that colour."""
    strong = contrast[region] >= np.median(contrast[region])
    colour = np.median(pixels[region][strong], axis=0)  # (3,)
    mask = region & (contrast >= 0.5 * np.linalg.norm(colour - background))
    return Component(mask, colour)


# ---------------------------------------------------------------- components -> attributes

def classify_component(component: Component) -> Shape:
    side = component.mask.shape[0]
    rows, cols = np.nonzero(component.mask)
    box_height, box_width = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
    centre = np.array([(cols.min() + cols.max() + 1) / 2, (rows.min() + rows.max() + 1) / 2])  # pixels
    top = np.count_nonzero(rows + 0.5 < centre[1])
    if top < TRIANGLE_TAPER * np.count_nonzero(rows + 0.5 > centre[1]):
        kind = "triangle"
    else:
        kind = nearest_fill(len(rows) / (box_height * box_width), max(box_height, box_width))
    centre = centre / side
    size = "large" if max(box_height, box_width) / side > SIZE_THRESHOLD else "small"
    return Shape(kind=kind, colour=nearest_name(component.colour, COLOURS), position=nearest_name(centre, POSITIONS),
                 size=size)


def nearest_fill(fill: float, box_side: int) -> str:
    """"square" or "circle": whose ideal drawing in a box of `box_side` pixels fills a share nearer to `fill`."""
    ideal = {kind: shape_mask(kind, (0.5, 0.5), 0.5, box_side).mean() for kind in ("circle", "square")}
    return min(ideal, key=lambda kind: abs(ideal[kind] - fill))


def detect(image: np.ndarray) -> Scene:
    """The scene an (H, W, 3) uint8 image shows; shapes in reading order of their positions."""
    if image.ndim != 3 or image.shape[2] != 3 or image.shape[0] != image.shape[1]:
        raise ValueError(f"expected a square RGB image of shape (H, H, 3), got {image.shape}")
    background = background_colour(image)
    shapes = [classify_component(c) for c in shape_components(image, background)]
    order = list(POSITIONS)
    return Scene(tuple(sorted(shapes, key=lambda s: order.index(s.position))), nearest_name(background, BACKGROUNDS))


# ---------------------------------------------------------------- captions

_SHAPE = re.compile(rf"an? (?P<size>{'|'.join(SIZES)}) (?P<colour>{'|'.join(COLOURS)}) (?P<kind>{'|'.join(KINDS)}) "
                    rf"(?:at the|in the) (?P<position>{'|'.join(POSITIONS)})")
_CAPTION = re.compile(rf"(?P<shapes>.+) on an? (?P<background>{'|'.join(BACKGROUNDS)}) background")


def parse_caption(caption: str) -> Scene:
    """The scene a caption of the shapes grammar describes; ValueError for any other text."""
    text = " ".join(caption.lower().strip().rstrip(".").split())
    match = _CAPTION.fullmatch(text)
    phrases = [_SHAPE.fullmatch(p) for p in match.group("shapes").split(" and ")] if match else [None]
    if None in phrases:
        raise ValueError(f"caption {caption!r} is not in the shapes grammar, e.g. "
                         "'a small red circle at the top left on a white background'")
    return Scene(tuple(Shape(**p.groupdict()) for p in phrases), match.group("background"))


# ---------------------------------------------------------------- scoring

def match_shapes(expected: tuple[Shape, ...], found: tuple[Shape, ...]) -> list[tuple[Shape, Shape | None]]:
    """Pair each expected shape with the found shape that agrees with it on the most attributes."""
    pairs, left = [], list(found)
    for shape in expected:
        best = max(left, key=lambda f: sum(getattr(f, a) == getattr(shape, a) for a in ATTRIBUTES[2:]), default=None)
        pairs.append((shape, best))
        if best is not None:
            left.remove(best)
    return pairs


def score(image: np.ndarray, caption: str | Scene) -> dict[str, bool]:
    """Per attribute, whether the image shows what the caption says; `all` when every attribute is right.

    A shape attribute (kind, colour, position, size) is right when it is right for every shape of the caption.
    """
    expected = parse_caption(caption) if isinstance(caption, str) else caption
    found = detect(image)
    pairs = match_shapes(expected.shapes, found.shapes)
    result = {"count": len(found.shapes) == len(expected.shapes), "background": found.background == expected.background}
    for attribute in ATTRIBUTES[2:]:
        result[attribute] = all(f is not None and getattr(f, attribute) == getattr(e, attribute) for e, f in pairs)
    result["all"] = all(result[a] for a in ATTRIBUTES)
    return result


def summarize(scores: list[dict[str, bool]]) -> dict[str, float]:
    """Share of images right per attribute (and `all`), plus how many images were scored."""
    keys = (*ATTRIBUTES, "all")
    summary = {k: float(np.mean([s[k] for s in scores])) if scores else float("nan") for k in keys}
    return {**summary, "n": len(scores)}


def detector_accuracy(n: int = 1000, *, seed: int = 12345, image_size: int = 64,
                      two_object_fraction: float = 0.3) -> dict[str, float]:
    """How often the detector agrees with the ground truth on `n` fresh renders (a seed training never uses)."""
    dataset = ShapesDataset(n, seed=seed, image_size=image_size, two_object_fraction=two_object_fraction)
    return summarize([score(sample.image, sample.scene) for sample in (dataset[i] for i in range(n))])
