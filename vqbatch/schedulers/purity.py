"""The purity prior: the high-quality inference strategy of Improved VQ-Diffusion (Tang et al. 2022, arXiv 2205.16007).

Sampling every masked token of x_t at once, each from its own marginal, breaks the joint distribution of the tokens.
The purity prior unmasks a few latent pixels per step, the ones the model is surest of most likely first, and keeps
every token once it is unmasked. One step from timestep t to s (P latent pixels, K codebook classes):

    purity:             purity(i) = max_k p(x_0^i = k | x_t), the model's confidence at pixel i.
    how many:           the step leaves round(P γ̄_s) pixels masked, as many as the forward chain q(x_s | x_0) masks
                        (γ̄_{-1} = 0 at x_0: the last step unmasks every pixel left).
    which pixels:       n of the pixels still masked, drawn without replacement with probability proportional to
                        purity, as Gumbel-top-n: the n largest log purity(i) + g_i with g_i ~ Gumbel(0, 1), the same
                        distribution as drawing one pixel after another (Kool et al. 2019, "Stochastic beams").
    which tokens, eq. 11: x_0^i ~ softmax_k((1 + r s_i) log p(x_0^i = k | x_t)), s_i = purity(i) / max_j purity(j)
                        over the image's pixels; r = `prior_weight` sharpens the surest pixels, r = 0 samples
                        p(x_0 | x_t) itself.

Source: the official code, microsoft/VQ-Diffusion `image_synthesis/modeling/transformers/diffusion_transformer.py`,
`DiffusionTransformer.p_sample` with `prior_rule=2` ("purity prior"; `prior_weight` is r, default 0; its README's
purity example uses 1); the pixels there come from `torch.multinomial(purity, n)`. Two choices differ: the count per
step there is a fixed table for P = 1024 and T = 100 (10 or 11 pixels a step), which the round(P γ̄_s) rule matches to
within one pixel of the running total on the linear γ̄ schedule while also following any `set_timesteps` schedule;
and the mask class is never drawn (there it has probability e^-70 and the step repeats).

Randomness: each step draws the tokens with the step's `noise` (Gumbel noise for every class (B, K, P), or one
categorical uniform per pixel (B, 1, P)), then Gumbel noise for every pixel's key (B, P), always the same amount per
image, from `generator` through `uniform_noise` as `VQDiffusionScheduler.step` does: with one generator per image, an
image's tokens do not depend on the other images of its batch, and a CPU generator drives a model on any device.
"""

from __future__ import annotations

import math
from numbers import Real

import torch

from vqbatch.choices import SAMPLERS, Noise, check_choice
from vqbatch.schedulers.vq_diffusion import (LOG_TINY, Generators, VQDiffusionScheduler, Workspace, draw_classes,
                                             gumbel_noised)

DEFAULT_PRIOR_WEIGHT = 0.0  # r of eq. 11, the official default


# ---------------------------------------------------------------------------------------------------------------------
# argument checks


def checked_prior_weight(prior_weight: float) -> float:
    if isinstance(prior_weight, bool) or not isinstance(prior_weight, Real) or not math.isfinite(prior_weight) \
            or prior_weight < 0:
        raise ValueError(f"prior_weight (r of Improved VQ-Diffusion eq. 11) must be a finite number >= 0, "
                         f"got {prior_weight!r}")
    return float(prior_weight)


def check_sampler(sampler: str, prior_weight: float) -> None:
    """`sampler` is one of SAMPLERS; a nonzero `prior_weight` needs the purity sampler, which alone reads it."""
    check_choice("sampler", sampler, SAMPLERS)
    checked_prior_weight(prior_weight)
    if sampler != "purity" and prior_weight != 0:
        raise ValueError(f"prior_weight={prior_weight!r} applies only to sampler='purity' (got sampler={sampler!r}); "
                         "choose sampler='purity' or leave prior_weight at 0")


# ---------------------------------------------------------------------------------------------------------------------
# the step


def log_purity(log_p_x_0: torch.Tensor) -> torch.Tensor:
    """log purity(i) = max_k log p(x_0^i = k | x_t), floored at log(1e-30): (B, K, P) -> (B, P)."""
    return log_p_x_0.amax(dim=1).clamp(min=LOG_TINY)


