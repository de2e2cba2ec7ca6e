"""Incremental refresh on a real local Ray instance and the tiny model: versions, the fingerprint, deduplication."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from vqbatch.cli import main
from vqbatch.config import InputConfig, S3Config, SamplingConfig, load_job_config
from vqbatch.engine import refresh, run_job
from vqbatch.io import dataset
from vqbatch.io.dataset import (FINGERPRINT_NAME, OutputRoot, pending_image_rows, plan_version, read_manifest,
                                read_metadata, start_version)
from vqbatch.io.filesystems import resolve
from vqbatch.io.held import HeldBuckets
from vqbatch.io.prompts import expand_rows, open_input
from vqbatch.io.formats import sampled_table, write_shard
from vqbatch.keys import key_column
from vqbatch.lineage import generation_fingerprint
from vqbatch.tiny import write_tiny_checkpoint


pytestmark = pytest.mark.usefixtures("local_ray")  # one fresh local Ray for the module (conftest)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return str(write_tiny_checkpoint(tmp_path_factory.mktemp("model") / "tiny", seed=0))


def write_prompts(path, ids):
    pq.write_table(pa.table({"id": ids, "prompt": [f"a small shape number {i}" for i in ids]}), path)
    return str(path)


def job(inputs, output, model, **overrides):
    return load_job_config(None, {"input.paths": inputs, "output.uri": str(output), "model.uri": model,
                                  "sampling.steps": 2, "sampling.images_per_prompt": 2, "compute.batch_size": 4,
                                  "compute.min_actors": 1, "compute.max_actors": 1, "output.rows_per_file": 3,
                                  **overrides})


def location(output):
    return OutputRoot(*resolve(str(output), S3Config()))


def keys_of(output):
    """The (id, image_index) keys readers see, and their rows."""
    rows = read_metadata(location(output)).to_pylist()
    return [(row["id"], row["image_index"]) for row in rows], rows


def test_refresh_adds_exactly_the_new_rows_then_nothing_and_refuses_a_changed_fingerprint(tiny_model, tmp_path,
                                                                                         capsys):
    output = tmp_path / "out"
    first = write_prompts(tmp_path / "a.parquet", ["1", "2"])
    summary = run_job(job([first], output, tiny_model))
    assert (summary.rows, summary.version) == (4, 1)
    before = {path: path.read_bytes() for path in (output / "versions" / "v0001").rglob("*") if path.is_file()}

    second = write_prompts(tmp_path / "b.parquet", ["3"])
    summary = refresh(job([first, second], output, tiny_model))
    assert (summary.rows, summary.ok, summary.errors, summary.version) == (2, 2, 0, 2)
    keys, rows = keys_of(output)
    assert sorted(keys) == [(i, k) for i in ("1", "2", "3") for k in (0, 1)]  # each key exactly once
    assert {row["id"] for row in rows if row["image"].startswith("versions/v0002/")} == {"3"}
    assert all((output / row["image"]).is_file() for row in rows)
    assert {path: path.read_bytes() for path in before} == before  # version 1 untouched
    manifest = json.loads((output / "manifest.json").read_text())
    history = [(v["version"], v["rows_added"], v["rows_failed"], len(v["input_files"])) for v in manifest["versions"]]
    assert history == [(1, 4, 0, 1), (2, 2, 0, 2)]
    assert manifest["versions"][0]["fingerprint"] == manifest["versions"][1]["fingerprint"]

    manifest_bytes = (output / "manifest.json").read_bytes()
    capsys.readouterr()
    code = main(["refresh", "--input", first, "--input", second, "--output", str(output), "--model", tiny_model,
                 "--steps", "2", "--images-per-prompt", "2", "--rows-per-file", "3", "--num-actors", "1",
                 "--batch-size", "4"])
    assert code == 0 and "nothing to add" in capsys.readouterr().out
    assert (output / "manifest.json").read_bytes() == manifest_bytes and not (output / "versions" / "v0003").exists()

    code = main(["refresh", "--input", first, "--input", second, "--output", str(output), "--model", tiny_model,
                 "--steps", "3", "--images-per-prompt", "2", "--rows-per-file", "3", "--num-actors", "1",
                 "--batch-size", "4"])
    error = capsys.readouterr().err
    assert code == 2 and "fingerprint changed" in error and "sampling.steps: 2 -> 3" in error
    assert "--allow-new-fingerprint" in error and (output / "manifest.json").read_bytes() == manifest_bytes

    summary = refresh(job([first, second], output, tiny_model, **{"sampling.steps": 3}), allow_new_fingerprint=True)
    assert (summary.rows, summary.version) == (6, 3)
    keys, rows = keys_of(output)
    assert sorted(keys) == [(i, k) for i in ("1", "2", "3") for k in (0, 1)]  # readers see the new generation only
    assert {row["steps"] for row in rows} == {3} and all(row["image"].startswith("versions/v0003/") for row in rows)
    history = read_manifest(location(output))["versions"]
    assert [v["version"] for v in history] == [1, 2, 3] and history[2]["fingerprint"] != history[1]["fingerprint"]


def test_returning_to_an_earlier_fingerprint_publishes_its_rows_again_without_sampling_them(tmp_path):
    inputs, output = write_prompts(tmp_path / "a.parquet", ["x", "y"]), tmp_path / "out"
    settings = {"sampling.images_per_prompt": 1, "output.mode": "refresh"}
    first = refresh(job([inputs], output, "noop", **settings, **{"sampling.base_seed": 1}))
    first_seeds = {row["id"]: row["seed"] for row in keys_of(output)[1]}
    refresh(job([inputs], output, "noop", **settings, **{"sampling.base_seed": 2}), allow_new_fingerprint=True)
    assert {row["id"]: row["seed"] for row in keys_of(output)[1]} != first_seeds

    summary = refresh(job([inputs], output, "noop", **settings, **{"sampling.base_seed": 1}),
                      allow_new_fingerprint=True)
    assert (summary.rows, summary.version) == (0, 3)  # nothing sampled: version 1 holds every key
    keys, rows = keys_of(output)
    assert sorted(keys) == [("x", 0), ("y", 0)] and {row["id"]: row["seed"] for row in rows} == first_seeds
    manifest = read_manifest(location(output))
    assert manifest["metadata_files"] == first.manifest["metadata_files"]
    assert manifest["versions"][2]["fingerprint"] == manifest["versions"][0]["fingerprint"]


def test_generate_refuses_an_existing_dataset_and_a_refresh_of_a_new_output_is_version_one(tmp_path, capsys):
    inputs = write_prompts(tmp_path / "a.parquet", ["x", "y"])
    output = tmp_path / "out"
    summary = refresh(job([inputs], output, "noop", **{"sampling.images_per_prompt": 1}))
    assert (summary.rows, summary.version) == (2, 1)
    code = main(["generate", "--input", inputs, "--output", str(output), "--model", "noop"])
    assert code == 2 and "already holds a dataset" in capsys.readouterr().err


def test_staged_files_are_adopted_deduplicated_and_published_without_sampling(tmp_path):
    """A killed run's complete files are adopted; rows a retried writer wrote twice are published once."""
    inputs = write_prompts(tmp_path / "a.parquet", ["a", "b", "c"])
    config = job([inputs], tmp_path / "out", "noop", **{"sampling.images_per_prompt": 1, "output.mode": "refresh"})
    plan = plan_version(config, open_input(config.input, config.s3))
    assert (plan.version, plan.pending) == (1, 3)
    start_version(plan)
    rows = expand_rows(pq.read_table(inputs), config.input, config.sampling)
    pixels = [np.full((4, 4, 3), 9, np.uint8)] * rows.num_rows
    sampled = sampled_table(rows, [[1, 2]] * rows.num_rows, pixels)
    write_shard(sampled.slice(0, 2), config, plan.folder)  # keys a, b
    write_shard(sampled.slice(1, 2), config, plan.folder)  # keys b, c: b again, as from a retried writer
    folder = tmp_path / "out" / plan.folder
    (folder / ".part-x.parquet.0123.tmp").write_bytes(b"half a file")

    summary = refresh(config)  # every key is staged: nothing to sample, so Ray is not needed
    assert (summary.rows, summary.version) == (3, 1)
    keys, _ = keys_of(tmp_path / "out")
    assert sorted(keys) == [("a", 0), ("b", 0), ("c", 0)]
    assert sorted(path.name for path in folder.glob("*part-*")) == \
        sorted(shard["file"].rsplit("/", 1)[1] for shard in summary.manifest["metadata_files"])
    assert json.loads((folder / FINGERPRINT_NAME).read_text())["fingerprint"] == generation_fingerprint(config).digest


