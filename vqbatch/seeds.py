"""The seed contract: which seed each output image is sampled with.

Image `k` of the input row with id `i` is sampled with `torch.Generator().manual_seed(seed)` where

- the row has its own seed `s`:  seed = s for k = 0, and derived_seed(s, i, k) for k > 0;
- otherwise:                     seed = derived_seed(base_seed, i, k).

`derived_seed(base, i, k)` is the first 8 bytes of BLAKE2b (digest size 8, no key) over the UTF-8 text
`f"{base}/{k}/{i}"` (`vqbatch.keys.seed_text`: two integers before the id, so no id can imitate another key's
text), read big-endian, shifted right by one bit: a 63-bit integer, so it fits int64 columns and is the same on
every machine, process and Python version (unlike `hash()`).
"""

from __future__ import annotations

import hashlib

from vqbatch.keys import seed_text

SEED_LIMIT = 2**63  # seeds are in [0, SEED_LIMIT): they fit an int64 column


def derived_seed(base_seed: int, row_id: str, image_index: int) -> int:
    digest = hashlib.blake2b(seed_text(base_seed, row_id, image_index), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


def image_seed(row_id: str, image_index: int, base_seed: int, row_seed: int | None = None) -> int:
    """The seed of image `image_index` of row `row_id` (see the module docstring)."""
    if row_seed is None:
        return derived_seed(base_seed, row_id, image_index)
    check_row_seed(row_seed)
    return row_seed if image_index == 0 else derived_seed(row_seed, row_id, image_index)


def check_row_seed(seed: int) -> None:
    if not 0 <= seed < SEED_LIMIT:
        raise ValueError(f"seed {seed} is out of range; allowed: integers in [0, 2**63)")
