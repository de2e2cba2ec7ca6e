"""Repeated hashes found out of core: the same answer as sorting them all, across spill files and batches, with the
spill files on disk only while the check runs; and the input's duplicate-id check through it."""

import os
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from vqbatch.config import InputConfig, S3Config
from vqbatch.io import repeats
from vqbatch.io.prompts import open_input
from vqbatch.io.repeats import RepeatedHashes
from vqbatch.keys import finalized


def test_repeats_across_spill_files_and_batches_match_an_in_memory_count(monkeypatch):
    monkeypatch.setattr(repeats, "PARTITION_HASHES", 64)
    monkeypatch.setattr(repeats, "ADD_CHUNK", 100)
    values = finalized(np.random.default_rng(3).integers(0, 3_000, 5_000).astype(np.uint64))  # many repeats
    distinct, counts = np.unique(values, return_counts=True)
    with RepeatedHashes(len(values)) as found:
        assert found.bits == 7 and len(found.files) == 128
        for batch in np.array_split(values, 9):
            found.add(batch)
        repeated = found.repeated()
        sizes = [os.path.getsize(file.name) for file in found.files]
        folder = found.folder.name
    np.testing.assert_array_equal(repeated, distinct[counts > 1])
    assert sum(sizes) == 8 * len(values) and max(sizes) < 8 * 3 * 64  # each hash spilled once, spread over files
    assert not os.path.exists(folder)


def test_no_repeat_and_nothing_added():
    with RepeatedHashes(0) as found:
        assert found.bits == 0 and found.repeated().size == 0
    with RepeatedHashes(10) as found:
        found.add(np.arange(10, dtype=np.uint64))
        found.add(np.array([], np.uint64))
        assert found.repeated().size == 0


@pytest.mark.parametrize("ids", [[f"row-{i}" for i in range(3_000)], list(range(3_000))])
def test_duplicate_ids_are_found_when_their_hashes_are_spilled_to_many_files(tmp_path, monkeypatch, ids):
    """Small integer ids hash to themselves: mixed, they still spread over the files (none holds them all)."""
    monkeypatch.setattr(repeats, "PARTITION_HASHES", 100)
    spilled = []
    monkeypatch.setattr(RepeatedHashes, "add", lambda self, hashes, add=RepeatedHashes.add: (
        spilled.append(repeats.bucket_of(np.asarray(hashes, np.uint64), self.bits)), add(self, hashes)))
    for part in range(3):
        pq.write_table(pa.table({"id": ids[part::3], "prompt": ["p"] * len(ids[part::3])}), tmp_path / f"{part}.parquet")
    config = InputConfig(paths=[str(tmp_path)])
    assert open_input(config, S3Config()).num_rows == 3_000
    assert np.bincount(np.concatenate(spilled)).max() < 300  # about 3000 / 32 per file
    pq.write_table(pa.table({"id": [ids[2_999], ids[5]], "prompt": ["p", "q"]}), tmp_path / "again.parquet")
    shown = f"has 2 duplicate id(s), e.g. {str(ids[5])!r} (2 rows), {str(ids[2_999])!r} (2 rows)"
    with pytest.raises(ValueError, match=re.escape(shown)):
        open_input(config, S3Config())
