"""`quality`: samplers, guidance and truncation judged on prompt adherence against speed, on a trained shapes model
(default: the shipped one).

Every row samples the same evaluation prompts (one-object and two-object captions from a seed training never
used) with one image per prompt, image i from a generator seeded `seed + i`, and scores the images with the
attribute detector (`vqbatch.train.detector`). A row is one sampler (the reference chain, or the purity prior of
Improved VQ-Diffusion), a number of steps spread over the whole chain (`timestep_spacing="skip"`; at the chain's
length that is the reference chain itself), a guidance scale, a truncation rate and what it truncates (the guided
prediction, or the prompted one before guidance: `truncation_target`). `transformer_calls` counts
forwards per image: steps, twice with guidance, since the guided branch doubles the rows of each forward. `specks`
is the share of images with stray specks (small blobs of a shape's colour on the background), right or not.

The summary reads the grid against issue 17's targets: the guided row with the most two-object images all right,
the unguided row of the same sampler, steps and truncation, the same setting at truncation 1.0 and at the fewest
steps.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch

from benchmarks.report import Report, machine
from vqbatch.pipeline import VQDiffusionPipeline
from vqbatch.train.adherence import evaluation_prompts, generate_and_score

ATTRIBUTES = ("kind", "colour", "position", "size")
GROUPS = ("one_object", "two_object")


@dataclass(frozen=True)
class Settings:
    model: str
    one_object: int
    two_object: int
    samplers: tuple[str, ...]
    step_counts: tuple[int, ...]
    guidance_scales: tuple[float, ...]
    truncation_rates: tuple[float, ...]
    truncation_targets: tuple[str, ...]
    prior_weight: float
    batch: int
    seed: int


@dataclass(frozen=True)
class Setting:
    sampler: str
    steps: int
    guidance_scale: float
    truncation_rate: float
    truncation_target: str

    def call_arguments(self, settings: Settings) -> dict:
        prior_weight = settings.prior_weight if self.sampler == "purity" else 0.0
        return dict(num_inference_steps=self.steps, guidance_scale=self.guidance_scale,
                    truncation_rate=self.truncation_rate, truncation_target=self.truncation_target,
                    timestep_spacing="skip", sampler=self.sampler, prior_weight=prior_weight)

    def transformer_calls(self) -> int:
        return self.steps * (2 if self.guidance_scale > 1.0 else 1)


def grid(settings: Settings) -> list[Setting]:
    """Every combination; without guidance or truncation the truncation targets are the same, so once."""
    def targets(guidance: float, truncation: float) -> tuple[str, ...]:
        return settings.truncation_targets if guidance > 1.0 and truncation < 1.0 else settings.truncation_targets[:1]

    return [Setting(sampler, steps, guidance, truncation, target) for sampler in settings.samplers
            for steps in sorted(settings.step_counts, reverse=True) for truncation in settings.truncation_rates
            for guidance in settings.guidance_scales for target in targets(guidance, truncation)]


def measure(pipeline: VQDiffusionPipeline, prompts: list[str], setting: Setting, settings: Settings) -> dict:
    started = time.perf_counter()
    report = generate_and_score(pipeline, prompts, batch_size=settings.batch, seed=settings.seed,
                                **setting.call_arguments(settings))
    seconds = time.perf_counter() - started
    one = report["one_object"]
    return {**asdict(setting), "transformer_calls": setting.transformer_calls(),
            **{f"{group}_all": report[group]["all"] for group in GROUPS},
            **{f"{group}_specks": report[group]["specks"] for group in GROUPS},
            **{f"one_object_{a}": one[a] for a in ATTRIBUTES}, "images_per_s": len(prompts) / seconds,
            "seconds": seconds}


def run(settings: Settings) -> Report:
    pipeline = VQDiffusionPipeline.from_pretrained(settings.model, torch_dtype=torch.float32)
    prompts = evaluation_prompts(settings.one_object, settings.two_object)
    report = Report("quality", asdict(settings), machine("cpu"), columns=[
        "sampler", "steps", "guidance_scale", "truncation_rate", "truncation_target", "transformer_calls",
        "one_object_all", "two_object_all", "one_object_specks", "two_object_specks",
        *(f"one_object_{a}" for a in ATTRIBUTES), "images_per_s"])
    for setting in grid(settings):
        report.rows.append(measure(pipeline, prompts, setting, settings))
        print(report.rows[-1], flush=True)
    report.summary = {**fewer_calls_summary(report.rows),
                      **guidance_summary(report.rows, single_target=settings.truncation_targets[0])}
    report.notes.append(f"{settings.one_object} one-object and {settings.two_object} two-object prompts; adherence "
                        "is the share of images with every attribute right (by the detector), per group; specks the "
                        "share of images with stray specks.")
    return report


def fewer_calls_summary(rows: list[dict]) -> dict:
    """The best reference-sampler row at the most steps, and the best row with at most a quarter of its calls."""
    longest = max(row["steps"] for row in rows)
    baseline = max((r for r in rows if r["sampler"] == "reference" and r["steps"] == longest),
                   key=lambda r: r["one_object_all"], default=None)
    if baseline is None:
        return {}
    cheap = [r for r in rows if 4 * r["transformer_calls"] <= baseline["transformer_calls"]]
    best = max(cheap, key=lambda r: r["one_object_all"], default=None)
    summary = {"baseline": baseline, "best_with_4x_fewer_calls": best}
    if best is not None:
        summary["gap_points"] = round(100 * (baseline["one_object_all"] - best["one_object_all"]), 1)
    return summary


def points(better: dict | None, worse: dict | None, key: str) -> float | None:
    """`better[key] - worse[key]` in percentage points, None when either row is missing."""
    return None if better is None or worse is None else round(100 * (better[key] - worse[key]), 1)


def guidance_summary(rows: list[dict], single_target: str) -> dict:
    """The guided row with the most two-object images all right (ties: more one-object), and what issue 17's
    targets compare it with: unguided, truncation 1.0, and the fewest steps, each otherwise the same setting.
    `single_target` is the truncation target of the rows run once (without guidance or without truncation)."""
    guided = [r for r in rows if r["guidance_scale"] > 1.0]
    if not guided:
        return {}
    best = max(guided, key=lambda r: (r["two_object_all"], r["one_object_all"]))

    def same_but(**changes) -> dict | None:
        wanted = {**{k: best[k] for k in ("sampler", "steps", "guidance_scale", "truncation_rate",
                                          "truncation_target")}, **changes}
        return next((r for r in rows if all(r[k] == v for k, v in wanted.items())), None)

    unguided = same_but(guidance_scale=1.0, truncation_target=single_target)
    untruncated = same_but(truncation_rate=1.0, truncation_target=single_target)
    fewest = same_but(steps=min(r["steps"] for r in rows))
    return {"best_guided": best, "unguided_same_setting": unguided,
            "guidance_gain_two_object_points": points(best, unguided, "two_object_all"),
            "truncation_vs_none_two_object_points": points(best, untruncated, "two_object_all"),
            "fewest_steps_vs_best_one_object_points": points(fewest, best, "one_object_all")}
