"""VQDiffusionTransformer and LearnedClassifierFreeSamplingEmbeddings against diffusers on the same weights."""

import pytest
import torch
from diffusers import Transformer2DModel
from diffusers.pipelines.deprecated.vq_diffusion.pipeline_vq_diffusion import (
    LearnedClassifierFreeSamplingEmbeddings as ReferenceEmbeddings,
)

from vqbatch.models.embeddings import LearnedClassifierFreeSamplingEmbeddings
from vqbatch.models.transformer import TextCache, VQDiffusionTransformer

# diffusers' own deprecation notes: on the "layer_norm" it writes into its config, and on its output class
pytestmark = pytest.mark.filterwarnings("ignore:.*(norm_type|Transformer2DModelOutput).*:FutureWarning")

TINY = dict(num_attention_heads=2, attention_head_dim=8, num_layers=2, cross_attention_dim=16, sample_size=4,
            num_vector_embeds=17, num_embeds_ada_norm=10, activation_fn="geglu-approximate", attention_bias=True)
ITHQ = {"_class_name": "Transformer2DModel", "_diffusers_version": "0.10.0.dev0", "activation_fn": "geglu-approximate",
        "attention_bias": True, "attention_head_dim": 88, "cross_attention_dim": 512, "dropout": 0.0,
        "in_channels": None, "norm_num_groups": 32, "num_attention_heads": 16, "num_embeds_ada_norm": 100,
        "num_layers": 36, "num_vector_embeds": 4097, "sample_size": 32}
TEXT_LEN = 5


def randomized(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter drawn at random (norm weights included), so no term of the forward hides behind 0 or 1."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    return model.eval()


def reference_model(**overrides) -> Transformer2DModel:
    return randomized(Transformer2DModel(**{**TINY, **overrides}))


def our_copy(reference: Transformer2DModel) -> VQDiffusionTransformer:
    ours = VQDiffusionTransformer.from_config(dict(reference.config))
    ours.load_state_dict(reference.state_dict(), strict=True)
    return ours.eval()


def inputs(config: dict, batch: int = 3, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, config["num_vector_embeds"], (batch, config["sample_size"] ** 2), generator=generator)
    text = torch.randn(batch, TEXT_LEN, config["cross_attention_dim"], generator=generator)
    return tokens, text


def reference_log_probs(reference: Transformer2DModel, tokens, text, timestep: int) -> torch.Tensor:
    with torch.no_grad():
        return reference(tokens, encoder_hidden_states=text, timestep=torch.tensor(timestep)).sample


# ---------------------------------------------------------------- numerical parity


@pytest.mark.parametrize("overrides", [
    dict(activation_fn="geglu", attention_bias=True, sample_size=3),
    dict(activation_fn="geglu-approximate", attention_bias=False, sample_size=5),
    dict(activation_fn="geglu", attention_bias=False, sample_size=4, norm_elementwise_affine=False, norm_eps=1e-3),
])
def test_log_probs_match_diffusers(overrides):
    reference = reference_model(**overrides)
    ours = our_copy(reference)
    tokens, text = inputs({**TINY, **overrides})
    for timestep in (0, 4, TINY["num_embeds_ada_norm"] - 1):
        expected = reference_log_probs(reference, tokens, text, timestep)
        with torch.no_grad():
            got = ours(tokens, text, timestep).sample
        assert got.shape == (3, TINY["num_vector_embeds"] - 1, overrides["sample_size"] ** 2)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_per_sample_timesteps_match_one_call_per_step():
    reference = reference_model()
    ours = our_copy(reference)
    tokens, text = inputs(TINY)
    steps = torch.tensor([7, 0, 3])
    with torch.no_grad():
        got = ours(tokens, text, steps).sample
    for i, step in enumerate(steps.tolist()):
        expected = reference_log_probs(reference, tokens[i:i + 1], text[i:i + 1], step)
        torch.testing.assert_close(got[i:i + 1], expected, atol=1e-5, rtol=0)


def test_text_cache_equals_no_cache():
    ours = our_copy(reference_model())
    tokens, text = inputs(TINY)
    with torch.no_grad():
        cache = ours.precompute_text(text)
        assert isinstance(cache, TextCache) and cache.batch_size == 3 and len(cache.keys_values) == TINY["num_layers"]
        for timestep in (0, 9):
            cached = ours(tokens, None, timestep, text_cache=cache).sample
            torch.testing.assert_close(cached, ours(tokens, text, timestep).sample, atol=1e-6, rtol=0)


def test_float32_log_softmax_stays_close_and_keeps_the_argmax():
    ours = our_copy(reference_model())
    tokens, text = inputs(TINY)
    with torch.no_grad():
        exact = ours(tokens, text, 5).sample
        fast = ours(tokens, text, 5, log_softmax_dtype=torch.float32).sample
    torch.testing.assert_close(fast, exact, atol=1e-5, rtol=0)
    assert torch.equal(fast.argmax(dim=1), exact.argmax(dim=1))


# ---------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("safe_serialization, variant, dtype", [
    (True, None, torch.float32), (False, None, torch.float32), (True, "fp16", torch.float16)])
