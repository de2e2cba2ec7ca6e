"""Every enumerated setting's allowed values, written once: the job config, the CLI's `choices=` and the pipeline
read them from here. Torch-free and Ray-free, so the config and the CLI can check settings before anything loads.

Each name pairs a `Literal` type (for pydantic and signatures) with the tuple of its values (for `choices=` and
error messages); `typing.get_args` keeps the two the same.
"""

from __future__ import annotations

from typing import Literal, get_args

# How each reverse step draws the previous tokens: "reference" is VQ-Diffusion's posterior step (diffusers), "purity"
# Improved VQ-Diffusion's purity prior (vqbatch/schedulers/purity.py).
Sampler = Literal["reference", "purity"]
# How a step draws each latent pixel's class: "gumbel" is Gumbel-max with one uniform per class (diffusers' random
# stream), "categorical" the inverse CDF of one uniform per pixel (the same distribution, C times fewer numbers).
Noise = Literal["gumbel", "categorical"]
# Which timesteps a run of N steps visits: "reference" the chain's last N (diffusers), "skip" N spread over it all.
TimestepSpacing = Literal["reference", "skip"]
# Which prediction a truncation rate cuts: "guided" the guided one, after guidance (diffusers and the reference code);
# "prompted" the prompted one, before guidance, so guidance only re-weights the classes the prompt makes likely and
# cannot lift a class both predictions call unlikely into a stray speck.
TruncationTarget = Literal["guided", "prompted"]
# Weights' and activations' dtype of a loaded model.
DType = Literal["float32", "float16", "bfloat16"]
# Where an engine actor runs its model: "auto" is cuda when the actor holds a GPU.
Device = Literal["auto", "cpu", "cuda"]
# torch.compile modes of the transformer; "reduce-overhead" adds CUDA graphs.
CompileMode = Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]
# Encodings of stored images.
ImageFormat = Literal["png", "jpeg", "webp"]
# What a run does with an output that already holds a dataset.
OutputMode = Literal["error", "overwrite", "refresh"]
# What a pipeline call returns: PIL images, a float array in [0, 1], or only the tokens.
OutputType = Literal["pil", "np", "latent"]
# The dtypes `vqbatch train` writes the weights in.
TrainDType = Literal["float32", "float16"]
# How `vqbatch train` draws each sample's timestep: uniformly, or in proportion to the root mean square of its loss
# (the reference VQ-Diffusion's "importance" sampling).
TimestepSampling = Literal["uniform", "importance"]
# DDPMScheduler's options, with diffusers' names: its β schedule, the variance of each reverse step, what the model
# predicts, and which timesteps a run of N steps visits.
BetaSchedule = Literal["linear", "scaled_linear", "squaredcos_cap_v2"]
VarianceType = Literal["fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned", "learned_range"]
PredictionType = Literal["epsilon", "sample", "v_prediction"]
DDPMTimestepSpacing = Literal["leading", "trailing", "linspace"]
# How a dataset's rows are stored (vqbatch/io/formats.py): one image file per row next to metadata Parquet, tar shards
# for WebDataset, or image bytes inside the Parquet files.
OutputFormat = Literal["files", "webdataset", "parquet"]
# How much of a dataset `vqbatch verify` reads besides the rows it regenerates: "decode" reads every published file
# and decodes every stored image, "exists" only checks that every published file is there (one listing per folder).
IntegrityCheck = Literal["decode", "exists"]

SAMPLERS: tuple[str, ...] = get_args(Sampler)
NOISES: tuple[str, ...] = get_args(Noise)
TIMESTEP_SPACINGS: tuple[str, ...] = get_args(TimestepSpacing)
TRUNCATION_TARGETS: tuple[str, ...] = get_args(TruncationTarget)
DTYPES: tuple[str, ...] = get_args(DType)
DEVICES: tuple[str, ...] = get_args(Device)
COMPILE_MODES: tuple[str, ...] = get_args(CompileMode)
IMAGE_FORMATS: tuple[str, ...] = get_args(ImageFormat)
OUTPUT_MODES: tuple[str, ...] = get_args(OutputMode)
OUTPUT_TYPES: tuple[str, ...] = get_args(OutputType)
TRAIN_DTYPES: tuple[str, ...] = get_args(TrainDType)
TIMESTEP_SAMPLINGS: tuple[str, ...] = get_args(TimestepSampling)
BETA_SCHEDULES: tuple[str, ...] = get_args(BetaSchedule)
VARIANCE_TYPES: tuple[str, ...] = get_args(VarianceType)
PREDICTION_TYPES: tuple[str, ...] = get_args(PredictionType)
DDPM_TIMESTEP_SPACINGS: tuple[str, ...] = get_args(DDPMTimestepSpacing)
OUTPUT_FORMATS: tuple[str, ...] = get_args(OutputFormat)
INTEGRITY_CHECKS: tuple[str, ...] = get_args(IntegrityCheck)


def check_choice(name: str, value: object, allowed: tuple[str, ...]) -> None:
    """A ValueError naming the setting, the value and the allowed ones when `value` is not one of `allowed`."""
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}; got {value!r}")
