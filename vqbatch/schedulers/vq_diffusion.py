"""VQ-Diffusion sampling (Gu et al. 2022): the reverse mask-and-replace chain over discrete image tokens.

Tokens take K + 1 values: K codebook classes and the mask token K (the last class, `mask_class`).
Notation of Gu et al., section 4.1 (timesteps count from 0 here):
    forward step, eq. 7:  q(x_t | x_{t-1}) keeps a token with α_t, replaces it by any of the K classes with β_t each,
                          masks it with γ_t (α_t + K β_t + γ_t = 1); a masked token stays masked.
    forward jump, eq. 8:  q(x_t | x_0) has the same form with ᾱ_t = Π α, γ̄_t = 1 - Π (1 - γ), β̄_t = (1 - ᾱ_t - γ̄_t) / K;
                          ᾱ_t and γ̄_t are linear in t from `*_cum_start` to `*_cum_end`.
    reverse step, eq. 11: p(x_s | x_t) = Σ_{x_0} q(x_t | x_s) q(x_s | x_0) p(x_0 | x_t) / q(x_t | x_0),
                          with p(x_0 | x_t) the model's prediction, worked out in log space.
The product of mask-and-replace matrices is one again, so a jump s -> t over several steps is a single transition with
α_{s->t} = ᾱ_t / ᾱ_s,  1 - γ_{s->t} = (1 - γ̄_t) / (1 - γ̄_s),  β_{s->t} = (1 - α_{s->t} - γ_{s->t}) / K,
and the reverse formula holds unchanged for s < t - 1. s = -1 stands for the clean tokens x_0 (ᾱ = 1, γ̄ = 0).

Fewer steps than training, `set_timesteps(num_inference_steps, device=None, spacing="reference")`:
    spacing="reference"  the diffusers behaviour: run the last `num_inference_steps` single steps of the chain,
                         timesteps n-1, ..., 0, each to its predecessor t-1 (from an all-masked latent this starts in
                         the middle of the chain).
    spacing="skip"       timesteps spread evenly over the whole chain, round(linspace(T-1, 0, n)) (for n = 1 just T-1),
                         each step jumping to the next timestep of the schedule with the jump posterior above; the
                         last jump lands on x_0. With n = T both spacings are the same schedule.
`step` looks the previous timestep up in the schedule (`previous_timestep`); a training timestep outside the schedule
steps to t - 1, as the reference's `step` does for any t. At t = 0 it samples the model's prediction of x_0 directly,
as the reference does.

Randomness, all through `uniform_noise`: a single generator draws the whole batch at once, as the reference does; a
list of generators draws row i from generator i with the shape a batch of one would use, so a row's tokens do not
depend on the other rows of its batch. Each generator draws on its own device and the noise then moves to the
model's, so a CPU generator drives a model on any device. `step(..., noise=...)` picks how a class is drawn from
the log-probabilities (B, C, P):
    noise="gumbel"       Gumbel-max, argmax_k (log p_k + g_k) with one uniform per class per pixel: the reference's
                         random stream, token for token (the default).
    noise="categorical"  inverse CDF: one uniform u per pixel, the first class whose cumulative probability exceeds
                         u; the same distribution with C times fewer random numbers (4097x at ITHQ size), so a CPU
                         generator's noise is cheap to draw and move, and equal whatever device samples it.

`step` checks shapes and dtypes only: reading token values back would stop a GPU once per step. Token values are
checked where tokens enter (the pipeline's `latents`, `q_posterior`); the tokens `step` returns are valid by
construction.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from numbers import Integral
from typing import NamedTuple

import torch
from pydantic import Field, ValidationInfo, field_validator

from vqbatch.choices import NOISES, TIMESTEP_SPACINGS, Noise, TimestepSpacing, check_choice
from vqbatch.configuration import ComponentConfig, ConfigOnlyComponent
from vqbatch.outputs import BaseOutput

TINY = 1e-30  # the probability floor of the reference sampler: log(0) is stored as log(1e-30)
LOG_TINY = float(torch.tensor(TINY).log())  # ≈ -69.08, the float32 log as a Python number (no device copy)


@dataclass
class VQDiffusionSchedulerOutput(BaseOutput):
    prev_sample: torch.LongTensor  # (B, P) tokens at the previous timestep, the next input of the model


class VQDiffusionSchedulerConfig(ComponentConfig):
    num_vec_classes: int = Field(ge=2)  # K codebook classes + 1 mask class
    num_train_timesteps: int = Field(default=100, ge=2)
    alpha_cum_start: float = Field(default=0.99999, gt=0, le=1)  # ᾱ_0: chance a token is still itself after step 0
    alpha_cum_end: float = Field(default=0.000009, gt=0, le=1)  # ᾱ_{T-1}
    gamma_cum_start: float = Field(default=0.000009, ge=0, lt=1)  # γ̄_0: chance a token is masked after step 0
    gamma_cum_end: float = Field(default=0.99999, ge=0, lt=1)  # γ̄_{T-1}

    @field_validator("alpha_cum_end")
    @classmethod
    def alpha_never_grows(cls, value: float, info: ValidationInfo) -> float:
        start = info.data.get("alpha_cum_start")
        if start is not None and value > start:
            raise ValueError(f"must be <= alpha_cum_start ({start}): a token cannot become more likely to be intact")
        return value

    @field_validator("gamma_cum_start")
    @classmethod
    def start_probabilities_fit(cls, value: float, info: ValidationInfo) -> float:
        alpha = info.data.get("alpha_cum_start")
        if alpha is not None and alpha + value > 1:
            raise ValueError(f"alpha_cum_start + gamma_cum_start must be <= 1, got {alpha} + {value}")
        return value

    @field_validator("gamma_cum_end")
    @classmethod
    def every_step_is_a_distribution(cls, value: float, info: ValidationInfo) -> float:
        """β_t >= 0 at every step. With linear ᾱ and 1 - γ̄ this reduces, for all t alike, to
        (1 - γ̄_start) (ᾱ_start - ᾱ_end) >= ᾱ_start (γ̄_end - γ̄_start)."""
        alpha_start, alpha_end = info.data.get("alpha_cum_start"), info.data.get("alpha_cum_end")
        gamma_start = info.data.get("gamma_cum_start")
        if gamma_start is None or alpha_start is None or alpha_end is None:
            return value  # an earlier field failed and is reported on its own
        if value < gamma_start:
            raise ValueError(f"must be >= gamma_cum_start ({gamma_start}): a masked token stays masked")
        if (1 - gamma_start) * (alpha_start - alpha_end) < alpha_start * (value - gamma_start):
            raise ValueError(
                "the replace probability β_t would be negative: need (1 - gamma_cum_start) * (alpha_cum_start - "
                f"alpha_cum_end) >= alpha_cum_start * (gamma_cum_end - gamma_cum_start), i.e. gamma_cum_end <= "
                f"{gamma_start + (1 - gamma_start) * (alpha_start - alpha_end) / alpha_start}")
        return value


# ---------------------------------------------------------------------------------------------------------------------
# schedules (float64, like the reference, turned into float32 logs at the end)


def linear_cumulative(start: float, end: float, num_train_timesteps: int) -> torch.Tensor:
    steps = torch.arange(num_train_timesteps, dtype=torch.float64)
    return steps / (num_train_timesteps - 1) * (end - start) + start  # (T,)


def cumulative_schedules(config: VQDiffusionSchedulerConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """ᾱ_t and γ̄_t for t = 0..T-1, then the identity entry (ᾱ = 1, γ̄ = 0) at index T, reached as index -1."""
    T = config.num_train_timesteps
    alpha_bar = linear_cumulative(config.alpha_cum_start, config.alpha_cum_end, T)
    gamma_bar = linear_cumulative(config.gamma_cum_start, config.gamma_cum_end, T)
    identity = torch.tensor([1.0, 0.0], dtype=torch.float64)
    return torch.cat((alpha_bar, identity[:1])), torch.cat((gamma_bar, identity[1:]))  # (T+1,), (T+1,)


def replace_probability(alpha: torch.Tensor, gamma: torch.Tensor, num_classes: int) -> torch.Tensor:
    # the config validation makes β >= 0; rounding can still push an exact 0 to -1e-17
    return ((1 - alpha - gamma) / num_classes).clamp(min=0)


def log_probabilities(alpha: torch.Tensor, beta: torch.Tensor, gamma: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return alpha.log().float(), beta.log().float(), gamma.log().float()


# ---------------------------------------------------------------------------------------------------------------------
# transition rows without building the (B, K, P) matrix


class TransitionRows(NamedTuple):
    """log q(x_t | x_prev = j) for the non-mask classes j of every pixel, which takes two values per pixel:
    `hot` at j = x_t and `other` elsewhere (both the masking probability where x_t is the mask)."""

    index: torch.Tensor  # (B, 1, P) long, the row of x_t (clamped into 0..K-1 where x_t is the mask)
    hot: torch.Tensor  # (B, 1, P)
    other: torch.Tensor  # (B, 1, P)


def transition_rows(x_t: torch.Tensor, log_a: torch.Tensor, log_b: torch.Tensor, log_c: torch.Tensor,
                    mask_class: int) -> TransitionRows:
    masked = (x_t == mask_class).unsqueeze(1)  # (B, 1, P)
    kept = torch.logaddexp(log_a, log_b)  # log(α + β): x_prev = x_t
    replaced = torch.logaddexp(log_a + LOG_TINY, log_b)  # log(α·1e-30 + β) ≈ log β: x_prev != x_t
    index = x_t.clamp(max=mask_class - 1).unsqueeze(1)  # (B, 1, P)
    return TransitionRows(index, torch.where(masked, log_c, kept), torch.where(masked, log_c, replaced))


def combine_with_rows(source: torch.Tensor, rows: TransitionRows, op: Callable, out: torch.Tensor) -> torch.Tensor:
    """out = op(source, Q) for the (B, K, P) matrix Q that `rows` stands for; `out` may be `source`."""
    hot = op(source.gather(1, rows.index), rows.hot)  # (B, 1, P)
    op(source, rows.other, out=out)
    return out.scatter_(1, rows.index, hot)


def log_stay_masked(x_t: torch.Tensor, mask_class: int) -> torch.Tensor:
    """log q(x_t | x_prev = mask): 0 where x_t is the mask, the log(0) floor elsewhere."""
    return torch.where(x_t == mask_class, 0.0, LOG_TINY).unsqueeze(1)  # (B, 1, P) float32


# ---------------------------------------------------------------------------------------------------------------------
# randomness: every draw goes through uniform_noise


Generators = torch.Generator | Sequence[torch.Generator] | None


def uniform_noise(shape: torch.Size | tuple[int, ...], device: torch.device, generator: Generators,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """U[0, 1) noise of `shape` on `device` (into `out`, float32 of that shape, when given): one generator draws it
    all, a list draws row i from generator i.

    Each generator draws on its own device (torch refuses a CPU generator for a CUDA tensor); the noise then moves.
    """
    noise = torch.empty(shape, device=device) if out is None else out
    if generator is None or isinstance(generator, torch.Generator):
        return draw_into(noise, generator)
    generators = list(generator)
    if len(generators) != shape[0]:
        raise ValueError(f"got {len(generators)} generators for a batch of {shape[0]} rows; "
                         "give one generator per row, or a single generator")
    for row, row_generator in enumerate(generators):  # each row drawn as a batch of one would draw it
        draw_into(noise[row:row + 1], row_generator)
    return noise


def draw_into(out: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    if generator is None or generator.device == out.device:
        return torch.rand(out.shape, generator=generator, out=out)
    return out.copy_(torch.rand(out.shape, generator=generator, device=generator.device), non_blocking=True)


def gumbel_noised(logits: torch.Tensor, generator: Generators, scratch: torch.Tensor | None = None) -> torch.Tensor:
    """logits + g with g = -log(-log(u + ε) + ε), u ~ U[0, 1): the reference's floors, computed in place (in
    `scratch`, float32 of the logits' shape, when given)."""
    noise = uniform_noise(logits.shape, logits.device, generator, out=scratch)  # (B, C, P)
    return noise.add_(TINY).log_().neg_().add_(TINY).log_().neg_().add_(logits)


