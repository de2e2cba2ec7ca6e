"""Lineage by content: the fingerprint hashes every checkpoint file (cached per machine), takes S3 objects'
checksums or ETags, and a model with other weights of the same shapes is a changed fingerprint that `refresh`
refuses; a checkpoint replaced after the run was planned is refused where an actor loads it; on a real local Ray, the
tiny model, and moto's S3 server over HTTP."""

import base64
import hashlib
import json
import shutil
import sqlite3
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import boto3
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray

from vqbatch.cli import main
from vqbatch.config import ModelConfig, S3Config, SamplingConfig, load_job_config
from vqbatch.engine import ProgressReport, check_job, refresh, run_job, sample_version
from vqbatch.hub import s3_checkpoint_objects
from vqbatch.io.filesystems import s3_client
from vqbatch.lineage import (HASH_CACHE_NAME, ModelChanged, check_model_unchanged, checkpoint_files,
                             generation_fingerprint, model_identity)
from vqbatch.sampler import build_model
from vqbatch.tiny import write_tiny_checkpoint

WEIGHTS = {"learned_classifier_free_sampling_embeddings/diffusion_pytorch_model.safetensors",
           "text_encoder/model.safetensors", "transformer/diffusion_pytorch_model.safetensors",
           "vqvae/diffusion_pytorch_model.safetensors"}


