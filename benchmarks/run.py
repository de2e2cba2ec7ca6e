"""Run one benchmark: `python -m benchmarks.run <model|sampler|parts|engine|dataplane|quality|gpu> [options]`.

Each prints its results as JSON and as a markdown table and writes both to `--out` as `<name>-<config>.json|.md`.
Defaults per `--config` keep the small runs to minutes on a 2-core CPU; see docs/performance.md.
"""

from __future__ import annotations

import argparse
import math
import warnings
from collections.abc import Sequence

import torch

from vqbatch.choices import COMPILE_MODES, OUTPUT_FORMATS, SAMPLERS, TRUNCATION_TARGETS

# Per model size: steps and batch sizes of the model benchmark, device, dtype, the sampler's batch and step counts
DEFAULTS = {
    "tiny": dict(steps=4, batch_sizes=(1, 2), device="cpu", dtype="float32", sampler_batch=1,
                 sampler_steps=(2, 5, 10)),
    "small": dict(steps=10, batch_sizes=(1, 4, 16), device="cpu", dtype="float32", sampler_batch=1,
                  sampler_steps=(10, 25, 50, 100)),
    "ithq": dict(steps=100, batch_sizes=(1, 4, 16), device="cuda", dtype="float16", sampler_batch=4,
                 sampler_steps=(10, 25, 50, 100)),
}
DEFAULT_OUT = "benchmarks/results"


def integers(text: str) -> tuple[int, ...]:
    """"1,4,16" -> (1, 4, 16)."""
    try:
        values = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 1,4,16; got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers; got {text!r}")
    return values


