"""The job config: YAML, dotted overrides (CLI flags) and Python build the same validated object."""

import pytest

from vqbatch.config import JobConfig, load_job_config

REQUIRED = {"input.paths": "prompts.parquet", "model.uri": "noop", "output.uri": "out"}


def write_yaml(tmp_path, text):
    path = tmp_path / "job.yaml"
    path.write_text(text)
    return path


def test_yaml_overrides_and_python_build_the_same_config(tmp_path):
    yaml_path = write_yaml(tmp_path, """
input: {paths: [a.parquet, "s3://bucket/prompts/*.parquet"], prompt_column: caption}
model: {uri: ./ckpt, dtype: float16}
sampling: {steps: 50, guidance_scale: 3.0, images_per_prompt: 4}
compute: {batch_size: 16, max_actors: 2}
output: {uri: s3://bucket/out, image_format: webp, image_quality: 80}
s3: {endpoint_url: "http://127.0.0.1:9000"}
""")
    from_yaml = load_job_config(yaml_path, {"sampling.steps": 10, "sampling.base_seed": None})
    from_python = JobConfig(
        input={"paths": ["a.parquet", "s3://bucket/prompts/*.parquet"], "prompt_column": "caption"},
        model={"uri": "./ckpt", "dtype": "float16"},
        sampling={"steps": 10, "guidance_scale": 3.0, "images_per_prompt": 4},
        compute={"batch_size": 16, "max_actors": 2},
        output={"uri": "s3://bucket/out", "image_format": "webp", "image_quality": 80},
        s3={"endpoint_url": "http://127.0.0.1:9000"})
    assert from_yaml == from_python
    assert from_yaml.sampling.steps == 10  # the override wins over the YAML value
    assert from_yaml.sampling.base_seed == 0  # a None override (an unset flag) keeps the default


def test_flags_alone_build_a_config_with_defaults():
    config = load_job_config(None, REQUIRED)
    assert config.input.paths == ("prompts.parquet",)  # one path becomes a tuple of one
    assert (config.input.prompt_column, config.input.id_column, config.input.seed_column) == ("prompt", "id", "seed")
    assert (config.sampling.steps, config.sampling.guidance_scale, config.sampling.truncation_rate) == (100, 5.0, 1.0)
    assert config.output.image_format == "png" and config.output.mode == "error"
    assert config.compute.max_actors is None and config.compute.gpus_per_actor is None


@pytest.mark.parametrize("override, field, value, allowed", [
    ({"sampling.steps": 0}, "sampling.steps", "0", "greater than or equal to 1"),
    ({"output.image_format": "gif"}, "output.image_format", "'gif'", "'png', 'jpeg' or 'webp'"),
    ({"sampling.truncation_rate": 1.5}, "sampling.truncation_rate", "1.5", "less than or equal to 1"),
    ({"model.dtype": "int8"}, "model.dtype", "'int8'", "'float32', 'float16' or 'bfloat16'"),
    ({"sampling.stepz": 3}, "sampling.stepz", "unknown field", "steps, guidance_scale, truncation_rate"),
    ({"compute.batch_size": "many"}, "compute.batch_size", "'many'", "valid integer"),
    ({"sampling.guidance_scale": float("inf")}, "sampling.guidance_scale", "inf", "finite number"),
    ({"sampling.guidance_scale": float("nan")}, "sampling.guidance_scale", "nan", "finite number"),
    ({"sampling.truncation_rate": float("nan")}, "sampling.truncation_rate", "nan", "finite number"),
    ({"sampling.images_per_prompt": 1025}, "sampling.images_per_prompt", "1025", "less than or equal to 1024"),
    ({"sampling.steps": True}, "sampling.steps", "True", "a boolean is not a number"),
    ({"sampling.guidance_scale": False}, "sampling.guidance_scale", "False", "a boolean is not a number"),
    ({"compute.batch_size": True}, "compute.batch_size", "True", "a boolean is not a number"),
    ({"compute.gpus_per_actor": True}, "compute.gpus_per_actor", "True", "a boolean is not a number"),
])
def test_errors_name_field_value_and_what_is_allowed(override, field, value, allowed):
    with pytest.raises(ValueError) as error:
        load_job_config(None, {**REQUIRED, **override})
    message = str(error.value)
    assert field in message and value in message and allowed in message


