"""Reruns and proof on datasets the real engine made on a local Ray instance: verify, tampering, rerun, and what
stays the same across batch sizes and actor counts (see docs/reproducibility.md)."""

import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from conftest import ray_started_locally
from vqbatch.cli import main
from vqbatch.config import S3Config, load_job_config
from vqbatch.engine import run_job
from vqbatch.io.dataset import OutputRoot, read_manifest, read_metadata
from vqbatch.io.filesystems import resolve
from vqbatch.io.images import decode_image, to_uint8
from vqbatch.pipeline import VQDiffusionPipeline
from vqbatch.proof import rerun, rows_where, verify
from vqbatch.tiny import CODEBOOK_SIZE, write_tiny_checkpoint

PROMPTS = ["a small red circle at the top left", "a large blue square in the center", "   ",
           "a green triangle on a black background", "two yellow stars"]  # p2 is blank: two error rows
OK_ROWS = 8  # 4 sampled prompts x 2 images


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    """The same prompts generated twice by the engine: batch size 1 on one actor, and batch size 4 on a pool of
    two actors (Ray Data hands this small input to the pool as one block, so one actor may get all of it)."""
    folder = tmp_path_factory.mktemp("proof")
    model = str(write_tiny_checkpoint(folder / "tiny", seed=0))
    ids = [f"p{i}" for i in range(len(PROMPTS))]
    for part, rows in enumerate((slice(0, 3), slice(3, None))):  # two files: a block for each of two actors
        pq.write_table(pa.table({"id": ids[rows], "prompt": PROMPTS[rows]}), folder / f"in-{part}.parquet")
    common = {"input.paths": [str(folder / "in-0.parquet"), str(folder / "in-1.parquet")], "model.uri": model,
              "sampling.steps": 3, "sampling.guidance_scale": 3.0, "sampling.truncation_rate": 0.9,
              "sampling.images_per_prompt": 2, "sampling.base_seed": 7, "output.rows_per_file": 3}
    runs = {"batch1": {"compute.batch_size": 1, "compute.max_actors": 1},
            "batch4_actors2": {"compute.batch_size": 4, "compute.min_actors": 2, "compute.max_actors": 2,
                               "compute.cpus_per_actor": 0.5},
            "prompted": {"compute.batch_size": 1, "compute.max_actors": 1, "sampling.truncation_target": "prompted"}}
    with ray_started_locally():
        for name, compute in runs.items():
            run_job(load_job_config(None, {**common, **compute, "output.uri": str(folder / name)}))
    return {"model": model, **{name: str(folder / name) for name in runs}}


def rows_by_key(uri):
    metadata = read_metadata(OutputRoot(*resolve(uri, S3Config())))
    return {(row["id"], row["image_index"]): row for row in metadata.to_pylist() if row["status"] == "ok"}


def stored_pixels(uri, row):  # (H, W, 3) uint8
    with open(f"{uri}/{row['image']}", "rb") as file:
        return decode_image(file.read())


def test_verify_passes_on_an_untouched_dataset(datasets, capsys):
    code = main(["verify", "--output", datasets["batch1"], "--sample", "100", "--batch-size", "1", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0, report
    assert (report["rows_ok"], report["rows_checked"], report["tokens_matched"], report["images_matched"]) == \
        (OK_ROWS, OK_ROWS, OK_ROWS, OK_ROWS)
    assert report["passed"] and report["mismatches"] == []


def test_verify_samples_at_the_batch_shape_the_dataset_was_made_with(datasets):
    """The batch-4 dataset verified with --batch-size 1: regenerated at its recorded shape 4 (each call padded),
    every token and every pixel matches."""
    report = verify(datasets["batch4_actors2"], sample=100, batch_size=1)
    assert (report.tokens_matched, report.images_matched) == (OK_ROWS, OK_ROWS) and report.passed


def test_verify_draws_the_same_sample_for_the_same_seed(datasets):
    first, again = (verify(datasets["batch1"], sample=3, seed=5, batch_size=1) for _ in range(2))
    keys = [(check.id, check.image_index) for check in first.checks]
    assert len(set(keys)) == 3 and keys == [(check.id, check.image_index) for check in again.checks]
    assert first.passed


def test_verify_fails_on_tampered_tokens_and_names_the_row(datasets, tmp_path, capsys):
    copy = tmp_path / "tampered"
    shutil.copytree(datasets["batch1"], copy)
    listed = read_manifest(OutputRoot(*resolve(str(copy), S3Config())))["metadata_files"]
    tables = ((copy / entry["file"], pq.read_table(copy / entry["file"])) for entry in listed)
    metadata_file, table = next((path, table) for path, table in tables if "ok" in table.column("status").to_pylist())
    rows = table.to_pylist()
    victim = next(row for row in rows if row["status"] == "ok")
    victim["tokens"] = [(victim["tokens"][0] + 1) % CODEBOOK_SIZE, *victim["tokens"][1:]]  # one latent pixel
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), metadata_file)

    code = main(["verify", "--output", str(copy), "--sample", "100", "--batch-size", "1"])
    printed = capsys.readouterr().out
    assert code == 1
    assert f"MISMATCH id={victim['id']!r} image_index={victim['image_index']}: 1 token(s) and 0 pixel(s)" in printed
    assert f"tokens {OK_ROWS - 1}/{OK_ROWS} and images {OK_ROWS}/{OK_ROWS}" in printed
    assert "FAILED: 1 row(s)" in printed