def numbers(text: str) -> tuple[float, ...]:
    """"1,2.5" -> (1.0, 2.5); finite numbers only."""
    try:
        values = tuple(float(part) for part in text.split(","))
    except ValueError:
        values = ()
    if not values or not all(math.isfinite(v) for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated finite numbers such as 1,3,5; got {text!r}")
    return values


def rates(text: str) -> tuple[float, ...]:
    """"1,0.86" -> (1.0, 0.86); each a truncation rate, in (0, 1]."""
    values = numbers(text)
    if not all(0 < v <= 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected truncation rates in (0, 1] such as 1,0.86; got {text!r}")
    return values


def names(allowed: tuple[str, ...]):
    """An argparse type: comma-separated names, each one of `allowed`."""
    def parse(text: str) -> tuple[str, ...]:
        values = tuple(text.split(","))
        unknown = [v for v in values if v not in allowed]
        if unknown:
            raise argparse.ArgumentTypeError(f"{', '.join(map(repr, unknown))} not allowed; choose from "
                                             f"{', '.join(allowed)}")
        return values
    return parse


def add_common(parser: argparse.ArgumentParser, sizes: bool = True) -> None:
    if sizes:
        parser.add_argument("--config", choices=sorted(DEFAULTS), default="small",
                            help="model size: small (CPU, minutes), ithq (the full architecture; GPU), tiny (seconds)")
        parser.add_argument("--device", help="cpu or cuda (default: the config's)")
        parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"),
                            help="weights and activations (default: the config's)")
        parser.add_argument("--seed", type=int, default=0, help="seed of the weights and of the sampling generator")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"folder for the JSON and markdown (default {DEFAULT_OUT})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.splitlines()[0])
    benchmarks = parser.add_subparsers(dest="benchmark", required=True)

    model = benchmarks.add_parser("model", help="images/s of vqbatch vs the diffusers pipeline, same tokens")
    add_common(model)
    model.add_argument("--steps", type=int, help="diffusion steps (default: 10 for small, 100 for ithq)")
    model.add_argument("--batch-sizes", type=integers, help="comma-separated (default 1,4,16)")
    model.add_argument("--repeats", type=int, default=1, help="timed calls per batch size (median reported)")
    model.add_argument("--guidance-scale", type=float, default=5.0)
    model.add_argument("--truncation-rate", type=float, default=0.86)
    model.add_argument("--compile", nargs="?", const="default", choices=COMPILE_MODES, metavar="MODE",
                       help="also time vqbatch with its transformer compiled: torch.compile mode (default mode: "
                            f"default; one of {', '.join(COMPILE_MODES)})")

    sampler = benchmarks.add_parser("sampler", help="time against steps of the fewer-step sampler")
    add_common(sampler)
    sampler.add_argument("--step-counts", type=integers, help="comma-separated (default 10,25,50,100)")
    sampler.add_argument("--batch", type=int, help="images per call (default: 1 for small, 4 for ithq)")
    sampler.add_argument("--guidance-scale", type=float, default=5.0)
    sampler.add_argument("--truncation-rate", type=float, default=0.86)

    parts = benchmarks.add_parser("parts", help="each speed change of the sampling loop alone vs the reference")
    add_common(parts)
    parts.add_argument("--batch", type=int, default=4, help="images per step (2x rows with guidance)")
    parts.add_argument("--repeats", type=int, default=5, help="timed calls per part (median reported)")

    engine = benchmarks.add_parser("engine", help="images/s of the Ray Data job vs a bare loop over the pipeline")
    add_common(engine)
    engine.add_argument("--images", type=int, default=48, help="prompts in the job (one image each)")
    engine.add_argument("--steps", type=int, default=10)
    engine.add_argument("--batch", type=int, default=8, help="images per actor call and per bare-loop call")

    dataplane = benchmarks.add_parser("dataplane", help="rows/s and peak memory with the no-op model")
    add_common(dataplane, sizes=False)
    dataplane.add_argument("--rows", type=integers, default=(10_000, 100_000, 1_000_000),
                           help="prompt counts, comma-separated (default 10000,100000,1000000)")
    dataplane.add_argument("--batch", type=int, default=1000, help="rows per actor call")
    dataplane.add_argument("--rows-per-file", type=int, default=10_000, help="rows per shard (metadata file, tar)")
    dataplane.add_argument("--output-format", choices=OUTPUT_FORMATS, default="files",
                           help="output.format of the jobs (default files)")
    dataplane.add_argument("--refresh", type=int, default=0, metavar="N",
                           help="then refresh the largest dataset with N new prompts, measured (default: no refresh)")
    quality = benchmarks.add_parser("quality", help="samplers x steps x truncation x guidance -> prompt adherence, "
                                                    "specks and images/s")
    add_common(quality, sizes=False)
    quality.add_argument("--model", help="a trained shapes checkpoint (default: the shipped default model)")
    quality.add_argument("--one-object", type=int, default=200, help="one-object evaluation prompts (default 200)")
    quality.add_argument("--two-object", type=int, default=100, help="two-object evaluation prompts (default 100)")
    quality.add_argument("--samplers", type=names(SAMPLERS), default=SAMPLERS,
                         help=f"comma-separated: {', '.join(SAMPLERS)} (default all)")
    quality.add_argument("--step-counts", type=integers, default=(100, 25),
                         help="steps over the whole chain, comma-separated (default 100,25)")
    quality.add_argument("--guidance-scales", type=numbers, default=(1.0, 2.0, 3.0, 5.0),
                         help="comma-separated (default 1,2,3,5)")
    quality.add_argument("--truncation-rates", type=rates, default=(1.0, 0.86),
                         help="comma-separated, each in (0, 1] (default 1,0.86)")
    quality.add_argument("--truncation-targets", type=names(TRUNCATION_TARGETS), default=TRUNCATION_TARGETS,
                         help=f"comma-separated: {', '.join(TRUNCATION_TARGETS)} (default all)")
    quality.add_argument("--prior-weight", type=float, default=1.0, help="the purity sampler's prior_weight")
    quality.add_argument("--batch", type=int, default=50, help="images per pipeline call")
    quality.add_argument("--seed", type=int, default=0, help="image i is sampled with seed + i")
    gpu = benchmarks.add_parser("gpu", help="on a GPU machine, without Ray: the gpu tests, speed and MFU against "
                                            "diffusers, tokens across batch shapes, peak memory")
    add_common(gpu, sizes=False)
    gpu.add_argument("--device", default="cuda", help="cuda (default) or cpu for a smoke run")
    gpu.add_argument("--size", choices=sorted(DEFAULTS), default="ithq", help="model architecture (default ithq)")
    gpu.add_argument("--dtypes", help="comma-separated (default float16,bfloat16 on cuda, float32 on cpu)")
    gpu.add_argument("--batch-sizes", type=integers, help="comma-separated (default 1,8,32 on cuda, 1,2 on cpu)")
    gpu.add_argument("--step-counts", type=integers, help="the two timed step counts (default 2,6 on cuda, 1,2 on cpu)")
    gpu.add_argument("--invariance-images", type=int, help="images of the batch-shape check (default 8, 2 on cpu)")
    gpu.add_argument("--invariance-steps", type=int, help="their steps (default 10, 2 on cpu)")
    gpu.add_argument("--peak-tflops", type=float, help="the device's dense peak (default: known GPUs' table)")
    gpu.add_argument("--seed", type=int, default=0)
    gpu.add_argument("--no-tests", action="store_true", help="skip (a), the tests marked gpu")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)  # diffusers' deprecation notes on the reference
    if args.threads:
        torch.set_num_threads(args.threads)
    report, stem = RUNNERS[args.benchmark](args)
    report.write(args.out, stem)


