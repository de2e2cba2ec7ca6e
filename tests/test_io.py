"""Input discovery and validation, image rows, image files, the dataset writer; local files and a moto S3 server."""

import io
import os

import boto3
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from vqbatch.config import InputConfig, S3Config, load_job_config
from vqbatch.io.dataset import (MANIFEST_NAME, SUCCESS_NAME, OutputRoot, prepare_output, publish,
                                read_manifest, read_metadata)
from vqbatch.io.formats import metadata_schema, sampled_table, write_shard
from vqbatch.io.card import CARD_NAME
from vqbatch.io.examples import EXAMPLE_PROMPTS, example_prompts
from vqbatch.io.filesystems import list_files, read_bytes, resolve, write_bytes_atomically
from vqbatch.io.images import decode_image, encode_image, png_bytes
from vqbatch.io.prompts import IMAGE_ROW_SCHEMA, expand_rows, image_keys, open_input
from vqbatch.io.view import read_dataset
from vqbatch.seeds import image_seed

NO_S3 = S3Config()


def write_prompts(path, **columns):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path)
    return path


# ---------------------------------------------------------------- finding and checking input

def test_files_folders_and_globs_are_found_once_each(tmp_path):
    for name in ("a", "b", "c"):
        write_prompts(tmp_path / "in" / f"{name}.parquet", id=[name], prompt=["p"])
    (tmp_path / "in" / "notes.txt").write_text("not an input")
    inputs = open_input(InputConfig(paths=[str(tmp_path / "in"), str(tmp_path / "in" / "a.parquet"),
                                           str(tmp_path / "in" / "[bc].parquet")]), NO_S3)
    assert [os.path.basename(path) for path in inputs.paths] == ["a.parquet", "b.parquet", "c.parquet"]
    assert inputs.num_rows == 3 and not inputs.has_seed_column


@pytest.mark.parametrize("columns, message", [
    (dict(id=["1"], text=["p"]), "has no column 'prompt'"),
    (dict(key=["1"], prompt=["p"]), "has no column 'id'"),
    (dict(id=["1"], prompt=[3]), "column 'prompt' has type int64; it must be a string"),
    (dict(id=[1.5], prompt=["p"]), "column 'id' has type double; it must be a string or an integer"),
    (dict(id=["1"], prompt=["p"], seed=["7"]), "seed column 'seed' has type string; it must be an integer"),
])
def test_missing_and_mistyped_columns_are_job_errors(tmp_path, columns, message):
    path = write_prompts(tmp_path / "bad.parquet", **columns)
    with pytest.raises(ValueError, match=message) as error:
        open_input(InputConfig(paths=[str(path)]), NO_S3)
    assert str(path) in str(error.value)


def test_null_ids_are_a_job_error_naming_each_file_and_its_rows(tmp_path):
    """A row without an id has no key, so it is rejected before any model loads, like a duplicate id."""
    ids = [None if row % 3 == 1 else f"a{row}" for row in range(20)]  # null at rows 1, 4, ..., 19
    pq.write_table(pa.table({"id": ids, "prompt": ["p"] * 20}), tmp_path / "a.parquet", row_group_size=4)
    write_prompts(tmp_path / "b.parquet", id=[None, "b1"], prompt=["p", "q"])
    write_prompts(tmp_path / "c.parquet", id=["c0", "c1"], prompt=["p", "q"])
    with pytest.raises(ValueError) as error:
        open_input(InputConfig(paths=[str(tmp_path)]), NO_S3)
    message = str(error.value)
    assert "id column 'id' is null in 8 row(s) of 2 input file(s), rows counted from 0" in message
    assert f"{tmp_path / 'a.parquet'} (7 row(s): 1, 4, 7, 10, 13, ...)" in message
    assert f"{tmp_path / 'b.parquet'} (1 row(s): 0)" in message and "c.parquet" not in message
    assert "give every row an id or remove those rows" in message


