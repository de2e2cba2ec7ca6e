"""The base of every output type: a dataclass read by attribute, by key and by position, as diffusers' outputs are.

    out.images == out["images"] == out[0] == out.to_tuple()[0]

Fields left None are not keys and take no position, so an output with an optional field unset indexes like one
without it. Torch-free.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import fields
from typing import Any


class BaseOutput(Mapping):
    """Mixin for `@dataclass` outputs: a read-only mapping of the fields that are not None, in field order."""

    def keys(self) -> list[str]:  # a list, as index positions follow it
        return [field.name for field in fields(self) if getattr(self, field.name) is not None]

    def to_tuple(self) -> tuple[Any, ...]:
        """The values of the fields that are not None, in field order."""
        return tuple(getattr(self, key) for key in self.keys())

    def __getitem__(self, key: str | int | slice) -> Any:
        if isinstance(key, str):
            if key not in self.keys():
                raise KeyError(f"{type(self).__name__} has no key {key!r}; its keys: {self.keys()}")
            return getattr(self, key)
        return self.to_tuple()[key]

    def __contains__(self, key: object) -> bool:  # a key, never a position
        return key in self.keys()

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self.keys())
