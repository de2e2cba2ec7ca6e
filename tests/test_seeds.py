"""The seed contract: documented, 63-bit, the same in every process."""

import hashlib
import os
import subprocess
import sys

import pytest

from vqbatch.seeds import SEED_LIMIT, derived_seed, image_seed


def documented_seed(base_seed, row_id, image_index):
    """The formula as the module docstring states it, written out independently."""
    digest = hashlib.blake2b(f"{base_seed}/{image_index}/{row_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


@pytest.mark.parametrize("base_seed, row_id, image_index", [(0, "a", 0), (7, "shapes-003", 2), (2**62, "é 🌍", 5)])
def test_derived_seed_follows_the_documented_formula(base_seed, row_id, image_index):
    assert derived_seed(base_seed, row_id, image_index) == documented_seed(base_seed, row_id, image_index)
    assert 0 <= derived_seed(base_seed, row_id, image_index) < SEED_LIMIT


def test_seeds_differ_across_ids_indices_and_base_seeds():
    seeds = {image_seed(row_id, index, base) for row_id in ("1", "2", "10") for index in range(3) for base in (0, 1)}
    assert len(seeds) == 18


def test_a_row_seed_is_used_for_the_first_image_and_derives_the_others():
    assert image_seed("x", 0, base_seed=5, row_seed=1234) == 1234
    assert image_seed("x", 1, base_seed=5, row_seed=1234) == documented_seed(1234, "x", 1)
    assert image_seed("x", 1, base_seed=99, row_seed=1234) == image_seed("x", 1, base_seed=5, row_seed=1234)
    with pytest.raises(ValueError, match=r"seed -1 is out of range; allowed: integers in \[0, 2\*\*63\)"):
        image_seed("x", 0, base_seed=0, row_seed=-1)


def test_seeds_are_the_same_in_another_process_with_another_hash_seed():
    code = "from vqbatch.seeds import image_seed; print(image_seed('row-7', 3, 11))"
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    other = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert int(other.stdout) == image_seed("row-7", 3, 11)
