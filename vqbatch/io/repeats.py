"""The 64-bit hashes that occur more than once among many, found with bounded memory in the driver.

Checking that ten million ids (or published keys) are unique by holding all their hashes costs 8 bytes per row at
least, and twice that while they are joined into one array. Instead `RepeatedHashes` writes each hash to one of
`2**bits` spill files on the driver's local disk, chosen by the hash's top bits (so the hashes must be well mixed:
`vqbatch.keys.finalized`), with `bits` chosen from the expected count so that each file holds about
`PARTITION_HASHES` hashes. Equal hashes land in the same file, so reading back one file at a time and sorting it
finds every repeat: memory is one file's hashes plus the write buffers, whatever the count. The disk holds 8 bytes
per hash until the check ends.
"""

from __future__ import annotations

import math
import os
import tempfile

import numpy as np

from vqbatch.io.held import bucket_of

PARTITION_HASHES = 1 << 18  # hashes per spill file, about: 2 MiB sorted at a time
MAX_BITS = 8  # at most 256 spill files open at once (files then grow past PARTITION_HASHES, beyond 67M hashes)
BUFFER_BYTES = 4 << 20  # write buffers of all spill files together
ADD_CHUNK = 1 << 16  # hashes grouped by spill file at a time


class RepeatedHashes:
    """`with RepeatedHashes(expected) as repeats: repeats.add(hashes) ...; repeats.repeated()`."""

    def __init__(self, expected: int):
        self.bits = min(MAX_BITS, max(0, math.ceil(math.log2(max(expected, 1) / PARTITION_HASHES))))
        self.folder = tempfile.TemporaryDirectory(prefix="vqbatch-repeats-")
        buffering = max(1 << 12, BUFFER_BYTES >> self.bits)
        self.files = [open(os.path.join(self.folder.name, f"{part}.u64"), "wb", buffering=buffering)
                      for part in range(2**self.bits)]

    def __enter__(self) -> "RepeatedHashes":
        return self

    def __exit__(self, *exc_info) -> None:
        for file in self.files:
            file.close()
        self.folder.cleanup()

    def add(self, hashes: np.ndarray) -> None:
        """Spill `hashes` (N,) uint64, each to the file of its top bits, `ADD_CHUNK` at a time (the temporaries of a
        large array stay small)."""
        hashes = np.asarray(hashes, np.uint64)
        for start in range(0, len(hashes), ADD_CHUNK):
            self.spill(hashes[start:start + ADD_CHUNK])

    def spill(self, hashes: np.ndarray) -> None:
        parts = bucket_of(hashes, self.bits)
        order = np.argsort(parts, kind="stable")
        bounds = np.searchsorted(parts[order], np.arange(2**self.bits + 1))
        grouped = hashes[order]
        for part in np.flatnonzero(np.diff(bounds)):
            self.files[part].write(grouped[bounds[part]:bounds[part + 1]].tobytes())

    def repeated(self) -> np.ndarray:  # (R,) uint64, sorted
        """Every hash added more than once, each once; one spill file in memory at a time."""
        found = []
        for file in self.files:
            file.flush()
            found.append(repeated_values(np.fromfile(file.name, np.uint64)))
        return np.concatenate(found)


def repeated_values(values: np.ndarray) -> np.ndarray:
    """The distinct values that occur more than once in `values` (N,), which this sorts in place (no copy)."""
    values.sort()
    return np.unique(values[1:][values[1:] == values[:-1]])
