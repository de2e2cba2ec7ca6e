"""Convolutional building blocks of the VQ-VAE (Esser et al., Taming Transformers; van den Oord et al., VQ-VAE).

Every module here carries the attribute names of diffusers' autoencoder blocks (`resnets`, `attentions`,
`downsamplers.0.conv`, `to_q`, `group_norm`, ...) so a diffusers VQModel state dict loads unchanged.
Decoder blocks can be conditioned on the quantized latents z_q through SpatialNorm (Zheng et al., MoVQ, 2022)
instead of GroupNorm: pass `zq_channels`, then give every forward the z_q tensor.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

NORM_EPS = 1e-6  # eps of every GroupNorm in the VQ-VAE
SPATIAL_NORM_GROUPS = 32  # SpatialNorm always normalises with 32 groups, whatever `norm_num_groups` says

ACTIVATIONS = {"silu": nn.SiLU, "swish": nn.SiLU, "mish": nn.Mish, "gelu": nn.GELU, "relu": nn.ReLU}
# Attention parameter names of checkpoints written before diffusers 0.14 (its old AttentionBlock) -> today's names
LEGACY_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


# ---------------------------------------------------------------- normalisation


def group_norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=groups, num_channels=channels, eps=NORM_EPS, affine=True)


class SpatialNorm(nn.Module):
    """MoVQ normalisation: GroupNorm(f) * conv_y(z_q) + conv_b(z_q), with z_q resized to f's grid (nearest)."""

    def __init__(self, channels: int, zq_channels: int):
        super().__init__()
        self.norm_layer = group_norm(channels, SPATIAL_NORM_GROUPS)
        self.conv_y = nn.Conv2d(zq_channels, channels, kernel_size=1)
        self.conv_b = nn.Conv2d(zq_channels, channels, kernel_size=1)

    def forward(self, f: torch.Tensor, zq: torch.Tensor) -> torch.Tensor:
        zq = F.interpolate(zq, size=f.shape[-2:], mode="nearest")  # (B, Cq, H, W)
        return self.norm_layer(f) * self.conv_y(zq) + self.conv_b(zq)


def norm_layer(channels: int, groups: int, zq_channels: int | None) -> nn.Module:
    """GroupNorm, or SpatialNorm conditioned on z_q when `zq_channels` is given."""
    return group_norm(channels, groups) if zq_channels is None else SpatialNorm(channels, zq_channels)


def apply_norm(norm: nn.Module, x: torch.Tensor, zq: torch.Tensor | None) -> torch.Tensor:
    return norm(x, zq) if isinstance(norm, SpatialNorm) else norm(x)


# ---------------------------------------------------------------- resnet and attention


class ResnetBlock(nn.Module):
    """x + conv2(act(norm2(conv1(act(norm1(x)))))), with a 1x1 conv on the skip path when channels change."""

    def __init__(self, in_channels: int, out_channels: int, groups: int, act_fn: str, zq_channels: int | None = None):
        super().__init__()
        self.norm1 = norm_layer(in_channels, groups, zq_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.norm2 = norm_layer(out_channels, groups, zq_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        self.nonlinearity = ACTIVATIONS[act_fn]()
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor, zq: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv1(self.nonlinearity(apply_norm(self.norm1, x, zq)))
        h = self.conv2(self.nonlinearity(apply_norm(self.norm2, h, zq)))
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return skip + h


class AttentionBlock(nn.Module):
    """Single-head self-attention over the H*W positions of a feature map, with a residual connection.

    Normalised by GroupNorm (`group_norm`) or, in a SpatialNorm decoder, by SpatialNorm (`spatial_norm`).
    """

    def __init__(self, channels: int, groups: int, zq_channels: int | None = None):
        super().__init__()
        self.group_norm = group_norm(channels, groups) if zq_channels is None else None
        self.spatial_norm = SpatialNorm(channels, zq_channels) if zq_channels is not None else None
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])  # index 0, as in diffusers' checkpoints

    def forward(self, x: torch.Tensor, zq: torch.Tensor | None = None) -> torch.Tensor:
        B, C, H, W = x.shape
        h = x if self.spatial_norm is None else self.spatial_norm(x, zq)
        h = h.flatten(2)  # (B, C, HW)
        h = h if self.group_norm is None else self.group_norm(h)  # on (B, C, HW), the same kernel as diffusers
        h = h.transpose(1, 2)  # (B, HW, C)
        q, k, v = (proj(h).unsqueeze(1) for proj in (self.to_q, self.to_k, self.to_v))  # (B, 1, HW, C)
        h = F.scaled_dot_product_attention(q, k, v).squeeze(1)  # softmax(q k^T / sqrt(C)) v: (B, HW, C)
        h = self.to_out[0](h).transpose(1, 2).reshape(B, C, H, W)
        return h + x  # operand order keeps diffusers' memory layout, so the next conv matches it bit for bit


