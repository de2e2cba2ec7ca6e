"""DDPM sampling (Ho, Jain & Abbeel 2020): the reverse chain x_T -> x_0 of a Gaussian diffusion.

Notation of Ho et al.: β_t the noise variance of training step t, α_t = 1 - β_t, ᾱ_t = Π_{s<=t} α_s.
    forward, eq. 4:     q(x_t | x_0) = N(√ᾱ_t x_0, (1 - ᾱ_t) I)
    posterior, eq. 6/7: q(x_{t-1} | x_t, x_0) = N(μ̃_t, β̃_t I)
        μ̃_t = √ᾱ_{t-1} β_t / (1 - ᾱ_t) · x_0 + √α_t (1 - ᾱ_{t-1}) / (1 - ᾱ_t) · x_t
        β̃_t = (1 - ᾱ_{t-1}) / (1 - ᾱ_t) · β_t
When sampling with fewer steps than training, t-1 stands for the previous timestep of the schedule and
α_t = ᾱ_t / ᾱ_{t-1}, β_t = 1 - α_t describe the whole jump. Timesteps count from 0 (Ho et al. count from 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Integral
from typing import Any, ClassVar

import numpy as np
import torch
from pydantic import Field, ValidationInfo, field_validator

from vqbatch.choices import BetaSchedule, DDPMTimestepSpacing, PredictionType, VarianceType
from vqbatch.configuration import ComponentConfig, ConfigOnlyComponent
from vqbatch.outputs import BaseOutput

LEARNED_VARIANCE_TYPES = ("learned", "learned_range")


@dataclass
class DDPMSchedulerOutput(BaseOutput):
    prev_sample: torch.Tensor  # x_{t-1}, the next input of the model
    pred_original_sample: torch.Tensor | None = None  # x̂_0 predicted at step t, for previews and guidance


# ---------------------------------------------------------------------------------------------------------------------
# noise schedules


def linear_betas(beta_start: float, beta_end: float, num_train_timesteps: int) -> torch.Tensor:
    return torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)  # (T,)


def scaled_linear_betas(beta_start: float, beta_end: float, num_train_timesteps: int) -> torch.Tensor:
    """Linear in √β: the schedule of latent diffusion."""
    return linear_betas(beta_start**0.5, beta_end**0.5, num_train_timesteps) ** 2  # (T,)


def cosine_betas(num_train_timesteps: int, max_beta: float = 0.999) -> torch.Tensor:
    """Nichol & Dhariwal 2021, eq. 17: ᾱ(t) = cos²((t/T + s) / (1 + s) · π/2), s = 0.008; β_t = 1 - ᾱ_t / ᾱ_{t-1}
    capped at `max_beta` so the last steps do not destroy the signal in one jump."""

    def alpha_bar(fraction: float) -> float:
        return math.cos((fraction + 0.008) / 1.008 * math.pi / 2) ** 2

    steps = range(num_train_timesteps)
    betas = [min(1 - alpha_bar((t + 1) / num_train_timesteps) / alpha_bar(t / num_train_timesteps), max_beta)
             for t in steps]
    return torch.tensor(betas, dtype=torch.float32)  # (T,)


def make_betas(config: DDPMSchedulerConfig) -> torch.Tensor:
    if config.trained_betas is not None:
        return torch.tensor(config.trained_betas, dtype=torch.float32)  # (T,)
    if config.beta_schedule == "linear":
        return linear_betas(config.beta_start, config.beta_end, config.num_train_timesteps)
    if config.beta_schedule == "scaled_linear":
        return scaled_linear_betas(config.beta_start, config.beta_end, config.num_train_timesteps)
    return cosine_betas(config.num_train_timesteps)


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2023, Algorithm 1: shift √ᾱ so that √ᾱ_{T-1} = 0 (the last step is pure noise, SNR 0) and scale
    it so that √ᾱ_0 keeps its value; then turn √ᾱ back into betas."""
    sqrt_alpha_bar = torch.cumprod(1.0 - betas, dim=0).sqrt()  # (T,)
    first, last = sqrt_alpha_bar[0].clone(), sqrt_alpha_bar[-1].clone()
    sqrt_alpha_bar = (sqrt_alpha_bar - last) * (first / (first - last))
    alpha_bar = sqrt_alpha_bar**2
    alphas = torch.cat([alpha_bar[:1], alpha_bar[1:] / alpha_bar[:-1]])  # α_t = ᾱ_t / ᾱ_{t-1}
    return 1 - alphas  # (T,)


