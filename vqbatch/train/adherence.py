"""Prompt adherence: how often generated images show what their prompts say, per attribute, by the detector.

One-object and two-object prompts are reported apart (two shapes are much harder to get all right). Each summary
also has `specks`, the share of images with stray specks (`count_specks`), whatever their attributes. Prompts
outside the shapes grammar cannot be checked and are counted, not scored.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch

from vqbatch.config import S3Config
from vqbatch.io.images import decode_image, to_uint8
from vqbatch.io.view import read_dataset
from vqbatch.train.detector import count_specks, parse_caption, score, summarize
from vqbatch.train.shapes import ShapesDataset

EVALUATION_SEED = 20240601  # prompts for evaluation come from a dataset seed training never uses


def adherence_report(pairs: Iterable[tuple[np.ndarray, str]]) -> dict:
    """Adherence of (image (H, W, 3) uint8, prompt) pairs: `one_object`, `two_object` and `overall` summaries."""
    groups: dict[str, list[dict[str, bool]]] = {"one_object": [], "two_object": []}
    specks: dict[str, list[bool]] = {"one_object": [], "two_object": []}
    unscored = 0
    for image, prompt in pairs:
        try:
            scene = parse_caption(prompt)
        except ValueError:
            unscored += 1
            continue
        group = "one_object" if len(scene.shapes) == 1 else "two_object"
        groups[group].append(score(image, scene))
        specks[group].append(count_specks(image) > 0)
    summaries = {name: speckled_summary(groups[name], specks[name]) for name in groups}
    overall = speckled_summary(groups["one_object"] + groups["two_object"], specks["one_object"] + specks["two_object"])
    return {**summaries, "overall": overall, "unscored_prompts": unscored}


def speckled_summary(scores: list[dict[str, bool]], specks: list[bool]) -> dict[str, float]:
    """`summarize` of the scores plus `specks`, the share of the images with stray specks."""
    return {**summarize(scores), "specks": float(np.mean(specks)) if specks else float("nan")}


def evaluation_prompts(one_object: int, two_object: int, seed: int = EVALUATION_SEED) -> list[str]:
    """`one_object` one-shape captions then `two_object` two-shape captions, drawn from the shapes grammar."""
    singles = ShapesDataset(one_object, seed=seed, two_object_fraction=0.0) if one_object else []
    pairs = ShapesDataset(two_object, seed=seed + 1, two_object_fraction=1.0) if two_object else []
    return [sample.caption for sample in singles] + [sample.caption for sample in pairs]


def generate_and_score(pipeline, prompts: list[str], *, batch_size: int = 16, seed: int = 0, **sampling) -> dict:
    """Sample one image per prompt (image i from a generator seeded `seed + i`) and report its adherence.

    `sampling` goes to the pipeline call (num_inference_steps, guidance_scale, truncation_rate, ...).
    """
    pairs = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        generators = [torch.Generator().manual_seed(seed + start + i) for i in range(len(chunk))]
        images = pipeline(chunk, generator=generators, output_type="np", **sampling).images  # (b, H, W, 3)
        pairs.extend(zip(to_uint8(images), chunk))
    return adherence_report(pairs)


def evaluate_dataset(uri: str, s3: S3Config | None = None) -> dict:
    """Adherence of a dataset the engine wrote at `uri` (local folder or s3:// prefix) in any output format (its
    published view, `read_dataset`, with the image bytes); failed rows are counted."""
    rows = read_dataset(uri, s3, images=True).select(["prompt", "image", "status"]).to_pylist()
    ok = [row for row in rows if row["status"] == "ok"]
    pairs = ((decode_image(row["image"]["bytes"]), row["prompt"]) for row in ok)
    return {**adherence_report(pairs), "failed_rows": len(rows) - len(ok)}


def format_report(report: dict) -> str:
    """A small text table: one line per prompt group, one column per attribute."""
    keys = ("count", "background", "kind", "colour", "position", "size", "all", "specks")
    lines = [f"{'group':<11}{'n':>6}" + "".join(f"{k:>11}" for k in keys)]
    for group in ("one_object", "two_object", "overall"):
        summary = report[group]
        lines.append(f"{group:<11}{summary['n']:>6}" + "".join(f"{100 * summary[k]:>10.1f}%" for k in keys))
    extra = {k: report[k] for k in ("unscored_prompts", "failed_rows") if k in report}
    lines.append(", ".join(f"{k}: {v}" for k, v in extra.items()))
    if "detector_accuracy" in report:
        check = report["detector_accuracy"]
        lines.append(f"detector accuracy on {check['n']} ground-truth renders: {100 * check['all']:.2f}%")
    return "\n".join(lines)
