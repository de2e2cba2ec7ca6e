"""The two pipelines under test: diffusers' reference with random weights, and vqbatch's on a copy of its weights.

Model sizes (`SIZES`):
    tiny   a few-second model with a 10-step chain, for the smoke test;
    small  the profile config of issue 7: 8-layer 512-wide transformer, 16x16 latents, 1024 codebook classes + mask;
    ithq   the architecture of microsoft/vq-diffusion-ithq: 36-layer 1408-wide transformer (1.36 B parameters),
           32x32 latents, 4096 classes + mask, CLIP ViT-B/32 text encoder, the f8 VQ-VAE of the ITHQ release.
The CLIP tokenizer is vqbatch's offline tiny one (a few hundred BPE tokens) in every size: the vocabulary only sets
the size of the text encoder's embedding table, not the work per token.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from vqbatch.io.examples import FREE_FORM_PROMPTS
from vqbatch.models.embeddings import LearnedClassifierFreeSamplingEmbeddings
from vqbatch.models.transformer import VQDiffusionTransformer
from vqbatch.models.vq_model import VQModel
from vqbatch.pipeline import VQDiffusionPipeline
from vqbatch.schedulers.vq_diffusion import VQDiffusionScheduler
from vqbatch.tiny import MAX_PROMPT_TOKENS, tiny_tokenizer

ITHQ_TIMESTEPS = 100  # the ITHQ diffusion chain length


@dataclass(frozen=True)
class ModelSize:
    name: str
    transformer: dict  # Transformer2DModel keywords
    vqvae: dict  # VQModel keywords
    text_encoder: dict = field(default_factory=dict)  # CLIPTextConfig keywords (vocabulary and special ids added)

    @property
    def num_classes(self) -> int:  # codebook classes + [MASK]
        return self.transformer["num_vector_embeds"]

    @property
    def latent_side(self) -> int:
        return self.transformer["sample_size"]

    @property
    def num_train_timesteps(self) -> int:  # the diffusion chain's length
        return self.transformer["num_embeds_ada_norm"]


def transformer_config(*, heads: int, head_dim: int, layers: int, latent_side: int, codebook: int,
                       text_width: int, timesteps: int = ITHQ_TIMESTEPS) -> dict:
    return dict(num_attention_heads=heads, attention_head_dim=head_dim, num_layers=layers,
                cross_attention_dim=text_width, attention_bias=True, sample_size=latent_side,
                num_vector_embeds=codebook + 1, activation_fn="geglu-approximate",
                num_embeds_ada_norm=timesteps)


def vqvae_config(*, channels: tuple[int, ...], layers_per_block: int, latent_channels: int, embed_dim: int,
                 codebook: int, attention_at_lowest: bool) -> dict:
    levels = len(channels)
    down = ["DownEncoderBlock2D"] * levels
    up = ["UpDecoderBlock2D"] * levels
    if attention_at_lowest:  # the ITHQ VQ-VAE attends at its 32x32 level: the last encoder and first decoder level
        down[-1], up[0] = "AttnDownEncoderBlock2D", "AttnUpDecoderBlock2D"
    return dict(in_channels=3, out_channels=3, down_block_types=tuple(down), up_block_types=tuple(up),
                block_out_channels=channels, layers_per_block=layers_per_block, latent_channels=latent_channels,
                num_vq_embeddings=codebook, norm_num_groups=min(32, channels[0]), vq_embed_dim=embed_dim)


SIZES = {
    "tiny": ModelSize(
        "tiny",
        transformer_config(heads=2, head_dim=16, layers=2, latent_side=4, codebook=32, text_width=32, timesteps=10),
        vqvae_config(channels=(8, 16), layers_per_block=1, latent_channels=8, embed_dim=8, codebook=32,
                     attention_at_lowest=False),
        dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)),
    "small": ModelSize(
        "small",
        transformer_config(heads=8, head_dim=64, layers=8, latent_side=16, codebook=1024, text_width=512),
        vqvae_config(channels=(64, 128, 128), layers_per_block=1, latent_channels=64, embed_dim=64, codebook=1024,
                     attention_at_lowest=False),
        dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=4, num_attention_heads=8)),
    "ithq": ModelSize(
        "ithq",
        transformer_config(heads=16, head_dim=88, layers=36, latent_side=32, codebook=4096, text_width=512),
        vqvae_config(channels=(64, 128, 256, 512), layers_per_block=2, latent_channels=256, embed_dim=128,
                     codebook=4096, attention_at_lowest=True),
        dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8)),
}


# ---------------------------------------------------------------------------------------------------------------
# Building
# ---------------------------------------------------------------------------------------------------------------

def text_encoder(size: ModelSize, tokenizer: CLIPTokenizer) -> CLIPTextModel:
    config = CLIPTextConfig(vocab_size=len(tokenizer), max_position_embeddings=MAX_PROMPT_TOKENS,
                            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id, **size.text_encoder)
    return CLIPTextModel(config).eval()


def reference_pipeline(size: ModelSize, seed: int = 0):
    """diffusers' VQDiffusionPipeline with random weights (each library's default init, drawn from `seed`)."""
    from diffusers import Transformer2DModel
    from diffusers import VQModel as ReferenceVQModel
    from diffusers.pipelines.deprecated.vq_diffusion.pipeline_vq_diffusion import (
        LearnedClassifierFreeSamplingEmbeddings as ReferenceEmbeddings,
    )
    from diffusers.pipelines.deprecated.vq_diffusion.pipeline_vq_diffusion import (
        VQDiffusionPipeline as ReferencePipeline,
    )
    from diffusers.schedulers import VQDiffusionScheduler as ReferenceScheduler
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # its advice on casting with `to()` does not apply to random weights

    tokenizer = tiny_tokenizer()
    text_width = size.transformer["cross_attention_dim"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder = text_encoder(size, tokenizer)
        transformer = Transformer2DModel(**size.transformer).eval()
        vqvae = ReferenceVQModel(**size.vqvae).eval()
        unconditional = ReferenceEmbeddings(learnable=True, hidden_size=text_width, length=MAX_PROMPT_TOKENS)
        torch.nn.init.normal_(unconditional.embeddings, std=text_width ** -0.5)  # rows of about unit norm, like text
    scheduler = ReferenceScheduler(num_vec_classes=size.num_classes, num_train_timesteps=size.num_train_timesteps)
    pipeline = ReferencePipeline(vqvae=vqvae, text_encoder=encoder, tokenizer=tokenizer, transformer=transformer,
                                 scheduler=scheduler, learned_classifier_free_sampling_embeddings=unconditional)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def copied_model(ours: type, reference: torch.nn.Module) -> torch.nn.Module:
    """Our model built from the reference's config, holding the reference's weights (strict key and shape check)."""
    model = ours.from_config(dict(reference.config))
    model.load_state_dict(reference.state_dict(), strict=True)
    return model.eval()


def matching_pipeline(reference) -> VQDiffusionPipeline:
    """vqbatch's pipeline with the reference's weights and settings; the text encoder is a copy of the reference's."""
    return VQDiffusionPipeline(
        vqvae=copied_model(VQModel, reference.vqvae),
        text_encoder=copy.deepcopy(reference.text_encoder),
        tokenizer=copy.deepcopy(reference.tokenizer),
        transformer=copied_model(VQDiffusionTransformer, reference.transformer),
        scheduler=VQDiffusionScheduler.from_config(dict(reference.scheduler.config)),
        learned_classifier_free_sampling_embeddings=copied_model(
            LearnedClassifierFreeSamplingEmbeddings, reference.learned_classifier_free_sampling_embeddings))