def test_rerun_of_chosen_ids_writes_a_separate_dataset_with_the_same_tokens(datasets, capsys):
    source = datasets["batch1"]
    code = main(["rerun", "--output", source, "--ids", "p1", "p2", "--batch-size", "2"])
    printed = capsys.readouterr().out
    assert code == 0 and "reran 2 image(s)" in printed and "skipped 2 error row(s)" in printed
    into = printed.split("-> ")[1].split(";")[0].strip()
    assert into.startswith(f"{source}/reruns/rerun-")
    original, reran = rows_by_key(source), rows_by_key(into)
    assert set(reran) == {("p1", 0), ("p1", 1)}
    for key, row in reran.items():
        assert row["tokens"] == original[key]["tokens"]
        assert {name: row[name] for name in ("prompt", "seed", "steps", "guidance_scale", "truncation_rate")} == \
            {name: original[key][name] for name in ("prompt", "seed", "steps", "guidance_scale", "truncation_rate")}
    assert rows_by_key(source) == original  # the source dataset is left as it was
    assert main(["rerun", "--output", source, "--ids", "p1"]) == 2  # the same rerun folder is not replaced...
    assert "already holds a dataset" in capsys.readouterr().err
    assert main(["rerun", "--output", source, "--ids", "p1", "--overwrite"]) == 0  # ...unless asked


def test_rerun_where_into_a_given_folder_reproduces_tokens_and_images(datasets, tmp_path):
    source = datasets["batch1"]
    summary = rerun(source, where="image_index == 1 and id in ('p0', 'p3')", into=str(tmp_path / "rerun"),
                    batch_size=1)
    assert (summary.output_uri, summary.rows, summary.skipped) == (str(tmp_path / "rerun"), 2, [])
    original, reran = rows_by_key(source), rows_by_key(summary.output_uri)
    assert set(reran) == {("p0", 1), ("p3", 1)}
    for key, row in reran.items():  # batch size 1, like the source: the same computation, bit for bit
        assert row["tokens"] == original[key]["tokens"]
        assert np.array_equal(stored_pixels(summary.output_uri, row), stored_pixels(source, original[key]))


@pytest.mark.parametrize("condition, message", [
    ("colour == 'red'", "unknown column 'colour'"),
    ("id.startswith('p')", "cannot filter on"),
    ("id == 1", "compares a column with a value of another type"),
    ("image_index ==", "is not a valid filter"),
])
def test_bad_where_filters_are_explained(datasets, condition, message):
    metadata = read_metadata(OutputRoot(*resolve(datasets["batch1"], S3Config())))
    with pytest.raises(ValueError, match=message):
        rows_where(metadata, condition)


def test_rerun_of_unknown_ids_is_refused(datasets):
    with pytest.raises(ValueError, match="ids not in the dataset: 'nope'"):
        rerun(datasets["batch1"], ids=["p1", "nope"])


def test_the_truncation_target_is_stored_verified_and_rerun(datasets, capsys):
    guided, prompted = rows_by_key(datasets["batch1"]), rows_by_key(datasets["prompted"])
    assert {row["truncation_target"] for row in guided.values()} == {"guided"}
    assert {row["truncation_target"] for row in prompted.values()} == {"prompted"}
    assert any(prompted[key]["tokens"] != guided[key]["tokens"] for key in guided)  # the setting was live
    assert main(["verify", "--output", datasets["prompted"], "--sample", "3"]) == 0
    summary = rerun(datasets["prompted"], ids=["p0"], batch_size=1)
    for key, row in rows_by_key(summary.output_uri).items():
        assert (row["truncation_target"], row["tokens"]) == ("prompted", prompted[key]["tokens"])


def test_tokens_do_not_depend_on_batch_size_or_actor_count(datasets):
    one, four = rows_by_key(datasets["batch1"]), rows_by_key(datasets["batch4_actors2"])
    assert one.keys() == four.keys() and len(one) == OK_ROWS
    for key in one:
        assert (four[key]["seed"], four[key]["tokens"]) == (one[key]["seed"], one[key]["tokens"]), key


def test_images_are_their_tokens_decoded_within_one_level_across_batch_sizes(datasets):
    """Batch size 1 decodes each image alone: exactly `decode_tokens` of its one row. Larger batches may round
    convolutions differently on CPU (docs/reproducibility.md): at most one level off, and only on few pixels."""
    pipe = VQDiffusionPipeline.from_pretrained(datasets["model"])
    one, four = rows_by_key(datasets["batch1"]), rows_by_key(datasets["batch4_actors2"])
    for key, row in one.items():
        alone = to_uint8(pipe.decode_tokens(torch.tensor([row["tokens"]]), output_type="np"))[0]  # (H, W, 3)
        assert np.array_equal(stored_pixels(datasets["batch1"], row), alone), key
        difference = np.abs(stored_pixels(datasets["batch4_actors2"], four[key]).astype(int) - alone.astype(int))
        assert difference.max() <= 1 and (difference > 0).mean() < 0.01, key