# ---------------------------------------------------------------- resampling


class Downsample(nn.Module):
    """Halve H and W: pad one pixel right and bottom, then a stride-2 3x3 conv (Taming's asymmetric padding)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Double H and W: nearest-neighbour resize, then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


# ---------------------------------------------------------------- encoder, mid and decoder blocks


class ResolutionBlock(nn.Module):
    """One resolution level: `num_layers` resnets, each optionally followed by attention, then a resampler.

    Encoder levels (diffusers' DownEncoderBlock2D / AttnDownEncoderBlock2D) end in `downsamplers`, decoder levels
    (UpDecoderBlock2D / AttnUpDecoderBlock2D) in `upsamplers`; the last level of each has neither.
    """

    def __init__(self, in_channels: int, out_channels: int, *, num_layers: int, groups: int, act_fn: str,
                 with_attention: bool, resample: Literal["down", "up"] | None, zq_channels: int | None = None):
        super().__init__()
        self.attentions = nn.ModuleList()  # registered before the resnets, as diffusers does: `parameters()` pair up
        self.resnets = nn.ModuleList()
        for i in range(num_layers):  # each resnet, then its attention: diffusers' order, so seeded weights agree
            self.resnets.append(
                ResnetBlock(in_channels if i == 0 else out_channels, out_channels, groups, act_fn, zq_channels))
            if with_attention:
                self.attentions.append(AttentionBlock(out_channels, groups, zq_channels))
        self.downsamplers = nn.ModuleList([Downsample(out_channels)] if resample == "down" else [])
        self.upsamplers = nn.ModuleList([Upsample(out_channels)] if resample == "up" else [])

    def forward(self, x: torch.Tensor, zq: torch.Tensor | None = None) -> torch.Tensor:
        for i, resnet in enumerate(self.resnets):
            x = resnet(x, zq)
            if self.attentions:
                x = self.attentions[i](x, zq)
        for resampler in (*self.downsamplers, *self.upsamplers):
            x = resampler(x)
        return x


class MidBlock(nn.Module):
    """resnet -> [attention] -> resnet at the lowest resolution (diffusers' UNetMidBlock2D)."""

    def __init__(self, channels: int, *, groups: int, act_fn: str, add_attention: bool,
                 zq_channels: int | None = None):
        super().__init__()
        first = ResnetBlock(channels, channels, groups, act_fn, zq_channels)  # created in diffusers' order: resnet,
        attention = [AttentionBlock(channels, groups, zq_channels)] if add_attention else []  # attention, resnet
        self.attentions = nn.ModuleList(attention)  # registered in diffusers' order too: `parameters()` pair up
        self.resnets = nn.ModuleList([first, ResnetBlock(channels, channels, groups, act_fn, zq_channels)])

    def forward(self, x: torch.Tensor, zq: torch.Tensor | None = None) -> torch.Tensor:
        x = self.resnets[0](x, zq)
        for attention in self.attentions:
            x = attention(x, zq)
        return self.resnets[1](x, zq)
