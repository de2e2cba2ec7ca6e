"""The training objective of VQ-Diffusion (Gu et al. 2022, sec. 4.1-4.3) for a batch with one timestep per sample.

Tokens have K codebook classes plus the mask class K. With the scheduler's cumulative schedule (ᾱ_t, β̄_t, γ̄_t)
and single steps (α_t, β_t, γ_t):

    forward jump, eq. 8:   q(x_t | x_0) keeps x_0 with ᾱ_t + β̄_t, turns it into each other class with β̄_t and
                           masks it with γ̄_t;
    posterior, eq. 11:     q(x_{t-1} | x_t, x_0), and the model's p_θ(x_{t-1} | x_t) = the same formula with the
                           transformer's p_θ(x_0 | x_t, y) in place of the one-hot x_0 (the reparameterisation);
    loss, eq. 5 and 12:    L_vlb: at t > 0 KL(q(x_{t-1} | x_t, x_0) || p_θ(x_{t-1} | x_t)), at t = 0 -log p_θ(x_0 | x_1),
                           plus λ L_x0 with L_x0 = -log p_θ(x_0 | x_t, y), the auxiliary denoising objective,
                           weighted (2 - t/T) as the reference implementation does (its "adaptive" weight).

Timesteps are drawn uniformly, or (`TimestepSampler`, as the reference trains) by importance: p(t) ∝ sqrt(E[L_t²])
from a running mean of each timestep's squared loss, each sample's loss weighted 1 / (T p(t)) so the objective's
expectation stays the uniform one. The hard, high-noise timesteps, where the prompt (or its absence, for the learned
"no prompt" embeddings) decides the most, then get more of a short run's samples.

The scheduler's `q_posterior` computes eq. 11 for one shared timestep, without gradients. Training needs a
timestep per sample and gradients through p_θ, so `log_posterior` evaluates the same closed form with every
schedule entry gathered per sample; a test checks the two agree.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vqbatch.schedulers.vq_diffusion import VQDiffusionScheduler

LOG_FLOOR = -70.0  # log(0) stand-in, as in the reference: keeps 0 * log 0 terms finite


@dataclass(frozen=True)
class Schedule:
    """Per-timestep log probabilities as (T + 1,) float32 tensors; index -1 (= T) is "no noise" (ᾱ = 1)."""

    log_cumprod_at: torch.Tensor
    log_cumprod_bt: torch.Tensor
    log_cumprod_ct: torch.Tensor
    log_at: torch.Tensor  # (T,) single steps t-1 -> t
    log_bt: torch.Tensor
    log_ct: torch.Tensor
    num_classes: int  # K, the codebook classes (the mask is class K)

    @classmethod
    def of(cls, scheduler: VQDiffusionScheduler) -> "Schedule":
        names = ("log_cumprod_at", "log_cumprod_bt", "log_cumprod_ct", "log_at", "log_bt", "log_ct")
        return cls(*(getattr(scheduler, name).float().cpu() for name in names), num_classes=scheduler.num_embed - 1)

    @property
    def num_timesteps(self) -> int:
        return self.log_at.shape[0]


def per_sample(values: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return values[t].view(-1, 1, 1)  # (B, 1, 1)


def q_sample(x_0: torch.Tensor, t: torch.Tensor, schedule: Schedule, generator: torch.Generator) -> torch.Tensor:
    """Draw x_t ~ q(x_t | x_0) (eq. 8): masked with γ̄_t, else a uniform class with K β̄_t, else x_0. (B, P) tokens."""
    K = schedule.num_classes
    gamma = schedule.log_cumprod_ct[t].exp().view(-1, 1)  # (B, 1)
    replace = (schedule.log_cumprod_bt[t].exp() * K).view(-1, 1)  # (B, 1)
    u = torch.rand(x_0.shape, generator=generator)  # (B, P)
    random_classes = torch.randint(0, K, x_0.shape, generator=generator)  # (B, P)
    x_t = torch.where(u < gamma + replace, random_classes, x_0)
    return torch.where(u < gamma, torch.full_like(x_0, K), x_t)


def log_transition_to(x_t: torch.Tensor, log_a: torch.Tensor, log_b: torch.Tensor, log_c: torch.Tensor,
                      num_classes: int) -> torch.Tensor:
    """log q(x_t | x_prev = j) for the K non-mask classes j of every pixel, (B, K, P); log_a etc. are (B, 1, 1)."""
    masked = (x_t == num_classes).unsqueeze(1)  # (B, 1, P)
    same = torch.nn.functional.one_hot(x_t.clamp(max=num_classes - 1), num_classes).permute(0, 2, 1).bool()  # (B, K, P)
    kept = torch.logaddexp(log_a, log_b)  # log(α + β)
    return torch.where(masked, log_c, torch.where(same, kept, log_b))


def log_posterior(log_p_x_0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, schedule: Schedule) -> torch.Tensor:
    """log Σ_{x_0} q(x_{t-1} | x_t, x_0) p(x_0) (eq. 11) for p(x_0) (B, K, P), per-sample t (B,). Returns (B, K+1, P)."""
    K = schedule.num_classes
    s = t - 1  # -1 indexes the "no noise" entry: at t = 0 the posterior is over x_0 itself
    to_t = log_transition_to(x_t, per_sample(schedule.log_cumprod_at, t), per_sample(schedule.log_cumprod_bt, t),
                             per_sample(schedule.log_cumprod_ct, t), K)  # q(x_t | x_0 = j)
    step = log_transition_to(x_t, per_sample(schedule.log_at, t), per_sample(schedule.log_bt, t),
                             per_sample(schedule.log_ct, t), K)  # q(x_t | x_{t-1} = j)
    weights = log_p_x_0 - to_t  # p(x_0 = j) / q(x_t | x_0 = j)
    norm = torch.logsumexp(weights, dim=1, keepdim=True)  # (B, 1, P)
    weights = weights - norm
    prior = torch.logaddexp(weights + per_sample(schedule.log_cumprod_at, s), per_sample(schedule.log_cumprod_bt, s))
    stay_masked = torch.where(x_t == K, 0.0, LOG_FLOOR).unsqueeze(1)  # log q(x_t | x_{t-1} = mask), (B, 1, P)
    mask_row = per_sample(schedule.log_cumprod_ct, s) + stay_masked  # γ̄_{t-1} q(x_t | mask)
    return (torch.cat([prior + step, mask_row], dim=1) + norm).clamp(min=LOG_FLOOR)  # (B, K+1, P)


def log_one_hot(x_0: torch.Tensor, num_classes: int) -> torch.Tensor:
    one_hot = torch.nn.functional.one_hot(x_0, num_classes).permute(0, 2, 1)  # (B, K, P)
    return torch.where(one_hot.bool(), 0.0, LOG_FLOOR)


@dataclass(frozen=True)
class DiffusionLoss:
    total: torch.Tensor  # scalar, what is minimised
    vlb: torch.Tensor  # scalar, L_vlb per latent pixel (nats)
    x0: torch.Tensor  # scalar, -log p(x_0 | x_t) per latent pixel (nats)
    per_sample_vlb: torch.Tensor  # (B,) L_vlb of each sample per latent pixel, detached: the sampler's history


def diffusion_loss(log_p_x_0: torch.Tensor, x_0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
                   schedule: Schedule, aux_weight: float, weights: torch.Tensor | None = None) -> DiffusionLoss:
    """L_vlb + λ L_x0 (eq. 12 and sec. 4.3) from the transformer's log p(x_0 | x_t, y) (B, K, P).

    `weights` (B,) scale each sample's terms (importance sampling's 1 / (T p(t))); None weighs all alike.
    """
    weight_of = torch.ones(t.shape) if weights is None else weights  # (B,)
    log_p_x_0 = log_p_x_0.clamp(min=LOG_FLOOR)
    log_true = log_posterior(log_one_hot(x_0, schedule.num_classes), x_t, t, schedule)  # (B, K+1, P)
    log_model = log_posterior(log_p_x_0, x_t, t, schedule)  # (B, K+1, P)
    kl = (log_true.exp() * (log_true - log_model)).sum(dim=1)  # (B, P)
    decoder_nll = -log_model.gather(1, x_0.unsqueeze(1)).squeeze(1)  # (B, P): -log p(x_0 | x_1) at t = 0
    first = (t == 0).view(-1, 1)  # (B, 1)
    per_sample = torch.where(first, decoder_nll, kl).mean(dim=1)  # (B,)
    x0_nll = -log_p_x_0.gather(1, x_0.unsqueeze(1)).squeeze(1)  # (B, P)
    adaptive = 2.0 - t.float() / schedule.num_timesteps  # (B,)
    auxiliary = adaptive * torch.where(first, decoder_nll, x0_nll).mean(dim=1)  # (B,)
    total = (weight_of * (per_sample + aux_weight * auxiliary)).mean()
    return DiffusionLoss(total=total, vlb=per_sample.mean().detach(), x0=x0_nll.mean().detach(),
                         per_sample_vlb=per_sample.detach())


class TimestepSampler:
    """Draws each sample's t: uniformly, or by importance once every t has `IMPORTANCE_AFTER` losses seen.

    Importance (the reference's `sample_time`, after Nichol & Dhariwal 2021): p(t) ∝ sqrt(E[L_t²]) + 1e-4 from a
    running mean (0.9 old, 0.1 new) of each timestep's squared loss, with t = 0 (the decoder term, of another scale)
    given the weight of t = 1. Its state is plain tensors, saved with a training run so a resumed run draws the same.
    """

    IMPORTANCE_AFTER = 10

    def __init__(self, num_timesteps: int, importance: bool):
        self.importance = importance
        self.history = torch.zeros(num_timesteps, dtype=torch.float64)  # (T,) running mean of L_t²
        self.counts = torch.zeros(num_timesteps, dtype=torch.int64)  # (T,) losses seen per timestep

    def probabilities(self) -> torch.Tensor:
        """p(t), (T,) float64."""
        if not self.importance or bool((self.counts <= self.IMPORTANCE_AFTER).any()):
            return torch.full(self.history.shape, 1.0 / len(self.history), dtype=torch.float64)
        root = self.history.sqrt() + 1e-4
        root[0] = root[1]
        return root / root.sum()

    def sample(self, batch: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """t (B,) and each sample's loss weight 1 / (T p(t)) (B,), which is 1 under uniform sampling."""
        p = self.probabilities()
        t = torch.multinomial(p, batch, replacement=True, generator=generator)  # (B,)
        return t, (1.0 / (len(p) * p[t])).float()

    def update(self, t: torch.Tensor, losses: torch.Tensor) -> None:
        """Fold one batch's per-sample losses (B,) in, sample by sample in batch order (deterministic)."""
        for step, loss in zip(t.tolist(), losses.double().tolist()):
            self.history[step] = 0.9 * self.history[step] + 0.1 * loss * loss
            self.counts[step] += 1

    def state_dict(self) -> dict:
        return {"history": self.history.clone(), "counts": self.counts.clone()}

    def load_state_dict(self, state: dict) -> None:
        self.history, self.counts = state["history"].clone(), state["counts"].clone()
