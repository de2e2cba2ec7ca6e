"""The key of an image row, (id, image_index), and every encoding of it.

An id is non-blank, valid UTF-8 text (integer ids are written as their decimal text; `vqbatch.io.prompts` refuses
null, empty, whitespace-only and undecodable ids); an image index is a non-negative int32. Each encoding below is
unambiguous for any id: no id, whatever characters it holds (tabs, newlines, NULs, slashes, dots, any Unicode), can
produce another key's encoding.

- `key_column`: one binary value per row, the image index as 4 big-endian bytes followed by the id's UTF-8 bytes.
  The index has a fixed width, so the id is exactly the rest. Arrow's kernels compare keys with it (the held keys a
  run skips, deduplication at publish, the published view's one row per key).
- `key_hashes`: a stable 64-bit hash of each `key_column` value, the same in every process: it buckets the held
  keys (`vqbatch.io.held`) and stands in for a key when publishing deduplicates. A hash is never trusted alone:
  equal hashes are settled by comparing the whole keys.
- `sample_key`: the row's name inside a shard: 32 hex digits of BLAKE2b-128 of the id, `_`, the index in decimal.
  The digest has a fixed width and holds no `_`, so the index is what follows it; free of dots and slashes, as
  WebDataset sample keys and file names need. It names image files (`image_name`), webdataset samples and
  parquet images' `path`.
- `keys_digest`: 32 hex digits of BLAKE2b-128 over the sorted key encodings, each preceded by its length (8 bytes):
  names a shard (its metadata file, its tar) or a rerun folder by the keys it holds.
- `seed_text`: what the seed contract hashes (`vqbatch.seeds`): `f"{base}/{image_index}/{id}"` in UTF-8. The base
  seed and the index are integers, which hold no slash, so the id is everything after the second slash.
- `readable_stem`: a file name stem that shows the id (`vqbatch decode`'s output files): the id itself when it is a
  short safe name not ending like a digest-bearing stem, else its safe characters, `-`, and 32 hex digits of its
  digest; `vqbatch decode` adds `_<image index>`.

BLAKE2b-128 digests make a crafted collision cost about 2**64 tries.
"""

from __future__ import annotations

import hashlib
import re

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

KEY_COLUMNS = ["id", "image_index"]
DIGEST_BYTES = 16
LENGTH_BYTES = 8
HASH_CHUNK = 1 << 13  # keys hashed at a time: per key byte four 8-byte temporaries (~6 MiB for 16-byte keys)
SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]")  # what a readable stem keeps of an id; the rest becomes "_"
DIGEST_SUFFIX = re.compile(r"-[0-9a-f]{32}$")  # how a stem that carries a digest ends
STEM_CHARACTERS = 80  # of the id kept in a stem that carries a digest


def id_bytes(row_id: str) -> bytes:
    """The id's UTF-8 bytes (lone surrogates of an undecodable id kept as they are)."""
    return row_id.encode("utf-8", errors="surrogatepass")


def digest(data: bytes) -> str:
    """32 hex digits of BLAKE2b-128 of `data`."""
    return hashlib.blake2b(data, digest_size=DIGEST_BYTES).hexdigest()


def key_column(rows: pa.Table) -> pa.Array:  # (N,) binary
    """The encoded (id, image_index) key of every row of `rows` (columns `KEY_COLUMNS`), in row order."""
    indices = rows.column("image_index").to_numpy().astype(">u4")  # (N,) big-endian
    prefix = pa.FixedSizeBinaryArray.from_buffers(pa.binary(4), len(indices), [None, pa.py_buffer(indices.tobytes())])
    ids = pc.cast(rows.column("id"), pa.binary())
    joined = pc.binary_join_element_wise(prefix.cast(pa.binary()), ids, b"")
    return joined.combine_chunks() if isinstance(joined, pa.ChunkedArray) else joined


def key_hashes(keys: pa.Array) -> np.ndarray:  # (N,) uint64
    """A 64-bit hash of each key's bytes (`key_column`), the same on every machine and in every process: each byte
    times a fixed odd multiplier of its position, summed, then MurmurHash3's finalizer; vectorized, `HASH_CHUNK`
    keys at a time."""
    hashes = np.empty(len(keys), np.uint64)
    for start in range(0, len(keys), HASH_CHUNK):
        chunk = keys.slice(start, HASH_CHUNK).cast(pa.large_binary())
        _, offset_buffer, data_buffer = chunk.buffers()
        offsets = np.frombuffer(offset_buffer, np.int64)[chunk.offset:chunk.offset + len(chunk) + 1]
        data = np.frombuffer(data_buffer, np.uint8)[offsets[0]:offsets[-1]].astype(np.uint64)  # (bytes,)
        starts, lengths = offsets[:-1] - offsets[0], np.diff(offsets)
        position = np.arange(len(data)) - np.repeat(starts, lengths)  # each byte's place in its key
        sums = np.add.reduceat(data * POSITION_MULTIPLIERS[position % len(POSITION_MULTIPLIERS)], starts) \
            if len(data) else np.zeros(len(chunk), np.uint64)
        hashes[start:start + len(chunk)] = finalized(np.where(lengths > 0, sums, 0) + lengths.astype(np.uint64))
    return hashes


POSITION_MULTIPLIERS = np.random.default_rng(20261201).integers(0, 2**63, 64, np.uint64) * 2 + 1  # fixed, odd


def finalized(values: np.ndarray) -> np.ndarray:  # (N,) uint64
    """MurmurHash3's 64-bit finalizer: every input bit flips about half the output bits (multiplication wraps)."""
    with np.errstate(over="ignore"):
        values = values ^ (values >> np.uint64(33))
        values = values * np.uint64(0xFF51AFD7ED558CCD)
        values = values ^ (values >> np.uint64(33))
        values = values * np.uint64(0xC4CEB9FE1A85EC53)
        return values ^ (values >> np.uint64(33))


def sample_key(row_id: str, image_index: int) -> str:
    """The row's name inside a shard: `<32 hex digits of the id's digest>_<image index>`; the same key, the same
    name."""
    return f"{digest(id_bytes(row_id))}_{image_index}"


def image_name(key: str, extension: str) -> str:
    """Where the image file of the row whose `sample_key` is `key` lives under its version folder:
    `images/<first 2 hex digits>/<key>.<extension>`."""
    return f"images/{key[:2]}/{key}.{extension}"


def keys_digest(rows: pa.Table) -> str:
    """32 hex digits naming the set of (id, image_index) keys of `rows`, whatever their order."""
    keys = sorted(key_column(rows.select(KEY_COLUMNS)).to_pylist())
    return digest(b"".join(len(key).to_bytes(LENGTH_BYTES, "big") + key for key in keys))


def seed_text(base_seed: int, row_id: str, image_index: int) -> bytes:
    """What `vqbatch.seeds.derived_seed` hashes: the documented `f"{base}/{image_index}/{id}"` in UTF-8."""
    return f"{base_seed}/{image_index}/".encode("ascii") + id_bytes(row_id)


def readable_stem(row_id: str) -> str:
    """The id itself when it is a short safe file name that cannot pass for a stem with a digest; else its first
    safe characters, `-` and the 32 hex digits of its digest."""
    safe = SAFE_NAME.sub("_", row_id)
    if safe == row_id and len(row_id) <= STEM_CHARACTERS and row_id not in (".", "..") \
            and not DIGEST_SUFFIX.search(row_id):
        return row_id
    return f"{safe[:STEM_CHARACTERS]}-{digest(id_bytes(row_id))}"
