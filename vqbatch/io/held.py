"""The keys a run skips (held by the published versions or staged by a killed run), cut into hash buckets so that no
read task holds them all.

A refresh of a 10M-row dataset skips 10M keys. Handing that array to every read task (and building a hash set of
it for every input batch) costs each task hundreds of MB and seconds per batch. Instead each key gets a stable
64-bit hash of its encoded key (`vqbatch.keys.key_hashes`, the same in every process); the held keys are
sorted by hash and cut into `2**bits` buckets by the hash's top bits, each at most about `BUCKET_KEYS` keys. A read
task fetches one bucket at a time (from Ray's object store; the engine puts them there) and finds its rows' hashes
by binary search; a hash found is confirmed by comparing the whole key, so a hash collision never drops a row.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from vqbatch.keys import key_hashes

BUCKET_KEYS = 1 << 20  # held keys per bucket, about: a read task holds one bucket (~30 MB) at a time


@dataclass(frozen=True)
class HeldBuckets:
    """Held keys (`vqbatch.keys.key_column`) in `2**bits` buckets; bucket `b` holds the keys whose hash's top `bits`
    bits are `b`."""

    bits: int
    buckets: list  # per bucket: a table (hash uint64, key) sorted by hash, or a handle `fetch` turns into one
    count: int  # keys in all buckets

    @classmethod
    def of(cls, keys: pa.Array) -> "HeldBuckets":
        bits = max(0, math.ceil(math.log2(max(len(keys), 1) / BUCKET_KEYS)))
        hashes = key_hashes(keys)
        order = np.argsort(hashes, kind="stable")
        hashes = hashes[order]
        bounds = np.searchsorted(bucket_of(hashes, bits), np.arange(2**bits + 1))
        sorted_keys = keys.take(pa.array(order))
        return cls(bits, [pa.table({"hash": hashes[start:end], "key": sorted_keys.slice(start, end - start)})
                          for start, end in zip(bounds[:-1], bounds[1:])], len(keys))

    def map(self, function: Callable) -> "HeldBuckets":
        """The same buckets, each passed through `function` (e.g. `ray.put`)."""
        return HeldBuckets(self.bits, [function(bucket) for bucket in self.buckets], self.count)


def bucket_of(hashes: np.ndarray, bits: int) -> np.ndarray:  # (N,) int64
    return (hashes >> np.uint64(64 - bits)).astype(np.int64) if bits else np.zeros(len(hashes), np.int64)


def held_rows(keys: pa.Array, held: HeldBuckets, fetch: Callable = lambda bucket: bucket) -> np.ndarray:  # (N,) bool
    """Which of `keys` the held keys hold; `fetch` turns a bucket's handle into its table, one bucket at a time.
    The keys are looked up in hash order, each bucket's as one ascending run: a binary search for ascending
    needles reuses the last one's place and is several times faster than one for needles in random order."""
    found = np.zeros(len(keys), bool)
    if not len(keys) or not held.count:
        return found
    hashes = key_hashes(keys)
    order = np.argsort(hashes, kind="stable")  # grouped by bucket (a hash's top bits), ascending within each
    hashes = hashes[order]
    bounds = np.searchsorted(bucket_of(hashes, held.bits), np.arange(2**held.bits + 1))
    for bucket, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        if start < end:
            rows = order[start:end]
            found[rows] = in_bucket(keys.take(pa.array(rows)), hashes[start:end], fetch(held.buckets[bucket]))
    return found


def in_bucket(keys: pa.Array, hashes: np.ndarray, bucket: pa.Table) -> np.ndarray:  # (n,) bool
    """Binary search of each hash (ascending) in the bucket's sorted hashes; each hit confirmed by the whole key."""
    bucket_hashes, bucket_keys = bucket.column("hash").to_numpy(), bucket.column("key").cast(pa.binary())
    first, last = np.searchsorted(bucket_hashes, hashes, "left"), np.searchsorted(bucket_hashes, hashes, "right")
    found = np.zeros(len(keys), bool)
    once = np.flatnonzero(last - first == 1)  # nearly every hit: one held key with this hash
    same = pc.equal(keys.take(pa.array(once)).cast(pa.binary()), bucket_keys.take(pa.array(first[once])))
    found[once] = same.to_numpy(zero_copy_only=False)
    for row in np.flatnonzero(last - first > 1):  # held keys whose hashes collide: compare with each
        candidates = bucket_keys.slice(first[row], last[row] - first[row]).to_pylist()
        found[row] = keys.slice(row, 1).cast(pa.binary())[0].as_py() in candidates
    return found
