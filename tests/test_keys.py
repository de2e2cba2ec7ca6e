"""The row key's encodings: unambiguous for any id, crafted ids included."""

import pyarrow as pa
import pytest

from vqbatch.keys import key_column, keys_digest

CRAFTED_IDS = ["a", "b", "a\n0\tb", "0\ta", "a\x00", "a\x000", "\x00\x00\x00\x00a", "", " ", "a/0/b", "é", "e\u0301"]


def keys(pairs):
    return pa.table({"id": [row_id for row_id, _ in pairs], "image_index": pa.array([k for _, k in pairs], pa.int32())})


def test_every_key_encoding_is_distinct_for_crafted_ids():
    pairs = [(row_id, index) for row_id in CRAFTED_IDS for index in (0, 1, 10, 256)]
    assert len(set(key_column(keys(pairs)).to_pylist())) == len(pairs)


def test_shard_digests_name_key_sets_not_joined_strings():
    """Keys {(a, 0), (b, 0)} and {("a\\n0\\tb", 0)} joined with tab and newline made the same shard name."""
    digests = {keys_digest(keys(group)) for group in ([("a", 0), ("b", 0)], [("a\n0\tb", 0)], [("a", 0)],
                                                     [("a", 0), ("b", 0), ("", 0)], [("a\x00", 0)])}
    assert len(digests) == 5
    assert keys_digest(keys([("b", 0), ("a", 0)])) == keys_digest(keys([("a", 0), ("b", 0)]))  # order-free


@pytest.mark.parametrize("row_id", ["a", "a\n0\tb", "\x00"])
def test_key_column_puts_the_index_first_in_four_bytes(row_id):
    assert key_column(keys([(row_id, 258)])).to_pylist() == [b"\x00\x00\x01\x02" + row_id.encode()]
