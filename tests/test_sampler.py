"""`vqbatch.sampler`: the actor's model without Ray, its rows, and what it samples on the tiny checkpoint."""

import subprocess
import sys

import numpy as np
import pytest

from vqbatch.config import ModelConfig, SamplingConfig, load_job_config
from vqbatch.lineage import generation_fingerprint, recorded_batch_shape
from vqbatch.sampler import DECODE_BATCH, NOOP_LATENT_PIXELS, NoopModel, PipelineModel, build_model, sample_rows
from vqbatch.tiny import IMAGE_SIZE, LATENT_SIZE, write_tiny_checkpoint

SAMPLING = SamplingConfig(steps=3, guidance_scale=3.0, truncation_rate=0.9)
PROMPTS = ["a red circle", "a blue square", "a red circle " + "word " * 80]
SEEDS = [5, 6, 7]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return str(write_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), seed=0))


@pytest.fixture(scope="module")
def model(checkpoint):
    return PipelineModel.load(ModelConfig(uri=checkpoint, device="cpu"), SAMPLING, batch_shape=4)


def test_importing_the_sampler_loads_no_ray():
    code = "import sys, vqbatch.sampler; print(sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "[]"


def test_build_model_picks_the_noop_model_or_the_pipeline(checkpoint):
    assert isinstance(build_model(ModelConfig(uri="noop"), SAMPLING, 2), NoopModel)
    loaded = build_model(ModelConfig(uri=checkpoint, device="cpu"), SAMPLING, 2)
    assert isinstance(loaded, PipelineModel) and (loaded.batch_shape, loaded.decode_batch) == (2, 2)


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
    rows = sample_rows(NoopModel(ModelConfig(uri="noop"), SAMPLING, 1), ["a", "b"], [1, 2])
    assert [row[0] for row in rows] == [[0] * NOOP_LATENT_PIXELS] * 2
    assert all((row[1] == 128).all() and row[2] is None for row in rows)


# ---------------------------------------------------------------------------------------------------------------
# one shape for every call


class ShapeLog:
    """Wraps the pipeline's transformer and decoder to record the batch of every call."""

    def __init__(self, pipe, monkeypatch):
        self.transformer, self.decoder = [], []
        forward, decode = pipe.transformer.forward, pipe.decode_tokens
        monkeypatch.setattr(pipe.transformer, "forward",
                            lambda sample, **kw: self.transformer.append(len(sample)) or forward(sample, **kw))
        monkeypatch.setattr(pipe, "decode_tokens",
                            lambda tokens, output_type: self.decoder.append(len(tokens)) or decode(tokens, output_type))


def test_every_model_call_has_the_batch_shape(model, monkeypatch):
    calls = ShapeLog(model.pipe, monkeypatch)
    tokens, pixels = model.sample(PROMPTS * 2, [1, 2, 3, 4, 5, 6])  # 6 rows at shape 4: calls of 4 + (2 + 2 filler)
    assert tokens.shape[0] == pixels.shape[0] == 6
    assert set(calls.transformer) == {2 * 4}  # guided: both halves in one forward
    assert calls.decoder == [4, 4]  # min(DECODE_BATCH, 4) images per decode


@pytest.mark.parametrize("split", [[1, 1, 1, 1, 1], [2, 3], [4, 1], [5]])
def test_tokens_and_pixels_do_not_depend_on_the_actor_batches(model, split):
    """The same five rows in actor batches of any sizes (padded to the shape 4): the same tokens and pixels."""
    prompts, seeds = ["a red circle", "a cat", "a blue square", "a red circle", "two dogs"], [9, 8, 7, 6, 5]
    whole_tokens, whole_pixels = model.sample(prompts, seeds)
    start = 0
    for size in split:
        tokens, pixels = model.sample(prompts[start:start + size], seeds[start:start + size])
        assert np.array_equal(tokens, whole_tokens[start:start + size])
        assert np.array_equal(pixels, whole_pixels[start:start + size])
        start += size


def test_a_row_sampled_at_another_shape_keeps_its_tokens_on_this_cpu(model):
    """Measured, not guaranteed (docs/reproducibility.md): on this CPU the transformer's rows do not depend on the
    batch shape; the decoder's pixels may, by a level, which is why decodes have one shape."""
    alone, _ = model.reshaped(1).sample(PROMPTS[:2], SEEDS[:2])
    shaped, _ = model.sample(PROMPTS[:2], SEEDS[:2])
    assert np.array_equal(alone, shaped)


@pytest.mark.parametrize("bad", [0, -2, 2.5, True])
def test_a_bad_batch_shape_is_named(model, bad):
    with pytest.raises(ValueError, match=f"batch_shape must be a positive number of images, got {bad!r}"):
        model.reshaped(bad)


def test_decodes_take_at_most_the_decode_batch(model):
    wide = model.reshaped(3 * DECODE_BATCH)
    assert (wide.batch_shape, wide.decode_batch) == (3 * DECODE_BATCH, DECODE_BATCH)


def test_the_batch_shape_is_in_the_fingerprint_and_read_back_for_reruns():
    def config(batch_size):
        return load_job_config(None, {"input.paths": "x", "model.uri": "noop", "output.uri": "o",
                                      "compute.batch_size": batch_size})

    parts = {size: generation_fingerprint(config(size)) for size in (4, 16, "auto")}
    assert parts[4].parts["shape"] == {"batch_size": 4, "decode_batch": 4}
    assert parts[16].parts["shape"] == {"batch_size": 16, "decode_batch": DECODE_BATCH}
    assert len({fingerprint.digest for fingerprint in parts.values()}) == 3
    version = {"fingerprint_parts": parts[16].parts, "batch_size": 16}
    assert recorded_batch_shape({"versions": [version]}) == 16
    auto = {"fingerprint_parts": parts["auto"].parts, "batch_size": 24}  # the size the run chose
    assert recorded_batch_shape({"versions": [version, auto]}) == 24
    assert recorded_batch_shape({"versions": [{"fingerprint_parts": {}}]}) is None  # written before the shape
