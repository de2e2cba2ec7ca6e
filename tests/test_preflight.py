"""The checkpoint preflight and the job settings checks: every bad setting is refused, naming the field, the value
and what is allowed, before any Ray process exists and before any model loads."""

import json
import shutil

import boto3
import psutil
import pytest
import ray
import torch
from vq_reference import hub_cache

from vqbatch.cli import main
from vqbatch.config import ModelConfig, S3Config, SamplingConfig, load_job_config
from vqbatch.engine import run_job
from vqbatch.io.examples import EXAMPLE_PROMPTS
from vqbatch.models.weight_files import check_safetensors_complete
from vqbatch.preflight import check_checkpoint, check_output_location
from vqbatch.tiny import write_tiny_checkpoint

RAY_PROCESS_NAMES = ("raylet", "gcs_server", "ray::")


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), seed=0)


@pytest.fixture
def checkpoint(tiny_checkpoint, tmp_path):
    """A copy of the tiny checkpoint to break."""
    return shutil.copytree(tiny_checkpoint, tmp_path / "checkpoint")


def ray_processes() -> set[int]:
    """The Ray processes below this one (an earlier test module's Ray may still be shutting down)."""
    return {child.pid for child in psutil.Process().children(recursive=True)
            if child.name().startswith(RAY_PROCESS_NAMES)}


@pytest.fixture(autouse=True)
def ray_processes_before_the_test():
    RAY_BEFORE.clear()
    RAY_BEFORE.update(ray_processes())


RAY_BEFORE: set[int] = set()


def assert_no_ray():
    """Ray was never started: not in this process, and no Ray process below it that the test started."""
    assert not ray.is_initialized()
    assert not ray_processes() - RAY_BEFORE


def job(model, tmp_path, **sampling):
    return load_job_config(None, {"input.paths": [str(EXAMPLE_PROMPTS)], "output.uri": str(tmp_path / "out"),
                                  "model.uri": str(model), **{f"sampling.{k}": v for k, v in sampling.items()}})


def refused_by_cli(arguments, capsys) -> str:
    assert main(arguments) == 2
    assert_no_ray()
    return capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------
# settings the checkpoint cannot run, and broken checkpoints: refused by run_job and by the CLI


def test_steps_beyond_the_checkpoints_chain(tiny_checkpoint, tmp_path, capsys):
    with pytest.raises(ValueError, match=r"sampling.steps: value 1000 is not allowed: .*num_train_timesteps=100, so "
                                         r"steps must lie in \[1, 100\]"):
        run_job(job(tiny_checkpoint, tmp_path, steps=1000))
    assert_no_ray()
    message = refused_by_cli(["generate", "--input", str(EXAMPLE_PROMPTS), "--output", str(tmp_path / "cli"),
                              "--model", str(tiny_checkpoint), "--steps", "1000"], capsys)
    assert "sampling.steps: value 1000" in message and "[1, 100]" in message
    assert not (tmp_path / "out").exists() and not (tmp_path / "cli").exists()
    check_checkpoint(job(tiny_checkpoint, tmp_path).model, job(tiny_checkpoint, tmp_path, steps=100).sampling,
                     S3Config())  # the whole chain is allowed


@pytest.mark.parametrize("flag, value, message", [
    ("--guidance-scale", "inf", "sampling.guidance_scale: value inf is not allowed: Input should be a finite number"),
    ("--guidance-scale", "nan", "sampling.guidance_scale: value nan is not allowed"),
    ("--truncation-rate", "inf", "sampling.truncation_rate: value inf is not allowed"),
    ("--truncation-rate", "0", "sampling.truncation_rate: value 0.0 is not allowed: Input should be greater than 0"),
    ("--images-per-prompt", "5000", "sampling.images_per_prompt: value 5000 is not allowed: Input should be less "
                                    "than or equal to 1024"),
    ("--sampler", "greedy", "argument --sampler: invalid choice: 'greedy' (choose from 'reference', 'purity')"),
    ("--dtype", "int8", "argument --dtype: invalid choice: 'int8'"),
    ("--output-format", "tar", "argument --output-format: invalid choice: 'tar' (choose from 'files', 'webdataset', "
                               "'parquet')"),
])
def test_bad_sampling_flags(tiny_checkpoint, tmp_path, capsys, flag, value, message):
    arguments = ["generate", "--input", str(EXAMPLE_PROMPTS), "--output", str(tmp_path / "out"),
                 "--model", str(tiny_checkpoint), flag, value]
    if "invalid choice" in message:  # argparse's own refusal
        with pytest.raises(SystemExit):
            main(arguments)
        assert_no_ray()
        assert message in capsys.readouterr().err
    else:
        assert message in refused_by_cli(arguments, capsys)


