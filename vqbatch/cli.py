"""The `vqbatch` command: one sub-command per user task, each a thin layer over a Python function."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from vqbatch.choices import (COMPILE_MODES, DTYPES, IMAGE_FORMATS, INTEGRITY_CHECKS, NOISES, OUTPUT_FORMATS, SAMPLERS,
                             TIMESTEP_SAMPLINGS, TIMESTEP_SPACINGS, TRAIN_DTYPES, TRUNCATION_TARGETS)


def add_tiny_model_command(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("tiny-model", help="write a small random-weight checkpoint in the diffusers layout")
    parser.add_argument("path", help="folder to write the checkpoint into")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights (default 0)")

    def run(args: argparse.Namespace) -> int:
        from vqbatch.tiny import write_tiny_checkpoint

        print(f"wrote tiny checkpoint to {write_tiny_checkpoint(args.path, seed=args.seed)}")
        return 0

    parser.set_defaults(run=run)


def add_eval_command(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("eval", help="prompt adherence of a generated shapes dataset, by the attribute "
                                              "detector")
    parser.add_argument("--output", required=True, help="the dataset's output folder or s3:// prefix")
    parser.add_argument("--json", action="store_true", help="print the report as JSON instead of a table")
    parser.add_argument("--detector-check", type=int, default=0, metavar="N",
                        help="also report the detector's accuracy on N fresh ground-truth renders")
    add_s3_flag(parser)

    def run(args: argparse.Namespace) -> int:
        import json

        from vqbatch.train.adherence import evaluate_dataset, format_report
        from vqbatch.train.detector import detector_accuracy

        report = evaluate_dataset(args.output, s3=job_s3(args))
        if args.detector_check:
            report["detector_accuracy"] = detector_accuracy(args.detector_check)
        print(json.dumps(report, indent=2) if args.json else format_report(report))
        return 0

    parser.set_defaults(run=run)


# ---------------------------------------------------------------- generate and demo (the batch engine)

GENERATE_FLAGS = (  # (flag, dotted config key, type, help)
    ("--input", "input.paths", str, "prompt Parquet file, folder or glob, local or s3:// (repeat for several)"),
    ("--output", "output.uri", str, "output folder or s3:// prefix"),
    ("--model", "model.uri", str, "checkpoint folder, s3:// URI, hub id, or 'noop' (no model: data-plane runs)"),
    ("--prompt-column", "input.prompt_column", str, "prompt column (default prompt)"),
    ("--id-column", "input.id_column", str, "id column (default id)"),
    ("--limit", "input.limit", int, "only the first N prompts, in file order (to try a config; default: all)"),
    ("--steps", "sampling.steps", int, "reverse-diffusion steps (default 100)"),
    ("--guidance-scale", "sampling.guidance_scale", float, "classifier-free guidance scale (default 5.0)"),
    ("--truncation-rate", "sampling.truncation_rate", float, "truncation rate in (0, 1] (default 1.0)"),
    ("--truncation-target", "sampling.truncation_target", str, "guided: truncate after guidance (diffusers, the "
                                                               "default); prompted: before it, no stray specks"),
    ("--images-per-prompt", "sampling.images_per_prompt", int, "images per prompt (default 1)"),
    ("--timestep-spacing", "sampling.timestep_spacing", str, "reference: diffusers' last N steps; skip: fewer "
                                                           "steps over the whole chain"),
    ("--sampler", "sampling.sampler", str, "reference: diffusers' sampling; purity: Improved VQ-Diffusion's "
                                           "purity prior, surest tokens first"),
    ("--prior-weight", "sampling.prior_weight", float, "r of the purity prior, >= 0: sharpens the surest tokens "
                                                       "(default 0; needs --sampler purity)"),
    ("--noise", "sampling.noise", str, "categorical: one uniform per latent pixel, the same on every device "
                                       "(default); gumbel: diffusers' random stream"),
    ("--seed", "sampling.base_seed", int, "base seed of rows without their own seed (default 0)"),
    ("--batch-size", "compute.batch_size", str, "images per actor call, each call padded to it (default 8), or "
                                                "auto: the largest batch that fits --memory-fraction of an actor's "
                                                "memory, measured"),
    ("--memory-fraction", "compute.memory_fraction", float, "share of an actor's memory --batch-size auto may fill "
                                                          "(default 0.8)"),
    ("--gpus-per-actor", "compute.gpus_per_actor", float, "GPUs per actor (default: 1 if the cluster has GPUs)"),
    ("--cpus-per-actor", "compute.cpus_per_actor", float, "CPUs per actor (default 1)"),
    ("--dtype", "model.dtype", str, "weights' and activations' dtype (default float32)"),
    ("--compile", "model.compile", str, "torch.compile mode of the transformer; reduce-overhead adds CUDA graphs "
                                        "(default: not compiled)"),
    ("--image-format", "output.image_format", str, "image file format (default png)"),
    ("--image-quality", "output.image_quality", int, "jpeg/webp quality 1-100 (default 95)"),
    ("--rows-per-file", "output.rows_per_file", int, "rows per shard: metadata Parquet file, tar (default 1000)"),
    ("--output-format", "output.format", str, "files: an image file per row; webdataset: tar shards; parquet: "
                                              "image bytes in the Parquet files (default files)"),
)


def add_train_command(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("train", help="train the small default model on the procedural shapes dataset")
    parser.add_argument("--output", required=True, help="folder for the checkpoint (diffusers layout) and train state")
    parser.add_argument("--seed", type=int, default=0, help="seed of data, weights and every training step (default 0)")
    parser.add_argument("--resume", action="store_true", help="continue the run whose train state is in --output")
    parser.add_argument("--vq-steps", type=int, help="VQ-VAE training steps (default: the config's)")
    parser.add_argument("--diffusion-steps", type=int, help="diffusion training steps (default: the config's)")
    parser.add_argument("--drop-rate", type=float, help="share of samples trained with the learned 'no prompt' "
                                                        "embeddings, in [0, 1) (default: the config's, 0.2)")
    parser.add_argument("--timestep-sampling", choices=TIMESTEP_SAMPLINGS,
                        help="how each sample's timestep is drawn (default: the config's, importance)")
    parser.add_argument("--vqvae-from", metavar="CHECKPOINT",
                        help="train the diffusion stage on this trained VQ-VAE (a checkpoint folder or its vqvae "
                             "folder) instead of training one")
    parser.add_argument("--smoke", action="store_true", help="a tiny config that trains in a minute (for tests)")
    parser.add_argument("--dtype", choices=TRAIN_DTYPES, default="float32", help="weights written")
    parser.add_argument("--threads", type=int, help="torch CPU threads (1 is often fastest on a shared machine)")

    def run(args: argparse.Namespace) -> int:
        import torch

        from vqbatch.train.loop import SMOKE_CONFIG, TrainConfig, train

        from pydantic import ValidationError

        settings = {**(SMOKE_CONFIG if args.smoke else {}), "seed": args.seed}
        flags = ("vq_steps", "diffusion_steps", "drop_rate", "timestep_sampling", "vqvae_from")
        settings.update({k: getattr(args, k) for k in flags if getattr(args, k) is not None})
        try:
            config = TrainConfig(**settings)
        except ValidationError as error:  # before any data is drawn or model built
            parser.error(f"invalid training settings: {error}")
        train(args.output, config, resume=args.resume, dtype=getattr(torch, args.dtype), threads=args.threads)
        return 0

    parser.set_defaults(run=run)


def add_generate_command(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("generate", help="generate an image dataset from Parquet prompts on Ray")
    add_job_flags(parser)
    existing = parser.add_mutually_exclusive_group()
    existing.add_argument("--overwrite", action="store_const", dest="output.mode", const="overwrite",
                          help="replace a dataset vqbatch wrote at --output (deleting only its own files; "
                               "an output holding other files is refused)")
    existing.add_argument("--resume", action="store_const", dest="output.mode", const="refresh",
                          help="finish a killed run at --output: keep the rows it wrote, sample the rest "
                               "(the same as `vqbatch refresh`)")
    parser.set_defaults(run=run_job_command)


def add_refresh_command(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("refresh", help="add the rows the dataset lacks (new prompts, rows a killed run "
                                                 "left) as a new version; nothing when it holds them all")
    add_job_flags(parser)
    parser.set_defaults(run=run_job_command, **{"output.mode": "refresh"})


# the flags whose values are one of a list (vqbatch/choices.py): argparse names the flag, the value and the list
FLAG_CHOICES = {"sampling.timestep_spacing": TIMESTEP_SPACINGS, "sampling.sampler": SAMPLERS, "model.dtype": DTYPES,
                "model.compile": COMPILE_MODES, "output.image_format": IMAGE_FORMATS, "sampling.noise": NOISES,
                "sampling.truncation_target": TRUNCATION_TARGETS, "output.format": OUTPUT_FORMATS}


def add_job_flags(parser: argparse.ArgumentParser) -> None:
    """The flags `generate` and `refresh` share: every job setting, the pool size, the cluster, the fingerprint."""
    parser.add_argument("--config", help="job YAML (sections input, model, sampling, compute, output, s3); "
                                         "flags override it")
    for flag, key, kind, text in GENERATE_FLAGS:
        choices = FLAG_CHOICES.get(key)
        parser.add_argument(flag, dest=key, type=kind, metavar=flag[2:].upper().replace("-", "_"),
                            help=f"{text}; one of {', '.join(choices)}" if choices else text,
                            action="append" if key == "input.paths" else None, choices=choices)
    parser.add_argument("--num-actors", type=int, help="fixed actor pool size (sets min and max)")
    parser.add_argument("--dry-run", action="store_true", help="print what would run (inputs, rows pending, "
                                                               "fingerprint, resources, batch size) and stop: no Ray, "
                                                               "no model loaded, nothing written")
    parser.add_argument("--ray-address", help="cluster to join (default: RAY_ADDRESS, else a new local Ray; "
                                              "'auto': a running cluster if any)")
    add_progress_flags(parser)
    parser.add_argument("--allow-new-fingerprint", action="store_true",
                        help="when the model, sampling settings or sampler code differ from the dataset's latest "
                             "version: generate every row again as a new version (refused otherwise)")


def run_job_command(args: argparse.Namespace) -> int:
    from vqbatch.config import load_job_config

    overrides = {key: getattr(args, key) for _, key, _, _ in GENERATE_FLAGS}
    overrides.update({"compute.min_actors": args.num_actors, "compute.max_actors": args.num_actors,
                      "output.mode": getattr(args, "output.mode")})
    config = load_job_config(args.config, overrides)
    if args.dry_run:
        return print_dry_run(config, args.allow_new_fingerprint)
    return run_and_report(config, args, args.allow_new_fingerprint)


def print_dry_run(config, allow_new_fingerprint: bool) -> int:
    from vqbatch.engine import check_job

    inputs, plan = check_job(config, allow_new_fingerprint)
    compute, images = config.compute, inputs.num_rows * config.sampling.images_per_prompt
    limit = f" (--limit {config.input.limit})" if config.input.limit else ""
    pool = f"{compute.min_actors}-{compute.max_actors}" if compute.max_actors else \
        f"at least {compute.min_actors}, at most one per GPU (or every CPU but one)"
    gpus = "1 if the cluster has GPUs, else 0" if compute.gpus_per_actor is None else f"{compute.gpus_per_actor:g}"
    print(f"dry run: nothing sampled, written or started\n"
          f"input        {len(inputs.paths)} file(s), {inputs.num_rows} prompts{limit}, {images} images: "
          f"{', '.join(inputs.uris)}\n"
          f"output       {config.output.uri} (mode {config.output.mode}) -> version {plan.version}\n"
          f"pending      {plan.pending} images to sample ({images - plan.pending} already held"
          f"{f', {len(plan.staged)} staged file(s) to publish' if plan.staged else ''})\n"
          f"fingerprint  {plan.fingerprint.digest} ({config.model.uri}, {config.model.dtype}; "
          f"{', '.join(f'{k}={v}' for k, v in plan.fingerprint.parts['sampling'].items())})\n"
          f"resources    actors: {pool}; per actor {gpus} GPU, {compute.cpus_per_actor:g} CPU\n"
          f"batch size   {compute.batch_size}"
          f"{' (measured from memory before the job starts)' if compute.batch_size == 'auto' else ''}")
    return 0


def add_demo_command(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("demo", help="run the whole engine on the bundled prompts and default model")
    parser.add_argument("--output", default="out/demo", help="output folder (default out/demo): a dataset vqbatch "
                                                             "wrote there is replaced; other files refuse the run")
    add_progress_flags(parser)

    def run(args: argparse.Namespace) -> int:
        from vqbatch.config import JobConfig
        from vqbatch.io.examples import EXAMPLE_PROMPTS

        config = JobConfig(input={"paths": [str(EXAMPLE_PROMPTS)]}, model={"uri": str(DEFAULT_MODEL)},
                           sampling=DEFAULT_MODEL_SAMPLING, compute={"batch_size": 8},
                           output={"uri": args.output, "rows_per_file": 16, "mode": "overwrite"})
        return run_and_report(config, args, with_report=True)  # the summary's last line: the page to open

    parser.set_defaults(run=run)


# trained on the shapes world (vqbatch train)
DEFAULT_MODEL = Path(__file__).resolve().parent / "data" / "default-model"
# How the shipped model follows prompts best (README, "The default model", the guidance table): the purity sampler at
# 25 steps over the whole chain, guidance 3 within the prompted prediction truncated at 0.5.
DEFAULT_MODEL_SAMPLING = {"guidance_scale": 3.0, "truncation_rate": 0.5, "truncation_target": "prompted",
                          "sampler": "purity", "prior_weight": 1.0, "steps": 25, "timestep_spacing": "skip"}


def run_and_report(config, args: argparse.Namespace, allow_new_fingerprint: bool = False,
                   with_report: bool = False) -> int:
    """Run the job with its progress and summary on stdout and only vqbatch's messages on stderr (`console`);
    with `with_report`, also the dataset's report, whose page the summary then names."""
    from vqbatch.console import LIVE_SECONDS, ProgressPrinter, own_messages_only, progress_mode
    from vqbatch.engine import run_job

    printer = ProgressPrinter(sys.stdout, progress_mode(args.quiet, args.json_progress, sys.stdout))
    with own_messages_only(args.verbose) as log_file:
        summary = run_job(config, on_progress=printer, ray_address=getattr(args, "ray_address", None),
                          allow_new_fingerprint=allow_new_fingerprint, progress_every=LIVE_SECONDS)
    if summary.version is None:
        print(f"nothing to add: {summary.output_uri} already holds every row of the input for this model, these "
              "sampling settings and this sampler version")
        return 0
    report = None
    if with_report:
        from vqbatch.report import write_report

        report = write_report(summary.output_uri, s3=config.s3).html.resolve()
    printer.summary(summary, log_file, report)
    return 0