def test_diffusers_checkpoint_loads_into_ours(tmp_path, safe_serialization, variant, dtype):
    reference = reference_model().to(dtype)
    reference.save_pretrained(tmp_path, safe_serialization=safe_serialization, variant=variant)
    ours = VQDiffusionTransformer.from_pretrained(tmp_path, variant=variant, torch_dtype=dtype)
    assert ours.dtype == dtype and not ours.training
    for name, tensor in reference.state_dict().items():
        assert torch.equal(ours.state_dict()[name], tensor), name
    assert ours.config.to_dict().items() >= {k: v for k, v in TINY.items()}.items()


@pytest.mark.parametrize("safe_serialization, variant, dtype", [
    (True, None, torch.float32), (False, None, torch.float32), (True, "fp16", torch.float16)])
def test_our_checkpoint_loads_into_diffusers(tmp_path, safe_serialization, variant, dtype):
    ours = our_copy(reference_model()).to(dtype)
    ours.save_pretrained(tmp_path, variant=variant, safe_serialization=safe_serialization)
    reference = Transformer2DModel.from_pretrained(tmp_path, variant=variant, torch_dtype=dtype)
    for name, tensor in ours.state_dict().items():
        assert torch.equal(reference.state_dict()[name], tensor), name
    if dtype == torch.float32:
        tokens, text = inputs(TINY)
        with torch.no_grad():
            torch.testing.assert_close(ours(tokens, text, 2).sample, reference_log_probs(reference, tokens, text, 2),
                                       atol=1e-5, rtol=0)


def test_ithq_config_is_accepted_and_written_back_for_diffusers(tmp_path):
    config = VQDiffusionTransformer.config_class.from_dict(ITHQ)
    assert (config.inner_dim, config.norm_type, config.num_layers) == (1408, "ada_norm", 36)
    with torch.device("meta"):
        model = VQDiffusionTransformer.from_config(config)
    assert (model.height, model.width, model.num_latent_pixels, model.num_vector_embeds) == (32, 32, 1024, 4097)
    model.save_config(tmp_path)
    reread = Transformer2DModel.load_config(tmp_path)
    assert {k: reread[k] for k in ITHQ if not k.startswith("_")} == {k: v for k, v in ITHQ.items()
                                                                    if not k.startswith("_")}


def test_ithq_architecture_has_the_same_parameters_as_diffusers():
    settings = {k: v for k, v in ITHQ.items() if not k.startswith("_")}
    with torch.device("meta"):
        reference = Transformer2DModel(**settings)
        ours = VQDiffusionTransformer(**settings)
    shapes = {name: tuple(tensor.shape) for name, tensor in ours.state_dict().items()}
    assert shapes == {name: tuple(tensor.shape) for name, tensor in reference.state_dict().items()}
    assert shapes["transformer_blocks.35.ff.net.0.proj.weight"] == (4 * 1408, 1408)
    assert shapes["out.weight"] == (4096, 1408)


@pytest.mark.parametrize("key, value", [
    ("in_channels", 4), ("patch_size", 2), ("out_channels", 4), ("norm_type", "ada_norm_zero"),
    ("activation_fn", "gelu"), ("only_cross_attention", True), ("double_self_attention", True),
    ("attention_type", "gated"), ("caption_channels", 8), ("use_linear_projection", True),
    ("num_vector_embeds", 1), ("num_embeds_ada_norm", None), ("dropout", 1.5), ("not_a_key", 3)])
def test_invalid_config_values_are_rejected_by_name(key, value):
    with pytest.raises(ValueError, match=key) as error:
        VQDiffusionTransformer(**{**TINY, key: value})
    assert repr(value) in str(error.value)


@pytest.mark.parametrize("missing", ["sample_size", "num_vector_embeds", "cross_attention_dim"])
def test_discrete_mode_keys_are_required(missing):
    with pytest.raises(ValueError, match=missing):
        VQDiffusionTransformer(**{k: v for k, v in TINY.items() if k != missing})


# ---------------------------------------------------------------- inputs, precision, training