def test_yaml_duplicate_keys_and_booleans_refused_by_the_cli(tiny_checkpoint, tmp_path, capsys):
    head = f"input: {{paths: [{EXAMPLE_PROMPTS}]}}\nmodel: {{uri: {tiny_checkpoint}}}\noutput: {{uri: {tmp_path}/o}}\n"
    for body, message in (("sampling:\n  steps: 4\n  steps: 5\n", "duplicate key 'steps' (line 6, first given on "
                                                                   "line 5)"),
                          ("sampling: {steps: true}\n", "sampling.steps: value True is not allowed"),
                          ("sampling: {guidance_scale: .inf}\n", "sampling.guidance_scale: value inf")):
        (tmp_path / "job.yaml").write_text(head + body)
        assert message in refused_by_cli(["generate", "--config", str(tmp_path / "job.yaml")], capsys)


def test_missing_tokenizer_files(checkpoint, tmp_path):
    for name in ("vocab.json", "merges.txt", "tokenizer.json"):
        (checkpoint / "tokenizer" / name).unlink(missing_ok=True)
    with pytest.raises(FileNotFoundError, match=r"model.uri: checkpoint .* has no tokenizer files in tokenizer/ "
                                                r"\(found: .*tokenizer_config.json.*\); a CLIP tokenizer needs "
                                                r"tokenizer.json or vocab.json \+ merges.txt"):
        run_job(job(checkpoint, tmp_path, steps=2))
    assert_no_ray()


@pytest.mark.parametrize("component", ["vqvae", "transformer", "learned_classifier_free_sampling_embeddings",
                                       "text_encoder"])
