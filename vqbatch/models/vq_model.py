"""VQ-VAE (van den Oord et al., 2017) in the VQGAN form of Taming Transformers, as VQ-Diffusion uses it.

    image x -> Encoder -> quant_conv -> z (B, D, h, w) -> VectorQuantizer -> z_q = e_k, k = argmin_j ||z - e_j||
    z_q -> post_quant_conv -> Decoder -> image

VQ-Diffusion samples the token grid k (B, h*w) and decodes it: `quantize.get_codebook_entry(k, (B, h, w, D))`
gives z_q (B, D, h, w), and `decode(z_q, force_not_quantize=True).sample` the image. The config and the state
dict follow diffusers' `VQModel` key for key, so its checkpoints (e.g. microsoft/vq-diffusion-ithq/vqvae) load as
they are.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from pydantic import PositiveInt, ValidationInfo, field_validator
from torch import nn

from vqbatch.configuration import ComponentConfig
from vqbatch.models.modeling import PretrainedModel
from vqbatch.outputs import BaseOutput
from vqbatch.models.vae_blocks import (
    LEGACY_ATTENTION_NAMES,
    SPATIAL_NORM_GROUPS,
    MidBlock,
    ResolutionBlock,
    apply_norm,
    group_norm,
    norm_layer,
)

DownBlockType = Literal["DownEncoderBlock2D", "AttnDownEncoderBlock2D"]
UpBlockType = Literal["UpDecoderBlock2D", "AttnUpDecoderBlock2D"]
ActivationName = Literal["silu", "swish", "mish", "gelu", "relu"]


class VQModelConfig(ComponentConfig):
    """Constructor arguments of `VQModel`, with diffusers' names and defaults."""

    in_channels: PositiveInt = 3
    out_channels: PositiveInt = 3
    down_block_types: tuple[DownBlockType, ...] = ("DownEncoderBlock2D",)  # encoder levels, highest resolution first
    up_block_types: tuple[UpBlockType, ...] = ("UpDecoderBlock2D",)  # decoder levels, lowest resolution first
    block_out_channels: tuple[PositiveInt, ...] = (64,)  # channels per encoder level (the decoder reverses them)
    layers_per_block: PositiveInt = 1  # resnets per encoder level; decoder levels have one more
    act_fn: ActivationName = "silu"
    latent_channels: PositiveInt = 3  # channels of the encoder output and of the decoder input
    sample_size: PositiveInt = 32  # informational: the side of the samples this model was trained on
    num_vq_embeddings: PositiveInt = 256  # codebook size K
    norm_num_groups: PositiveInt = 32
    vq_embed_dim: PositiveInt | None = None  # codebook vector size D; None means latent_channels
    scaling_factor: float = 0.18215  # latent std for latent diffusion (z * scaling_factor); unused by VQ-Diffusion
    norm_type: Literal["group", "spatial"] = "group"  # "spatial": decoder norms conditioned on z_q (MoVQ)
    mid_block_add_attention: bool = True
    lookup_from_codebook: bool = False  # decode(..., force_not_quantize=True) takes token indices, not latents
    force_upcast: bool = False  # tells pipelines to run this model in float32 when the rest runs in half precision

    @field_validator("block_out_channels")
    @classmethod
    def one_channel_count_per_level(cls, channels: tuple[int, ...], info: ValidationInfo) -> tuple[int, ...]:
        for key in ("down_block_types", "up_block_types"):
            if key in info.data and len(info.data[key]) != len(channels):
                raise ValueError(f"has {len(channels)} levels but {key} has {len(info.data[key])}; they must match")
        return channels

    @field_validator("norm_num_groups")
    @classmethod
    def groups_divide_channels(cls, groups: int, info: ValidationInfo) -> int:
        indivisible = [c for c in info.data.get("block_out_channels", ()) if c % groups]
        if indivisible:
            raise ValueError(f"does not divide block_out_channels {indivisible} (GroupNorm needs it to)")
        return groups

    @field_validator("norm_type")
    @classmethod
    def spatial_norm_fits(cls, norm_type: str, info: ValidationInfo) -> str:
        if norm_type != "spatial":
            return norm_type
        indivisible = [c for c in info.data.get("block_out_channels", ()) if c % SPATIAL_NORM_GROUPS]
        if indivisible:
            raise ValueError(f"'spatial' needs block_out_channels divisible by {SPATIAL_NORM_GROUPS}, not {indivisible}")
        latent, embed = info.data.get("latent_channels"), info.data.get("vq_embed_dim")
        if embed not in (None, latent):
            raise ValueError(f"'spatial' conditions on z_q, so vq_embed_dim ({embed}) must equal latent_channels "
                             f"({latent}) or be None")
        return norm_type


@dataclass
class VQEncoderOutput(BaseOutput):
    latents: torch.Tensor  # (B, vq_embed_dim, h, w): z before quantization


@dataclass
class DecoderOutput(BaseOutput):
    sample: torch.Tensor  # (B, out_channels, H, W)
    commit_loss: torch.Tensor | None = None  # scalar after quantization; zeros (B,) when decode skipped it


