"""Sampling that survives faults inside one actor: a row that fails on its own, and a batch too big for memory.

The engine's actors sample through a `ResilientSampler` rather than calling the model directly:

- A batch that raises is sampled again row by row. A row that still raises alone becomes an error outcome carrying
  its message; the other rows keep their results. When every row of a batch of several rows fails alone too, no row
  is to blame (a broken model, a bug): the batch's own error is raised, so Ray's retries and then the job see it.
- A batch that runs out of memory (`MemoryError`, `torch.cuda.OutOfMemoryError`) is split: the sampler halves the
  largest batch it will try and goes on in chunks of that size, for this batch and every later one. A single image
  that still runs out of memory becomes an error outcome.

Neither changes any row's tokens: each image is sampled with its own generator (see `vqbatch.seeds`), so its tokens
do not depend on which rows share its batch.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any


# Samples one value per (prompt, seed), in order; raises when the batch cannot be sampled.
SampleFunction = Callable[[list[str], list[int]], Sequence[Any]]


@dataclass(frozen=True)
class RowOutcome:
    value: Any  # what the sample function gave for this row; None when it failed
    error: str | None = None  # why it failed


def describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


def out_of_memory_errors() -> tuple[type[BaseException], ...]:
    """`MemoryError`, and `torch.cuda.OutOfMemoryError` once torch is loaded: a model that never imported torch
    cannot raise it, and the no-op model's actors then skip torch's import (seconds per actor)."""
    torch = sys.modules.get("torch")
    return (MemoryError, torch.cuda.OutOfMemoryError) if torch else (MemoryError,)


def release_cached_memory() -> None:
    torch = sys.modules.get("torch")
    if torch and torch.cuda.is_available():
        torch.cuda.empty_cache()


class ResilientSampler:
    """Calls `sample` on whole batches, splitting them on out-of-memory errors and isolating rows that fail."""

    def __init__(self, sample: SampleFunction, max_batch: int | None = None):
        self.sample = sample
        self.max_batch = max_batch  # the largest batch tried; None until memory runs out

    def __call__(self, prompts: list[str], seeds: list[int]) -> list[RowOutcome]:
        """One outcome per (prompt, seed), in order."""
        outcomes: list[RowOutcome] = []
        while len(outcomes) < len(prompts):
            start = len(outcomes)
            size = min(len(prompts) - start, self.max_batch or len(prompts))
            try:
                outcomes += self.sample_rows(prompts[start:start + size], seeds[start:start + size])
            except out_of_memory_errors() as error:
                release_cached_memory()
                if size == 1:
                    outcomes.append(RowOutcome(None, f"out of memory on a single image ({describe(error)})"))
                else:
                    self.shrink(size, error)
        return outcomes

    def shrink(self, size: int, error: BaseException) -> None:
        self.max_batch = size // 2
        print(f"vqbatch: out of memory sampling {size} images ({describe(error)}); sampling at most "
              f"{self.max_batch} at once from now on", file=sys.stderr)

    def sample_rows(self, prompts: list[str], seeds: list[int]) -> list[RowOutcome]:
        try:
            return [RowOutcome(value) for value in self.sample(prompts, seeds)]
        except out_of_memory_errors():
            raise
        except Exception as error:  # not hidden: it becomes the row's message, or is raised when no row is to blame
            if len(prompts) == 1:
                return [RowOutcome(None, describe(error))]
            alone = [self.sample_rows([prompt], [seed])[0] for prompt, seed in zip(prompts, seeds)]
            if all(outcome.error for outcome in alone):
                raise error
            return alone
