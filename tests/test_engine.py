"""The whole engine on a real local Ray instance: local and S3 (moto server) datasets, reproducibility, job errors."""

import json
import os

import boto3
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from vqbatch.cli import main
from vqbatch.config import S3Config, load_job_config, validate_job_config
from vqbatch.engine import (BLOCK_ROWS, MAX_BATCHES_PER_BLOCK, BatchLedger, actor_pool, build_dataset, rows_per_block,
                            run_job)
from vqbatch.io.dataset import MANIFEST_FORMAT, OutputRoot, plan_version, read_manifest, read_metadata
from vqbatch.io.formats import metadata_schema
from vqbatch.io.filesystems import read_bytes, resolve
from vqbatch.io.images import decode_image
from vqbatch.io.prompts import open_input
from vqbatch.pipeline import VQDiffusionPipeline
from vqbatch.seeds import image_seed
from vqbatch.tiny import write_tiny_checkpoint

SAMPLING = {"steps": 3, "guidance_scale": 3.0, "truncation_rate": 0.9}


pytestmark = pytest.mark.usefixtures("local_ray")  # one fresh local Ray for the module (conftest)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return str(write_tiny_checkpoint(tmp_path_factory.mktemp("model") / "tiny", seed=0))


def write_inputs(folder):
    """Two files with row seeds (some null) and a blank prompt in each."""
    folder.mkdir()
    pq.write_table(pa.table({"id": ["1", "2", "3"],
                             "prompt": ["a small red circle at the top left on a white background", "   ",
                                        "a large blue square in the center on a black background"],
                             "seed": pa.array([11, 12, None], pa.int64())}), folder / "part-0.parquet")
    pq.write_table(pa.table({"id": ["x", "y", "z"], "prompt": ["a lighthouse at sunset", "", "two cats"],
                             "seed": pa.array([None, None, 2**40], pa.int64())}), folder / "part-1.parquet")
    return {("1", 11), ("3", None), ("x", None), ("z", 2**40)}  # (id, row seed) of the rows that can be sampled


def test_generate_end_to_end_on_local_ray(tiny_model, tmp_path, capsys):
    sampled_rows = write_inputs(tmp_path / "in")
    output = tmp_path / "out"
    code = main(["generate", "--input", str(tmp_path / "in" / "part-0.parquet"),
                 "--input", str(tmp_path / "in" / "part-1.parquet"), "--output", str(output),
                 "--model", tiny_model, "--steps", "3", "--guidance-scale", "3.0", "--truncation-rate", "0.9",
                 "--images-per-prompt", "2", "--seed", "5", "--batch-size", "3", "--rows-per-file", "5",
                 "--json-progress"])
    assert code == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]  # one JSON object per line
    progress, summary = records[:-1], records[-1]
    assert progress and all(record["event"] == "progress" and record["images_total"] == 12 for record in progress)
    assert progress[-1]["images_done"] == 12 and progress[-1]["errors"] == 4
    assert [record["images_done"] for record in progress] == sorted(record["images_done"] for record in progress)
    assert summary["event"] == "done" and (summary["images"], summary["ok"], summary["errors"]) == (12, 8, 4)
    assert summary["report_command"] == f"vqbatch report {output}"

    location = OutputRoot(*resolve(str(output), S3Config()))
    metadata = read_metadata(location)
    assert metadata.schema == metadata_schema("files")
    rows = metadata.to_pylist()
    keys = [(row["id"], row["image_index"]) for row in rows]
    assert sorted(keys) == sorted((row_id, k) for row_id in ("1", "2", "3", "x", "y", "z") for k in (0, 1))
    assert read_manifest(location)["rows"] == 12 and (output / "_SUCCESS").is_file()

    pipe = VQDiffusionPipeline.from_pretrained(tiny_model)
    for row_id, row_seed in sampled_rows:
        for row in (row for row in rows if row["id"] == row_id):
            expected_seed = image_seed(row_id, row["image_index"], base_seed=5, row_seed=row_seed)
            assert (row["status"], row["error"], row["seed"]) == ("ok", None, expected_seed)
            assert (row["steps"], row["guidance_scale"], row["truncation_rate"]) == (3, 3.0, 0.9)
            check_image_matches_tokens(pipe, row, decode_image((output / row["image"]).read_bytes()))
            check_row_reproduces_alone(pipe, row)
    errors = [row for row in rows if row["status"] == "error"]
    assert {row["id"] for row in errors} == {"2", "y"} and all(row["error"] == "prompt is empty" for row in errors)
    assert all(row["image"] is None and row["tokens"] is None for row in errors)
    image_files = [name for _, _, names in os.walk(output) for name in names if name.endswith(".png")]
    assert len(image_files) == 8