def test_a_stale_stage_of_another_fingerprint_is_discarded(tmp_path):
    inputs = write_prompts(tmp_path / "a.parquet", ["a"])
    old = job([inputs], tmp_path / "out", "noop", **{"sampling.images_per_prompt": 1, "output.mode": "refresh"})
    plan = plan_version(old, open_input(old.input, old.s3))
    start_version(plan)
    rows = expand_rows(pq.read_table(inputs), old.input, old.sampling)
    write_shard(sampled_table(rows, [[0]], [np.zeros((2, 2, 3), np.uint8)]), old, plan.folder)
    new = job([inputs], tmp_path / "out", "noop", **{"sampling.images_per_prompt": 1, "output.mode": "refresh",
                                                      "sampling.steps": 7})
    new_plan = plan_version(new, open_input(new.input, new.s3))
    assert (new_plan.version, new_plan.pending, new_plan.staged) == (1, 1, ())  # the stale file is not adopted
    start_version(new_plan)
    assert not list((tmp_path / "out" / plan.folder).glob("part-*"))


@pytest.mark.parametrize("colliding_hashes", [False, True])
def test_publishing_keeps_each_new_key_once_and_no_held_key(tmp_path, monkeypatch, colliding_hashes):
    """Held key a, staged files (a, b) and (b, c): version 2 adds b and c once. With every key hash equal, the
    exact comparison behind the hashes must give the same answer."""
    if colliding_hashes:
        monkeypatch.setattr(dataset, "key_hashes", lambda keys: np.zeros(len(keys), np.uint64))
    output = tmp_path / "out"
    settings = {"sampling.images_per_prompt": 1, "output.mode": "refresh"}
    refresh(job([write_prompts(tmp_path / "first.parquet", ["a"])], output, "noop", **settings))
    config = job([write_prompts(tmp_path / "all.parquet", ["a", "b", "c"])], output, "noop", **settings)
    plan = plan_version(config, open_input(config.input, config.s3))
    assert (plan.version, plan.pending) == (2, 2)
    start_version(plan)
    rows = expand_rows(pq.read_table(tmp_path / "all.parquet"), config.input, config.sampling)
    sampled = sampled_table(rows, [[1]] * rows.num_rows, [np.full((2, 2, 3), 5, np.uint8)] * rows.num_rows)
    write_shard(sampled.slice(0, 2), config, plan.folder)  # keys a (held), b
    write_shard(sampled.slice(1, 2), config, plan.folder)  # keys b (again), c

    summary = refresh(config)
    assert (summary.version, summary.rows, summary.ok) == (2, 2, 2)
    keys, _ = keys_of(output)
    assert sorted(keys) == [("a", 0), ("b", 0), ("c", 0)]


def test_pending_image_rows_compare_whole_keys_even_when_ids_hold_nul():
    table = pa.table({"id": ["a\x001", "a", "b"], "prompt": ["p", "q", "r"]})
    config, sampling = InputConfig(paths=["x"]), SamplingConfig(images_per_prompt=2)
    done = key_column(pa.table({"id": ["a", "b", "a"], "image_index": pa.array([0, 1, 10], pa.int32())}))
    pending = pending_image_rows(table, config, sampling, HeldBuckets.of(done))
    assert expand_rows(table, config, sampling, pending).select(["id", "image_index"]).to_pylist() == [
        {"id": "a\x001", "image_index": 0}, {"id": "a\x001", "image_index": 1}, {"id": "a", "image_index": 1},
        {"id": "b", "image_index": 0}]
    nothing_done = HeldBuckets.of(pa.array([], pa.binary()))
    assert pending_image_rows(table, config, sampling, nothing_done).tolist() == list(range(6))