def test_a_model_config_missing_or_not_json(checkpoint, tmp_path, component):
    config = checkpoint / component / "config.json"
    text = config.read_text()
    config.write_text(text[:len(text) // 2])
    with pytest.raises(ValueError, match=rf"model.uri: {component}/config.json of checkpoint .* is not valid JSON"):
        run_job(job(checkpoint, tmp_path, steps=2))
    config.unlink()
    with pytest.raises(FileNotFoundError, match=rf"model.uri: checkpoint .* has no {component}/config.json"):
        run_job(job(checkpoint, tmp_path, steps=2))
    assert_no_ray()


def test_truncated_weight_file(checkpoint, tmp_path):
    weights = checkpoint / "transformer" / "diffusion_pytorch_model.safetensors"
    check_safetensors_complete(weights)
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(ValueError, match=r"weight file .*transformer/diffusion_pytorch_model.safetensors is "
                                         r"truncated: its header describes \d+ bytes, the file has \d+"):
        run_job(job(checkpoint, tmp_path, steps=2))
    weights.write_bytes(b"\x05")
    with pytest.raises(ValueError, match="not even a safetensors header"):
        run_job(job(checkpoint, tmp_path, steps=2))
    weights.write_bytes((10**6).to_bytes(8, "little") + b"{}")
    with pytest.raises(ValueError, match="its header claims 1000000 bytes, the file has 10"):
        run_job(job(checkpoint, tmp_path, steps=2))
    assert_no_ray()


def test_text_encoder_weights_in_a_torch_pickle_pass(checkpoint):
    """transformers names its pickled weights pytorch_model.bin (older checkpoints, and hub ones, have them)."""
    from safetensors.torch import load_file

    safetensors_file = checkpoint / "text_encoder" / "model.safetensors"
    torch.save(load_file(safetensors_file), checkpoint / "text_encoder" / "pytorch_model.bin")
    safetensors_file.unlink()
    check_checkpoint(ModelConfig(uri=str(checkpoint)), SamplingConfig(steps=2), S3Config())
    (checkpoint / "text_encoder" / "pytorch_model.bin").unlink()
    with pytest.raises(FileNotFoundError, match="expected one of model.safetensors, model.safetensors.index.json, "
                                                "pytorch_model.bin, pytorch_model.bin.index.json"):
        check_checkpoint(ModelConfig(uri=str(checkpoint)), SamplingConfig(steps=2), S3Config())


def test_missing_component_and_missing_shard(checkpoint, tmp_path):
    from vqbatch import VQModel

    vqvae = VQModel.from_pretrained(checkpoint, subfolder="vqvae")
    shutil.rmtree(checkpoint / "vqvae")
    vqvae.save_pretrained(checkpoint / "vqvae", max_shard_size=20_000)
    sorted((checkpoint / "vqvae").glob("*-of-*.safetensors"))[0].unlink()
    with pytest.raises(FileNotFoundError, match="names shard files that are missing: diffusion_pytorch_model-00001"):
        run_job(job(checkpoint, tmp_path, steps=2))
    index = json.loads((checkpoint / "model_index.json").read_text())
    del index["scheduler"]
    (checkpoint / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="model_index.json lacks scheduler"):
        run_job(job(checkpoint, tmp_path, steps=2))
    with pytest.raises(FileNotFoundError, match="model.uri: 'no/such/folder/here' is not a checkpoint folder"):
        run_job(job("no/such/folder/here", tmp_path))
    assert_no_ray()


# ---------------------------------------------------------------------------------------------------------------
# s3:// and hub checkpoints: only their config files are read


def test_s3_checkpoint_is_checked_from_its_configs_alone(s3_endpoint, tiny_checkpoint, tmp_path):
    client = boto3.client("s3")
    client.create_bucket(Bucket="models")
    for path in sorted(tiny_checkpoint.rglob("*")):
        if path.is_file() and path.suffix != ".safetensors":  # configs and tokenizer only: weights are never read
            client.upload_file(str(path), "models", f"tiny/{path.relative_to(tiny_checkpoint)}")
    config = job("s3://models/tiny", tmp_path, steps=101)
    with pytest.raises(ValueError, match=r"sampling.steps: value 101 .*'s3://models/tiny'"):
        check_checkpoint(config.model, config.sampling, config.s3)
    check_checkpoint(config.model, job("s3://models/tiny", tmp_path, steps=100).sampling, config.s3)
    for name in ("vocab.json", "tokenizer.json"):
        client.delete_object(Bucket="models", Key=f"tiny/tokenizer/{name}")
    with pytest.raises(FileNotFoundError, match="has no tokenizer files"):
        check_checkpoint(config.model, job("s3://models/tiny", tmp_path, steps=5).sampling, config.s3)
    assert not (tmp_path / "cache").exists()  # nothing downloaded


def test_hub_checkpoint_is_checked_from_its_configs_alone(offline_hub, tiny_checkpoint, tmp_path):
    configs_only = tmp_path / "configs-only"
    for path in tiny_checkpoint.rglob("*"):
        if path.is_file() and path.suffix != ".safetensors":
            target = configs_only / path.relative_to(tiny_checkpoint)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(path.read_bytes())
    hub_cache(offline_hub, "vqbatch-tests/tiny", {"main": configs_only})
    check_checkpoint(job("vqbatch-tests/tiny", tmp_path).model, job("vqbatch-tests/tiny", tmp_path, steps=100).sampling,
                     S3Config())
    with pytest.raises(ValueError, match=r"sampling.steps: value 500 .*'vqbatch-tests/tiny'.*\[1, 100\]"):
        check_checkpoint(job("vqbatch-tests/tiny", tmp_path).model,
                         job("vqbatch-tests/tiny", tmp_path, steps=500).sampling, S3Config())


# ---------------------------------------------------------------------------------------------------------------
# outputs that cannot be written, or that a later run would read as input: refused before Ray starts


def output_job(inputs, output, model):
    return load_job_config(None, {"input.paths": inputs, "output.uri": str(output), "model.uri": str(model)})


def prompts_in(folder):
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(EXAMPLE_PROMPTS, folder / "prompts.parquet")
    return folder


def test_an_output_that_is_a_file_or_cannot_be_written_is_refused(tiny_checkpoint, tmp_path, capsys):
    taken = tmp_path / "taken.txt"
    taken.write_text("not a dataset")
    with pytest.raises(ValueError, match=r"output.uri: '.*taken.txt' is an existing file; give a folder"):
        run_job(output_job([str(EXAMPLE_PROMPTS)], taken, tiny_checkpoint))
    with pytest.raises(ValueError, match=r"output.uri: '.*taken.txt/out' cannot be created: .*taken.txt is a file"):
        run_job(output_job([str(EXAMPLE_PROMPTS)], taken / "out", tiny_checkpoint))
    assert_no_ray()
    message = refused_by_cli(["generate", "--input", str(EXAMPLE_PROMPTS), "--output", "/sys/vqbatch-out",
                              "--model", str(tiny_checkpoint)], capsys)
    assert "output.uri: '/sys/vqbatch-out' is not writable (/sys: " in message and "write permission" in message
    assert taken.read_text() == "not a dataset" and not (tmp_path / "cache").exists()


@pytest.mark.parametrize("inputs, output", [
    (["data"], "data/out"),
    (["data/"], "./data/./out/"),
    (["data/*.parquet"], "data/sub/../out"),
    (["data/prompts.parquet", "data"], "data"),
    (["link"], "data/out"),  # the same folder through a symbolic link
])
def test_a_local_output_inside_an_input_folder_is_refused(tiny_checkpoint, tmp_path, monkeypatch, capsys,
                                                         inputs, output):
    monkeypatch.chdir(tmp_path)
    prompts_in(tmp_path / "data")
    (tmp_path / "link").symlink_to(tmp_path / "data")
    message = refused_by_cli(["generate", *(f"--input={path}" for path in inputs), "--output", output,
                              "--model", str(tiny_checkpoint)], capsys)
    assert f"output.uri: {output!r} lies inside the input folder" in message
    assert "choose an output outside the input folders" in message
    assert sorted(path.name for path in (tmp_path / "data").iterdir()) == ["prompts.parquet"]


def test_an_output_beside_the_input_is_accepted(tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    prompts_in(tmp_path / "data")
    for inputs, output in ((["data/prompts.parquet"], "data/out"), (["data"], "data-out"), (["data/*.parquet"], "out")):
        check_output_location(output_job(inputs, output, tiny_checkpoint))


def test_an_s3_output_inside_an_input_prefix_is_refused(s3_endpoint, tiny_checkpoint, tmp_path, capsys):
    client = boto3.client("s3")
    client.create_bucket(Bucket="data")
    client.upload_file(str(EXAMPLE_PROMPTS), "data", "prompts/part-0.parquet")
    client.put_object(Bucket="data", Key="file-not-folder", Body=b"x")
    for inputs, output in ((["s3://data/prompts"], "s3://data//prompts/./out"),
                           (["s3://data/prompts/*.parquet"], "s3://data/prompts/v2/"),
                           (["s3://data/prompts/"], "s3://data/prompts")):
        message = refused_by_cli(["generate", *(f"--input={path}" for path in inputs), "--output", output,
                                  "--model", str(tiny_checkpoint)], capsys)
        assert f"output.uri: {output!r} lies inside the input folder {inputs[0]!r}" in message
    message = refused_by_cli(["generate", "--input", "s3://data/prompts", "--output", "s3://data/file-not-folder",
                              "--model", str(tiny_checkpoint)], capsys)
    assert "output.uri: 's3://data/file-not-folder' is an existing file" in message
    check_output_location(output_job(["s3://data/prompts/part-0.parquet"], "s3://data/prompts/out", tiny_checkpoint))
    check_output_location(output_job(["s3://data/prompts"], "s3://data/prompts-out", tiny_checkpoint))
