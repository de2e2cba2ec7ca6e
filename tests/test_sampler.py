"""`vqbatch.sampler`: the actor's model without Ray, its rows, and what it samples on the tiny checkpoint."""

import subprocess
import sys

import numpy as np
import pytest

from vqbatch.config import ModelConfig, SamplingConfig
from vqbatch.sampler import NOOP_LATENT_PIXELS, NoopModel, PipelineModel, build_model, sample_rows
from vqbatch.tiny import IMAGE_SIZE, LATENT_SIZE, write_tiny_checkpoint

SAMPLING = SamplingConfig(steps=3, guidance_scale=3.0, truncation_rate=0.9)
PROMPTS = ["a red circle", "a blue square", "a red circle " + "word " * 80]
SEEDS = [5, 6, 7]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return str(write_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), seed=0))


@pytest.fixture(scope="module")
def model(checkpoint):
    return PipelineModel(ModelConfig(uri=checkpoint, device="cpu"), SAMPLING)


def test_importing_the_sampler_loads_no_ray():
    code = "import sys, vqbatch.sampler; print(sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "[]"


def test_build_model_picks_the_noop_model_or_the_pipeline(checkpoint):
    assert isinstance(build_model(ModelConfig(uri="noop"), SAMPLING), NoopModel)
    assert isinstance(build_model(ModelConfig(uri=checkpoint, device="cpu"), SAMPLING), PipelineModel)


def test_rows_hold_tokens_uint8_pixels_and_truncation_flags(model):
    rows = sample_rows(model, PROMPTS, SEEDS)
    assert len(rows) == 3
    for tokens, pixels, _ in rows:
        assert len(tokens) == LATENT_SIZE * LATENT_SIZE and all(isinstance(token, int) for token in tokens)
        assert pixels.dtype == np.uint8 and pixels.shape == (IMAGE_SIZE, IMAGE_SIZE, 3)
    assert [truncated for _, _, truncated in rows] == [False, False, True]


def test_rows_equal_a_direct_sample_of_the_same_seeds(model):
    tokens, pixels = model.sample(PROMPTS[:2], SEEDS[:2])
    rows = sample_rows(model, PROMPTS[:2], SEEDS[:2])
    assert [row[0] for row in rows] == tokens.tolist()
    assert all(np.array_equal(row[1], image) for row, image in zip(rows, pixels))


def test_noop_rows_are_zero_tokens_and_grey_pixels():
    rows = sample_rows(NoopModel(ModelConfig(uri="noop"), SAMPLING), ["a", "b"], [1, 2])
    assert [row[0] for row in rows] == [[0] * NOOP_LATENT_PIXELS] * 2
    assert all((row[1] == 128).all() and row[2] is None for row in rows)