@pytest.fixture
def cache(monkeypatch, tmp_path):
    monkeypatch.setenv("VQBATCH_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    """Two tiny checkpoints of the same shapes and tokenizer, with other weights (seeds 0 and 1)."""
    root = tmp_path_factory.mktemp("tiny-pair")
    return write_tiny_checkpoint(root / "seed0", seed=0), write_tiny_checkpoint(root / "seed1", seed=1)


def files_of(folder: Path) -> list[Path]:
    return sorted(path for path in folder.rglob("*") if path.is_file())


def sha256_of(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------------------------------------------------------
# local checkpoints: every file by content, hashed once per machine


def test_every_file_is_named_by_its_bytes_and_other_weights_change_only_the_weights(tiny_pair, cache):
    first, second = tiny_pair
    files = checkpoint_files(first)
    assert files == {path.relative_to(first).as_posix(): sha256_of(path) for path in files_of(first)}
    assert WEIGHTS <= set(files) and {"tokenizer/vocab.json", "tokenizer/merges.txt"} <= set(files)
    assert all((first / name).stat().st_size == (second / name).stat().st_size for name in files)  # same shapes
    other = checkpoint_files(second)
    assert {name for name in files if files[name] != other[name]} == WEIGHTS  # configs and tokenizer alike

    job = {"input.paths": "prompts.parquet", "output.uri": "out"}
    fingerprints = [generation_fingerprint(load_job_config(None, {**job, "model.uri": str(folder)}))
                    for folder in (first, second)]
    assert fingerprints[0].digest != fingerprints[1].digest


def test_a_file_is_hashed_once_until_it_is_written_again(tiny_pair, cache, tmp_path, monkeypatch):
    folder = shutil.copytree(tiny_pair[0], tmp_path / "model")
    hashed = []
    file_digest = hashlib.file_digest
    monkeypatch.setattr(hashlib, "file_digest", lambda file, name: hashed.append(file.name) or file_digest(file, name))
    first = checkpoint_files(folder)
    assert len(hashed) == len(files_of(folder))
    assert checkpoint_files(folder) == first and len(hashed) == len(files_of(folder))  # all from the cache

    weights = folder / "transformer" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes((tiny_pair[1] / weights.relative_to(folder)).read_bytes())  # same size, in place
    hashed.clear()
    again = checkpoint_files(folder)
    assert hashed == [str(weights.resolve())] and again[weights.relative_to(folder).as_posix()] == sha256_of(weights)

    with sqlite3.connect(cache / HASH_CACHE_NAME) as database:
        rows = database.execute("SELECT path, digest FROM digests").fetchall()
    assert dict(rows) == {str(path.resolve()): sha256_of(path) for path in files_of(folder)}


def test_processes_hashing_at_once_share_the_cache(tiny_pair, cache):
    with ProcessPoolExecutor(4, mp_context=get_context("spawn")) as pool:
        results = list(pool.map(checkpoint_files, [tiny_pair[0]] * 4 + [tiny_pair[1]] * 4))
    assert all(result == checkpoint_files(tiny_pair[0]) for result in results[:4])
    assert all(result == checkpoint_files(tiny_pair[1]) for result in results[4:])
    with sqlite3.connect(cache / HASH_CACHE_NAME) as database:
        assert database.execute("SELECT count(*) FROM digests").fetchone()[0] == 2 * len(files_of(tiny_pair[0]))


# ---------------------------------------------------------------------------------------------------------------
# s3:// checkpoints: the objects' checksums, else ETags


def test_s3_objects_are_named_by_their_sha256_checksum_else_their_etag(s3_endpoint, tiny_pair):
    client = boto3.client("s3")
    client.create_bucket(Bucket="models")
    folder = tiny_pair[0]
    for path in files_of(folder):
        relative = path.relative_to(folder).as_posix()
        client.put_object(Bucket="models", Key=f"checked/{relative}", Body=path.read_bytes(), ChecksumAlgorithm="SHA256")
        client.put_object(Bucket="models", Key=f"plain/{relative}", Body=path.read_bytes(), ChecksumAlgorithm="CRC32")
    client.put_object(Bucket="models", Key="plain/.hidden", Body=b"not part of the checkpoint")

    local = checkpoint_files(folder)
    checked = model_identity(ModelConfig(uri="s3://models/checked"), S3Config())
    assert checked == {"kind": "files", "files": local}  # the same bytes, local or on S3, are the same identity
    plain = s3_checkpoint_objects("s3://models/plain/", s3_client(S3Config()))
    assert {name: item.content_id for name, item in plain.items()} == {
        path.relative_to(folder).as_posix(): "etag:" + hashlib.md5(path.read_bytes()).hexdigest()
        for path in files_of(folder)}  # a single-part upload's ETag is its MD5

    weights = "transformer/diffusion_pytorch_model.safetensors"
    client.put_object(Bucket="models", Key=f"checked/{weights}", Body=(tiny_pair[1] / weights).read_bytes(),
                      ChecksumAlgorithm="SHA256")
    changed = model_identity(ModelConfig(uri="s3://models/checked"), S3Config())["files"]
    assert {name for name in local if changed[name] != local[name]} == {weights}
    head = client.head_object(Bucket="models", Key=f"checked/{weights}", ChecksumMode="ENABLED")
    assert changed[weights] == "sha256:" + base64.b64decode(head["ChecksumSHA256"]).hex()


# ---------------------------------------------------------------------------------------------------------------
# refresh with a retrained model of the same shapes


def test_refresh_with_other_weights_of_the_same_shapes_is_a_changed_fingerprint(local_ray, tiny_pair, cache,
                                                                                tmp_path, capsys):
    model, output, prompts = tmp_path / "model", tmp_path / "out", tmp_path / "prompts.parquet"
    shutil.copytree(tiny_pair[0], model)
    pq.write_table(pa.table({"id": ["a", "b"], "prompt": ["a red circle", "a blue square"]}), prompts)
    flags = ["--input", str(prompts), "--output", str(output), "--model", str(model), "--steps", "2",
             "--batch-size", "2", "--num-actors", "1", "--gpus-per-actor", "0"]
    config = load_job_config(None, {"input.paths": str(prompts), "output.uri": str(output), "model.uri": str(model),
                                    "sampling.steps": 2, "compute.batch_size": 2, "compute.min_actors": 1,
                                    "compute.max_actors": 1, "compute.gpus_per_actor": 0})
    assert run_job(config).rows == 2
    manifest = (output / "manifest.json").read_bytes()

    for name in WEIGHTS:  # retrained in place: same names, sizes and configs, other weights
        shutil.copyfile(tiny_pair[1] / name, model / name)
    capsys.readouterr()
    assert main(["refresh", *flags]) == 2
    error = capsys.readouterr().err
    assert "fingerprint changed" in error and "--allow-new-fingerprint" in error
    assert "model.files.transformer/diffusion_pytorch_model.safetensors: 'sha256:" in error
    assert (output / "manifest.json").read_bytes() == manifest  # nothing added, nothing mixed

    summary = refresh(config, allow_new_fingerprint=True)
    assert (summary.rows, summary.version) == (2, 2)  # every row again, from the new weights
    history = json.loads((output / "manifest.json").read_text())["versions"]
    files = [version["fingerprint_parts"]["model"]["files"] for version in history]
    assert {name for name in files[0] if files[0][name] != files[1][name]} == WEIGHTS


# ---------------------------------------------------------------------------------------------------------------
# the planned identity travels to every model load: a checkpoint replaced after planning is refused

TRANSFORMER = "transformer/diffusion_pytorch_model.safetensors"


def test_a_load_compares_the_checkpoint_with_the_planned_identity(tiny_pair, cache, tmp_path):
    model = ModelConfig(uri=str(shutil.copytree(tiny_pair[0], tmp_path / "model")))
    planned = {**model_identity(model, S3Config()), "dtype": model.dtype}
    check_model_unchanged(model, S3Config(), planned)  # the same files: nothing to say

    shutil.copyfile(tiny_pair[1] / TRANSFORMER, tmp_path / "model" / TRANSFORMER)
    with pytest.raises(ModelChanged, match=f"files.{TRANSFORMER}: 'sha256:") as changed:
        build_model(model, SamplingConfig(), 2, identity=planned)  # refused before it loads
    assert str(tmp_path / "model") in str(changed.value) and "tokenizer" not in str(changed.value)

    shutil.copyfile(tiny_pair[0] / TRANSFORMER, tmp_path / "model" / TRANSFORMER)
    (tmp_path / "model" / "tokenizer" / "added.json").write_text("{}")
    (tmp_path / "model" / "vqvae" / "config.json").unlink()
    with pytest.raises(ModelChanged) as changed:
        check_model_unchanged(model, S3Config(), planned)
    assert "files.tokenizer/added.json: None -> 'sha256:" in str(changed.value)
    assert "files.vqvae/config.json: 'sha256:" in str(changed.value) and "-> None" in str(changed.value)
    assert TRANSFORMER not in str(changed.value)
    with pytest.raises(ModelChanged, match="dtype: 'float32' -> 'float16'"):
        check_model_unchanged(model.model_copy(update={"dtype": "float16"}), S3Config(),
                              {**model_identity(model, S3Config()), "dtype": "float32"})


def test_an_s3_load_compares_the_listed_checksums_with_the_planned_identity(s3_endpoint, tiny_pair):
    client = boto3.client("s3")
    client.create_bucket(Bucket="replaced")
    for path in files_of(tiny_pair[0]):
        client.put_object(Bucket="replaced", Key=f"m/{path.relative_to(tiny_pair[0]).as_posix()}",
                          Body=path.read_bytes(), ChecksumAlgorithm="SHA256")
    model = ModelConfig(uri="s3://replaced/m")
    planned = {**model_identity(model, S3Config()), "dtype": model.dtype}
    check_model_unchanged(model, S3Config(), planned)

    client.put_object(Bucket="replaced", Key=f"m/{TRANSFORMER}", Body=(tiny_pair[1] / TRANSFORMER).read_bytes(),
                      ChecksumAlgorithm="SHA256")
    with pytest.raises(ModelChanged, match=f"s3://replaced/m changed since the run was planned .*{TRANSFORMER}"):
        check_model_unchanged(model, S3Config(), planned)


def test_weights_replaced_between_planning_and_the_actors_load_fail_the_job_and_publish_nothing(
        local_ray, tiny_pair, cache, tmp_path):
    model, output, prompts = tmp_path / "model", tmp_path / "out", tmp_path / "prompts.parquet"
    shutil.copytree(tiny_pair[0], model)
    pq.write_table(pa.table({"id": ["a", "b"], "prompt": ["a red circle", "a blue square"]}), prompts)
    config = load_job_config(None, {"input.paths": str(prompts), "output.uri": str(output), "model.uri": str(model),
                                    "sampling.steps": 2, "compute.batch_size": 2, "compute.min_actors": 1,
                                    "compute.max_actors": 1, "compute.gpus_per_actor": 0})
    inputs, plan = check_job(config)  # the driver plans: the fingerprint names the seed-0 weights
    shutil.copyfile(tiny_pair[1] / TRANSFORMER, model / TRANSFORMER)  # replaced before any actor loads

    with pytest.raises(ray.exceptions.RayActorError, match=f"changed since the run was planned .*{TRANSFORMER}"):
        sample_version(config, inputs, plan, ProgressReport(plan.pending, None, None), None)
    assert not (output / "manifest.json").exists()
    assert not list(output.rglob("*.parquet")) and not list(output.rglob("*.png"))