def test_missing_sections_and_inverted_pool_are_reported():
    with pytest.raises(ValueError, match="input: required field is missing") as error:
        load_job_config(None, {"model.uri": "noop"})
    assert "output: required field is missing" in str(error.value)
    with pytest.raises(ValueError, match="max_actors=1 must be >= min_actors=3"):
        load_job_config(None, {**REQUIRED, "compute.min_actors": 3, "compute.max_actors": 1})


def test_bad_yaml_files_are_reported(tmp_path):
    with pytest.raises(FileNotFoundError, match="job config file not found"):
        load_job_config(tmp_path / "missing.yaml")
    with pytest.raises(ValueError, match="must hold a mapping"):
        load_job_config(write_yaml(tmp_path, "- a\n- b\n"))
    with pytest.raises(ValueError, match="not valid YAML"):
        load_job_config(write_yaml(tmp_path, "input: [unclosed\n"))


def test_secrets_do_not_show_in_dumps():
    config = load_job_config(None, {**REQUIRED, "s3.secret_access_key": "hunter2"})
    assert config.s3.secret_access_key.get_secret_value() == "hunter2"
    assert "hunter2" not in repr(config) and "hunter2" not in config.model_dump_json()


def test_yaml_rejects_duplicate_keys_and_booleans_for_numbers(tmp_path):
    with pytest.raises(ValueError, match=r"duplicate key 'steps' \(line 4, first given on line 3\)"):
        load_job_config(write_yaml(tmp_path, "input: {paths: [a.parquet]}\nsampling:\n  steps: 10\n  steps: 20\n"))
    with pytest.raises(ValueError, match="duplicate key 'sampling'"):
        load_job_config(write_yaml(tmp_path, "sampling: {steps: 10}\nsampling: {guidance_scale: 2}\n"))
    with pytest.raises(ValueError, match="sampling.steps: value True is not allowed: .*a boolean is not a number"):
        load_job_config(write_yaml(tmp_path, "sampling: {steps: true}\n"), REQUIRED)
    config = load_job_config(write_yaml(tmp_path, "model: {uri: noop, compile: null}\nsampling: {steps: 7}\n"),
                             REQUIRED)
    assert config.sampling.steps == 7 and config.model.compile is None  # numbers and nulls still load


@pytest.mark.parametrize("s3_section", [
    {"secret_acess_key": "hunter2-secret"},  # a mistyped credential name
    {"secret_access_key": ["hunter2-secret"]},  # a credential of the wrong type
    {"access_key_id": {"nested": "hunter2-secret"}},
])
def test_a_broken_s3_section_is_reported_without_its_values(tmp_path, s3_section):
    import yaml

    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump({**{"input": {"paths": ["p.parquet"]}, "model": {"uri": "noop"},
                                       "output": {"uri": "out"}}, "s3": s3_section, "s4": {"token": "hunter2-other"}}))
    with pytest.raises(ValueError) as error:
        load_job_config(path)
    message = str(error.value)
    assert f"s3.{next(iter(s3_section))}" in message and "s4: unknown field" in message
    assert "hunter2" not in message and "hunter2" not in repr(error.value.__context__)


@pytest.mark.parametrize("text, line", [
    ('s3:\n  secret_access_key: "hunter2-secret\n', 2),  # an unclosed quote
    ("s3:\n  secret_access_key: hunter2: secret\n", 2),  # a colon inside the value
    ("s3:\n  secret_access_key: [hunter2-secret\n", 2),  # an unclosed flow sequence
    ("s3:\n\tsecret_access_key: hunter2-secret\n", 2),  # a tab for indentation
    ("s3:\n  secret_access_key: a\n  secret_access_key: hunter2-secret\n", 3),  # a key given twice
])
def test_a_yaml_syntax_error_names_its_line_but_never_quotes_it(tmp_path, text, line):
    with pytest.raises(ValueError, match=f"not valid YAML: .*line {line}") as error:
        load_job_config(write_yaml(tmp_path, text))
    assert "hunter2" not in str(error.value) and error.value.__context__ is None