def run_model(args: argparse.Namespace):
    from benchmarks import model

    defaults = DEFAULTS[args.config]
    settings = model.Settings(size=args.config, steps=args.steps or defaults["steps"],
                              guidance_scale=args.guidance_scale, truncation_rate=args.truncation_rate,
                              batch_sizes=args.batch_sizes or defaults["batch_sizes"], repeats=args.repeats,
                              device=args.device or defaults["device"], dtype=args.dtype or defaults["dtype"],
                              seed=args.seed, compile=args.compile)
    return model.run(settings), f"model-{args.config}" + ("-compiled" if args.compile else "")


def run_sampler(args: argparse.Namespace):
    from benchmarks import sampler

    defaults = DEFAULTS[args.config]
    settings = sampler.Settings(size=args.config, step_counts=args.step_counts or defaults["sampler_steps"],
                                batch=args.batch or defaults["sampler_batch"], guidance_scale=args.guidance_scale,
                                truncation_rate=args.truncation_rate, device=args.device or defaults["device"],
                                dtype=args.dtype or defaults["dtype"], seed=args.seed)
    return sampler.run(settings), f"sampler-{args.config}"


def run_parts(args: argparse.Namespace):
    from benchmarks import parts

    settings = parts.Settings(size=args.config, batch=args.batch, repeats=args.repeats, seed=args.seed)
    return parts.run(settings), f"parts-{args.config}"


def run_engine(args: argparse.Namespace):
    from benchmarks import engine

    defaults = DEFAULTS[args.config]
    settings = engine.Settings(size=args.config, images=args.images, steps=args.steps, batch=args.batch,
                               device=args.device or defaults["device"], dtype=args.dtype or defaults["dtype"],
                               seed=args.seed)
    return engine.run(settings), f"engine-{args.config}"


def run_dataplane(args: argparse.Namespace):
    from benchmarks import dataplane

    settings = dataplane.Settings(row_counts=args.rows, batch=args.batch, rows_per_file=args.rows_per_file,
                                  output_format=args.output_format, refresh_rows=args.refresh)
    return dataplane.run(settings), "dataplane"


def run_quality(args: argparse.Namespace):
    from benchmarks import quality
    from vqbatch.cli import DEFAULT_MODEL

    settings = quality.Settings(model=args.model or str(DEFAULT_MODEL), one_object=args.one_object,
                                two_object=args.two_object, samplers=args.samplers, step_counts=args.step_counts,
                                guidance_scales=args.guidance_scales, truncation_rates=args.truncation_rates,
                                truncation_targets=args.truncation_targets, prior_weight=args.prior_weight,
                                batch=args.batch, seed=args.seed)
    return quality.run(settings), "quality"


def run_gpu(args: argparse.Namespace):
    from benchmarks import gpu

    on_gpu = args.device.startswith("cuda")
    step_counts = args.step_counts or ((2, 6) if on_gpu else (1, 2))
    if len(step_counts) != 2 or step_counts[0] >= step_counts[1]:
        raise SystemExit(f"--step-counts takes two increasing counts, e.g. 2,6; got {step_counts}")
    settings = gpu.Settings(size=args.size, device=args.device,
                            dtypes=tuple((args.dtypes or ("float16,bfloat16" if on_gpu else "float32")).split(",")),
                            batch_sizes=args.batch_sizes or ((1, 8, 32) if on_gpu else (1, 2)),
                            step_counts=step_counts, invariance_images=args.invariance_images or (8 if on_gpu else 2),
                            invariance_steps=args.invariance_steps or (10 if on_gpu else 2),
                            peak_tflops=args.peak_tflops, seed=args.seed, run_tests=not args.no_tests)
    return gpu.run(settings), f"gpu-{args.size}-{args.device.split(':')[0]}"


RUNNERS = {"model": run_model, "sampler": run_sampler, "parts": run_parts, "engine": run_engine,
           "dataplane": run_dataplane, "quality": run_quality, "gpu": run_gpu}

if __name__ == "__main__":
    main()
