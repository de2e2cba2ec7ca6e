"""VQModel against diffusers' VQModel: same weights, same inputs, same numbers; checkpoints readable both ways."""

import copy
import inspect
import json

import diffusers
import pytest
import torch
from diffusers.models.autoencoders.vae import VectorQuantizer as DiffusersVectorQuantizer

from vqbatch.models.vq_model import VectorQuantizer, VQModel

ATOL = 1e-5

TINY = dict(block_out_channels=(32, 64), norm_num_groups=8, layers_per_block=1, latent_channels=4, vq_embed_dim=3,
            num_vq_embeddings=16)
PLAIN_BLOCKS = dict(down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                    up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"))
ATTENTION_BLOCKS = dict(down_block_types=("DownEncoderBlock2D", "AttnDownEncoderBlock2D"),
                        up_block_types=("AttnUpDecoderBlock2D", "UpDecoderBlock2D"))

VARIANTS = {
    "attention-group": dict(**ATTENTION_BLOCKS),
    "attention-spatial-lookup": dict(down_block_types=("AttnDownEncoderBlock2D", "DownEncoderBlock2D"),
                                     up_block_types=("UpDecoderBlock2D", "AttnUpDecoderBlock2D"),
                                     norm_type="spatial", vq_embed_dim=None, lookup_from_codebook=True),
    "plain-group-no-mid-attention-lookup": dict(**PLAIN_BLOCKS, mid_block_add_attention=False,
                                                lookup_from_codebook=True),
    "plain-spatial-no-mid-attention": dict(**PLAIN_BLOCKS, norm_type="spatial", vq_embed_dim=None,
                                           mid_block_add_attention=False, act_fn="gelu"),
}

# The VQ-VAE of microsoft/vq-diffusion-ithq: Taming's PatchVQGAN with ch 64, ch_mult (1, 2, 4, 8), attention at the
# 32x32 level, 4096 codes of dim 128 (VQ-Diffusion's OUTPUT/pretrained_model/taming_dvae/config.yaml).
ITHQ_CONFIG = {
    "_class_name": "VQModel", "_diffusers_version": "0.11.0.dev0", "act_fn": "silu",
    "block_out_channels": [64, 128, 256, 512],
    "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D", "AttnDownEncoderBlock2D"],
    "up_block_types": ["AttnUpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"],
    "in_channels": 3, "latent_channels": 256, "layers_per_block": 2, "norm_num_groups": 32,
    "num_vq_embeddings": 4096, "out_channels": 3, "sample_size": 32, "vq_embed_dim": 128,
}
# The three-level variant without attention the task brief quoted; built as well so both layouts are covered.
THREE_LEVEL_CONFIG = {**ITHQ_CONFIG, "block_out_channels": [128, 256, 512],
                      "down_block_types": ["DownEncoderBlock2D"] * 3, "up_block_types": ["UpDecoderBlock2D"] * 3}


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Non-trivial weights everywhere (diffusers starts norms at 1/0 and the codebook near 0)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.1 * torch.randn(parameter.shape, generator=generator))
        model.quantize.embedding.weight.copy_(torch.randn(model.quantize.embedding.weight.shape, generator=generator))


def twin_models(**overrides):
    """A diffusers VQModel with random weights and ours holding the same state dict (strict load)."""
    config = {**TINY, **overrides}
    torch.manual_seed(0)
    reference = diffusers.VQModel(**config).eval()
    randomize(reference, seed=1)
    ours = VQModel(**config).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    return reference, ours


def images(batch=2, size=16, seed=2):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def assert_close(actual, expected, atol=ATOL):
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    torch.testing.assert_close(actual, expected, atol=atol, rtol=0)


def assert_same_weights(ours: torch.nn.Module, reference: torch.nn.Module):
    expected = reference.state_dict()
    actual = ours.state_dict()
    assert sorted(actual) == sorted(expected)
    for key, value in expected.items():
        assert actual[key].dtype == value.dtype, key
        assert torch.equal(actual[key], value), key


