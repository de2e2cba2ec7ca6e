"""The job config: what to read, which model, how to sample, on what compute, where to write.

One `JobConfig` is built the same way from a YAML file, from CLI flags and from Python: `load_job_config(yaml_path,
overrides)` deep-merges dotted-key overrides (`{"sampling.steps": 10}`) over the YAML mapping and validates the
result. A bad value is a `ValueError` that names the field, the value and what is allowed.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

import yaml
from pydantic import (BaseModel, ConfigDict, Field, SecretStr, ValidationError, ValidationInfo, field_validator,
                      model_validator)

from vqbatch.choices import (CompileMode, Device, DType, ImageFormat, Noise, OutputFormat, OutputMode, Sampler,
                             TimestepSpacing, TruncationTarget)

NOOP_MODEL = "noop"  # model.uri selecting the no-op model: fixed tiny images, for data-plane benchmarks
# Each image of a prompt is an output row sampled in the same read block; a larger count is taken for a typo (a job
# wanting more images of one prompt lists the prompt under several ids).
MAX_IMAGES_PER_PROMPT = 1024
SECRET_SECTION = "s3"  # the section whose values are never echoed in a problem


class Section(BaseModel):
    """Base of every config section: frozen (hashable, safe to share with Ray workers), strict about unknown keys and
    about booleans where numbers belong (pydantic would read `steps: true` as 1)."""

    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())

    @field_validator("*", mode="before")
    @classmethod
    def no_boolean_for_a_number(cls, value: Any, info: ValidationInfo) -> Any:
        if isinstance(value, bool) and takes_numbers_not_booleans(cls.model_fields[info.field_name].annotation):
            raise ValueError("a boolean is not a number here; write the number")
        return value


def takes_numbers_not_booleans(annotation: Any) -> bool:
    """Whether a field's type (through Optional, unions and Annotated) admits int or float but not bool."""
    kinds, pending = set(), [annotation]
    while pending:
        kind = pending.pop()
        arguments = get_args(kind)
        if arguments and get_origin(kind) is not Literal:
            pending.extend(arguments)
        else:
            kinds.add(kind)
    return bool(kinds & {int, float}) and bool not in kinds