def categorical_sample_(log_p: torch.Tensor, generator: Generators,
                        scratch: torch.Tensor | None = None) -> torch.LongTensor:
    """One class per pixel of the log-probabilities `log_p` (B, C, P, unnormalised; overwritten) by inverse CDF.

    u ~ U[0, 1) per pixel; the class is the first k with Σ_{j<=k} p_j > u Σ_j p_j: P(k) = p_k / Σ p, exactly the
    distribution of Gumbel-max, from one uniform per pixel instead of one per class. The cumulative sums run along
    the classes of each pixel, laid out last so that they and the binary search read memory in order (a sum over
    the middle dimension, and a comparison of every class with the threshold, took 70% of the step at ITHQ size).
    `scratch`, (B, P, C) in log_p's dtype when given, receives the cumulative sums.
    """
    B, C, P = log_p.shape
    u = uniform_noise((B, 1, P), log_p.device, generator)  # (B, 1, P)
    p = log_p.sub_(log_p.amax(dim=1, keepdim=True)).exp_()  # (B, C, P) unnormalised probabilities
    cdf = torch.cumsum(p.transpose(1, 2), dim=2, out=scratch)  # (B, P, C) non-decreasing in k
    threshold = u.transpose(1, 2).mul_(cdf[:, :, -1:])  # (B, P, 1) u times the total mass
    # the first k whose cumulative mass passes the threshold; the clamp catches u·total rounding up to total
    return torch.searchsorted(cdf, threshold, right=True).squeeze(2).clamp_(max=C - 1)  # (B, P)