def test_empty_whitespace_and_undecodable_ids_are_job_errors_like_null_ids(tmp_path):
    ids = pa.array([b"a", b"", b" \t", "\u3000".encode(), b"ok\xff", b"b"], pa.binary()).view(pa.string())
    pq.write_table(pa.table({"id": ids, "prompt": ["p"] * 6}), tmp_path / "a.parquet")
    with pytest.raises(ValueError) as error:
        open_input(InputConfig(paths=[str(tmp_path)]), NO_S3)
    message = str(error.value)
    assert f"id column 'id' is empty or whitespace-only in 3 row(s) of 1 input file(s), rows counted from 0: " \
           f"{tmp_path / 'a.parquet'} (3 row(s): 1, 2, 3)" in message
    assert f"id column 'id' is not valid UTF-8 in 1 row(s) of 1 input file(s), rows counted from 0: " \
           f"{tmp_path / 'a.parquet'} (1 row(s): 4)" in message


def test_unreadable_empty_and_absent_inputs_are_job_errors(tmp_path):
    write_prompts(tmp_path / "ok.parquet", id=["1"], prompt=["p"])
    (tmp_path / "corrupt.parquet").write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(ValueError, match=r"cannot read input file .*corrupt.parquet as Parquet.*replace or remove"):
        open_input(InputConfig(paths=[str(tmp_path)]), NO_S3)
    empty = write_prompts(tmp_path / "empty" / "e.parquet", id=pa.array([], pa.string()),
                          prompt=pa.array([], pa.string()))
    with pytest.raises(ValueError, match="the input has no rows"):
        open_input(InputConfig(paths=[str(empty)]), NO_S3)
    with pytest.raises(FileNotFoundError, match="matches no Parquet file"):
        open_input(InputConfig(paths=[str(tmp_path / "nowhere" / "*.parquet")]), NO_S3)
    with pytest.raises(ValueError, match="mix s3:// and local paths"):
        open_input(InputConfig(paths=[str(empty), "s3://bucket/x.parquet"]), NO_S3)


def test_ids_must_be_strings_in_every_file_or_integers_in_every_file(tmp_path):
    write_prompts(tmp_path / "a.parquet", id=[1], prompt=["p"])
    write_prompts(tmp_path / "b.parquet", id=["2"], prompt=["q"])
    with pytest.raises(ValueError, match="holds integers in .*a.parquet but strings in .*b.parquet"):
        open_input(InputConfig(paths=[str(tmp_path)]), NO_S3)


def test_ids_whose_hashes_collide_are_compared_exactly(tmp_path):
    """Duplicates are found by 8-byte hashes, then checked on the ids themselves: -1 and -2 share Python's hash."""
    assert hash(-1) == hash(-2)
    write_prompts(tmp_path / "a.parquet", id=[-1, 5], prompt=["p", "q"])
    write_prompts(tmp_path / "b.parquet", id=[-2, 7], prompt=["r", "s"])
    assert open_input(InputConfig(paths=[str(tmp_path)]), NO_S3).num_rows == 4
    write_prompts(tmp_path / "c.parquet", id=[-2], prompt=["t"])
    with pytest.raises(ValueError, match=r"1 duplicate id\(s\), e.g. '-2' \(2 rows\)"):
        open_input(InputConfig(paths=[str(tmp_path)]), NO_S3)


def test_a_seed_column_must_be_in_every_file_or_none(tmp_path):
    write_prompts(tmp_path / "a.parquet", id=["1"], prompt=["p"], seed=[5])
    write_prompts(tmp_path / "b.parquet", id=["2"], prompt=["q"])
    with pytest.raises(ValueError, match="seed column 'seed' is in some input files but not in .*b.parquet"):
        open_input(InputConfig(paths=[str(tmp_path)]), NO_S3)


def test_dictionary_encoded_columns_read_as_their_values(tmp_path):
    """pandas stores a categorical column dictionary-encoded: ids, prompts and seeds given so are read as plain."""
    table = pa.table({"id": pa.array(["a", "b", "c"]).dictionary_encode(),
                      "prompt": pa.array(["a cat", "a cat", ""]).dictionary_encode(),
                      "seed": pa.array([5, 5, 6]).dictionary_encode()})
    pq.write_table(table, tmp_path / "categorical.parquet")
    config = InputConfig(paths=[str(tmp_path)])
    inputs = open_input(config, NO_S3)
    read = pa.Table.from_batches(list(inputs.batches(inputs.paths[0], inputs.columns(config))))
    assert read.schema.types == [pa.string(), pa.string(), pa.int64()]
    sampling = load_job_config(None, {"input.paths": "x", "model.uri": "noop", "output.uri": "o"}).sampling
    rows = expand_rows(read, config, sampling).to_pylist()
    assert [(row["id"], row["prompt"], row["seed"], row["status"]) for row in rows] == [
        ("a", "a cat", 5, "ok"), ("b", "a cat", 5, "ok"), ("c", "", None, "error")]
    repeated_id = table.set_column(0, "id", pa.array(["a", "a", "c"]).dictionary_encode())
    pq.write_table(repeated_id, tmp_path / "categorical.parquet")
    with pytest.raises(ValueError, match="duplicate id"):
        open_input(config, NO_S3)