def add_progress_flags(parser: argparse.ArgumentParser) -> None:
    """How a run shows itself: progress (live, plain, JSON or none) and whether Ray's own lines are printed."""
    shown = parser.add_mutually_exclusive_group()
    shown.add_argument("--quiet", action="store_true", help="no progress lines; only the summary and errors")
    shown.add_argument("--json-progress", action="store_true",
                       help="progress as one JSON object per line on stdout, the summary as the last one "
                            "(for schedulers and CI)")
    parser.add_argument("--verbose", action="store_true",
                        help="also print Ray's and transformers' own messages (by default kept in a log file that "
                             "the summary names)")


def report_job_error(error: Exception) -> int:
    print(f"vqbatch: {error}", file=sys.stderr)
    return 2


# ---------------------------------------------------------------- rerun and verify (proof of stored rows)

def add_rerun_command(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("rerun", help="regenerate chosen rows of a dataset from their stored seeds and "
                                               "parameters into a separate dataset")
    parser.add_argument("--output", required=True, help="the dataset's output folder or s3:// prefix")
    choice = parser.add_mutually_exclusive_group(required=True)
    choice.add_argument("--ids", nargs="+", metavar="ID", help="rerun every image of these ids")
    choice.add_argument("--where", metavar="FILTER", help="rerun the rows matching a filter over metadata columns, "
                                                          "e.g. \"image_index == 0 and id in ('a', 'b')\"")
    parser.add_argument("--into", metavar="URI", help="where to write the rerun (default: "
                                                      "<output>/reruns/rerun-<digest of the chosen rows>)")
    parser.add_argument("--batch-size", type=int, default=8, help="batch shape for datasets that recorded none "
                        "(default 8); others are sampled at the shape they were made with")
    parser.add_argument("--overwrite", action="store_true", help="replace a dataset already at the rerun folder")
    add_s3_flag(parser)
    add_threads_flag(parser)

    def run(args: argparse.Namespace) -> int:
        from vqbatch.proof import rerun

        use_threads(args.threads)
        summary = rerun(args.output, ids=args.ids, where=args.where, into=args.into, batch_size=args.batch_size,
                        overwrite=args.overwrite, s3=job_s3(args))
        skipped = f"; skipped {len(summary.skipped)} error row(s) without a seed" if summary.skipped else ""
        print(f"reran {summary.rows} image(s) -> {summary.output_uri}{skipped}")
        return 0

    parser.set_defaults(run=run)


def add_verify_command(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("verify", help="regenerate random rows of a dataset and check that tokens and "
                                                "images match bit for bit (exit 1 on any mismatch)")
    parser.add_argument("--output", required=True, help="the dataset's output folder or s3:// prefix")
    parser.add_argument("--sample", type=int, required=True, metavar="N", help="rows to regenerate (all if fewer)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random choice of rows (default 0)")
    parser.add_argument("--batch-size", type=int, default=8, help="batch shape for datasets that recorded none "
                        "(default 8); others are sampled at the shape they were made with")
    parser.add_argument("--integrity", choices=INTEGRITY_CHECKS, default="decode",
                        help="decode (default): read every published file and decode every stored image; exists: "
                             "only check that every published file is there (for datasets too large to read whole)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    add_s3_flag(parser)
    add_threads_flag(parser)

    def run(args: argparse.Namespace) -> int:
        import json

        from vqbatch.proof import format_report, verify

        use_threads(args.threads)
        report = verify(args.output, args.sample, seed=args.seed, batch_size=args.batch_size,
                        s3=job_s3(args), integrity=args.integrity)
        print(json.dumps(report.to_dict(), indent=2) if args.json else format_report(report))
        return 0 if report.passed else 1

    parser.set_defaults(run=run)


def add_s3_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="JOB_YAML", help="job YAML whose s3 section (endpoint, region, "
                                                             "credentials) reads the dataset and its model; other "
                                                             "sections are ignored (default: the AWS_* variables)")


def job_s3(args: argparse.Namespace):
    from vqbatch.config import load_s3_config

    return load_s3_config(args.config)


def add_threads_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads; the same count as the actors "
                                                               "had for bit-exact CPU images (default 1, like "
                                                               "actors with one CPU)")


def use_threads(threads: int) -> None:
    import torch

    if threads < 1:
        raise ValueError(f"--threads must be a positive integer, got {threads}")
    torch.set_num_threads(threads)


# ---------------------------------------------------------------- seeing a dataset: report, inspect, decode

def add_report_command(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("report", help="a self-contained report.html and contact_sheet.png: sampled "
                                                "images with their prompts, versions, errors, speed")
    parser.add_argument("output", metavar="OUTPUT", help="the dataset's output folder or s3:// prefix")
    parser.add_argument("--sample", type=int, default=48, metavar="N", help="images shown (default 48; all if fewer)")
    parser.add_argument("--to", metavar="DIR", help="folder for the report (default: OUTPUT/report, or ./report "
                                                    "for an s3:// OUTPUT)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random choice of images (default 0)")
    add_s3_flag(parser)

    def run(args: argparse.Namespace) -> int:
        from vqbatch.report import write_report

        files = write_report(args.output, args.to, sample=args.sample, seed=args.seed,
                             s3=job_s3(args))
        print(f"open {files.html.resolve()} ({files.images} images with their prompts; contact sheet: "
              f"{files.contact_sheet.resolve()})")
        return 0

    parser.set_defaults(run=run)


def add_inspect_command(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("inspect", help="summarise a dataset in the terminal (versions, rows, errors by "
                                                 "kind, parameters, size, formats) and show one row in full")
    parser.add_argument("output", metavar="OUTPUT", help="the dataset's output folder or s3:// prefix")
    parser.add_argument("--id", dest="row_id", metavar="ID", help="the row shown in full (default: the first)")
    add_s3_flag(parser)

    def run(args: argparse.Namespace) -> int:
        from vqbatch.inspection import inspect_dataset

        print(inspect_dataset(args.output, args.row_id, s3=job_s3(args)), end="")
        return 0

    parser.set_defaults(run=run)


def add_decode_command(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("decode", help="re-render images of chosen ids from their stored tokens with the "
                                                "dataset's model (no sampling)")
    parser.add_argument("output", metavar="OUTPUT", help="the dataset's output folder or s3:// prefix")
    parser.add_argument("--ids", nargs="+", required=True, metavar="ID", help="decode every image of these ids")
    parser.add_argument("--to", required=True, metavar="DIR", help="folder for the image files")
    parser.add_argument("--image-format", choices=IMAGE_FORMATS, help="file format (default: the dataset's)")
    parser.add_argument("--size", type=int, metavar="S", help="pixels per side (default: the model's image size)")
    add_s3_flag(parser)
    add_threads_flag(parser)

    def run(args: argparse.Namespace) -> int:
        from vqbatch.inspection import decode_rows

        use_threads(args.threads)
        written = decode_rows(args.output, args.ids, args.to, image_format=args.image_format, size=args.size,
                              s3=job_s3(args))
        print(f"decoded {len(written)} image(s) from stored tokens into {args.to}")
        return 0

    parser.set_defaults(run=run)


COMMANDS = [add_tiny_model_command, add_eval_command, add_train_command, add_generate_command, add_refresh_command,
            add_demo_command, add_rerun_command, add_verify_command, add_report_command, add_inspect_command,
            add_decode_command]


def build_parser() -> argparse.ArgumentParser:
    import vqbatch

    parser = argparse.ArgumentParser(prog="vqbatch", description=__doc__)
    parser.add_argument("--version", action="version", version=f"vqbatch {vqbatch.__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    for add_command in COMMANDS:
        add_command(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, OSError) as error:  # what the user must fix: input, output, checkpoint, its location
        return report_job_error(error)


if __name__ == "__main__":
    sys.exit(main())