def draw_classes(log_p: torch.Tensor, generator: Generators, noise: Noise, *, overwrite: bool,
                 workspace: Workspace | None = None) -> torch.LongTensor:
    """A class per pixel drawn from `log_p` (B, C, P) with the `noise` method; `overwrite` lets it reuse `log_p`;
    its one full-size temporary comes from `workspace` when given."""
    B, C, P = log_p.shape
    if noise == "categorical":
        scratch = workspace.view("scratch", (B, P, C), log_p.dtype, log_p.device) if workspace else None
        return categorical_sample_(log_p if overwrite else log_p.clone(), generator, scratch)
    scratch = workspace.view("scratch", (B, C, P), torch.float32, log_p.device) if workspace else None
    return gumbel_noised(log_p, generator, scratch).argmax(dim=1)


class Workspace:
    """Scratch tensors a scheduler keeps on the CPU from one step to the next, by name, allocated again only to grow
    or to change dtype. On a CPU a fresh tensor pays its page faults on every step: about 90 ms for the 134 MB of a
    (B, K + 1, P) float32 at ITHQ size and batch 8, as long as the arithmetic that fills it. On other devices each
    call allocates afresh: CUDA's caching allocator reuses freed blocks already, and holding them between steps would
    only add to the transformer's peak memory. Like the scheduler's timesteps, it serves one sampling loop at a
    time."""

    def __init__(self):
        self.tensors: dict[str, torch.Tensor] = {}

    def view(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A contiguous tensor of `shape`, on the CPU in the storage kept under `name`; its values are left over."""
        if torch.device(device).type != "cpu":
            return torch.empty(shape, dtype=dtype, device=device)
        size, held = math.prod(shape), self.tensors.get(name)
        if held is None or held.numel() < size or held.dtype != dtype:
            held = self.tensors[name] = torch.empty(size, dtype=dtype, device=device)
        return held[:size].view(shape)


def logsumexp_over_classes(q: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    """torch.logsumexp(q, dim=1, keepdim=True) for q (B, C, P), the same floats, its (B, C, P) temporary in
    `scratch`: (B, 1, P)."""
    maxes = q.amax(dim=1, keepdim=True)  # (B, 1, P)
    maxes.masked_fill_(maxes.abs() == torch.inf, 0)  # as torch does: an all -inf pixel sums to -inf, not NaN
    return torch.sub(q, maxes, out=scratch).exp_().sum(dim=1, keepdim=True).log_().add_(maxes)


def posterior_dtype(log_p_x_0: torch.Tensor) -> torch.dtype:
    """The posterior's dtype: at least float32, whatever the model's output dtype (float16 and bfloat16 included)."""
    return torch.promote_types(log_p_x_0.dtype, torch.float32)


# ---------------------------------------------------------------------------------------------------------------------
# the scheduler


class VQDiffusionScheduler(ConfigOnlyComponent):
    """Samples x_{t-1} (or the next timestep of a skipping schedule) from the transformer's log p(x_0 | x_t)."""

    config_class = VQDiffusionSchedulerConfig
    config_name = "scheduler_config.json"
    diffusers_name = "VQDiffusionScheduler"
    order = 1  # model evaluations per step

    def __init__(self, num_vec_classes: int, num_train_timesteps: int = 100, alpha_cum_start: float = 0.99999,
                 alpha_cum_end: float = 0.000009, gamma_cum_start: float = 0.000009, gamma_cum_end: float = 0.99999):
        self.config = VQDiffusionSchedulerConfig.from_dict(dict(
            num_vec_classes=num_vec_classes, num_train_timesteps=num_train_timesteps, alpha_cum_start=alpha_cum_start,
            alpha_cum_end=alpha_cum_end, gamma_cum_start=gamma_cum_start, gamma_cum_end=gamma_cum_end))
        self.num_embed = num_vec_classes
        self.mask_class = num_vec_classes - 1  # also K, the number of codebook classes
        self.num_train_timesteps = num_train_timesteps
        self.alpha_bar, self.gamma_bar = cumulative_schedules(self.config)  # (T+1,) float64, CPU
        beta_bar = replace_probability(self.alpha_bar, self.gamma_bar, self.mask_class)
        self.log_cumprod_at, self.log_cumprod_bt, self.log_cumprod_ct = log_probabilities(
            self.alpha_bar, beta_bar, self.gamma_bar)  # (T+1,) each: log ᾱ_t, log β̄_t, log γ̄_t
        self.log_at, self.log_bt, self.log_ct = self.transition_log_probs(
            torch.arange(-1, num_train_timesteps - 1), torch.arange(num_train_timesteps))  # (T,) single steps
        self.num_inference_steps: int | None = None
        self.spacing: TimestepSpacing = "reference"
        self.workspace = Workspace()  # the step's full-size temporaries, kept between steps
        self._use_timesteps(list(range(num_train_timesteps - 1, -1, -1)), device=None)

    # -- schedule -----------------------------------------------------------------------------------------------------

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None,
                      spacing: TimestepSpacing = "reference") -> None:
        """Choose the timesteps `step` runs through; see the module docstring for the two spacings."""
        T = self.num_train_timesteps
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, Integral) \
                or not 1 <= num_inference_steps <= T:
            raise ValueError(f"num_inference_steps must be an integer in [1, {T}] (num_train_timesteps), "
                             f"got {num_inference_steps!r}")
        check_choice("spacing", spacing, TIMESTEP_SPACINGS)
        n = int(num_inference_steps)
        if spacing == "reference":
            timesteps = list(range(n - 1, -1, -1))
        else:
            timesteps = torch.linspace(T - 1, 0, n, dtype=torch.float64).round().long().tolist()
        self.num_inference_steps, self.spacing = n, spacing
        self._use_timesteps(timesteps, device)

    def _use_timesteps(self, timesteps: list[int], device: str | torch.device | None) -> None:
        self.timesteps = torch.tensor(timesteps, dtype=torch.long, device=device)  # (n,) decreasing
        self.timestep_values = timesteps  # the same as ints: a loop that steps with them reads nothing off the device
        self.previous_timesteps = dict(zip(timesteps, timesteps[1:] + [-1]))
        for name in ("log_at", "log_bt", "log_ct", "log_cumprod_at", "log_cumprod_bt", "log_cumprod_ct"):
            setattr(self, name, getattr(self, name).to(device))
        self.jump_log_probs = {t: tuple(p.to(device) for p in self.transition_log_probs(s, t))
                               for t, s in self.previous_timesteps.items() if s != t - 1}  # on the device already

    def previous_timestep(self, timestep: int | torch.Tensor) -> int:
        """The timestep a step from `timestep` lands on: the next one of the current schedule, or t - 1 for a
        training timestep outside it; -1 stands for x_0."""
        t = self._checked_train_timestep(timestep, "timestep")
        return self.previous_timesteps.get(t, t - 1)

    def transition_log_probs(self, s: int | torch.Tensor, t: int | torch.Tensor) -> tuple[torch.Tensor, ...]:
        """log α_{s->t}, log β_{s->t}, log γ_{s->t} of the jump from timestep s (-1: x_0) to t."""
        alpha = self.alpha_bar[t] / self.alpha_bar[s]
        gamma = 1 - (1 - self.gamma_bar[t]) / (1 - self.gamma_bar[s])
        return log_probabilities(alpha, replace_probability(alpha, gamma, self.mask_class), gamma)

    def _step_log_probs(self, s: int, t: int) -> tuple[torch.Tensor, ...]:
        if s == t - 1:
            return self.log_at[t], self.log_bt[t], self.log_ct[t]  # precomputed single steps
        if self.previous_timesteps.get(t) == s:
            return self.jump_log_probs[t]  # the schedule's jumps, precomputed by set_timesteps
        return tuple(p.to(self.log_at.device) for p in self.transition_log_probs(s, t))

    # -- math ---------------------------------------------------------------------------------------------------------

    def log_Q_t_transitioning_to_known_class(self, *, t: int | torch.Tensor, x_t: torch.LongTensor,
                                             log_onehot_x_t: torch.Tensor | None = None,
                                             cumulative: bool) -> torch.Tensor:
        """Columns of log transition probabilities into each pixel's x_t.

        cumulative=True:  log q(x_t | x_0 = j) for the K non-mask classes j, shape (B, K, P).
        cumulative=False: log q(x_t | x_{t-1} = j) for all K + 1 classes, shape (B, K + 1, P).
        Log zeros are the reference's floor log(1e-30). `log_onehot_x_t` (the log one-hot of x_t) is accepted for
        diffusers-style callers; the rows follow from x_t alone, so it is not read.
        """
        t = self._checked_train_timestep(t, "t")
        x_t = self._checked_tokens(x_t, "x_t")
        if cumulative:
            log_abc = self.log_cumprod_at[t], self.log_cumprod_bt[t], self.log_cumprod_ct[t]
        else:
            log_abc = self.log_at[t], self.log_bt[t], self.log_ct[t]
        rows = transition_rows(x_t, *log_abc, self.mask_class)
        B, P = x_t.shape
        K = self.mask_class
        out = torch.empty((B, K if cumulative else K + 1, P), device=x_t.device)
        out[:, :K] = rows.other
        out[:, :K].scatter_(1, rows.index, rows.hot)
        if not cumulative:
            out[:, K:] = log_stay_masked(x_t, self.mask_class)
        return out

    def q_posterior(self, log_p_x_0: torch.Tensor, x_t: torch.LongTensor, t: int | torch.Tensor,
                    t_prev: int | None = None) -> torch.Tensor:
        """log p(x_{t_prev} | x_t) = log Σ_{x_0} q(x_t | x_{t_prev}) q(x_{t_prev} | x_0) p(x_0) / q(x_t | x_0).

        log_p_x_0: (B, K, P) the model's log p(x_0 | x_t); x_t: (B, P) tokens; t_prev defaults to t - 1 (the reference
        single step), any -1 <= t_prev < t is a jump. Returns (B, K + 1, P); it sums to 1 over classes when p(x_0) does.
        """
        t = self._checked_train_timestep(t, "t")
        t_prev = t - 1 if t_prev is None else self._as_timestep(t_prev, "t_prev")
        if not -1 <= t_prev < t:
            raise ValueError(f"t_prev must lie in [-1, {t - 1}] (before t={t}), got {t_prev}")
        x_t = self._checked_tokens(x_t, "x_t")
        self._check_model_output(log_p_x_0, x_t)
        return self._posterior(log_p_x_0, x_t, t, t_prev)

    def _posterior(self, log_p_x_0: torch.Tensor, x_t: torch.Tensor, t: int, s: int,
                   out: torch.Tensor | None = None) -> torch.Tensor:
        """log p(x_s | x_t) (B, K + 1, P), into `out` when given."""
        B, K, P = log_p_x_0.shape
        to_t = transition_rows(x_t, self.log_cumprod_at[t], self.log_cumprod_bt[t], self.log_cumprod_ct[t],
                               self.mask_class)  # q(x_t | x_0)
        s_to_t = transition_rows(x_t, *self._step_log_probs(s, t), self.mask_class)  # q(x_t | x_s)
        dtype = posterior_dtype(log_p_x_0)
        out = torch.empty((B, K + 1, P), dtype=dtype, device=log_p_x_0.device) if out is None else out
        q = out[:, :K]  # (B, K, P) view: the non-mask classes
        combine_with_rows(log_p_x_0, to_t, torch.sub, out=q)  # log p(x_0) / q(x_t | x_0)
        norm = logsumexp_over_classes(q, self.workspace.view("scratch", (B, K, P), dtype, q.device))  # (B, 1, P)
        q.sub_(norm)  # weights over x_0 that sum to 1
        q.add_(self.log_cumprod_at[s])
        torch.logaddexp(q, self.log_cumprod_bt[s], out=q)  # Σ_{x_0} w(x_0) q(x_s = j | x_0) = ᾱ_s w_j + β̄_s
        combine_with_rows(q, s_to_t, torch.add, out=q)  # · q(x_t | x_s = j)
        q.add_(norm)
        # mask row: γ̄_s · q(x_t | x_s = mask) · norm
        torch.add(self.log_cumprod_ct[s] + log_stay_masked(x_t, self.mask_class), norm, out=out[:, K:])
        return out  # (B, K + 1, P)

    # -- sampling -----------------------------------------------------------------------------------------------------

    def step(self, model_output: torch.Tensor, timestep: int | torch.Tensor, sample: torch.LongTensor,
             generator: Generators = None, return_dict: bool = True,
             noise: Noise = "gumbel") -> VQDiffusionSchedulerOutput | tuple[torch.LongTensor]:
        """Sample the tokens at the previous timestep of the schedule.

        model_output: (B, K, P) log p(x_0 | x_t); sample: (B, P) tokens x_t, their values trusted (see the module
        docstring); generator: one, or one per row, on any device; noise: "gumbel" or "categorical".
        Give `timestep` as an int to keep the step free of device reads.
        """
        check_choice("noise", noise, NOISES)
        t = self._as_timestep(timestep, "timestep")
        x_t = self._checked_token_layout(sample, "sample")
        self._check_model_output(model_output, x_t)
        prev_sample = self._previous_tokens(model_output, x_t, t, self.previous_timestep(t), generator, noise)
        return VQDiffusionSchedulerOutput(prev_sample) if return_dict else (prev_sample,)

    def _previous_tokens(self, log_p_x_0: torch.Tensor, x_t: torch.Tensor, t: int, s: int, generator: Generators,
                         noise: Noise) -> torch.Tensor:
        """x_s ~ p_θ(x_s | x_t), eq. 11 with p_θ(x_0 | x_t) (at t = 0, x_0 itself): (B, P) tokens."""
        if t == 0:
            return draw_classes(log_p_x_0, generator, noise, overwrite=False, workspace=self.workspace)  # (B, P)
        B, K, P = log_p_x_0.shape
        posterior = self.workspace.view("posterior", (B, K + 1, P), posterior_dtype(log_p_x_0), log_p_x_0.device)
        return draw_classes(self._posterior(log_p_x_0, x_t, t, s, out=posterior), generator, noise, overwrite=True,
                            workspace=self.workspace)

    # -- input checks -------------------------------------------------------------------------------------------------

    @staticmethod
    def _as_timestep(value: int | torch.Tensor, name: str) -> int:
        if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point():
            return int(value.item())
        if isinstance(value, Integral) and not isinstance(value, bool):
            return int(value)
        raise ValueError(f"{name} must be an integer or a one-element integer tensor, got {value!r}")

    def _checked_train_timestep(self, value: int | torch.Tensor, name: str) -> int:
        t = self._as_timestep(value, name)
        if not 0 <= t < self.num_train_timesteps:
            raise ValueError(f"{name} must lie in [0, {self.num_train_timesteps - 1}] (num_train_timesteps="
                             f"{self.num_train_timesteps}), got {t}")
        return t

    def _checked_token_layout(self, tokens: torch.Tensor, name: str) -> torch.Tensor:
        """`tokens` as long, after the checks that need no device read: an integer tensor (B, P)."""
        if tokens.ndim != 2 or tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool:
            raise ValueError(f"{name} must be an integer tensor of shape (batch, pixels), "
                             f"got {tokens.dtype} of shape {tuple(tokens.shape)}")
        return tokens.long()

    def _checked_tokens(self, tokens: torch.Tensor, name: str) -> torch.Tensor:
        """`_checked_token_layout`, and every value in [0, mask_class] (a device read)."""
        tokens = self._checked_token_layout(tokens, name)
        low, high = (int(v) for v in torch.aminmax(tokens))
        if low < 0 or high > self.mask_class:
            bad = low if low < 0 else high
            raise ValueError(f"{name} holds token {bad}; tokens must lie in [0, {self.mask_class}] "
                             f"(num_vec_classes={self.num_embed}, the last one is the mask)")
        return tokens.long()

    def _check_model_output(self, model_output: torch.Tensor, x_t: torch.Tensor) -> None:
        expected = (x_t.shape[0], self.mask_class, x_t.shape[1])
        if tuple(model_output.shape) != expected:
            raise ValueError(f"model_output has shape {tuple(model_output.shape)}; expected (batch, num_vec_classes - 1,"
                             f" pixels) = {expected} to match the tokens of shape {tuple(x_t.shape)}")
