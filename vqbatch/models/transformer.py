"""The denoiser of VQ-Diffusion: a transformer that predicts p(x_0 | x_t, y) over the VQ-VAE codebook.

Inputs: x_t, the (B, H*W) latent tokens of the noisy image, where class K = num_vector_embeds - 1 is [MASK];
y, the text encoder's output (B, T, C); t, the diffusion step. Output: log p(x_0 | x_t, y) over the K codebook
classes (a clean token is never [MASK]), shape (B, K, H*W).

Each block (Gu et al., sec. 4.1, fig. 2): x += SelfAttn(AdaLN(x, t)); x += CrossAttn(AdaLN(x, t), y); x += FF(LN(x)).
Parameter names follow diffusers' `Transformer2DModel` in its discrete-input mode, so its checkpoints load unchanged.

Speed: attention runs through `F.scaled_dot_product_attention`; the cross-attention keys and values of y do not
depend on x_t or t, so `precompute_text` computes them once per prompt batch and every step reuses them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, PositiveInt
from torch import nn

from vqbatch.configuration import ComponentConfig
from vqbatch.models.modeling import PretrainedModel
from vqbatch.outputs import BaseOutput

LOG_SOFTMAX_DTYPES = (torch.float64, torch.float32)


class VQDiffusionTransformerConfig(ComponentConfig):
    """The keys of diffusers' `Transformer2DModel` config; defaults are diffusers' defaults."""

    num_attention_heads: PositiveInt = 16
    attention_head_dim: PositiveInt = 88
    num_layers: PositiveInt = 1
    dropout: float = Field(0.0, ge=0.0, lt=1.0)  # after each attention output and inside the feed-forward
    cross_attention_dim: PositiveInt  # width C of the text encoder's output
    attention_bias: bool = False  # biases in the q, k, v projections
    sample_size: PositiveInt  # latent height = latent width
    num_vector_embeds: int = Field(ge=2)  # K codebook classes + 1 for [MASK]
    activation_fn: Literal["geglu", "geglu-approximate"] = "geglu"  # gated GELU, or the ungated x * sigmoid(1.702 x)
    num_embeds_ada_norm: PositiveInt  # diffusion steps the timestep embedding knows: 0 <= t < this
    upcast_attention: bool = False  # attention in float32 even for a half-precision model
    norm_elementwise_affine: bool = True  # learned weight and bias in the feed-forward LayerNorm
    norm_eps: float = Field(1e-5, gt=0.0)  # eps of the feed-forward LayerNorm
    # Keys that select the other input modes of Transformer2DModel: only their discrete-input values are accepted.
    norm_type: Literal["ada_norm", "layer_norm"] = "ada_norm"  # diffusers writes "layer_norm" and means ada_norm
    in_channels: None = None
    out_channels: None = None
    patch_size: None = None
    only_cross_attention: Literal[False] = False
    double_self_attention: Literal[False] = False
    attention_type: Literal["default"] = "default"
    caption_channels: None = None
    use_linear_projection: Literal[False] = False
    interpolation_scale: None = None
    use_additional_conditions: Literal[False] | None = None
    norm_num_groups: PositiveInt = 32  # GroupNorm of continuous input; unused here, kept so the file round-trips

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim


# ---------------------------------------------------------------- layers
#
# Inference allocates each large activation once and updates it in place where the result is the same to the bit
# (the parity tests compare with diffusers): on a CPU every fresh tensor of more than 32 MiB is new memory from the
# kernel, page by page, which costs as much as the arithmetic on it. Autograd still sees every in-place update.


def log_softmax_by_row(logits: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """float32 log_softmax over classes (B, K, L) -> (B, K, L), computed in `dtype` one batch row at a time, so that
    the double-precision copies stay one row large; each row is the whole-batch result to the bit."""
    out = torch.empty(logits.shape, dtype=torch.float32, device=logits.device)
    for row in range(logits.shape[0]):
        out[row] = F.log_softmax(logits[row].to(dtype), dim=0)  # (K, L)
    return out


class LatentImageEmbedding(nn.Module):
    """Token embedding plus learned row and column embeddings (as in DALL-E): e(x) + e_row(i) + e_col(j)."""

    def __init__(self, num_embed: int, height: int, width: int, dim: int):
        super().__init__()
        self.height, self.width = height, width
        self.emb = nn.Embedding(num_embed, dim)
        self.height_emb = nn.Embedding(height, dim)
        self.width_emb = nn.Embedding(width, dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # (B, H*W) -> (B, H*W, D)
        rows = self.height_emb.weight[:, None, :]  # (H, 1, D)
        columns = self.width_emb.weight[None, :, :]  # (1, W, D)
        positions = (rows + columns).reshape(self.height * self.width, -1)  # (H*W, D), row-major like the tokens
        return self.emb(tokens) + positions


class AdaLayerNorm(nn.Module):
    """LayerNorm modulated by the diffusion step: LN(x) * (1 + scale(t)) + shift(t)."""

    def __init__(self, dim: int, num_steps: int):
        super().__init__()
        self.emb = nn.Embedding(num_steps, dim)
        self.linear = nn.Linear(dim, 2 * dim)
        self.norm = nn.LayerNorm(dim, elementwise_affine=False)

    def forward(self, x: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:  # x (B, L, D), timestep (1|B,)
        modulation = self.linear(F.silu(self.emb(timestep)))[:, None, :]  # (1|B, 1, 2D)
        scale, shift = modulation.chunk(2, dim=-1)  # (1|B, 1, D) each
        return self.norm(x).mul_(1 + scale).add_(shift)


class Attention(nn.Module):
    """Multi-head attention of queries from x over keys and values from a context (x itself, or the text)."""

    def __init__(self, *, query_dim: int, context_dim: int, heads: int, head_dim: int, bias: bool, dropout: float,
                 upcast: bool):
        super().__init__()
        self.heads, self.upcast = heads, upcast
        inner_dim = heads * head_dim
        self.to_q = nn.Linear(query_dim, inner_dim, bias=bias)
        self.to_k = nn.Linear(context_dim, inner_dim, bias=bias)
        self.to_v = nn.Linear(context_dim, inner_dim, bias=bias)
        self.to_out = nn.Sequential(nn.Linear(inner_dim, query_dim), nn.Dropout(dropout))

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, nh*hs) -> (B, nh, T, hs)
        batch, length, _ = x.shape
        return x.view(batch, length, self.heads, -1).transpose(1, 2)

    def keys_values(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T, C) -> key, value, each (B, nh, T, hs)."""
        return self.split_heads(self.to_k(context)), self.split_heads(self.to_v(context))

    def forward(self, x: torch.Tensor, keys_values: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        batch, length, _ = x.shape  # (B, L, D)
        query = self.split_heads(self.to_q(x))  # (B, nh, L, hs)
        key, value = keys_values
        if self.upcast:
            attended = F.scaled_dot_product_attention(query.float(), key.float(), value.float()).to(query.dtype)
        else:
            attended = F.scaled_dot_product_attention(query, key, value)  # (B, nh, L, hs)
        return self.to_out(attended.transpose(1, 2).reshape(batch, length, -1))  # (B, L, D)


class GEGLU(nn.Module):
    """Gated GELU (Shazeer, 2020): one projection split into a value half and a gate half, value * GELU(gate)."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, 2 * dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * F.gelu(gate)


class SigmoidGELU(nn.Module):
    """A projection, then GELU approximated as x * sigmoid(1.702 x) (Hendrycks & Gimpel, sec. 2); not gated."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)
        return x.mul_(torch.mul(x, 1.702).sigmoid_())


ACTIVATIONS = {"geglu": GEGLU, "geglu-approximate": SigmoidGELU}


class FeedForward(nn.Module):
    """D -> 4D (activation) -> dropout -> D."""

    def __init__(self, dim: int, activation_fn: str, dropout: float, mult: int = 4):
        super().__init__()
        self.net = nn.Sequential(ACTIVATIONS[activation_fn](dim, mult * dim), nn.Dropout(dropout),
                                 nn.Linear(mult * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class TransformerBlock(nn.Module):
    """Self-attention and cross-attention, each after a timestep-modulated LayerNorm, then a feed-forward."""

    def __init__(self, config: VQDiffusionTransformerConfig):
        super().__init__()
        dim = config.inner_dim
        shared = dict(query_dim=dim, heads=config.num_attention_heads, head_dim=config.attention_head_dim,
                      bias=config.attention_bias, dropout=config.dropout, upcast=config.upcast_attention)
        self.norm1 = AdaLayerNorm(dim, config.num_embeds_ada_norm)
        self.attn1 = Attention(context_dim=dim, **shared)
        self.norm2 = AdaLayerNorm(dim, config.num_embeds_ada_norm)
        self.attn2 = Attention(context_dim=config.cross_attention_dim, **shared)
        self.norm3 = nn.LayerNorm(dim, eps=config.norm_eps, elementwise_affine=config.norm_elementwise_affine)
        self.ff = FeedForward(dim, config.activation_fn, config.dropout)

    def forward(self, x: torch.Tensor, text_keys_values: tuple[torch.Tensor, torch.Tensor],
                timestep: torch.Tensor) -> torch.Tensor:  # x (B, L, D)
        normed = self.norm1(x, timestep)
        x = self.attn1(normed, self.attn1.keys_values(normed)).add_(x)
        x = self.attn2(self.norm2(x, timestep), text_keys_values).add_(x)
        return self.ff(self.norm3(x)).add_(x)


# ---------------------------------------------------------------- model


@dataclass
class Transformer2DModelOutput(BaseOutput):
    """diffusers' name for the transformer's output."""

    sample: torch.Tensor  # (B, K, P) float32 log p(x_0 | x_t, y) over the K codebook classes


@dataclass(frozen=True)
class TextCache:
    """The cross-attention keys and values of one batch of text conditions, one (key, value) pair per block.

    Made by `VQDiffusionTransformer.precompute_text` once per prompt batch; every diffusion step reuses it.
    """

    keys_values: tuple[tuple[torch.Tensor, torch.Tensor], ...]  # per block: key, value, each (B, nh, T, hs)

    @property
    def batch_size(self) -> int:
        return self.keys_values[0][0].shape[0]


class VQDiffusionTransformer(PretrainedModel):
    """The VQ-Diffusion denoiser; diffusers calls it `Transformer2DModel` (with `num_vector_embeds`).

    Constructor keywords are the keys of `VQDiffusionTransformerConfig`.
    """

    config_class = VQDiffusionTransformerConfig
    diffusers_name = "Transformer2DModel"

    def __init__(self, **config: Any):
        super().__init__()
        self.config = VQDiffusionTransformerConfig.from_dict(config)
        c = self.config
        self.latent_image_embedding = LatentImageEmbedding(c.num_vector_embeds, c.sample_size, c.sample_size,
                                                           c.inner_dim)
        self.transformer_blocks = nn.ModuleList(TransformerBlock(c) for _ in range(c.num_layers))
        self.norm_out = nn.LayerNorm(c.inner_dim)
        self.out = nn.Linear(c.inner_dim, c.num_vector_embeds - 1)

    @property
    def height(self) -> int:
        return self.config.sample_size

    @property
    def width(self) -> int:
        return self.config.sample_size

    @property
    def num_latent_pixels(self) -> int:
        return self.height * self.width

    @property
    def num_vector_embeds(self) -> int:
        return self.config.num_vector_embeds

    def precompute_text(self, encoder_hidden_states: torch.Tensor) -> TextCache:
        """Every block's cross-attention keys and values of the text (B, T, C), cast to the model's dtype."""
        if encoder_hidden_states.ndim != 3 or encoder_hidden_states.shape[-1] != self.config.cross_attention_dim:
            raise ValueError(f"encoder_hidden_states must have shape (batch, text_len, "
                             f"{self.config.cross_attention_dim}), got {tuple(encoder_hidden_states.shape)}")
        text = encoder_hidden_states.to(self.dtype)
        return TextCache(tuple(block.attn2.keys_values(text) for block in self.transformer_blocks))

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                timestep: torch.Tensor | int | None = None, *, text_cache: TextCache | None = None,
                log_softmax_dtype: torch.dtype = torch.float64,
                return_dict: bool = True) -> Transformer2DModelOutput | tuple[torch.Tensor]:
        """log p(x_0 | x_t, y), float32 of shape (B, num_vector_embeds - 1, num_latent_pixels), as `.sample` of a
        `Transformer2DModelOutput` (or the tuple `(log_p,)` with `return_dict=False`).

        hidden_states: x_t, integer tokens (B, num_latent_pixels). The text y comes either as encoder_hidden_states
        (B, T, cross_attention_dim) or as the `text_cache` of `precompute_text`; give exactly one. timestep: an int,
        a 0-d or (1,) tensor shared by the batch, or a (B,) tensor with one step per sample.
        log_softmax_dtype: float64 reproduces the reference to the bit; float32 skips the double-precision pass.
        """
        if log_softmax_dtype not in LOG_SOFTMAX_DTYPES:
            raise ValueError(f"log_softmax_dtype must be one of {LOG_SOFTMAX_DTYPES}, got {log_softmax_dtype}")
        batch = self.check_tokens(hidden_states)
        text_cache = self.resolve_text(encoder_hidden_states, text_cache, batch)
        timestep = self.timestep_tensor(timestep, batch, hidden_states.device)
        x = self.latent_image_embedding(hidden_states)  # (B, L, D)
        for block, text_keys_values in zip(self.transformer_blocks, text_cache.keys_values):
            x = block(x, text_keys_values, timestep)
        logits = self.out(self.norm_out(x)).permute(0, 2, 1)  # (B, K, L)
        log_p = log_softmax_by_row(logits, log_softmax_dtype)
        return Transformer2DModelOutput(sample=log_p) if return_dict else (log_p,)

    # ------------------------------------------------ input checks (shapes and dtypes only: no device sync)

    def check_tokens(self, tokens: torch.Tensor) -> int:
        if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
            raise ValueError(f"hidden_states must hold integer token ids, got dtype {tokens.dtype}")
        if tokens.ndim != 2 or tokens.shape[1] != self.num_latent_pixels:
            raise ValueError(f"hidden_states must have shape (batch, {self.num_latent_pixels}) for "
                             f"{self.height}x{self.width} latents, got {tuple(tokens.shape)}")
        return tokens.shape[0]

    def resolve_text(self, encoder_hidden_states: torch.Tensor | None, text_cache: TextCache | None,
                     batch: int) -> TextCache:
        if (encoder_hidden_states is None) == (text_cache is None):
            raise ValueError("give exactly one of encoder_hidden_states and text_cache, got "
                             f"{'both' if text_cache is not None else 'neither'}")
        if text_cache is None:
            text_cache = self.precompute_text(encoder_hidden_states)
        if len(text_cache.keys_values) != len(self.transformer_blocks):
            raise ValueError(f"text_cache has {len(text_cache.keys_values)} blocks, this model "
                             f"{len(self.transformer_blocks)}: it was made by another model")
        if text_cache.batch_size != batch:
            raise ValueError(f"the text batch ({text_cache.batch_size}) must match the token batch ({batch})")
        return text_cache

    def timestep_tensor(self, timestep: torch.Tensor | int | None, batch: int, device: torch.device) -> torch.Tensor:
        """The diffusion step as a (1,) or (B,) integer tensor on the tokens' device."""
        num_steps = self.config.num_embeds_ada_norm
        if timestep is None or isinstance(timestep, (bool, float)):
            raise ValueError(f"timestep must be an int or an integer tensor, got {timestep!r}")
        if isinstance(timestep, int) and not 0 <= timestep < num_steps:
            raise ValueError(f"timestep must be in [0, {num_steps}), got {timestep}")
        steps = torch.as_tensor(timestep, device=device)
        if steps.dtype.is_floating_point or steps.dtype.is_complex or steps.dtype == torch.bool:
            raise ValueError(f"timestep must hold integers, got dtype {steps.dtype}")
        if steps.ndim > 1 or steps.numel() not in (1, batch):
            raise ValueError(f"timestep must be a scalar or have shape ({batch},), got shape {tuple(steps.shape)}")
        return steps.reshape(-1)


Transformer2DModel = VQDiffusionTransformer  # diffusers' name, so `from vqbatch import Transformer2DModel` works
