"""The row key and every encoding of it: unambiguous for any id, crafted ids included; a job over crafted ids on a
real local Ray publishes every row of each format once, and `vqbatch decode` writes one file per row."""

import hashlib
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from vqbatch import read_dataset
from vqbatch.cli import main
from vqbatch.config import load_job_config
from vqbatch.engine import run_job
from vqbatch.keys import image_name, key_column, key_hashes, keys_digest, readable_stem, sample_key, seed_text
from vqbatch.seeds import derived_seed
from vqbatch.tiny import write_tiny_checkpoint

# Separators, control characters, prefixes of one another, look-alike Unicode, path parts, and ids that imitate
# another key's encoding (joined with tab/newline or NUL, a decimal index, a digest-bearing stem).
CRAFTED_IDS = ["a", "b", "ab", "a\n0\tb", "0\ta", "a\t0", "a\x00", "a\x000", "a\x001", "\x00\x00\x00\x00a", "a/0/b",
               "0/a", "a_0", "a_1", "a.png", "é", "e\u0301", "../x", ".", "..", "a b", "a_b",
               f"a_b-{readable_stem('a b')[-32:]}", "a_b-" + "0" * 32, "🌍", "x" * 81, "x" * 80,
               "a_b-" + hashlib.blake2b(b"a b", digest_size=4).hexdigest()]  # `decode`'s old name for "a b"


def keys(pairs):
    return pa.table({"id": [row_id for row_id, _ in pairs], "image_index": pa.array([k for _, k in pairs], pa.int32())})


PAIRS = [(row_id, index) for row_id in CRAFTED_IDS for index in (0, 1, 10, 256)]


def test_no_two_crafted_keys_share_any_encoding():
    encoded = key_column(keys(PAIRS))
    assert len(set(encoded.to_pylist())) == len(PAIRS)
    assert len(set(key_hashes(encoded).tolist())) == len(PAIRS)
    assert len({sample_key(row_id, index) for row_id, index in PAIRS}) == len(PAIRS)
    assert len({image_name(sample_key(row_id, index), "png") for row_id, index in PAIRS}) == len(PAIRS)
    assert len({keys_digest(keys([pair])) for pair in PAIRS}) == len(PAIRS)
    texts = {seed_text(base, row_id, index) for row_id, index in PAIRS for base in (0, 1, 10)}
    assert len(texts) == 3 * len(PAIRS)
    assert len({readable_stem(row_id) for row_id in CRAFTED_IDS}) == len(CRAFTED_IDS)


def test_shard_digests_name_key_sets_not_joined_strings():
    """Keys {(a, 0), (b, 0)} and {("a\\n0\\tb", 0)} joined with tab and newline made the same shard name."""
    digests = {keys_digest(keys(group)) for group in ([("a", 0), ("b", 0)], [("a\n0\tb", 0)], [("a", 0)],
                                                     [("a", 0), ("b", 0), ("", 0)], [("a\x00", 0)])}
    assert len(digests) == 5
    assert keys_digest(keys([("b", 0), ("a", 0)])) == keys_digest(keys([("a", 0), ("b", 0)]))  # order-free


@pytest.mark.parametrize("row_id", ["a", "a\n0\tb", "\x00"])
def test_key_column_puts_the_index_first_in_four_bytes(row_id):
    assert key_column(keys([(row_id, 258)])).to_pylist() == [b"\x00\x00\x01\x02" + row_id.encode()]


def test_sample_keys_and_image_names_are_safe_names():
    for row_id, index in PAIRS:
        key = sample_key(row_id, index)
        assert key.removesuffix(f"_{index}").isalnum() and len(key) == 33 + len(str(index)) and "." not in key
        assert image_name(key, "jpg") == f"images/{key[:2]}/{key}.jpg"


def test_readable_stems_show_safe_ids_and_never_a_path():
    assert readable_stem("p1") == "p1" and readable_stem("x" * 80) == "x" * 80
    for row_id in CRAFTED_IDS:
        stem = readable_stem(row_id)
        assert "/" not in stem and "\x00" not in stem and stem not in (".", "..") and len(stem) <= 80 + 33
    assert readable_stem("a b").startswith("a_b-") and readable_stem("a_b-" + "0" * 32) != "a_b-" + "0" * 32


def test_the_seed_text_keeps_the_documented_bytes():
    """Moving the seed's encoding into keys.py changed no seed: the bytes are `f"{base}/{k}/{id}"` in UTF-8."""
    assert seed_text(7, "a/0/b", 2) == "7/2/a/0/b".encode()
    for row_id, index in PAIRS:
        documented = hashlib.blake2b(f"7/{index}/{row_id}".encode(), digest_size=8).digest()
        assert derived_seed(7, row_id, index) == int.from_bytes(documented, "big") >> 1


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, local_ray):
    return str(write_tiny_checkpoint(tmp_path_factory.mktemp("model") / "tiny", seed=0))


@pytest.mark.parametrize("output_format", ["files", "webdataset", "parquet"])
def test_a_job_over_crafted_ids_publishes_every_row_once(output_format, tmp_path, tiny_model):
    """Every format; the files format with a real (tiny) model, whose images `vqbatch decode` decodes again."""
    prompts = tmp_path / "prompts.parquet"
    pq.write_table(pa.table({"id": CRAFTED_IDS, "prompt": [f"a shape {i}" for i in range(len(CRAFTED_IDS))]}),
                   prompts)
    config = load_job_config(None, {"input.paths": [str(prompts)], "output.uri": str(tmp_path / "out"),
                                    "model.uri": tiny_model if output_format == "files" else "noop",
                                    "sampling.steps": 2, "output.format": output_format,
                                    "sampling.images_per_prompt": 2, "compute.batch_size": 4,
                                    "compute.max_actors": 1, "output.rows_per_file": 3})
    summary = run_job(config)
    expected = sorted((row_id, index) for row_id in CRAFTED_IDS for index in (0, 1))
    assert summary.rows == summary.ok == len(expected)
    rows = read_dataset(str(tmp_path / "out"), images=True)
    assert sorted(zip(rows.column("id").to_pylist(), rows.column("image_index").to_pylist())) == expected
    assert len({row["image"]["path"] for row in rows.to_pylist()}) == len(expected)  # one image per key
    if output_format == "webdataset":
        members = [name for tar in (tmp_path / "out").rglob("*.tar") for name in tarfile.open(tar).getnames()]
        assert len(members) == 3 * len(expected) == len(set(members))  # image, json, tokens per key
    if output_format == "files":
        assert len(list((tmp_path / "out").rglob("*.png"))) == len(expected)
        assert main(["decode", str(tmp_path / "out"), "--ids", *CRAFTED_IDS, "--to", str(tmp_path / "decoded")]) == 0
        assert len(list((tmp_path / "decoded").iterdir())) == len(expected)  # no decoded file overwrote another
