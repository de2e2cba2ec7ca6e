"""The bundled example prompt file (`vqbatch/data/prompts.parquet`) and how it is made.

Regenerate it with `python -m vqbatch.io.examples`: shapes-world captions (what the default model is trained on)
followed by free-form prompts, with string ids `shapes-000`, ... and `free-00`, ...
"""

from __future__ import annotations

import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

EXAMPLE_PROMPTS = Path(__file__).resolve().parent.parent / "data" / "prompts.parquet"
NUM_SHAPES_PROMPTS = 32
SHAPES_SEED = 2024  # a scene set apart from the training scenes' default seed 0
FREE_FORM_PROMPTS = (
    "a lighthouse on a cliff at sunset",
    "an astronaut riding a horse on the moon",
    "a bowl of ramen with a soft-boiled egg, studio lighting",
    "a watercolor painting of a fox in a snowy forest",
    "a red double-decker bus on a rainy London street",
    "a close-up photo of a honeybee on a sunflower",
    "an isometric pixel-art castle floating in the clouds",
    "a vintage map of an imaginary archipelago",
    "two cats sleeping on a windowsill in the afternoon sun",
    "a futuristic city skyline at night with neon lights",
    "a stack of pancakes with blueberries and maple syrup",
    "a minimalist line drawing of a mountain range",
)


def example_prompts() -> pa.Table:
    """Columns `id` (string) and `prompt` (string), one row per example prompt."""
    from vqbatch.train.shapes import ShapesDataset

    scenes = ShapesDataset(NUM_SHAPES_PROMPTS, seed=SHAPES_SEED)
    shapes = [scenes[index].caption for index in range(NUM_SHAPES_PROMPTS)]
    ids = [f"shapes-{index:03d}" for index in range(len(shapes))] + \
          [f"free-{index:02d}" for index in range(len(FREE_FORM_PROMPTS))]
    return pa.table({"id": ids, "prompt": shapes + list(FREE_FORM_PROMPTS)})


def write_example_prompts(path: str | Path = EXAMPLE_PROMPTS) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(example_prompts(), path)
    return path


if __name__ == "__main__":
    print(f"wrote {write_example_prompts(*sys.argv[1:2])}")