def sharpened_logits(log_p_x_0: torch.Tensor, log_purity: torch.Tensor, prior_weight: float,
                     out: torch.Tensor | None = None) -> torch.Tensor:
    """Eq. 11: (1 + r s_i) log p(x_0^i = k | x_t) with s_i = purity(i) / max_j purity(j), shape (B, K, P), into
    `out` when given."""
    relative = (log_purity - log_purity.amax(dim=1, keepdim=True)).exp_()  # (B, P) s_i in (0, 1]
    return torch.mul(log_p_x_0, (1 + prior_weight * relative).unsqueeze(1), out=out)


def pixels_to_unmask(log_purity: torch.Tensor, masked: torch.Tensor, counts: torch.Tensor,
                     generator: Generators) -> torch.Tensor:
    """Per image b, `counts[b]` masked pixels drawn without replacement with probability ∝ purity: (B, P) bool.

    Gumbel-top-n: the pixels whose keys log purity(i) + g_i rank among the n largest of the masked pixels' keys.
    """
    keys = gumbel_noised(log_purity, generator).masked_fill_(~masked, -torch.inf)  # (B, P), finite where masked
    order = keys.argsort(dim=1, descending=True)  # (B, P) pixels by key
    positions = torch.arange(keys.shape[1], device=keys.device).expand_as(order)
    ranks = torch.empty_like(order).scatter_(1, order, positions)  # (B, P) each pixel's place in `order`
    return ranks < counts.unsqueeze(1)  # counts <= masked pixels, whose finite keys rank first: only they unmask


def purity_prior_step(log_p_x_0: torch.Tensor, x_t: torch.LongTensor, num_left_masked: int, prior_weight: float,
                      generator: Generators, mask_class: int, noise: Noise = "gumbel",
                      workspace: Workspace | None = None) -> torch.LongTensor:
    """x_s: x_t with its surest masked pixels unmasked until `num_left_masked` are left masked (none are added).

    log_p_x_0: (B, K, P) the model's log p(x_0 | x_t); x_t: (B, P) tokens, `mask_class` where masked; the full-size
    temporaries come from `workspace` when given.
    """
    log_p_x_0 = log_p_x_0.float()
    masked = x_t == mask_class  # (B, P)
    counts = (masked.sum(dim=1) - num_left_masked).clamp_(min=0)  # (B,) pixels each image unmasks
    purity = log_purity(log_p_x_0)  # (B, P)
    sharpened = workspace.view("posterior", log_p_x_0.shape, log_p_x_0.dtype, log_p_x_0.device) if workspace else None
    tokens = draw_classes(sharpened_logits(log_p_x_0, purity, prior_weight, out=sharpened), generator, noise,
                          overwrite=True, workspace=workspace)  # (B, P)
    return torch.where(pixels_to_unmask(purity, masked, counts, generator), tokens, x_t)


# ---------------------------------------------------------------------------------------------------------------------
# the scheduler


class PurityPriorScheduler(VQDiffusionScheduler):
    """A `VQDiffusionScheduler` whose `step` samples by the purity prior; the schedules and timesteps are the parent's,
    so `set_timesteps` (both spacings) works unchanged."""

    def __init__(self, *args, prior_weight: float = DEFAULT_PRIOR_WEIGHT, **kwargs):
        super().__init__(*args, **kwargs)
        self.prior_weight = checked_prior_weight(prior_weight)

    @classmethod
    def from_scheduler(cls, scheduler: VQDiffusionScheduler,
                       prior_weight: float = DEFAULT_PRIOR_WEIGHT) -> "PurityPriorScheduler":
        """The purity-prior sampler of the chain `scheduler` defines (same config)."""
        return cls(**dict(scheduler.config), prior_weight=prior_weight)

    def num_left_masked(self, timestep: int, num_pixels: int) -> int:
        """round(P γ̄_s): of P pixels, how many stay masked once the chain reaches `timestep` (-1, x_0: none)."""
        return round(num_pixels * float(self.gamma_bar[timestep]))

    def _previous_tokens(self, log_p_x_0: torch.Tensor, x_t: torch.Tensor, t: int, s: int, generator: Generators,
                         noise: Noise) -> torch.Tensor:
        """x_s by the purity prior: x_t with its surest masked pixels unmasked down to round(P γ̄_s) masked."""
        return purity_prior_step(log_p_x_0, x_t, self.num_left_masked(s, x_t.shape[1]), self.prior_weight,
                                 generator, self.mask_class, noise, self.workspace)
