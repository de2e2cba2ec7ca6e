"""One S3 resolver and secrets kept: with the endpoint and credentials only in the job YAML (every AWS_* variable
cleared), generate, verify, rerun, inspect and an s3:// model all reach moto's S3 server over HTTP, and no secret
shows in an error, a log, the manifest, the dataset card or a row."""

import os
import re
from pathlib import Path

import boto3
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
import yaml
from pydantic import SecretStr

from conftest import free_port, ray_started_locally
from vqbatch.cli import main
from vqbatch.config import S3Config, load_job_config, load_s3_config
from vqbatch.tiny import write_tiny_checkpoint

ACCESS_KEY = "AKIAVQBATCHTESTKEY01"
SECRET_KEY = "vqbatch/Secret+Key/never-Shown-0123456789"
SECRETS = (ACCESS_KEY, SECRET_KEY)


@pytest.fixture
def s3_only_in_yaml(moto_server, monkeypatch, tmp_path):
    """The module's moto S3 server with no AWS_* variable set, so only a config's s3 section can reach it. Returns
    (endpoint, a boto3 client for the test's own setup)."""
    for name in [name for name in os.environ if name.startswith("AWS_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("VQBATCH_CACHE", str(tmp_path / "cache"))
    return moto_server, boto3.client("s3", endpoint_url=moto_server, region_name="us-east-1",
                                     aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY)


def write_yaml(path: Path, settings: dict) -> str:
    path.write_text(yaml.safe_dump(settings))
    return str(path)


def s3_section(endpoint: str, **changes) -> dict:
    return {"endpoint_url": endpoint, "region": "us-east-1", "access_key_id": ACCESS_KEY,
            "secret_access_key": SECRET_KEY, **changes}


def assert_no_secret(text: str | bytes, where: str) -> None:
    for secret in SECRETS:
        assert (secret.encode() if isinstance(text, bytes) else secret) not in text, f"a secret shows in {where}"


def test_credentials_are_secret_strings_and_never_printed():
    for name in ("access_key_id", "secret_access_key", "session_token"):
        assert S3Config.model_fields[name].annotation == SecretStr | None
    config = load_job_config(None, {"input.paths": "p.parquet", "output.uri": "out", "model.uri": "noop",
                                    "s3.access_key_id": ACCESS_KEY, "s3.secret_access_key": SECRET_KEY})
    assert config.s3.secret_access_key.get_secret_value() == SECRET_KEY
    for text in (repr(config), str(config), config.model_dump_json(), str(config.model_dump())):
        assert_no_secret(text, "the config's text")


def test_run_verify_rerun_inspect_and_an_s3_model_with_settings_only_in_the_yaml(s3_only_in_yaml, tmp_path, capsys):
    endpoint, client = s3_only_in_yaml
    for bucket in ("models", "data"):
        client.create_bucket(Bucket=bucket)
    model = write_tiny_checkpoint(tmp_path / "tiny", seed=0)
    for path in sorted(model.rglob("*")):
        if path.is_file():
            client.upload_file(str(path), "models", f"tiny/{path.relative_to(model).as_posix()}")
    pq.write_table(pa.table({"id": ["a", "b", "c"], "prompt": ["a red circle", "a blue square", "a green star"]}),
                   tmp_path / "prompts.parquet")
    client.upload_file(str(tmp_path / "prompts.parquet"), "data", "prompts/part-0.parquet")
    job = write_yaml(tmp_path / "job.yaml", {
        "input": {"paths": ["s3://data/prompts"]}, "model": {"uri": "s3://models/tiny"}, "sampling": {"steps": 2},
        "compute": {"batch_size": 2, "min_actors": 1, "max_actors": 1, "gpus_per_actor": 0},
        "output": {"uri": "s3://data/out", "rows_per_file": 2}, "s3": s3_section(endpoint)})

    with ray_started_locally():  # after the AWS_* variables were cleared: its workers have none either
        assert main(["generate", "--config", job, "--quiet"]) == 0
        assert main(["verify", "--output", "s3://data/out", "--sample", "3", "--config", job]) == 0
        assert main(["rerun", "--output", "s3://data/out", "--ids", "b", "--into", "s3://data/rerun", "--config",
                     job]) == 0
        assert main(["inspect", "s3://data/out", "--id", "c", "--config", job]) == 0
    output = capsys.readouterr()
    assert "verified 3 of 3 ok rows" in output.out and "PASSED" in output.out and "reran 1 image(s)" in output.out
    assert (tmp_path / "cache" / "s3" / "models" / "tiny").is_dir()  # the actors' model came through the YAML

    assert_no_secret(output.out + output.err, "the commands' output")
    for log_file in re.findall(r"Ray's own messages: (\S+)", output.out + output.err):
        assert_no_secret(Path(log_file).read_bytes(), log_file)
    keys = [item["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket="data")
            for item in page.get("Contents", [])]
    assert {"out/manifest.json", "out/README.md", "rerun/manifest.json"} <= set(keys)
    for key in keys:  # manifests, dataset cards, fingerprints, run records, every metadata row and image
        assert_no_secret(client.get_object(Bucket="data", Key=key)["Body"].read(), key)


@pytest.mark.parametrize("changes, shown", [
    ({"sampling": {"steps": "many"}}, "sampling.steps: value 'many' is not allowed"),
    ({"s3": {"secret_acess_key": SECRET_KEY}}, "s3.secret_acess_key: unknown field; allowed: endpoint_url"),
    ({"s3": {"access_key_id": [ACCESS_KEY], "region": {"name": SECRET_KEY}}}, "s3.access_key_id: value (not shown)"),
])
def test_a_broken_config_never_shows_a_secret(s3_only_in_yaml, tmp_path, capsys, changes, shown):
    endpoint, _ = s3_only_in_yaml
    settings = {"input": {"paths": ["s3://data/prompts"]}, "model": {"uri": "noop"}, "output": {"uri": "s3://data/o"},
                "s3": s3_section(endpoint)}
    for section, values in changes.items():
        settings[section] = {**settings.get(section, {}), **values}
    job = write_yaml(tmp_path / "broken.yaml", settings)
    assert main(["generate", "--config", job]) == 2
    assert main(["verify", "--output", "s3://data/o", "--sample", "1", "--config", job]) == 2  # no dataset there
    output = capsys.readouterr()
    assert shown in output.err
    assert_no_secret(output.out + output.err, "the error")
    with pytest.raises(ValueError) as error:
        load_job_config(job)
    assert_no_secret(str(error.value), "the exception")
    assert error.value.__context__ is None and error.value.__cause__ is None  # nor pydantic's error behind it
    if "sampling" not in changes:
        with pytest.raises(ValueError) as error:
            load_s3_config(job)
        assert_no_secret(str(error.value), "the s3 section's exception")


def test_a_bad_endpoint_fails_without_showing_a_secret(s3_only_in_yaml, tmp_path, capsys):
    settings = {"input": {"paths": ["s3://data/prompts"]}, "model": {"uri": "noop"}, "output": {"uri": "s3://data/o"},
                "s3": s3_section(f"http://127.0.0.1:{free_port()}")}  # nothing listens there
    job = write_yaml(tmp_path / "job.yaml", settings)
    assert main(["generate", "--config", job]) == 2
    assert main(["verify", "--output", "s3://data/o", "--sample", "1", "--config", job]) == 2
    output = capsys.readouterr()
    assert "vqbatch:" in output.err and not ray.is_initialized()
    assert_no_secret(output.out + output.err, "the error")
