"""`VQDiffusionPipeline.compile_transformer`: the compiled forward against the eager one on the tiny model (CPU).

One compilation (about a minute on a busy 2-core CPU) serves every check here.
"""

import pytest
import torch

from vqbatch.pipeline import VQDiffusionPipeline
from vqbatch.tiny import tiny_pipeline

PROMPTS = ["a small red circle at the top left", "a large blue square in the center"]
CALL = dict(num_inference_steps=4, guidance_scale=3.0, truncation_rate=0.9, output_type="latent")


def tokens_of(pipe: VQDiffusionPipeline) -> torch.Tensor:
    return pipe(PROMPTS, generator=torch.Generator().manual_seed(7), **CALL).tokens


@pytest.fixture(scope="module")
def eager_and_compiled():
    return tiny_pipeline(seed=0), tiny_pipeline(seed=0).compile_transformer("default")


def test_compiled_forward_matches_the_eager_one(eager_and_compiled):
    eager, compiled = eager_and_compiled
    tokens = torch.full((4, eager.transformer.num_latent_pixels), eager.transformer.num_vector_embeds - 1)
    tokens[:, ::3] = torch.arange(4)[:, None]  # some pixels unmasked, different per row
    with torch.no_grad():
        text = eager.text_conditions(PROMPTS, 1, guided=True)
        for t in (0, 5):
            expected = eager.transformer(tokens, timestep=torch.tensor(t), text_cache=text).sample
            got = compiled.transformer(tokens, timestep=torch.tensor(t), text_cache=text).sample
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_compiled_pipeline_samples_the_eager_tokens(eager_and_compiled):
    eager, compiled = eager_and_compiled
    assert torch.equal(tokens_of(compiled), tokens_of(eager))
    assert compiled.cuda_graphs is False and eager.cuda_graphs is False


def test_the_compiled_transformer_keeps_its_weights_and_state_dict(eager_and_compiled):
    eager, compiled = eager_and_compiled
    assert isinstance(compiled.transformer, type(eager.transformer))
    assert compiled.transformer.state_dict().keys() == eager.transformer.state_dict().keys()


def test_unknown_compile_mode_is_named():
    with pytest.raises(ValueError, match="compile mode must be one of 'default'.*got 'fastest'"):
        tiny_pipeline().compile_transformer("fastest")


def test_config_modes_are_the_pipeline_modes():
    from typing import get_args

    from vqbatch.config import ModelConfig
    from vqbatch.choices import COMPILE_MODES

    literal, _ = get_args(ModelConfig.model_fields["compile"].annotation)
    assert get_args(literal) == COMPILE_MODES


@pytest.mark.filterwarnings("ignore::FutureWarning")  # diffusers' deprecation notes on the reference
def test_model_benchmark_times_the_compiled_pipeline_beside_the_others(tmp_path):
    import json

    from benchmarks.run import main

    main(["model", "--config", "tiny", "--steps", "2", "--batch-sizes", "2", "--compile", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "model-tiny-compiled.json").read_text())
    row = result["rows"][0]
    assert row["compiled_images_per_s"] > 0 and row["compiled_warmup_s"] > 0
    assert row["compiled_speedup"] == pytest.approx(row["compiled_images_per_s"] / row["reference_images_per_s"])
    assert row["compiled_same_tokens"] is True and row["same_tokens"] is True
    assert result["summary"]["compiled_all_same_tokens"] is True
    assert "| compiled_images_per_s |" in (tmp_path / "model-tiny-compiled.md").read_text()
