"""`truncation_target`: which prediction the truncation rate cuts, the guided one (diffusers) or the prompted one
before guidance, where guidance then only re-weights the classes the prompt makes likely."""

import math

import pytest
import torch

from vqbatch.config import SamplingConfig
from vqbatch.pipeline import VQDiffusionPipeline, guide_, truncate
from vqbatch.tiny import write_tiny_checkpoint


def log_probs(*rows) -> torch.Tensor:
    """(1, K, P) log-probabilities from P columns of K probabilities each."""
    return torch.tensor(rows, dtype=torch.float64).T.log().unsqueeze(0)


def test_guidance_renormalises_over_the_prompted_support():
    text, uncond = log_probs([0.6, 0.3, 0.1]), log_probs([0.2, 0.2, 0.6])  # K = 3, P = 1
    guided = guide_(uncond.clone(), text.clone(), 2.0, prompted_truncation_rate=0.8)
    # 0.6 + 0.3 reach 0.8, so class 2 is dropped; the others weigh p_text^2 / p_uncond: 1.8 and 0.45
    assert guided[0, :, 0].exp().tolist() == pytest.approx([0.8, 0.2, 0.0])
    assert guided[0, 2, 0] == -math.inf


def test_a_class_both_predictions_call_unlikely_is_not_lifted_into_a_speck():
    """The unconditional prediction calls class 2 far less likely than the prompted one does: guidance at scale 3
    multiplies it by (p_text / p_uncond)^2 = 1e8 and, truncated after guidance, it is all that is left."""
    text, uncond = log_probs([0.98, 0.01, 0.01]), log_probs([0.5, 0.49999, 0.00001])
    after = truncate(guide_(uncond.clone(), text.clone(), 3.0), 0.9)
    assert torch.isfinite(after[0, :, 0]).tolist() == [False, False, True]
    before = guide_(uncond.clone(), text.clone(), 3.0, prompted_truncation_rate=0.9)
    assert before[0, :, 0].exp().tolist() == pytest.approx([1.0, 0.0, 0.0])


def test_without_a_prompted_rate_guidance_keeps_every_class():
    text, uncond = log_probs([0.6, 0.3, 0.1], [0.5, 0.25, 0.25]), log_probs([0.2, 0.2, 0.6], [0.3, 0.3, 0.4])
    guided = guide_(uncond.clone(), text.clone(), 2.0)
    expected = (2 * text - uncond).softmax(dim=1)
    assert torch.allclose(guided.exp(), expected) and torch.isfinite(guided).all()


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return VQDiffusionPipeline.from_pretrained(write_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), seed=0))


def recorded_steps(pipe, monkeypatch, **call):
    """Each step's prompted and unconditional transformer outputs and the log p(x_0) the scheduler got."""
    outputs, steps = [], []
    forward, step = pipe.transformer.forward, pipe.scheduler.step

    def recording_forward(*args, **kwargs):
        result = forward(*args, **kwargs)
        outputs.append(result[0].clone())  # (2B, K, P): unconditional rows first
        return result

    def recording_step(log_p_x_0, *args, **kwargs):
        steps.append(log_p_x_0.clone())
        return step(log_p_x_0, *args, **kwargs)

    monkeypatch.setattr(pipe.transformer, "forward", recording_forward)
    monkeypatch.setattr(pipe.scheduler, "step", recording_step)
    tokens = pipe(["a red circle", "a cat"], generator=[torch.Generator().manual_seed(s) for s in (1, 2)],
                  output_type="latent", **call).tokens
    monkeypatch.undo()
    return outputs, steps, tokens


def test_the_pipeline_guides_within_the_prompted_truncation(pipe, monkeypatch):
    call = dict(num_inference_steps=5, guidance_scale=3.0, truncation_rate=0.5)
    outputs, steps, tokens = recorded_steps(pipe, monkeypatch, truncation_target="prompted", **call)
    assert len(outputs) == len(steps) == 5
    for both, log_p_x_0 in zip(outputs, steps):
        uncond, text = both.chunk(2)
        expected = guide_(uncond.clone(), text.clone(), 3.0, prompted_truncation_rate=0.5)
        kept = ~truncate(text, 0.5).isinf()
        assert torch.equal(torch.isfinite(expected), kept)
        assert torch.allclose(log_p_x_0[kept], expected[kept], atol=1e-5)
        assert (log_p_x_0[~kept] < -60).all()  # log 0, floored as every step's input is
    _, _, guided_tokens = recorded_steps(pipe, monkeypatch, **call)
    assert not torch.equal(tokens, guided_tokens)


def test_without_guidance_both_targets_give_the_same_tokens(pipe, monkeypatch):
    call = dict(num_inference_steps=4, guidance_scale=1.0, truncation_rate=0.7)
    _, _, prompted = recorded_steps(pipe, monkeypatch, truncation_target="prompted", **call)
    _, _, guided = recorded_steps(pipe, monkeypatch, truncation_target="guided", **call)
    assert torch.equal(prompted, guided)


def test_a_bad_target_is_named(pipe):
    with pytest.raises(ValueError, match="truncation_target must be one of 'guided', 'prompted'; got 'both'"):
        pipe("a cat", num_inference_steps=2, truncation_target="both")
    with pytest.raises(ValueError, match="truncation_target"):
        SamplingConfig(truncation_target="both")
    assert SamplingConfig().truncation_target == "guided"