# ---------------------------------------------------------------------------------------------------------------------
# inference timesteps (Lin et al. 2023, Table 2)


def leading_timesteps(num_steps: int, num_train_timesteps: int, steps_offset: int) -> np.ndarray:
    """Every (T // n)-th step counted from 0, shifted by `steps_offset`."""
    return np.arange(num_steps - 1, -1, -1, dtype=np.int64) * (num_train_timesteps // num_steps) + steps_offset


def trailing_timesteps(num_steps: int, num_train_timesteps: int) -> np.ndarray:
    """Steps T/n apart counted back from T - 1, so that sampling starts at the last training step. Built with a float
    `np.arange` like the reference implementation, whose rounding of x.5 ties it follows; that arange sometimes holds
    one value too many (a rounding of 0), hence the cut to `num_steps`."""
    steps = np.arange(num_train_timesteps, 0, -num_train_timesteps / num_steps)[:num_steps]
    return np.round(steps).astype(np.int64) - 1


def linspace_timesteps(num_steps: int, num_train_timesteps: int) -> np.ndarray:
    """n steps evenly spread over [0, T - 1], rounded to the nearest integer."""
    return np.round(np.linspace(0, num_train_timesteps - 1, num_steps))[::-1].astype(np.int64)


def check_custom_timesteps(timesteps: list[Any], num_train_timesteps: int) -> None:
    if not timesteps:
        raise ValueError("timesteps is empty; give at least one timestep")
    not_integers = [t for t in timesteps if not isinstance(t, Integral) or isinstance(t, bool)]
    if not_integers:
        raise ValueError(f"timesteps must be integers, got {not_integers}")
    outside = [t for t in timesteps if not 0 <= t < num_train_timesteps]
    if outside:
        raise ValueError(f"timesteps {outside} are outside the training range [0, {num_train_timesteps - 1}]")
    for earlier, later in zip(timesteps, timesteps[1:]):
        if later >= earlier:
            raise ValueError(f"timesteps must be strictly descending, but {earlier} is followed by {later}")


# ---------------------------------------------------------------------------------------------------------------------
# one reverse step


def dynamic_threshold(x0: torch.Tensor, ratio: float, max_value: float) -> torch.Tensor:
    """Saharia et al. 2022 (Imagen), §2.3: s = the `ratio` quantile of |x̂_0| per sample, clamped to [1, max_value];
    x̂_0 is clipped to [-s, s] and divided by s, which pulls saturated pixels back inwards."""
    flat = x0.reshape(x0.shape[0], -1)  # (B, C*H*W)
    if flat.dtype not in (torch.float32, torch.float64):
        flat = flat.float()  # quantile needs float32 or float64
    s = torch.quantile(flat.abs(), ratio, dim=1).clamp(min=1, max=max_value).unsqueeze(1)  # (B, 1)
    return (torch.clamp(flat, -s, s) / s).reshape(x0.shape).to(x0.dtype)


def posterior_mean(x0: torch.Tensor, xt: torch.Tensor, alpha_bar_t: torch.Tensor,
                   alpha_bar_prev: torch.Tensor) -> torch.Tensor:
    """μ̃_t(x_t, x_0) of Ho et al. eq. 7."""
    alpha_t = alpha_bar_t / alpha_bar_prev
    beta_t = 1 - alpha_t
    x0_coefficient = (alpha_bar_prev**0.5 * beta_t) / (1 - alpha_bar_t)
    xt_coefficient = alpha_t**0.5 * (1 - alpha_bar_prev) / (1 - alpha_bar_t)
    return x0_coefficient * x0 + xt_coefficient * xt


def noise_std(variance_type: VarianceType, alpha_bar_t: torch.Tensor, alpha_bar_prev: torch.Tensor,
              predicted_variance: torch.Tensor | None) -> torch.Tensor:
    """σ_t of x_{t-1} = μ̃_t + σ_t z. The `_log` variants are the same variances, which the code bases that named
    them (rl-diffuser, GLIDE) kept in log space."""
    beta_t = 1 - alpha_bar_t / alpha_bar_prev
    posterior_variance = ((1 - alpha_bar_prev) / (1 - alpha_bar_t) * beta_t).clamp(min=1e-20)  # β̃_t, eq. 7; log-safe
    if variance_type in ("fixed_small", "fixed_small_log"):  # σ_t² = β̃_t, the lower bound of Ho et al. §3.2
        return posterior_variance**0.5
    if variance_type in ("fixed_large", "fixed_large_log"):  # σ_t² = β_t, the upper bound
        return beta_t**0.5
    if variance_type == "learned":  # the model predicts σ_t² itself
        return predicted_variance**0.5
    # learned_range, Nichol & Dhariwal 2021 eq. 15: log σ_t² = v log β_t + (1 - v) log β̃_t with v = (output + 1) / 2
    v = (predicted_variance + 1) / 2
    return torch.exp(0.5 * (v * torch.log(beta_t) + (1 - v) * torch.log(posterior_variance)))


# ---------------------------------------------------------------------------------------------------------------------
# the scheduler


class DDPMSchedulerConfig(ComponentConfig):
    """Every option of `DDPMScheduler`, validated; stored as `scheduler_config.json` in the diffusers layout."""

    num_train_timesteps: int = Field(1000, ge=1)  # T, the number of diffusion steps the model was trained with
    beta_start: float = Field(0.0001, gt=0, lt=1)
    beta_end: float = Field(0.02, gt=0, lt=1)
    beta_schedule: BetaSchedule = "linear"
    trained_betas: list[float] | None = None  # one β per training step; replaces beta_start/beta_end/beta_schedule
    variance_type: VarianceType = "fixed_small"
    clip_sample: bool = True  # clip x̂_0 to [-clip_sample_range, clip_sample_range]
    prediction_type: PredictionType = "epsilon"  # what the model predicts: the noise ε, x_0, or v (Salimans & Ho)
    thresholding: bool = False  # dynamic thresholding of x̂_0 (Imagen); replaces clip_sample; not for latents
    dynamic_thresholding_ratio: float = Field(0.995, gt=0, le=1)
    clip_sample_range: float = Field(1.0, gt=0)
    sample_max_value: float = Field(1.0, gt=0)  # the largest threshold s of dynamic thresholding
    timestep_spacing: DDPMTimestepSpacing = "leading"
    steps_offset: int = Field(0, ge=0)  # added to the 'leading' timesteps
    rescale_betas_zero_snr: bool = False  # make ᾱ_{T-1} = 0 (Lin et al. 2023); use with v_prediction

    @field_validator("trained_betas", mode="before")
    @classmethod
    def arrays_to_lists(cls, value: Any) -> Any:
        return value.tolist() if isinstance(value, (np.ndarray, torch.Tensor)) else value

    @field_validator("trained_betas")
    @classmethod
    def one_beta_per_training_step(cls, betas: list[float] | None, info: ValidationInfo) -> list[float] | None:
        if betas is None:
            return None
        num_train_timesteps = info.data.get("num_train_timesteps")
        if len(betas) != num_train_timesteps:
            raise ValueError(f"needs one beta per training step: {len(betas)} betas for "
                             f"num_train_timesteps={num_train_timesteps}")
        outside = [beta for beta in betas if not 0 < beta <= 1]
        if outside:
            raise ValueError(f"betas must lie in (0, 1], got {outside[:5]}")
        return betas


class DDPMScheduler(ConfigOnlyComponent):
    """The sampler of Ho et al. 2020: `set_timesteps`, then for each t in `timesteps` call
    `step(model(x_t, t), t, x_t, generator)` to get x_{t-1}; `add_noise` is the forward process for training."""

    config_class: ClassVar[type[ComponentConfig]] = DDPMSchedulerConfig
    config_name: ClassVar[str] = "scheduler_config.json"
    diffusers_name: ClassVar[str] = "DDPMScheduler"
    config: DDPMSchedulerConfig
    order: ClassVar[int] = 1  # model evaluations per step (multistep solvers have more)

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: BetaSchedule = "linear",
        trained_betas: np.ndarray | list[float] | None = None,
        variance_type: VarianceType = "fixed_small",
        clip_sample: bool = True,
        prediction_type: PredictionType = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        clip_sample_range: float = 1.0,
        sample_max_value: float = 1.0,
        timestep_spacing: DDPMTimestepSpacing = "leading",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
    ):
        settings = {name: value for name, value in locals().items() if name != "self"}
        self.config = DDPMSchedulerConfig.from_dict(settings)
        betas = make_betas(self.config)
        self.betas = rescale_zero_terminal_snr(betas) if self.config.rescale_betas_zero_snr else betas  # (T,)
        self.alphas = 1.0 - self.betas  # (T,)
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)  # (T,) ᾱ_t
        self.init_noise_sigma = 1.0  # x_T ~ N(0, I)
        self.custom_timesteps = False
        self.num_inference_steps: int | None = None
        self.timesteps = torch.arange(len(self) - 1, -1, -1)  # (T,) every training step until set_timesteps

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    def scale_model_input(self, sample: torch.Tensor, timestep: int | None = None) -> torch.Tensor:
        """DDPM feeds x_t to the model unscaled; here for interchangeability with schedulers that scale it."""
        return sample

    def set_timesteps(self, num_inference_steps: int | None = None, device: str | torch.device | None = None,
                      timesteps: list[int] | None = None) -> None:
        """Choose the descending timesteps of sampling: `num_inference_steps` spaced by `timestep_spacing`, or your
        own `timesteps`."""
        if (num_inference_steps is None) == (timesteps is None):
            raise ValueError("set_timesteps takes exactly one of num_inference_steps or timesteps, got "
                             f"num_inference_steps={num_inference_steps!r} and timesteps={timesteps!r}")
        if timesteps is not None:
            schedule = timesteps.tolist() if isinstance(timesteps, (np.ndarray, torch.Tensor)) else list(timesteps)
            check_custom_timesteps(schedule, self.config.num_train_timesteps)
        else:
            schedule = self._spaced_timesteps(num_inference_steps).tolist()
        self.timesteps = torch.tensor(schedule, dtype=torch.int64, device=device)
        self.num_inference_steps = len(schedule)
        self.custom_timesteps = timesteps is not None

    def _spaced_timesteps(self, num_steps: int) -> np.ndarray:
        num_train_timesteps, spacing = self.config.num_train_timesteps, self.config.timestep_spacing
        is_integer = isinstance(num_steps, Integral) and not isinstance(num_steps, bool)
        if not is_integer or not 1 <= num_steps <= num_train_timesteps:
            raise ValueError(f"num_inference_steps must be an integer in [1, num_train_timesteps={num_train_timesteps}]"
                             f", got {num_steps!r}")
        if spacing == "trailing":
            return trailing_timesteps(num_steps, num_train_timesteps)
        if spacing == "linspace":
            return linspace_timesteps(num_steps, num_train_timesteps)
        schedule = leading_timesteps(num_steps, num_train_timesteps, self.config.steps_offset)
        if schedule[0] >= num_train_timesteps:
            raise ValueError(f"steps_offset={self.config.steps_offset} moves the first of {num_steps} 'leading' "
                             f"timesteps to {schedule[0]}, past the last training step {num_train_timesteps - 1}; "
                             "use fewer steps or a smaller steps_offset")
        return schedule

    def previous_timestep(self, timestep: int | torch.Tensor) -> int | torch.Tensor:
        """The timestep the chain moves to from `timestep`: after `set_timesteps` the next one of `timesteps` (-1 after
        the last) as a 0-d tensor, before it `timestep - 1`."""
        if self.num_inference_steps is None:
            return timestep - 1
        t = int(timestep)
        schedule = self.timesteps.tolist()
        if t not in schedule:
            raise ValueError(f"timestep {t} is not one of the scheduler's timesteps {schedule}")
        index = schedule.index(t)
        return torch.tensor(schedule[index + 1] if index + 1 < len(schedule) else -1)

    def step(self, model_output: torch.Tensor, timestep: int | torch.Tensor, sample: torch.Tensor,
             generator: torch.Generator | None = None, return_dict: bool = True
             ) -> DDPMSchedulerOutput | tuple[torch.Tensor, torch.Tensor]:
        """x_{t-1} ~ N(μ̃_t(x_t, x̂_0), σ_t² I) (Ho et al. Algorithm 2), with x̂_0 predicted from the model output."""
        t = int(timestep)
        if not 0 <= t < self.config.num_train_timesteps:
            raise ValueError(f"timestep {t} is outside the training range [0, {self.config.num_train_timesteps - 1}]")
        prev_t = int(self.previous_timestep(t))
        model_output, predicted_variance = self._split_predicted_variance(model_output, sample)
        alpha_bar_t = self.alphas_cumprod[t]
        alpha_bar_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else torch.tensor(1.0)

        x0 = self._predict_original_sample(model_output, sample, alpha_bar_t)  # (B, C, H, W)
        if self.config.thresholding:
            x0 = dynamic_threshold(x0, self.config.dynamic_thresholding_ratio, self.config.sample_max_value)
        elif self.config.clip_sample:
            x0 = x0.clamp(-self.config.clip_sample_range, self.config.clip_sample_range)

        prev_sample = posterior_mean(x0, sample, alpha_bar_t, alpha_bar_prev)
        if t > 0:  # z ~ N(0, I) on every step but the one from t = 0
            noise = torch.randn(model_output.shape, generator=generator, dtype=model_output.dtype,
                                device=generator.device if generator is not None else model_output.device)
            sigma = noise_std(self.config.variance_type, alpha_bar_t, alpha_bar_prev, predicted_variance)
            prev_sample = prev_sample + sigma * noise.to(model_output.device)

        if not return_dict:
            return prev_sample, x0
        return DDPMSchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)

    def _split_predicted_variance(self, model_output: torch.Tensor, sample: torch.Tensor
                                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """With a learned variance the model returns (B, 2C, H, W): the prediction, then the variance output."""
        learned = self.config.variance_type in LEARNED_VARIANCE_TYPES
        batch, channels, *rest = sample.shape
        expected = (batch, 2 * channels, *rest) if learned else tuple(sample.shape)
        if tuple(model_output.shape) != expected:
            raise ValueError(f"model_output has shape {tuple(model_output.shape)}, expected {expected} for a sample of "
                             f"shape {tuple(sample.shape)} with variance_type={self.config.variance_type!r}")
        if not learned:
            return model_output, None
        prediction, variance = model_output.split(channels, dim=1)  # 2 x (B, C, H, W)
        return prediction, variance

    def _predict_original_sample(self, model_output: torch.Tensor, sample: torch.Tensor,
                                alpha_bar_t: torch.Tensor) -> torch.Tensor:
        """x̂_0 from x_t = √ᾱ_t x_0 + √(1 - ᾱ_t) ε: Ho et al. eq. 15 for ε, Salimans & Ho 2022 for v."""
        prediction_type = self.config.prediction_type
        if prediction_type == "sample":
            return model_output
        if prediction_type == "v_prediction":  # v = √ᾱ_t ε - √(1 - ᾱ_t) x_0
            return alpha_bar_t**0.5 * sample - (1 - alpha_bar_t) ** 0.5 * model_output
        if alpha_bar_t == 0:
            raise ValueError("an epsilon prediction says nothing about x_0 at a timestep with ᾱ_t = 0 (zero terminal "
                             "SNR); use prediction_type='v_prediction' or 'sample', or skip that timestep")
        return (sample - (1 - alpha_bar_t) ** 0.5 * model_output) / alpha_bar_t**0.5

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor,
                  timesteps: torch.Tensor) -> torch.Tensor:
        """The forward process, eq. 4: x_t = √ᾱ_t x_0 + √(1 - ᾱ_t) ε, one timestep per sample."""
        signal_scale, noise_scale = self._signal_and_noise_scales(timesteps, original_samples)
        return signal_scale * original_samples + noise_scale * noise

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The v-prediction target (Salimans & Ho 2022): v = √ᾱ_t ε - √(1 - ᾱ_t) x_0."""
        signal_scale, noise_scale = self._signal_and_noise_scales(timesteps, sample)
        return signal_scale * noise - noise_scale * sample

    def _signal_and_noise_scales(self, timesteps: torch.Tensor | int,
                                like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """√ᾱ_t and √(1 - ᾱ_t) per sample, shaped (B, 1, ..., 1) to broadcast against `like`."""
        timesteps = torch.as_tensor(timesteps, device=like.device)
        num_train_timesteps = self.config.num_train_timesteps
        if timesteps.is_floating_point() or timesteps.dtype == torch.bool:
            raise ValueError(f"timesteps must be integers, got dtype {timesteps.dtype}")
        if timesteps.numel() and not (0 <= timesteps.min() and timesteps.max() < num_train_timesteps):
            raise ValueError(f"timesteps {timesteps.tolist()} leave the training range [0, {num_train_timesteps - 1}]")
        alpha_bar = self.alphas_cumprod.to(device=like.device, dtype=like.dtype)[timesteps].flatten()  # (B,)
        shape = (-1,) + (1,) * (like.ndim - 1)
        return (alpha_bar**0.5).reshape(shape), ((1 - alpha_bar) ** 0.5).reshape(shape)