def check_image_matches_tokens(pipe, row, stored):
    tokens = torch.tensor([row["tokens"]], dtype=torch.long)  # (1, P)
    assert tokens.shape[1] == pipe.transformer.height * pipe.transformer.width
    decoded = np.asarray(pipe.decode_tokens(tokens, output_type="pil")[0].convert("RGB"))
    # The actor decoded this image inside a batch; CPU convolutions round differently at other batch sizes, so a
    # pixel may land one level off (tokens, the sampled data, must match exactly: see the reproduction check).
    difference = np.abs(stored.astype(int) - decoded.astype(int))
    assert difference.max() <= 1 and (difference > 0).mean() < 0.01


def check_row_reproduces_alone(pipe, row):
    alone = pipe([row["prompt"]], num_inference_steps=row["steps"], guidance_scale=row["guidance_scale"],
                 truncation_rate=row["truncation_rate"], timestep_spacing=row["timestep_spacing"], noise=row["noise"],
                 generator=torch.Generator().manual_seed(row["seed"]), output_type="latent")
    assert alone.tokens[0].tolist() == row["tokens"], f"row {row['id']}/{row['image_index']} does not reproduce"


def test_the_read_task_also_cuts_the_actor_batches(tmp_path, capsys):
    """Ray Data fuses the repartition into the read task only while the read keeps Ray's default task options. Run
    apart, the repartition's one-CPU tasks and the reads hold every CPU the actor leaves on a small node, and no file
    is written before the whole input is read."""
    write_inputs(tmp_path / "in")
    config = validate_job_config({"input": {"paths": [str(tmp_path / "in")]}, "model": {"uri": "noop"},
                                  "output": {"uri": str(tmp_path / "out")}})
    inputs = open_input(config.input, config.s3)
    num_gpus, pool = actor_pool(config.compute)
    ledger = BatchLedger.remote()
    build_dataset(config, inputs, num_gpus, pool, plan_version(config, inputs), ledger).explain()
    optimized = capsys.readouterr().out.split("Physical Plan (Optimized)")[1]
    assert "MapBatches(read_pending_rows)->StreamingRepartition" in optimized
    assert f"num_rows_per_block={rows_per_block(config.compute.batch_size)}," in optimized


@pytest.mark.parametrize("batch_size", [1, 16, 1000, 1500, BLOCK_ROWS, 3 * BLOCK_ROWS])
def test_a_block_holds_whole_batches_about_block_rows_and_at_most_a_few(batch_size):
    """Fewer, larger blocks: Ray Data's driver keeps per-block statistics until the dataset finishes."""
    rows = rows_per_block(batch_size)
    batches = rows // batch_size
    assert rows % batch_size == 0 and 1 <= batches <= MAX_BATCHES_PER_BLOCK
    assert rows <= max(BLOCK_ROWS, batch_size) and (batches == MAX_BATCHES_PER_BLOCK or rows + batch_size > BLOCK_ROWS)


