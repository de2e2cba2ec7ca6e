"""The webdataset writer's own tar and .npy encoders give exactly the bytes tarfile and numpy write, for names
and sizes inside a plain ustar header and beyond it (long or non-ASCII names take tarfile's PAX header), and for
every C-ordered array."""

import io
import random
import tarfile

import numpy as np
import pytest

from vqbatch.io.formats import TAR_MEMBER_MODE, npy_bytes, tar_bytes, tar_members


def tarfile_bytes(members: list[tuple[str, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), TAR_MEMBER_MODE, 0
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def random_members(seed: int, count: int) -> list[tuple[str, bytes]]:
    rng = random.Random(seed)
    return [(f"{rng.getrandbits(128):032x}.{rng.choice(['png', 'json', 'tokens.npy'])}",
             rng.randbytes(rng.choice([0, 1, 511, 512, 513, rng.randrange(5000)]))) for _ in range(count)]


@pytest.mark.parametrize("members", [
    [],
    [("", b"")],
    [("a.png", b"x")],
    [("n" * 99, b"1"), ("n" * 100, b"22"), ("n" * 101, b"333")],  # the ustar name field holds 100 bytes
    [("prompt-é.json", b"{}"), ("键.tokens.npy", b"\0" * 700)],
    [("deep/" * 30 + "x.png", b"y" * 10_000)],
    random_members(0, 500),
], ids=["empty", "unnamed", "one", "name-100-edge", "non-ascii", "long-path", "random-500"])
def test_tar_bytes_are_the_bytes_tarfile_writes(members):
    archive = tar_bytes(members)
    assert archive == tarfile_bytes(members)
    assert tar_members(archive) == members


@pytest.mark.parametrize("array", [
    np.arange(64, dtype=np.int32), np.zeros((0,), np.int32), np.arange(6, dtype=np.int64).reshape(2, 3),
    np.arange(10, dtype=np.int32)[::3], np.array(7, dtype=np.uint16)
], ids=["tokens", "empty", "2d", "strided", "scalar"])
def test_npy_bytes_are_the_bytes_numpy_saves(array):
    saved = io.BytesIO()
    np.save(saved, array, allow_pickle=False)
    assert npy_bytes(array) == saved.getvalue()
    assert np.array_equal(np.load(io.BytesIO(npy_bytes(array))), array)


def test_a_fortran_ordered_array_is_written_in_c_order_and_loads_equal():
    array = np.arange(6, dtype=np.float32).reshape(3, 2).T
    assert np.array_equal(np.load(io.BytesIO(npy_bytes(array))), array)