# ---------------------------------------------------------------- image rows

def test_expand_rows_gives_one_row_per_image_with_its_seed_and_status():
    table = pa.table({"id": [10, 11, 12, 13], "prompt": ["a cat", None, "   ", "a dog"], "seed": [3, 4, 5, -1]})
    sampling = load_job_config(None, {"input.paths": "x", "model.uri": "noop", "output.uri": "o",
                                      "sampling.images_per_prompt": 2, "sampling.base_seed": 9}).sampling
    rows = expand_rows(table, InputConfig(paths=["x"]), sampling)
    assert rows.schema == IMAGE_ROW_SCHEMA and rows.num_rows == 8
    by_key = {(row["id"], row["image_index"]): row for row in rows.to_pylist()}
    assert by_key[("10", 0)]["seed"] == 3 and by_key[("10", 1)]["seed"] == image_seed("10", 1, 9, row_seed=3)
    assert by_key[("10", 0)]["status"] == "ok" and by_key[("10", 0)]["error"] is None
    assert by_key[("11", 0)]["error"] == "prompt is null"
    assert by_key[("12", 1)]["error"] == "prompt is empty"
    assert "seed -1 is out of range" in by_key[("13", 0)]["error"]
    assert all(row["seed"] is None for row in by_key.values() if row["status"] == "error")


@pytest.mark.parametrize("ids", [[10, -3, 2**40, 7], ["a", "a\x00b", "ü 東京 🙂", "a/b"]], ids=["integer", "text"])
def test_image_keys_are_expand_rows_keys_and_a_selection_expands_only_its_rows(ids):
    prompts = pa.concat_arrays([pa.array(["a cat", None, "  "], pa.string()),
                                pa.array([b"a \xff dog"], pa.binary()).view(pa.string())])
    table = pa.table({"id": ids, "prompt": prompts, "seed": [3, 4, None, -1], "tag": ["w", "x", "y", "z"]})
    config = InputConfig(paths=["x"], keep_columns=["tag"])
    sampling = load_job_config(None, {"input.paths": "x", "model.uri": "noop", "output.uri": "o",
                                      "sampling.images_per_prompt": 3, "sampling.base_seed": 9}).sampling
    whole = expand_rows(table, config, sampling)
    assert image_keys(table, config, sampling).equals(whole.select(["id", "image_index"]))
    selected = np.array([1, 4, 5, 9, 11])
    assert expand_rows(table, config, sampling, selected).equals(whole.take(pa.array(selected)))
    assert expand_rows(table, config, sampling, np.array([], np.int64)).num_rows == 0


def test_rows_without_a_seed_column_get_derived_seeds():
    sampling = load_job_config(None, {"input.paths": "x", "model.uri": "noop", "output.uri": "o",
                                      "sampling.base_seed": 4}).sampling
    rows = expand_rows(pa.table({"id": ["a"], "prompt": ["p"]}), InputConfig(paths=["x"]), sampling).to_pylist()
    assert rows[0]["seed"] == image_seed("a", 0, base_seed=4)


def test_the_bundled_prompt_file_is_what_example_prompts_makes():
    from vqbatch.train.detector import parse_caption

    bundled = pq.read_table(EXAMPLE_PROMPTS)
    assert bundled.schema.equals(example_prompts().schema)
    assert bundled.column("id").to_pylist() == example_prompts().column("id").to_pylist()
    assert bundled.num_rows >= 24 and len(set(bundled.column("id").to_pylist())) == bundled.num_rows
    for row in bundled.to_pylist():  # the shapes captions follow the grammar `vqbatch eval` scores
        if row["id"].startswith("shapes-"):
            assert parse_caption(row["prompt"]).caption() == row["prompt"]


