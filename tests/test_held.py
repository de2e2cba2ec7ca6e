"""Held keys in hash buckets: the same answer as a set lookup, collisions settled by whole keys, one bucket at a
time, and a small handle for the read tasks."""

import pickle

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from vqbatch.io import held
from vqbatch.io.held import HeldBuckets, held_rows
from vqbatch.keys import key_column, key_hashes


def keys(names) -> pa.Array:
    pairs = list(names)
    return key_column(pa.table({"id": [name for name, _ in pairs],
                                "image_index": pa.array([index for _, index in pairs], pa.int32())}))


def test_held_rows_match_a_set_lookup_across_buckets(monkeypatch):
    monkeypatch.setattr(held, "BUCKET_KEYS", 100)
    published = keys((f"id{i}", i % 3) for i in range(2_000))
    buckets = HeldBuckets.of(published)
    assert buckets.bits == 5 and sum(bucket.num_rows for bucket in buckets.buckets) == 2_000
    assert max(bucket.num_rows for bucket in buckets.buckets) < 3 * held.BUCKET_KEYS
    queried = keys([*((f"id{i}", i % 3) for i in range(1_500, 2_500)), ("id7", 2), ("id7", 1), ("", 0)])
    expected = pc.is_in(queried, value_set=published).to_numpy(zero_copy_only=False)
    handles = HeldBuckets(buckets.bits, list(range(len(buckets.buckets))), buckets.count)  # as refs in Ray's store
    fetched = []
    found = held_rows(queried, handles, fetch=lambda index: fetched.append(index) or buckets.buckets[index])
    np.testing.assert_array_equal(found, expected)
    assert expected.sum() == 501 and len(fetched) == len(set(fetched)) <= 2**buckets.bits  # each bucket once


def test_colliding_hashes_are_settled_by_the_whole_key(monkeypatch):
    monkeypatch.setattr(held, "key_hashes", lambda values: np.full(len(values), 7, np.uint64))
    buckets = HeldBuckets.of(keys([("a", 0), ("b", 0), ("c", 1)]))
    found = held_rows(keys([("b", 0), ("c", 0), ("a", 0), ("d", 1)]), buckets)
    assert found.tolist() == [True, False, True, False]


def test_hashes_are_stable_and_spread():
    values = keys((f"row-{i:08d}", 0) for i in range(10_000))
    hashes = key_hashes(values)
    assert hashes.dtype == np.uint64 and len(np.unique(hashes)) == 10_000
    assert key_hashes(keys([("row-00000000", 0)]))[0] == hashes[0]  # alone or in a batch, the same hash
    top = np.bincount((hashes >> np.uint64(60)).astype(np.int64), minlength=16)
    assert top.min() > 10_000 / 16 * 0.8  # top bits spread evenly: buckets stay balanced


@pytest.mark.parametrize("count", [0, 3])
def test_the_read_tasks_handle_is_small_whatever_the_held_keys(count, monkeypatch):
    monkeypatch.setattr(held, "BUCKET_KEYS", 1_000)
    buckets = HeldBuckets.of(keys((f"id{i}", 0) for i in range(count * 1_000)))
    handle = buckets.map(lambda bucket: b"0" * 28)  # what a read task gets: one object ref (28 bytes) per bucket
    assert len(pickle.dumps(handle)) < 1_000
    assert held_rows(keys([("x", 0)]), buckets).tolist() == [False]