def test_s3_in_and_s3_out_through_the_engine(s3_endpoint, tmp_path):
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="engine")
    local = tmp_path / "prompts.parquet"
    pq.write_table(pa.table({"id": [f"p{i}" for i in range(7)], "prompt": [f"prompt {i}" for i in range(7)]}), local)
    s3.upload_file(str(local), "engine", "prompts/part-0.parquet")
    config = load_job_config(None, {  # Ray workers get the endpoint and keys from the config, not the environment
        "input.paths": "s3://engine/prompts/", "model.uri": "noop", "output.uri": "s3://engine/datasets/run1",
        "output.image_format": "jpeg", "output.rows_per_file": 4, "compute.batch_size": 2,
        "s3.endpoint_url": s3_endpoint, "s3.access_key_id": "testing", "s3.secret_access_key": "testing"})
    summary = run_job(config)
    assert (summary.rows, summary.ok, summary.errors, summary.metadata_files) == (7, 7, 0, 2)
    keys = {item["Key"] for item in s3.list_objects_v2(Bucket="engine", Prefix="datasets/run1/")["Contents"]}
    assert {"datasets/run1/_SUCCESS", "datasets/run1/manifest.json"} <= keys
    location = OutputRoot.of(config.output, config.s3)
    metadata = read_metadata(location).to_pylist()
    assert sorted(row["id"] for row in metadata) == [f"p{i}" for i in range(7)]
    for row in metadata:
        assert f"datasets/run1/{row['image']}" in keys and row["image"].endswith(".jpg")
        assert decode_image(read_bytes(location.filesystem, location.path(row["image"]))).shape == (8, 8, 3)


@pytest.mark.parametrize("make_input, message", [
    (lambda d: pq.write_table(pa.table({"id": ["1"], "text": ["p"]}), d / "a.parquet"), "has no column 'prompt'"),
    (lambda d: pq.write_table(pa.table({"id": pa.array([], pa.string()), "prompt": pa.array([], pa.string())}),
                              d / "a.parquet"), "the input has no rows"),
    (lambda d: (pq.write_table(pa.table({"id": ["1"], "prompt": ["p"]}), d / "a.parquet"),
                (d / "b.parquet").write_bytes(b"\x00garbage")), "cannot read input file .*b.parquet"),
])
def test_job_errors_come_before_any_output_or_model(tmp_path, make_input, message):
    (tmp_path / "in").mkdir()
    make_input(tmp_path / "in")
    config = load_job_config(None, {"input.paths": str(tmp_path / "in"), "model.uri": str(tmp_path / "no-model"),
                                    "output.uri": str(tmp_path / "out")})
    with pytest.raises(ValueError, match=message):
        run_job(config)
    assert not (tmp_path / "out").exists()


def test_an_actor_pool_taking_every_cpu_is_refused_before_the_output_is_cleared(tmp_path):
    pq.write_table(pa.table({"id": ["1"], "prompt": ["p"]}), tmp_path / "a.parquet")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "manifest.json").write_text(json.dumps({"format": MANIFEST_FORMAT}))  # a dataset...
    (tmp_path / "out" / "_SUCCESS").write_bytes(b"")  # ...that overwrite would replace
    config = load_job_config(None, {"input.paths": str(tmp_path / "a.parquet"), "model.uri": "noop",
                                    "output.uri": str(tmp_path / "out"), "output.mode": "overwrite",
                                    "compute.max_actors": 2})
    with pytest.raises(ValueError, match=r"max_actors=2 x cpus_per_actor=1.0 CPU would take every CPU .* <= 1"):
        run_job(config)
    assert (tmp_path / "out" / "_SUCCESS").is_file()


def test_a_missing_model_folder_is_a_job_error(tmp_path, capsys):
    pq.write_table(pa.table({"id": ["1"], "prompt": ["p"]}), tmp_path / "a.parquet")
    code = main(["generate", "--input", str(tmp_path / "a.parquet"), "--output", str(tmp_path / "out"),
                 "--model", str(tmp_path / "no-model")])
    assert code == 2 and "is not a checkpoint folder" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