# ---------------------------------------------------------------- images

@pytest.mark.parametrize("image_format", ["png", "jpeg", "webp"])
def test_images_encode_and_decode(image_format):
    pixels = np.random.default_rng(0).integers(0, 256, (16, 24, 3), dtype=np.uint8)
    decoded = decode_image(encode_image(pixels, image_format, quality=90))
    assert decoded.shape == pixels.shape
    if image_format == "png":
        np.testing.assert_array_equal(decoded, pixels)


@pytest.mark.parametrize("channels, mode", [(1, "L"), (3, "RGB"), (4, "RGBA")])
def test_png_bytes_are_lossless_pngs_that_pil_reads(channels, mode):
    pixels = np.random.default_rng(1).integers(0, 256, (7, 5, channels), dtype=np.uint8)
    image = Image.open(io.BytesIO(png_bytes(pixels)))
    assert (image.format, image.mode, image.size) == ("PNG", mode, (5, 7))
    np.testing.assert_array_equal(np.asarray(image).reshape(pixels.shape), pixels)


def test_png_bytes_refuse_other_pixels():
    with pytest.raises(ValueError, match="1, 3 or 4 channels; got uint8 with 2"):
        png_bytes(np.zeros((2, 2, 2), np.uint8))
    with pytest.raises(ValueError, match="got float32"):
        png_bytes(np.zeros((2, 2, 3), np.float32))


# ---------------------------------------------------------------- the dataset writer

def job_config(output_uri, **overrides):
    return load_job_config(None, {"input.paths": "x", "model.uri": "noop", "output.uri": output_uri,
                                  "sampling.images_per_prompt": 2, **overrides})


def sampled_rows(config):
    rows = expand_rows(pa.table({"id": ["a", "b", "c"], "prompt": ["red", "", "blue"]}), config.input,
                       config.sampling)
    pixels = [np.full((4, 6, 3), 40 * i, np.uint8) if status == "ok" else None
              for i, status in enumerate(rows.column("status").to_pylist())]
    tokens = [[i, i + 1] if image is not None else None for i, image in enumerate(pixels)]
    return sampled_table(rows, tokens, pixels), pixels


def test_a_shard_and_its_manifest_make_a_readable_dataset(tmp_path):
    config = job_config(str(tmp_path / "out"))
    sampled, pixels = sampled_rows(config)
    output = prepare_output(config.output, config.s3)
    shard = write_shard(sampled, config)
    assert write_shard(sampled, config) == shard  # same rows, same file name
    publish(output, [shard], ["x"], config)
    metadata = read_metadata(output)
    assert metadata.schema == metadata_schema("files") and metadata.num_rows == 6
    assert (shard["ok"], shard["errors"]) == (4, 2) and read_manifest(output)["rows"] == 6
    for row, image in zip(metadata.to_pylist(), pixels):
        if image is None:
            assert row["image"] is None and row["tokens"] is None and row["status"] == "error"
        else:
            stored = decode_image((tmp_path / "out" / row["image"]).read_bytes())
            np.testing.assert_array_equal(stored, image)
    names = sorted(os.listdir(tmp_path / "out"))
    assert names == sorted(["images", shard["file"], MANIFEST_NAME, SUCCESS_NAME, CARD_NAME])  # no temporary files
    assert not [name for _, _, files in os.walk(tmp_path / "out") for name in files if name.endswith(".tmp")]


def test_the_published_view_keeps_each_keys_last_row_when_listed_files_repeat_keys(tmp_path):
    config = job_config(str(tmp_path / "out"))
    output = prepare_output(config.output, config.s3)
    sampled, _ = sampled_rows(config)
    again = sampled.filter(pa.array([row_id != "b" for row_id in sampled.column("id").to_pylist()]))
    again = again.set_column(again.schema.get_field_index("tokens"), "tokens",  # the newer rows' own tokens
                             pa.array([[7, 7]] * again.num_rows, again.schema.field("tokens").type))
    publish(output, [write_shard(sampled, config, "versions/v0001"), write_shard(again, config, "versions/v0002")],
            ["x"], config)
    rows = read_dataset(str(tmp_path / "out")).to_pylist()
    assert sorted((row["id"], row["image_index"]) for row in rows) == [(i, k) for i in "abc" for k in (0, 1)]
    newest = {(row["id"], row["image_index"]): row["tokens"] for row in again.to_pylist()}
    for row in rows:
        assert row["tokens"] == newest.get((row["id"], row["image_index"]), row["tokens"])
        version = "versions/v0001/" if row["id"] == "b" else "versions/v0002/"
        assert row["image"] is None or row["image"].startswith(version)


