"""The `vqbatch` command: one sub-command per user task, each a thin layer over a Python function."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


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
    parser = commands.add_parser("eval", help="prompt adherence of a generated shapes dataset, by the attribute detector")
    parser.add_argument("--output", required=True, help="the dataset's output folder or s3:// prefix")
    parser.add_argument("--json", action="store_true", help="print the report as JSON instead of a table")
    parser.add_argument("--detector-check", type=int, default=0, metavar="N",
                        help="also report the detector's accuracy on N fresh ground-truth renders")

    def run(args: argparse.Namespace) -> int:
        import json

        from vqbatch.train.adherence import evaluate_dataset, format_report
        from vqbatch.train.detector import detector_accuracy

        report = evaluate_dataset(args.output)
        if args.detector_check:
            report["detector_accuracy"] = detector_accuracy(args.detector_check)
        print(json.dumps(report, indent=2) if args.json else format_report(report))
        return 0

    parser.set_defaults(run=run)


COMMANDS = [add_tiny_model_command, add_eval_command]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vqbatch", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    for add_command in COMMANDS:
        add_command(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