# ---------------------------------------------------------------- numerical parity


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_encode_quantize_decode_forward_match_diffusers(variant):
    reference, ours = twin_models(**VARIANTS[variant])
    x = images()
    with torch.no_grad():
        latents = ours.encode(x).latents
        assert_close(latents, reference.encode(x).latents)

        quant, loss, indices = ours.quantize(latents)
        ref_quant, ref_loss, (_, _, ref_indices) = reference.quantize(latents)
        B, _, h, w = latents.shape
        assert indices.shape == (B, h * w)
        assert torch.equal(indices.flatten(), ref_indices.flatten())
        assert_close(quant, ref_quant)
        assert_close(loss, ref_loss)

        decoded, ref_decoded = ours.decode(latents), reference.decode(latents)
        assert_close(decoded.sample, ref_decoded.sample)
        assert_close(decoded.commit_loss, ref_decoded.commit_loss)

        sample, commit_loss = ours(x, return_dict=False)
        ref_sample, ref_commit_loss = reference(x, return_dict=False)
        assert_close(sample, ref_sample)
        assert_close(commit_loss, ref_commit_loss)
        assert sample.shape == x.shape


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_decode_without_quantizing_matches_diffusers(variant):
    """force_not_quantize: latents pass as they are, or (lookup_from_codebook) token indices are looked up."""
    reference, ours = twin_models(**VARIANTS[variant])
    with torch.no_grad():
        latents = reference.encode(images()).latents
        B, D, h, w = latents.shape
        if ours.config.lookup_from_codebook:
            tokens = torch.randint(0, TINY["num_vq_embeddings"], (B, h * w), generator=torch.Generator().manual_seed(3))
            inputs, shape = tokens, (B, h, w, D)
        else:
            inputs, shape = latents, None
        sample, commit_loss = ours.decode(inputs, force_not_quantize=True, shape=shape, return_dict=False)
        ref_sample, ref_commit_loss = reference.decode(inputs, force_not_quantize=True, shape=shape, return_dict=False)
    assert_close(sample, ref_sample)
    assert torch.equal(commit_loss, ref_commit_loss) and commit_loss.dtype == inputs.dtype