def test_an_existing_dataset_is_refused_or_replaced_and_other_files_refuse_both(tmp_path):
    config = job_config(str(tmp_path))
    output = prepare_output(config.output, config.s3)
    publish(output, [write_shard(sampled_rows(config)[0], config)], ["x"], config)
    with pytest.raises(ValueError, match="already holds a dataset.*output.mode=overwrite"):
        prepare_output(config.output, config.s3)
    overwrite = job_config(str(tmp_path), **{"output.mode": "overwrite"}).output
    (tmp_path / "keep.txt").write_text("not ours")
    with pytest.raises(ValueError, match=r"holds 1 file\(s\) vqbatch did not write \(keep.txt\)"):
        prepare_output(overwrite, config.s3)
    assert len(os.listdir(tmp_path)) == 6  # keep.txt, the shard, images/, the manifest, _SUCCESS, the card
    (tmp_path / "keep.txt").unlink()
    prepare_output(overwrite, config.s3)
    assert os.listdir(tmp_path) == []


def test_s3_input_and_output_through_pyarrow_and_boto3(s3_endpoint, tmp_path):
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="vqb")
    local = write_prompts(tmp_path / "p.parquet", id=["1", "2"], prompt=["a", "b"], seed=[1, 2])
    s3.upload_file(str(local), "vqb", "in/part-0.parquet")
    s3.put_object(Bucket="vqb", Key="in/README.txt", Body=b"skip me")
    inputs = open_input(InputConfig(paths=["s3://vqb/in/*.parquet"]), NO_S3)
    assert inputs.uris == ["s3://vqb/in/part-0.parquet"] and inputs.num_rows == 2 and inputs.has_seed_column

    filesystem, root = resolve("s3://vqb/out", NO_S3)
    write_bytes_atomically(filesystem, f"{root}/metadata/x.bin", b"whole")
    assert s3.get_object(Bucket="vqb", Key="out/metadata/x.bin")["Body"].read() == b"whole"
    assert read_bytes(filesystem, f"{root}/metadata/x.bin") == b"whole"
    assert list_files(filesystem, root) == ["vqb/out/metadata/x.bin"]

    config = job_config("s3://vqb/dataset")
    output = prepare_output(config.output, config.s3)
    publish(output, [write_shard(sampled_rows(config)[0], config)], inputs.uris, config)
    keys = [item["Key"] for item in s3.list_objects_v2(Bucket="vqb", Prefix="dataset/")["Contents"]]
    assert "dataset/_SUCCESS" in keys and sum(key.startswith("dataset/images/") for key in keys) == 4
    assert read_metadata(OutputRoot.of(config.output, config.s3)).num_rows == 6


def test_a_limit_reads_only_the_first_prompts_in_file_order(tmp_path):
    for name, ids in (("a", ["1", "2", "3"]), ("b", ["4", "5", "6"]), ("c", ["7", "7", "8"])):  # c repeats an id
        write_prompts(tmp_path / "in" / f"{name}.parquet", id=ids, prompt=["p"] * 3)
    inputs = open_input(InputConfig(paths=[str(tmp_path / "in")], limit=5), NO_S3)  # c is never read: no error
    assert [os.path.basename(path) for path in inputs.paths] == ["a.parquet", "b.parquet"]
    assert inputs.num_rows == 5 and inputs.file_rows == (3, 2)
    read = [row_id for path in inputs.paths for batch in inputs.batches(path, ["id"], batch_rows=2)
            for row_id in batch.column("id").to_pylist()]
    assert read == ["1", "2", "3", "4", "5"]
    with pytest.raises(ValueError, match="input.limit: value 0 is not allowed"):
        load_job_config(None, {"input.paths": "x.parquet", "model.uri": "m", "output.uri": "o", "input.limit": 0})