def pipeline_pair(size: ModelSize, device: str = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0):
    """(ours, reference) on `device` in `dtype`, with identical weights."""
    reference = reference_pipeline(size, seed)
    ours = matching_pipeline(reference)
    reference.to(device=device, dtype=dtype)
    ours.to(device=device, dtype=dtype)
    return ours, reference


def transformer_parameters(size: ModelSize) -> int:
    """Parameter count of the transformer alone, from a meta-device build (no memory)."""
    with torch.device("meta"):
        model = VQDiffusionTransformer(**size.transformer)
    return sum(parameter.numel() for parameter in model.parameters())


# ---------------------------------------------------------------------------------------------------------------
# Calling them alike
# ---------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Sampling:
    """The settings both pipelines are called with; each call gets a fresh generator seeded with `seed`."""

    guidance_scale: float
    truncation_rate: float
    seed: int
    device: str

    def arguments(self, steps: int) -> dict:
        return dict(num_inference_steps=steps, guidance_scale=self.guidance_scale,
                    truncation_rate=self.truncation_rate, output_type="np",
                    generator=torch.Generator(self.device).manual_seed(self.seed))


@dataclass(frozen=True)
class SamplingSettings:
    """What the benchmarks that sample both pipelines share; each adds its own step counts and batch sizes."""

    size: str  # a key of `SIZES`
    guidance_scale: float
    truncation_rate: float
    device: str
    dtype: str  # a torch dtype's name, e.g. "float16"
    seed: int

    @property
    def sampling(self) -> Sampling:
        return Sampling(self.guidance_scale, self.truncation_rate, self.seed, self.device)


def distinct_prompts(count: int) -> list[str]:
    """`count` different prompts, so that no pipeline can share text work between images."""
    return [f"{FREE_FORM_PROMPTS[i % len(FREE_FORM_PROMPTS)]}, take {i}" for i in range(count)]


def reference_tokens(reference, prompts: list[str], steps: int, sampling: Sampling) -> torch.Tensor:
    """Run the reference; it returns no tokens, so a step callback keeps the last sample (its final tokens)."""
    final = {}
    reference(prompts, **sampling.arguments(steps), callback=lambda step, t, sample: final.update(tokens=sample))
    return final["tokens"].cpu()


def vqbatch_tokens(ours: VQDiffusionPipeline, prompts: list[str], steps: int, sampling: Sampling,
                   timestep_spacing: str = "reference") -> torch.Tensor:
    return ours(prompts, **sampling.arguments(steps), timestep_spacing=timestep_spacing).tokens
