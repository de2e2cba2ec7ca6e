"""The `ray` requirement in pyproject.toml: a floor and a ceiling, and the installed Ray (what CI tests) inside them."""

import tomllib
from pathlib import Path

import ray
from packaging.requirements import Requirement
from packaging.version import Version

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def ray_requirement() -> Requirement:
    dependencies = tomllib.loads(PYPROJECT.read_text())["project"]["dependencies"]
    return next(Requirement(line) for line in dependencies if Requirement(line).name == "ray")


def test_ray_has_a_tested_floor_and_ceiling():
    specifier = ray_requirement().specifier
    floors = [Version(spec.version) for spec in specifier if spec.operator == ">="]
    ceilings = [Version(spec.version) for spec in specifier if spec.operator == "<"]
    assert len(floors) == 1 and len(ceilings) == 1, f"ray needs one floor and one ceiling; got {specifier}"
    installed = Version(ray.__version__)
    assert installed in specifier, f"ray {installed} is outside {specifier}"
    # the floor is what CI runs, and nothing newer than the installed minor release is allowed untested
    assert (floors[0].major, floors[0].minor) == (installed.major, installed.minor)
    assert ceilings[0] <= Version(f"{installed.major}.{installed.minor + 1}")