# ---------------------------------------------------------------- vector quantizer


class Quantized(NamedTuple):
    latents: torch.Tensor  # (B, D, h, w): z_q, with straight-through gradients to z
    commit_loss: torch.Tensor  # scalar
    indices: torch.Tensor  # (B, h*w): codebook index k per position, row-major (the token layout)


class VectorQuantizer(nn.Module):
    """Nearest-neighbour lookup in a codebook e (K, D), with the VQ-VAE losses (van den Oord et al., eq. 3).

    `legacy=True` is what diffusers' VQModel uses: the weight beta sits on the codebook term,
    loss = ||z - sg[e]||^2 + beta ||sg[z] - e||^2; `legacy=False` is the paper's ||sg[z] - e||^2 + beta ||z - sg[e]||^2.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, beta: float = 0.25, legacy: bool = True):
        super().__init__()
        self.embedding = nn.Embedding(num_embeddings, embedding_dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / num_embeddings, 1.0 / num_embeddings)
        self.beta = beta
        self.legacy = legacy

    def nearest_indices(self, z: torch.Tensor) -> torch.Tensor:
        B, D, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, D)  # (B*h*w, D)
        distances = torch.cdist(flat, self.embedding.weight)  # (B*h*w, K)
        return distances.argmin(dim=1).reshape(B, h * w)

    def get_codebook_entry(self, indices: torch.Tensor, shape: tuple[int, int, int, int] | None) -> torch.Tensor:
        """Codebook vectors of `indices`; with `shape` = (batch, height, width, channels) as a (B, D, h, w) map."""
        z_q = self.embedding(indices)  # (*indices.shape, D)
        if shape is None:
            return z_q
        return z_q.reshape(shape).permute(0, 3, 1, 2).contiguous()  # (B, D, h, w)

    def commitment_loss(self, z: torch.Tensor, z_q: torch.Tensor) -> torch.Tensor:
        commitment = F.mse_loss(z, z_q.detach())  # ||z - sg[e]||^2: pulls the encoder to its code
        codebook = F.mse_loss(z_q, z.detach())  # ||sg[z] - e||^2: pulls the code to the encoder output
        return commitment + self.beta * codebook if self.legacy else self.beta * commitment + codebook

    def forward(self, z: torch.Tensor) -> Quantized:
        B, D, h, w = z.shape
        indices = self.nearest_indices(z)  # (B, h*w)
        z_q = self.get_codebook_entry(indices, (B, h, w, D))  # (B, D, h, w)
        loss = self.commitment_loss(z, z_q)
        z_q = (z + (z_q - z).detach()).contiguous()  # straight-through estimator; NCHW memory like diffusers'
        return Quantized(z_q, loss, indices)


# ---------------------------------------------------------------- encoder and decoder


class Encoder(nn.Module):
    """conv_in -> levels (resnets, attention, downsample) -> mid block -> GroupNorm, SiLU, conv_out."""

    def __init__(self, config: VQModelConfig):
        super().__init__()
        channels, groups = config.block_out_channels, config.norm_num_groups
        self.conv_in = nn.Conv2d(config.in_channels, channels[0], kernel_size=3, padding=1)
        self.down_blocks = nn.ModuleList(
            ResolutionBlock(channels[max(i - 1, 0)], channels[i], num_layers=config.layers_per_block, groups=groups,
                            act_fn=config.act_fn, with_attention=block_type == "AttnDownEncoderBlock2D",
                            resample="down" if i < len(channels) - 1 else None)
            for i, block_type in enumerate(config.down_block_types))
        self.mid_block = MidBlock(channels[-1], groups=groups, act_fn=config.act_fn,
                                  add_attention=config.mid_block_add_attention)
        self.conv_norm_out = group_norm(channels[-1], groups)
        self.conv_act = nn.SiLU()
        self.conv_out = nn.Conv2d(channels[-1], config.latent_channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)  # (B, C0, H, W)
        for block in self.down_blocks:
            h = block(h)
        h = self.mid_block(h)  # (B, C_last, h, w)
        return self.conv_out(self.conv_act(self.conv_norm_out(h)))  # (B, latent_channels, h, w)


class Decoder(nn.Module):
    """conv_in -> mid block -> levels (resnets, attention, upsample) -> norm, SiLU, conv_out.

    With norm_type "spatial" every norm is a SpatialNorm conditioned on z_q (`forward(h, zq)`).
    """

    def __init__(self, config: VQModelConfig):
        super().__init__()
        channels, groups = config.block_out_channels[::-1], config.norm_num_groups
        zq_channels = config.latent_channels if config.norm_type == "spatial" else None
        self.conv_in = nn.Conv2d(config.latent_channels, channels[0], kernel_size=3, padding=1)
        mid_block = MidBlock(channels[0], groups=groups, act_fn=config.act_fn,
                             add_attention=config.mid_block_add_attention, zq_channels=zq_channels)
        self.up_blocks = nn.ModuleList(
            ResolutionBlock(channels[max(i - 1, 0)], channels[i], num_layers=config.layers_per_block + 1,
                            groups=groups, act_fn=config.act_fn, with_attention=block_type == "AttnUpDecoderBlock2D",
                            resample="up" if i < len(channels) - 1 else None, zq_channels=zq_channels)
            for i, block_type in enumerate(config.up_block_types))
        self.mid_block = mid_block  # created before the levels, registered after them: diffusers' two orders
        self.conv_norm_out = norm_layer(channels[-1], groups, zq_channels)
        self.conv_act = nn.SiLU()
        self.conv_out = nn.Conv2d(channels[-1], config.out_channels, kernel_size=3, padding=1)

    def forward(self, h: torch.Tensor, zq: torch.Tensor | None = None) -> torch.Tensor:
        h = self.mid_block(self.conv_in(h), zq)  # (B, C_last, h, w)
        for block in self.up_blocks:
            h = block(h, zq)
        return self.conv_out(self.conv_act(apply_norm(self.conv_norm_out, h, zq)))  # (B, out_channels, H, W)


# ---------------------------------------------------------------- the model


class VQModel(PretrainedModel):
    """The VQ-VAE: `encode` an image to latents z, `decode` latents (quantizing them first) or codebook entries."""

    config_class = VQModelConfig
    config_name = "config.json"
    diffusers_name = "VQModel"

    def __init__(self, in_channels: int = 3, out_channels: int = 3,
                 down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",),
                 up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",), block_out_channels: tuple[int, ...] = (64,),
                 layers_per_block: int = 1, act_fn: str = "silu", latent_channels: int = 3, sample_size: int = 32,
                 num_vq_embeddings: int = 256, norm_num_groups: int = 32, vq_embed_dim: int | None = None,
                 scaling_factor: float = 0.18215, norm_type: str = "group", mid_block_add_attention: bool = True,
                 lookup_from_codebook: bool = False, force_upcast: bool = False):
        super().__init__()
        arguments = locals()
        self.config = VQModelConfig.from_dict({name: arguments[name] for name in VQModelConfig.model_fields})
        embed_dim = self.config.vq_embed_dim or self.config.latent_channels
        self.encoder = Encoder(self.config)
        self.quant_conv = nn.Conv2d(self.config.latent_channels, embed_dim, kernel_size=1)
        self.quantize = VectorQuantizer(self.config.num_vq_embeddings, embed_dim, beta=0.25, legacy=True)
        self.post_quant_conv = nn.Conv2d(embed_dim, self.config.latent_channels, kernel_size=1)
        self.decoder = Decoder(self.config)

    def encode(self, x: torch.Tensor, return_dict: bool = True) -> VQEncoderOutput | tuple[torch.Tensor]:
        """x (B, in_channels, H, W) -> latents z (B, D, H/f, W/f), f = 2^(levels - 1), not yet quantized."""
        latents = self.quant_conv(self.encoder(x))
        return VQEncoderOutput(latents=latents) if return_dict else (latents,)

    def decode(self, h: torch.Tensor, force_not_quantize: bool = False, return_dict: bool = True,
               shape: tuple[int, int, int, int] | None = None) -> DecoderOutput | tuple[torch.Tensor, torch.Tensor]:
        """Latents -> image (B, out_channels, H, W).

        By default `h` (B, D, h, w) is quantized first. With `force_not_quantize=True`, `h` is taken as z_q already,
        or, when the config has `lookup_from_codebook`, as token indices that `shape` = (B, h, w, D) arranges.
        """
        if not force_not_quantize:
            quant, commit_loss, _ = self.quantize(h)
        else:
            lookup = self.config.lookup_from_codebook
            if lookup and shape is None:
                raise ValueError("decode(indices, force_not_quantize=True) with lookup_from_codebook needs "
                                 "shape=(batch, height, width, channels) to arrange the indices")
            quant = self.quantize.get_codebook_entry(h, shape) if lookup else h  # (B, D, h, w)
            commit_loss = h.new_zeros(h.shape[0])  # (B,), in h's dtype, as diffusers returns it
        zq = quant if self.config.norm_type == "spatial" else None
        sample = self.decoder(self.post_quant_conv(quant), zq)
        return DecoderOutput(sample=sample, commit_loss=commit_loss) if return_dict else (sample, commit_loss)

    def forward(self, sample: torch.Tensor, return_dict: bool = True) -> DecoderOutput | tuple[torch.Tensor, ...]:
        """Reconstruct `sample`: encode, quantize, decode."""
        decoded = self.decode(self.encode(sample).latents)
        return decoded if return_dict else (decoded.sample, decoded.commit_loss)

    def rename_legacy_keys(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Checkpoints converted before diffusers 0.14 name attention layers query/key/value/proj_attn."""
        pattern = re.compile(r"(\.attentions\.\d+\.)(query|key|value|proj_attn)(\.weight|\.bias)$")
        return {pattern.sub(lambda m: m[1] + LEGACY_ATTENTION_NAMES[m[2]] + m[3], key): value
                for key, value in state.items()}
