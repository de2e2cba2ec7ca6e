"""Component configs: pydantic models that read and write diffusers-layout JSON files.

Every scheduler and model keeps its constructor arguments in a frozen `ComponentConfig` (`obj.config`).
The JSON files carry diffusers' bookkeeping keys (`_class_name`, `_diffusers_version`), which are accepted
on load and written on save; any other unknown key or invalid value is a `ValueError` that names the key,
the value and what is allowed.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, ValidationError

# Keys diffusers and transformers add to config files for their own bookkeeping; they carry no setting.
BOOKKEEPING_KEYS = frozenset({"_class_name", "_diffusers_version", "_name_or_path", "_use_default_values"})
DIFFUSERS_VERSION = "0.42.1"  # the diffusers layout version we write, so diffusers reads our files


class ComponentConfig(BaseModel):
    """Base of every component's config: frozen, strict about unknown keys, read like diffusers' frozen config dict
    (`config["key"]`, `config.get`, `keys`, `values`, `items`, `len`; iterating it gives the keys)."""

    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=(), arbitrary_types_allowed=True)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ComponentConfig":
        settings = {k: v for k, v in data.items() if k not in BOOKKEEPING_KEYS}
        try:
            return cls(**settings)
        except ValidationError as error:
            raise ValueError(describe_validation_error(cls, settings, error)) from None

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def __getitem__(self, key: str) -> Any:
        return getattr(self, key)

    def __contains__(self, key: str) -> bool:
        return key in type(self).model_fields

    def keys(self):
        return type(self).model_fields.keys()

    def values(self) -> list[Any]:
        return [getattr(self, key) for key in self.keys()]

    def items(self) -> list[tuple[str, Any]]:
        return [(key, getattr(self, key)) for key in self.keys()]

    def get(self, key: str, default: Any = None) -> Any:
        return getattr(self, key) if key in self else default

    def __iter__(self):  # the keys, as a dict's (pydantic's own yields (key, value) pairs)
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self.keys())


def short_repr(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 5] + " ...)"


def describe_validation_error(cls: type[BaseModel], settings: Mapping[str, Any], error: ValidationError) -> str:
    """One line per problem: which key, what value, what is allowed."""
    lines = []
    for problem in error.errors():
        key = ".".join(str(part) for part in problem["loc"]) or "<config>"
        value = settings.get(str(problem["loc"][0]), problem.get("input")) if problem["loc"] else settings
        if problem["type"] == "extra_forbidden":
            allowed = ", ".join(sorted(cls.model_fields))
            lines.append(f"unknown key {key!r} (value {short_repr(value)}); allowed keys: {allowed}")
        else:
            lines.append(f"invalid value {short_repr(value)} for {key!r}: {problem['msg']}")
    return f"{cls.__name__}: " + "; ".join(lines)


def read_json(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from None


def write_json(path: str | Path, data: Mapping[str, Any]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


class Configured:
    """Gives a component `config`, `from_config`, and config-file saving and loading.

    Subclasses set `config_class`, `config_name` (the file name in a checkpoint folder) and `diffusers_name`
    (the `_class_name` written to that file, so diffusers can read it) and call `super().__init__` with their
    validated config.
    """

    config_class: ClassVar[type[ComponentConfig]]
    config_name: ClassVar[str] = "config.json"
    diffusers_name: ClassVar[str]
    config: ComponentConfig

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | ComponentConfig, **overrides: Any):
        settings = config.to_dict() if isinstance(config, ComponentConfig) else dict(config)
        validated = cls.config_class.from_dict({**settings, **overrides})
        return cls(**dict(validated))

    @classmethod
    def load_config(cls, pretrained_model_name_or_path: str | Path, subfolder: str | None = None,
                    revision: str | None = None) -> ComponentConfig:
        """The validated config file of a component: a local folder, an s3:// URI or a hub id (at `revision`), plus
        `subfolder`, as diffusers' `load_config` takes them."""
        from vqbatch.hub import component_folder

        folder = component_folder(pretrained_model_name_or_path, subfolder, revision)
        return cls.config_class.from_dict(read_json(folder / cls.config_name))

    def save_config(self, directory: str | Path) -> Path:
        path = Path(directory) / self.config_name
        write_json(path, {"_class_name": self.diffusers_name, "_diffusers_version": DIFFUSERS_VERSION,
                          **self.config.to_dict()})
        return path


class ConfigOnlyComponent(Configured):
    """A component whose checkpoint folder holds only its config file (the schedulers)."""

    def save_pretrained(self, directory: str | Path) -> None:
        self.save_config(directory)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, subfolder: str | None = None,
                        revision: str | None = None, **overrides: Any):
        return cls.from_config(cls.load_config(pretrained_model_name_or_path, subfolder, revision), **overrides)
