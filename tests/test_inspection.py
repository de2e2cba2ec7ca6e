"""`vqbatch inspect` and `vqbatch decode` on a local dataset and on the same dataset in S3 (moto server)."""

import boto3
import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pytest

from conftest import SMALL_DATASET_OK, published_dataset
from vqbatch.cli import main
from vqbatch.config import S3Config, load_job_config
from vqbatch.inspection import error_kinds, inspect_dataset, readable
from vqbatch.io.dataset import OutputRoot, prepare_output, publish, read_metadata
from vqbatch.io.formats import sampled_table, write_shard
from vqbatch.io.filesystems import read_bytes, resolve, s3_filesystem
from vqbatch.io.images import decode_image
from vqbatch.keys import readable_stem


@pytest.fixture(scope="module")
def dataset_uris(small_dataset, s3_endpoint):
    """The small dataset's local folder, and the same files copied under an s3:// prefix."""
    filesystem = s3_filesystem(S3Config())
    boto3.client("s3").create_bucket(Bucket="seen")
    pafs.copy_files(str(small_dataset), "seen/small", destination_filesystem=filesystem)
    return {"local": str(small_dataset), "s3": "s3://seen/small"}


def stored_rows(uri: str) -> dict[str, dict]:
    location = OutputRoot(*resolve(uri, S3Config()))
    return {row["id"]: row for row in read_metadata(location).to_pylist()}


def stored_pixels(uri: str, row: dict) -> np.ndarray:
    location = OutputRoot(*resolve(uri, S3Config()))
    return decode_image(read_bytes(location.filesystem, location.path(row["image"])))


@pytest.mark.parametrize("where", ["local", "s3"])
def test_inspect_summarises_the_dataset_and_shows_one_row_with_its_rerun_command(dataset_uris, where, capsys):
    uri = dataset_uris[where]
    assert main(["inspect", uri, "--id", "p3"]) == 0
    printed = capsys.readouterr().out
    row = stored_rows(uri)["p3"]
    assert f"rows      {SMALL_DATASET_OK + 2} ({SMALL_DATASET_OK} ok, 2 errors) in 3 metadata files" in printed
    assert "formats   image files (png) with Parquet metadata" in printed
    assert "steps=2" in printed and "fingerprint " in printed and "\n  v1  " in printed
    assert "\n       1  prompt is empty\n" in printed and "\n       1  prompt is null\n" in printed
    assert f"  seed              {row['seed']}\n" in printed and f"  prompt            {row['prompt']}\n" in printed
    assert printed.rstrip().endswith(f"rerun it: vqbatch rerun --output {uri} --ids p3")
    assert "on disk   " in printed and " KiB (images " in printed


@pytest.mark.parametrize("output_format, storage, metadata", [
    ("files", "image files (png) with Parquet metadata", "metadata"),
    ("webdataset", "webdataset tar shards (png) with Parquet metadata", "metadata"),
    ("parquet", "Parquet shards holding the images (png)", "metadata with the images")])
def test_inspect_names_each_format_and_the_bytes_of_its_images_and_metadata(output_format, storage, metadata,
                                                                            tmp_path):
    config = load_job_config(None, {"input.paths": "x", "model.uri": "noop", "output.uri": str(tmp_path),
                                    "output.format": output_format})
    rows = pa.table({"id": ["a", "b"], "prompt": ["red", "blue"], "image_index": pa.array([0, 0], pa.int32()),
                     "seed": [1, 2], "status": ["ok", "ok"], "error": pa.array([None, None], pa.string())})
    pixels = [np.random.default_rng(seed).integers(0, 256, (32, 32, 3), np.uint8) for seed in (1, 2)]
    location = prepare_output(config.output, config.s3)
    publish(location, [write_shard(sampled_table(rows, [[1], [2]], pixels), config)], ["x"], config)

    printed = inspect_dataset(str(tmp_path), row_id="a")
    files = [path for path in tmp_path.rglob("*") if path.is_file()]
    images = sum(path.stat().st_size for path in files if path.suffix in (".png", ".tar"))
    parquet = sum(path.stat().st_size for path in files if path.name.startswith("part-") and path.suffix == ".parquet")
    assert f"formats   {storage}\n" in printed
    assert f"(images {readable(images)}, {metadata} {readable(parquet)}, other " in printed
    assert images > 0 or output_format == "parquet"
    assert "b'\\x89PNG" not in printed  # the parquet format's image bytes are counted, not printed


def test_inspect_of_an_unknown_id_names_it(dataset_uris, capsys):
    assert main(["inspect", dataset_uris["local"], "--id", "nope"]) == 2
    assert "ids not in the dataset: 'nope'" in capsys.readouterr().err


@pytest.mark.parametrize("where", ["local", "s3"])
def test_decoded_png_images_equal_the_stored_ones(dataset_uris, where, tmp_path, capsys):
    uri = dataset_uris[where]
    ids = ["p0", "p7", "odd/id <&>", "blank"]  # "blank" is an error row: no tokens, nothing decoded
    assert main(["decode", uri, "--ids", *ids, "--to", str(tmp_path)]) == 0
    assert "decoded 3 image(s)" in capsys.readouterr().out
    rows = stored_rows(uri)
    for row_id in ids[:3]:
        decoded = decode_image((tmp_path / f"{readable_stem(row_id)}_0.png").read_bytes())
        np.testing.assert_array_equal(decoded, stored_pixels(uri, rows[row_id]))
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(f"{readable_stem(i)}_0.png" for i in ids[:3])


def test_decode_in_another_format_and_size(dataset_uris, tmp_path):
    assert main(["decode", dataset_uris["local"], "--ids", "p1", "--to", str(tmp_path), "--image-format", "jpeg",
                 "--size", "64"]) == 0
    decoded = decode_image((tmp_path / "p1_0.jpg").read_bytes())
    stored = stored_pixels(dataset_uris["local"], stored_rows(dataset_uris["local"])["p1"])
    assert decoded.shape == (64, 64, 3)
    assert np.abs(decoded[::2, ::2].astype(int) - stored.astype(int)).mean() < 12  # nearest-neighbour enlarged


def test_decode_refuses_a_bad_format_and_size(dataset_uris, tmp_path, capsys):
    with pytest.raises(SystemExit):  # argparse's choices, from vqbatch.choices
        main(["decode", dataset_uris["local"], "--ids", "p1", "--to", str(tmp_path), "--image-format", "gif"])
    assert "invalid choice: 'gif'" in capsys.readouterr().err
    assert main(["decode", dataset_uris["local"], "--ids", "p1", "--to", str(tmp_path), "--size", "0"]) == 2
    assert "--size must be a positive number of pixels, got 0" in capsys.readouterr().err


def test_decode_refuses_a_dataset_of_the_noop_model(tmp_path, capsys):
    published_dataset(tmp_path / "out", "files", ["ok", "ok"])
    assert main(["decode", str(tmp_path / "out"), "--ids", "r0", "--to", str(tmp_path / "decoded")]) == 2
    assert "made with the no-op model 'noop'" in capsys.readouterr().err
    assert not (tmp_path / "decoded").exists()


def test_error_kinds_group_messages_that_differ_only_in_numbers_and_details():
    import pyarrow as pa

    metadata = pa.table({"status": ["error", "error", "error", "ok"],
                         "error": ["seed 7 is out of range; allowed: [0, 2**63)",
                                   "seed 9 is out of range; allowed: [0, 2**63)", "prompt is null", None]})
    assert error_kinds(metadata) == {"seed N is out of range": 2, "prompt is null": 1}