class InputConfig(Section):
    paths: tuple[str, ...] = Field(min_length=1)  # Parquet files, folders or globs; local or s3://
    prompt_column: str = "prompt"
    id_column: str = "id"  # string or integer ids; written as strings
    seed_column: str = "seed"  # used when the input has it (integers in [0, 2**63)); otherwise seeds are derived
    limit: int | None = Field(None, ge=1)  # only the first N prompts, in file order (to try a config); None: all
    # input columns copied into every output row of every format (img2dataset's save_additional_columns)
    keep_columns: tuple[str, ...] = ()

    @field_validator("paths", mode="before")
    @classmethod
    def one_path_is_a_list(cls, value: Any) -> Any:
        return (value,) if isinstance(value, (str, Path)) else value

    @field_validator("paths", mode="after")
    @classmethod
    def paths_are_not_blank(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if any(not str(path).strip() for path in value):
            raise ValueError("every input path must be a non-empty file, folder, glob or s3:// URI")
        return tuple(str(path) for path in value)

    @field_validator("keep_columns", mode="before")
    @classmethod
    def one_column_is_a_list(cls, value: Any) -> Any:
        return (value,) if isinstance(value, str) else value

    @field_validator("keep_columns", mode="after")
    @classmethod
    def kept_columns_are_named_once(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        repeated = sorted({name for name in value if value.count(name) > 1})
        if repeated or any(not name.strip() for name in value):
            raise ValueError(f"keep_columns must name each input column once, non-blank; got {list(value)!r}")
        return value


class ModelConfig(Section):
    uri: str = Field(min_length=1)  # checkpoint folder, s3:// URI, hub id, or "noop"
    dtype: DType = "float32"
    device: Device = "auto"  # auto: cuda when the actor has a GPU
    # torch.compile mode of the transformer (VQDiffusionPipeline.compile_transformer); None: not compiled.
    # reduce-overhead adds CUDA graphs (GPU). Each batch size compiles once per actor, on its first batch.
    compile: CompileMode | None = None


class SamplingConfig(Section):
    steps: int = Field(100, ge=1)  # reverse-diffusion steps
    # classifier-free guidance weight; <= 1 disables guidance
    guidance_scale: float = Field(5.0, ge=0, allow_inf_nan=False)
    # keep the most likely classes holding this probability mass
    truncation_rate: float = Field(1.0, gt=0, le=1, allow_inf_nan=False)
    # which prediction the rate cuts: guided (diffusers), or prompted, before guidance (no stray specks)
    truncation_target: TruncationTarget = "guided"
    images_per_prompt: int = Field(1, ge=1, le=MAX_IMAGES_PER_PROMPT)
    timestep_spacing: TimestepSpacing = "reference"  # skip: fewer steps spread over the whole chain
    # purity: Improved VQ-Diffusion's purity prior, the surest tokens unmasked first and kept (schedulers/purity.py)
    sampler: Sampler = "reference"
    prior_weight: float = Field(0.0, ge=0, allow_inf_nan=False)  # r of the purity prior: sharpens the surest tokens
    # how each token is drawn: categorical, one uniform per latent pixel from the image's own CPU generator (the same
    # noise on every device); gumbel, Gumbel-max with one per class (diffusers' random stream, the pipeline default)
    noise: Noise = "categorical"
    base_seed: int = Field(0, ge=0, lt=2**63)  # seeds of rows without their own seed derive from it

    @field_validator("prior_weight")
    @classmethod
    def prior_weight_needs_purity(cls, value: float, info: ValidationInfo) -> float:
        sampler = info.data.get("sampler")
        if value != 0 and sampler not in (None, "purity"):
            raise ValueError(f"prior_weight applies only to sampler 'purity' (sampler is {sampler!r}); set "
                             "sampling.sampler to 'purity' or leave prior_weight at 0")
        return value


class ComputeConfig(Section):
    min_actors: int = Field(1, ge=1)
    max_actors: int | None = Field(None, ge=1)  # None: one per GPU, or every CPU but one
    gpus_per_actor: float | None = Field(None, ge=0)  # None: 1 when the cluster has GPUs, else 0
    cpus_per_actor: float = Field(1.0, gt=0)
    # images sampled together by one actor call; "auto": the largest batch that fits memory_fraction of an actor's
    # memory, measured once before the job starts (vqbatch/batch_size.py)
    batch_size: Annotated[int, Field(ge=1)] | Literal["auto"] = 8
    memory_fraction: float = Field(0.8, gt=0, le=1)  # of the GPU's memory (or the actor's share of the node's RAM)

    @model_validator(mode="after")
    def pool_is_not_inverted(self) -> "ComputeConfig":
        if self.max_actors is not None and self.max_actors < self.min_actors:
            raise ValueError(f"max_actors={self.max_actors} must be >= min_actors={self.min_actors}")
        return self


class OutputConfig(Section):
    uri: str = Field(min_length=1)  # local folder or s3://bucket/prefix
    image_format: ImageFormat = "png"
    image_quality: int = Field(95, ge=1, le=100)  # jpeg and webp only
    rows_per_file: int = Field(1000, ge=1)  # rows per shard: a metadata Parquet file (and its tar for webdataset)
    # files: one image file per row beside metadata Parquet; webdataset: tar shards; parquet: image bytes in Parquet
    format: OutputFormat = "files"
    # a local output on a cluster of more than one node must be a filesystem every node mounts; say so here
    shared_filesystem: bool = False
    # what to do when the output already holds a dataset: refuse it, replace it, or add the rows it lacks as a new
    # version (`vqbatch refresh`, `generate --resume`; also finishes a killed run)
    mode: OutputMode = "error"


class S3Config(Section):
    """S3 settings; each unset field falls back to the usual AWS environment variables."""

    endpoint_url: str | None = None  # else AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL
    region: str | None = None  # else AWS_REGION or AWS_DEFAULT_REGION, else us-east-1
    access_key_id: SecretStr | None = None  # else AWS_ACCESS_KEY_ID
    secret_access_key: SecretStr | None = None  # else AWS_SECRET_ACCESS_KEY
    session_token: SecretStr | None = None  # else AWS_SESSION_TOKEN


class JobConfig(Section):
    input: InputConfig
    model: ModelConfig
    sampling: SamplingConfig = SamplingConfig()
    compute: ComputeConfig = ComputeConfig()
    output: OutputConfig
    s3: S3Config = S3Config()


def load_job_config(yaml_path: str | Path | None = None, overrides: Mapping[str, Any] | None = None) -> JobConfig:
    """Validate the YAML mapping at `yaml_path` (if any) with dotted-key `overrides` applied on top.

    Overrides whose value is None are skipped, so unset CLI flags leave the YAML value alone.
    """
    settings = read_yaml(yaml_path) if yaml_path is not None else {}
    for dotted_key, value in (overrides or {}).items():
        if value is not None:
            set_dotted(settings, dotted_key, value)
    return validate_job_config(settings)


class S3Section(BaseModel):
    """The `s3` section of a job YAML, for commands that only read or write datasets (rerun, verify, report, ...)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    s3: S3Config = S3Config()


def load_s3_config(yaml_path: str | Path | None) -> S3Config:
    """The `s3` section of the job YAML at `yaml_path` (the other sections are not needed and not checked); the
    AWS environment variables alone when no file is given. Problems are reported as `load_job_config` does."""
    if yaml_path is None:
        return S3Config()
    try:
        return S3Section.model_validate(read_yaml(yaml_path)).s3
    except ValidationError as error:
        problems = describe_problems(error)
    raise ValueError(problems)


def validate_job_config(settings: Mapping[str, Any]) -> JobConfig:
    """The config, or a ValueError raised outside the `except` block: pydantic's error, which quotes every value
    given (credentials too), is not even its hidden context."""
    try:
        return JobConfig.model_validate(settings)
    except ValidationError as error:
        problems = describe_problems(error)
    raise ValueError(problems)


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"job config file not found: {path}")
    problem = None
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=UniqueKeyLoader)
    except yaml.YAMLError as error:
        problem = yaml_problem(error)  # raised outside the block: PyYAML's error keeps the file's text
    if problem is not None:
        raise ValueError(f"{path} is not valid YAML: {problem}")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a mapping with sections {', '.join(JobConfig.model_fields)}; "
                         f"got a {type(data).__name__}")
    return data


def yaml_problem(error: yaml.YAMLError) -> str:
    """What the parser found and where (line, column), without the lines PyYAML quotes in its own message: a quoted
    line may hold a credential."""
    if not isinstance(error, yaml.MarkedYAMLError):
        return str(error)  # a reader error: the bad character's code and position, no text of the file
    parts = [f"{text} (line {mark.line + 1}, column {mark.column + 1})" if mark else text
             for text, mark in ((error.context, error.context_mark), (error.problem, error.problem_mark)) if text]
    return "; ".join(parts + ([error.note] if error.note else []))


class UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, except that a key given twice in one mapping is an error (YAML keeps the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (line {line}, first given on line {seen[key]}); give each "
                    "setting once", key_node.start_mark)
            seen[key] = line
        return super().construct_mapping(node, deep)


def set_dotted(settings: dict[str, Any], dotted_key: str, value: Any) -> None:
    """settings["a"]["b"] = value for dotted_key "a.b", creating the sections on the way."""
    *sections, leaf = dotted_key.split(".")
    for section in sections:
        settings = settings.setdefault(section, {})
        if not isinstance(settings, dict):
            raise ValueError(f"job config: {section!r} must be a mapping to set {dotted_key!r}; got {settings!r}")
    settings[leaf] = value


def describe_problems(error: ValidationError) -> str:
    """One line per problem: the dotted field, the value given, and what is allowed."""
    return "invalid job config:\n" + "\n".join(f"  {describe_problem(problem)}" for problem in error.errors())


def describe_problem(problem: Mapping[str, Any]) -> str:
    """The value given is shown only for known fields outside the `s3` section: an unknown field may be a mistyped
    credential, and every value in `s3` may be one."""
    location = tuple(str(part) for part in problem["loc"])
    field = ".".join(location) or "<config>"
    if problem["type"] == "extra_forbidden":
        return f"{field}: unknown field; allowed: {', '.join(allowed_fields(location[:-1]))}"
    if problem["type"] == "missing":
        return f"{field}: required field is missing"
    shown = "value (not shown)" if location[:1] == (SECRET_SECTION,) else f"value {problem['input']!r}"
    return f"{field}: {shown} is not allowed: {problem['msg']}"


def allowed_fields(section_path: tuple[str, ...]) -> list[str]:
    model: type[BaseModel] = JobConfig
    for name in section_path:
        annotation = model.model_fields[name].annotation
        assert isinstance(annotation, type) and issubclass(annotation, BaseModel), section_path
        model = annotation
    return list(model.model_fields)