def test_get_codebook_entry_matches_diffusers_and_decodes_tokens_like_the_pipeline():
    reference, ours = twin_models(**ATTENTION_BLOCKS)
    B, h, w, D = 2, 4, 4, TINY["vq_embed_dim"]
    tokens = torch.randint(0, TINY["num_vq_embeddings"], (B, h * w), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        entries = ours.quantize.get_codebook_entry(tokens, shape=(B, h, w, D))
        assert entries.shape == (B, D, h, w)
        assert torch.equal(entries, reference.quantize.get_codebook_entry(tokens, shape=(B, h, w, D)))
        assert torch.equal(ours.quantize.get_codebook_entry(tokens, shape=None),
                           reference.quantize.get_codebook_entry(tokens, shape=None))
        # VQDiffusionPipeline: tokens (B, h*w) -> codebook entries (B, D, h, w) -> decode without quantizing
        image = ours.decode(entries, force_not_quantize=True).sample
        assert_close(image, reference.decode(entries, force_not_quantize=True).sample)
        assert image.shape == (B, 3, 2 * h, 2 * w)  # two levels: one upsampling


def test_quantizing_the_codebook_entries_gives_back_their_tokens():
    _, ours = twin_models(**PLAIN_BLOCKS)
    tokens = torch.randperm(TINY["num_vq_embeddings"], generator=torch.Generator().manual_seed(5)).reshape(1, 16)
    entries = ours.quantize.get_codebook_entry(tokens, shape=(1, 4, 4, TINY["vq_embed_dim"]))
    assert torch.equal(ours.quantize(entries).indices, tokens)


@pytest.mark.parametrize("legacy", [True, False])
def test_quantizer_loss_and_gradients_match_diffusers(legacy):
    """Loss value and straight-through / codebook / commitment gradients, both beta placements."""
    torch.manual_seed(6)
    reference = DiffusersVectorQuantizer(16, 3, beta=0.25, legacy=legacy)
    ours = VectorQuantizer(16, 3, beta=0.25, legacy=legacy)
    ours.load_state_dict(reference.state_dict(), strict=True)
    z = torch.randn(2, 3, 4, 4)
    results = []
    for quantizer in (ours, reference):
        z_leaf = z.clone().requires_grad_(True)
        quant, loss, _ = quantizer(z_leaf)
        (loss + quant.square().sum()).backward()
        results.append((loss.detach(), z_leaf.grad, quantizer.embedding.weight.grad))
    for actual, expected in zip(*results):
        assert_close(actual, expected, atol=1e-6)


def test_vq_model_quantizer_uses_diffusers_loss_weighting():
    _, ours = twin_models(**PLAIN_BLOCKS)
    assert ours.quantize.beta == 0.25 and ours.quantize.legacy is True


# ---------------------------------------------------------------- checkpoints


def test_reads_diffusers_checkpoints(tmp_path):
    reference, _ = twin_models(**ATTENTION_BLOCKS, norm_type="spatial", vq_embed_dim=None)
    reference.save_pretrained(tmp_path / "safetensors")
    reference.save_pretrained(tmp_path / "bin", safe_serialization=False)
    copy.deepcopy(reference).half().save_pretrained(tmp_path / "fp16", variant="fp16")
    for folder in ("safetensors", "bin"):
        loaded = VQModel.from_pretrained(tmp_path / folder)
        assert loaded.config.norm_type == "spatial" and loaded.config.block_out_channels == (32, 64)
        assert_same_weights(loaded, reference)
        with torch.no_grad():
            assert_close(loaded(images()).sample, reference(images()).sample)
    half = VQModel.from_pretrained(tmp_path / "fp16", variant="fp16")
    assert half.dtype == torch.float16
    assert_same_weights(half, diffusers.VQModel.from_pretrained(tmp_path / "fp16", variant="fp16",
                                                                torch_dtype=torch.float16))
    assert VQModel.from_pretrained(tmp_path / "fp16", variant="fp16", torch_dtype=torch.float32).dtype == torch.float32


def test_diffusers_reads_our_checkpoints(tmp_path):
    _, ours = twin_models(**ATTENTION_BLOCKS, lookup_from_codebook=True)
    ours.save_pretrained(tmp_path / "safetensors")
    ours.save_pretrained(tmp_path / "bin", safe_serialization=False)
    half_ours = copy.deepcopy(ours).to(torch.float16)
    half_ours.save_pretrained(tmp_path / "fp16", variant="fp16")
    for folder in ("safetensors", "bin"):
        loaded = diffusers.VQModel.from_pretrained(tmp_path / folder).eval()
        assert loaded.config.lookup_from_codebook is True and tuple(loaded.config.block_out_channels) == (32, 64)
        assert_same_weights(ours, loaded)
        with torch.no_grad():
            assert_close(ours(images()).sample, loaded(images()).sample)
    half = diffusers.VQModel.from_pretrained(tmp_path / "fp16", variant="fp16", torch_dtype=torch.float16)
    assert_same_weights(half_ours, half)
    config = json.loads((tmp_path / "safetensors" / "config.json").read_text())
    assert config["_class_name"] == "VQModel"


def test_reads_checkpoints_with_pre_0_14_attention_names(tmp_path):
    """The ITHQ conversion wrote query/key/value/proj_attn; diffusers renames them on load, and so must we."""
    reference, _ = twin_models(**ATTENTION_BLOCKS)
    renames = {".to_q.": ".query.", ".to_k.": ".key.", ".to_v.": ".value.", ".to_out.0.": ".proj_attn."}
    legacy_state = {}
    for key, value in reference.state_dict().items():
        for new, old in renames.items():
            key = key.replace(new, old)
        legacy_state[key] = value
    assert "encoder.mid_block.attentions.0.query.weight" in legacy_state
    assert "decoder.up_blocks.0.attentions.1.proj_attn.bias" in legacy_state
    reference.save_config(tmp_path)
    torch.save(legacy_state, tmp_path / "diffusion_pytorch_model.bin")
    loaded = VQModel.from_pretrained(tmp_path)
    assert_same_weights(loaded, diffusers.VQModel.from_pretrained(tmp_path))
    assert_same_weights(loaded, reference)


def test_strict_loading_names_missing_unexpected_and_misshaped_keys(tmp_path):
    from safetensors.torch import load_file, save_file

    _, ours = twin_models(**PLAIN_BLOCKS)
    ours.save_pretrained(tmp_path)
    path = tmp_path / "diffusion_pytorch_model.safetensors"
    state = load_file(path)
    del state["decoder.conv_out.bias"]
    state["encoder.extra.weight"] = torch.zeros(1)
    state["quantize.embedding.weight"] = torch.zeros(17, 3)
    save_file(state, path)
    with pytest.raises(ValueError) as error:
        VQModel.from_pretrained(tmp_path)
    message = str(error.value)
    for key in ("decoder.conv_out.bias", "encoder.extra.weight", "quantize.embedding.weight: file (17, 3)"):
        assert key in message


@pytest.mark.parametrize("config", [ITHQ_CONFIG, THREE_LEVEL_CONFIG], ids=["ithq", "three-level"])
def test_ithq_size_model_has_diffusers_parameter_names_and_shapes(config, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(config))
    with torch.device("meta"):
        ours = VQModel.from_config(VQModel.load_config(tmp_path))
        reference = diffusers.VQModel.from_config(diffusers.VQModel.load_config(tmp_path))
    shapes = {key: tuple(value.shape) for key, value in ours.state_dict().items()}
    assert shapes == {key: tuple(value.shape) for key, value in reference.state_dict().items()}
    assert shapes["quantize.embedding.weight"] == (4096, 128)
    assert ours.config.scaling_factor == 0.18215 and ours.config.norm_type == "group"


# ---------------------------------------------------------------- precision and config


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_forward_and_token_decoding_are_finite(dtype):
    reference, ours = twin_models(**ATTENTION_BLOCKS)
    ours.to(dtype)
    tokens = torch.randint(0, TINY["num_vq_embeddings"], (2, 16), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        sample = ours(images().to(dtype)).sample
        image = ours.decode(ours.quantize.get_codebook_entry(tokens, (2, 4, 4, 3)), force_not_quantize=True).sample
        expected = reference.decode(reference.quantize.get_codebook_entry(tokens, (2, 4, 4, 3)),
                                    force_not_quantize=True).sample
    assert sample.dtype == dtype and torch.isfinite(sample).all()
    assert image.dtype == dtype and torch.isfinite(image).all()
    # decoding fixed tokens has no discrete step, so half precision stays near float32
    assert (image.float() - expected).abs().max() < 0.05 * expected.abs().max()


def test_constructor_defaults_match_diffusers():
    ours = inspect.signature(VQModel.__init__).parameters
    theirs = inspect.signature(diffusers.VQModel.__init__).parameters
    assert list(ours) == list(theirs)
    assert {k: p.default for k, p in ours.items()} == {k: p.default for k, p in theirs.items()}
    assert VQModel().config.to_dict() == {k: list(v) if isinstance(v, tuple) else v
                                          for k, v in diffusers.VQModel().config.items() if not k.startswith("_")}


@pytest.mark.parametrize("key, value", [
    ("act_fn", "tanh"),
    ("norm_type", "batch"),
    ("down_block_types", ("CrossAttnDownBlock2D", "DownEncoderBlock2D")),
    ("up_block_types", ("UpDecoderBlock2D", "UpBlock2D")),
    ("block_out_channels", (32, 64, 128)),
    ("norm_num_groups", 6),
    ("latent_channels", 0),
    ("num_vq_embeddings", "many"),
])
def test_invalid_config_values_raise_value_error_naming_the_key(key, value):
    settings = {**TINY, **PLAIN_BLOCKS, key: value}
    for build in (lambda: VQModel(**settings), lambda: VQModel.from_config(settings)):
        with pytest.raises(ValueError, match=key):
            build()


def test_decoding_indices_without_a_shape_is_an_error():
    _, ours = twin_models(**PLAIN_BLOCKS, lookup_from_codebook=True)
    with pytest.raises(ValueError, match="shape"):
        ours.decode(torch.zeros(1, 16, dtype=torch.long), force_not_quantize=True)


def test_spatial_norm_requires_latent_sized_codebook_vectors():
    with pytest.raises(ValueError, match="norm_type.*vq_embed_dim"):
        VQModel(**{**TINY, **PLAIN_BLOCKS, "norm_type": "spatial", "vq_embed_dim": 3})


def test_unknown_config_key_is_rejected():
    with pytest.raises(ValueError, match="unknown key 'double_z'"):
        VQModel.from_config({**TINY, "double_z": True})


# ---------------------------------------------------------------- seeded construction and output types


@pytest.mark.parametrize("variant", [PLAIN_BLOCKS, *VARIANTS.values(), dict(layers_per_block=2, **ATTENTION_BLOCKS)],
                         ids=["plain", *VARIANTS, "two-layers-attention"])
def test_seeded_construction_gives_diffusers_weights(variant):
    config = {**TINY, **variant}
    torch.manual_seed(11)
    reference = diffusers.VQModel(**config)
    torch.manual_seed(11)
    ours = VQModel(**config)
    # the same names in the same order, so `parameters()` of the two models pair up as well
    assert list(ours.state_dict()) == list(reference.state_dict())
    for (name, tensor), expected in zip(ours.named_parameters(), reference.parameters()):
        assert torch.equal(tensor, expected), name


def test_output_types_index_like_diffusers():
    ours = VQModel(**TINY, **PLAIN_BLOCKS).eval()
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        encoded, decoded = ours.encode(x), ours(x)
    assert encoded[0] is encoded.latents is encoded["latents"] and encoded.to_tuple() == (encoded.latents,)
    assert list(encoded.keys()) == ["latents"] and len(encoded) == 1
    assert decoded[0] is decoded.sample and decoded[1] is decoded.commit_loss
    assert list(decoded.keys()) == ["sample", "commit_loss"] and decoded.to_tuple()[:1] == (decoded.sample,)
    assert decoded[:1] == (decoded.sample,) and "sample" in decoded and "latents" not in decoded and 0 not in decoded
    with pytest.raises(KeyError, match="latents"):
        decoded["latents"]
