"""The key of an image row, (id, image_index), and its encodings that name files.

An id is non-blank, valid UTF-8 text (integer ids are written as their decimal text; `vqbatch.io.prompts` refuses
null, empty, whitespace-only and undecodable ids); an image index is a non-negative int32. Each encoding below is
unambiguous for any id: no id, whatever characters it holds, can produce another key's encoding.

- `key_column`: one binary value per row, the image index as 4 big-endian bytes followed by the id's UTF-8 bytes.
  The index has a fixed width, so the id is exactly the rest.
- `keys_digest`: 32 hex digits of BLAKE2b-128 over the sorted key encodings, each preceded by its length (8 bytes):
  names a shard (or a rerun folder) by the keys it holds. (Keys joined with tab and newline, as before, could be
  imitated by an id holding those characters, and two shards then got one name.)
"""

from __future__ import annotations

import hashlib

import pyarrow as pa
import pyarrow.compute as pc

KEY_COLUMNS = ["id", "image_index"]
DIGEST_BYTES = 16  # 128 bits: a crafted collision would take about 2**64 tries
LENGTH_BYTES = 8


def key_column(rows: pa.Table) -> pa.Array:  # (N,) binary
    """The encoded (id, image_index) key of every row of `rows` (columns `KEY_COLUMNS`), in row order."""
    indices = rows.column("image_index").to_numpy().astype(">u4")  # (N,) big-endian
    prefix = pa.FixedSizeBinaryArray.from_buffers(pa.binary(4), len(indices), [None, pa.py_buffer(indices.tobytes())])
    ids = pc.cast(rows.column("id"), pa.binary())
    joined = pc.binary_join_element_wise(prefix.cast(pa.binary()), ids, b"")
    return joined.combine_chunks() if isinstance(joined, pa.ChunkedArray) else joined


def keys_digest(rows: pa.Table) -> str:
    """32 hex digits naming the set of (id, image_index) keys of `rows`, whatever their order."""
    keys = sorted(key_column(rows.select(KEY_COLUMNS)).to_pylist())
    data = b"".join(len(key).to_bytes(LENGTH_BYTES, "big") + key for key in keys)
    return hashlib.blake2b(data, digest_size=DIGEST_BYTES).hexdigest()