def test_invalid_inputs_are_rejected():
    ours = our_copy(reference_model())
    tokens, text = inputs(TINY)
    cases = [
        (dict(hidden_states=tokens.float(), encoder_hidden_states=text, timestep=1), "integer token ids"),
        (dict(hidden_states=tokens[:, :-1], encoder_hidden_states=text, timestep=1), r"\(batch, 16\)"),
        (dict(hidden_states=tokens, encoder_hidden_states=text[:2], timestep=1), "must match the token batch"),
        (dict(hidden_states=tokens, encoder_hidden_states=text[..., :8], timestep=1), "text_len, 16"),
        (dict(hidden_states=tokens, timestep=1), "neither"),
        (dict(hidden_states=tokens, encoder_hidden_states=text, text_cache=ours.precompute_text(text), timestep=1),
         "both"),
        (dict(hidden_states=tokens, encoder_hidden_states=text, timestep=10), r"\[0, 10\)"),
        (dict(hidden_states=tokens, encoder_hidden_states=text, timestep=torch.tensor([1, 2])), r"shape \(3,\)"),
        (dict(hidden_states=tokens, encoder_hidden_states=text, timestep=None), "timestep"),
        (dict(hidden_states=tokens, encoder_hidden_states=text, timestep=1, log_softmax_dtype=torch.float16),
         "log_softmax_dtype"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            ours(**kwargs)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_forward_is_finite_and_close(dtype):
    full = our_copy(reference_model())
    half = our_copy(reference_model()).to(dtype)
    tokens, text = inputs(TINY)
    with torch.no_grad():
        got = half(tokens, text, 3).sample  # float32 text into a half model: cast on the way in
        cached = half(tokens, None, 3, text_cache=half.precompute_text(text)).sample
        expected = full(tokens, text, 3).sample
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    assert torch.equal(got, cached)
    probabilities_error = (got.exp() - expected.exp()).abs().max().item()
    assert probabilities_error < 0.1, probabilities_error


def test_training_forward_backward_and_dropout():
    ours = VQDiffusionTransformer(**{**TINY, "dropout": 0.3}).train()
    tokens, text = inputs(TINY)
    text.requires_grad_(True)
    steps = torch.tensor([0, 5, 9])
    first = ours(tokens, text, steps).sample
    second = ours(tokens, text, steps).sample
    assert not torch.equal(first, second)  # dropout is live in training mode
    loss = -first.logsumexp(dim=1).mean() + first.mean()
    loss.backward()
    assert text.grad is not None and text.grad.abs().sum() > 0
    without_grad = [name for name, parameter in ours.named_parameters() if parameter.grad is None]
    assert without_grad == []
    ours.eval()
    with torch.no_grad():
        assert torch.equal(ours(tokens, text, steps).sample, ours(tokens, text, steps).sample)


# ---------------------------------------------------------------- learned classifier-free embeddings


def test_learned_embeddings_round_trip_with_diffusers(tmp_path):
    reference = randomized(ReferenceEmbeddings(learnable=True, hidden_size=16, length=7))
    reference.save_pretrained(tmp_path / "theirs")
    ours = LearnedClassifierFreeSamplingEmbeddings.from_pretrained(tmp_path / "theirs")
    assert ours.learnable and torch.equal(ours.embeddings, reference.embeddings)
    ours.save_pretrained(tmp_path / "ours", safe_serialization=False)
    back = ReferenceEmbeddings.from_pretrained(tmp_path / "ours")
    assert back.config.learnable and torch.equal(back.embeddings, reference.embeddings)


def test_learned_embeddings_start_at_zero_like_the_reference():
    ours = LearnedClassifierFreeSamplingEmbeddings(learnable=True, hidden_size=512, length=77)
    reference = ReferenceEmbeddings(learnable=True, hidden_size=512, length=77)
    assert ours.embeddings.shape == (77, 512) and torch.equal(ours.embeddings, reference.embeddings)


def test_not_learnable_embeddings_round_trip_with_diffusers(tmp_path):
    ReferenceEmbeddings(learnable=False).save_pretrained(tmp_path / "theirs")
    ours = LearnedClassifierFreeSamplingEmbeddings.from_pretrained(tmp_path / "theirs")
    assert not ours.learnable and ours.embeddings is None
    ours.save_pretrained(tmp_path / "ours")
    back = ReferenceEmbeddings.from_pretrained(tmp_path / "ours")
    assert not back.config.learnable and back.embeddings.numel() == 0


@pytest.mark.parametrize("settings, key", [
    (dict(learnable=True, hidden_size=16), "length"), (dict(learnable=True, length=4), "hidden_size"),
    (dict(learnable=True, hidden_size=0, length=4), "hidden_size"), (dict(learnable="maybe"), "learnable")])
def test_learned_embeddings_invalid_config(settings, key):
    with pytest.raises(ValueError, match=key):
        LearnedClassifierFreeSamplingEmbeddings.from_config(settings)


def test_forward_returns_sample_or_a_tuple_like_diffusers():
    reference = reference_model()
    ours = our_copy(reference)
    tokens, text = inputs(TINY)
    with torch.no_grad():
        output = ours(tokens, encoder_hidden_states=text, timestep=4)
        (as_tuple,) = ours(tokens, encoder_hidden_states=text, timestep=4, return_dict=False)
        expected = reference(tokens, encoder_hidden_states=text, timestep=torch.tensor(4), return_dict=False)
    assert isinstance(expected, tuple) and len(expected) == 1
    torch.testing.assert_close(output.sample, expected[0], atol=1e-5, rtol=0)
    assert output[0] is output["sample"] is output.sample and list(output.keys()) == ["sample"]
    assert torch.equal(as_tuple, output.sample)
