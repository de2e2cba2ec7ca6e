"""The command line's own habits: every enumerated flag lists its values (`choices=`), taken from vqbatch/choices.py."""

import argparse
import typing

import pytest

from vqbatch.cli import GENERATE_FLAGS, build_parser
from vqbatch.config import JobConfig


def literal_values(dotted_key: str) -> tuple | None:
    """The allowed values of a job setting typed as a `Literal` (or an optional one); None for any other type."""
    section, name = dotted_key.split(".")
    annotation = JobConfig.model_fields[section].annotation.model_fields[name].annotation
    members = [annotation] if typing.get_origin(annotation) is typing.Literal else typing.get_args(annotation)
    literals = [member for member in members if typing.get_origin(member) is typing.Literal]
    if len(literals) != 1 or any(member is not type(None) for member in members if member not in literals):
        return None
    return typing.get_args(literals[0])


def job_flags(command: str) -> dict[str, argparse.Action]:
    commands = next(action for action in build_parser()._actions if isinstance(action, argparse._SubParsersAction))
    return {action.dest: action for action in commands.choices[command]._actions}


@pytest.mark.parametrize("command", ["generate", "refresh"])
def test_every_enumerated_job_flag_has_its_values_as_choices(command):
    flags = job_flags(command)
    enumerated = {key: literal_values(key) for _, key, _, _ in GENERATE_FLAGS if literal_values(key)}
    assert "output.format" in enumerated and "output.image_format" in enumerated
    for key, values in enumerated.items():
        assert tuple(flags[key].choices) == values, key


def test_an_unknown_output_format_is_refused_by_the_parser_naming_the_formats(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["generate", "--output-format", "tarball"])
    assert "argument --output-format: invalid choice: 'tarball' (choose from 'files', 'webdataset', 'parquet')" \
        in capsys.readouterr().err
