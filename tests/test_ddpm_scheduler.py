"""DDPMScheduler against diffusers.DDPMScheduler (the reference) on the same inputs and the same random numbers.

Known diffusers 0.42.1 quirks these tests work around (we do better, on purpose):
- `fixed_large_log` takes the square root of log(β_t) < 0 and returns NaN; ours is σ² = β_t kept in log space, so
  it is compared with diffusers' `fixed_large`.
- `trailing` spacing builds its steps with a float `np.arange`, which for some n (e.g. 61 of 1000) yields one extra
  timestep -1; ours yields exactly n timesteps.
- custom `timesteps` leave `num_inference_steps` at None there; ours sets it to their count.
- epsilon prediction at ᾱ_t = 0 (zero terminal SNR) returns inf/NaN there; ours raises ValueError.
- invalid arguments raise TypeError, IndexError, ZeroDivisionError or nothing there; ours raise ValueError.
"""

from __future__ import annotations

import inspect
import itertools
import json

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler as ReferenceScheduler

import vqbatch
from vqbatch.schedulers.ddpm import DDPMScheduler, DDPMSchedulerConfig, DDPMSchedulerOutput

TOLERANCE = dict(atol=1e-6, rtol=1e-6)
NUM_TRAIN_TIMESTEPS = 1000
TRAINED_BETAS = np.geomspace(2e-4, 0.03, NUM_TRAIN_TIMESTEPS).tolist()

SCHEDULES = ["linear", "scaled_linear", "squaredcos_cap_v2", "trained_betas"]
VARIANCE_TYPES = ["fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned", "learned_range"]
PREDICTION_TYPES = ["epsilon", "sample", "v_prediction"]
SPACINGS = ["leading", "trailing", "linspace"]

# The defaults listed in the seed document (/work/shared/seeds/001_44f6f98e0a9d8430.txt).
SEED_DEFAULTS = {
    "num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
    "trained_betas": None, "variance_type": "fixed_small", "clip_sample": True, "prediction_type": "epsilon",
    "thresholding": False, "dynamic_thresholding_ratio": 0.995, "clip_sample_range": 1.0, "sample_max_value": 1.0,
    "timestep_spacing": "leading", "steps_offset": 0, "rescale_betas_zero_snr": False,
}


def schedule_settings(schedule: str) -> dict:
    return {"trained_betas": TRAINED_BETAS} if schedule == "trained_betas" else {"beta_schedule": schedule}


def reference_for(settings: dict) -> ReferenceScheduler:
    """The diffusers scheduler that should behave like ours (see the module docstring for fixed_large_log)."""
    if settings.get("variance_type") == "fixed_large_log":
        settings = {**settings, "variance_type": "fixed_large"}
    return ReferenceScheduler(**settings)


def random_model_output(variance_type: str, shape: tuple, generator: torch.Generator) -> torch.Tensor:
    """A fake model output; learned variance types get a second, valid variance half on the channel axis."""
    prediction = torch.randn(shape, generator=generator)
    if variance_type == "learned":  # σ² itself: positive
        return torch.cat([prediction, torch.rand(shape, generator=generator) * 0.5 + 0.01], dim=1)
    if variance_type == "learned_range":  # the interpolation weight: in [-1, 1]
        return torch.cat([prediction, torch.rand(shape, generator=generator) * 2 - 1], dim=1)
    return prediction


def assert_steps_match(ours: DDPMScheduler, reference: ReferenceScheduler, settings: dict, seed: int = 0) -> int:
    """Run our chain over all our timesteps, stepping the reference on the same inputs; return the steps taken."""
    shape = (2, 3, 4, 4)
    inputs = torch.Generator().manual_seed(seed)
    sample = 2 * torch.randn(shape, generator=inputs)  # wide enough for clipping and thresholding to act
    steps = 0
    for t in ours.timesteps:
        if settings.get("prediction_type", "epsilon") == "epsilon" and ours.alphas_cumprod[t] == 0:
            continue  # undefined there: see test_epsilon_at_zero_snr_raises
        model_output = random_model_output(settings.get("variance_type", "fixed_small"), shape, inputs)
        ours_out = ours.step(model_output, t, sample, generator=torch.Generator().manual_seed(seed + int(t)))
        ref_out = reference.step(model_output, t, sample, generator=torch.Generator().manual_seed(seed + int(t)))
        message = f"settings={settings}, t={int(t)}"
        torch.testing.assert_close(ours_out.pred_original_sample, ref_out.pred_original_sample, **TOLERANCE,
                                   msg=lambda m: f"{message}: x0 {m}")
        torch.testing.assert_close(ours_out.prev_sample, ref_out.prev_sample, **TOLERANCE,
                                   msg=lambda m: f"{message}: prev_sample {m}")
        assert torch.isfinite(ours_out.prev_sample).all(), message
        sample = ours_out.prev_sample
        steps += 1
    return steps


# ---------------------------------------------------------------------------------------------------------------------
# parity of step over every option


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("variance_type", VARIANCE_TYPES)
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_step_matches_diffusers_over_all_options(schedule, variance_type, prediction_type):
    switches = itertools.product(SPACINGS, [False, True], [False, True], [False, True])
    for spacing, thresholding, zero_snr, clip in switches:
        settings = {**schedule_settings(schedule), "variance_type": variance_type, "prediction_type": prediction_type,
                    "timestep_spacing": spacing, "thresholding": thresholding, "rescale_betas_zero_snr": zero_snr,
                    "clip_sample": clip, "clip_sample_range": 1.5, "dynamic_thresholding_ratio": 0.9,
                    "sample_max_value": 2.0, "steps_offset": 1}
        ours, reference = DDPMScheduler(**settings), reference_for(settings)
        ours.set_timesteps(3)
        reference.set_timesteps(3)
        assert ours.timesteps.tolist() == reference.timesteps.tolist(), settings
        assert assert_steps_match(ours, reference, settings) >= 2, settings


def test_step_over_all_training_timesteps_matches_diffusers():
    settings = {"variance_type": "learned_range", "prediction_type": "v_prediction", "num_train_timesteps": 50}
    ours, reference = DDPMScheduler(**settings), ReferenceScheduler(**settings)
    assert assert_steps_match(ours, reference, settings) == 50


def test_step_tuple_and_tensor_timestep():
    scheduler = DDPMScheduler()
    scheduler.set_timesteps(10)
    model_output, sample = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    t = scheduler.timesteps[2]
    as_output = scheduler.step(model_output, t, sample, generator=torch.Generator().manual_seed(5))
    as_tuple = scheduler.step(model_output, int(t), sample, generator=torch.Generator().manual_seed(5),
                              return_dict=False)
    assert isinstance(as_output, DDPMSchedulerOutput) and isinstance(as_tuple, tuple) and len(as_tuple) == 2
    torch.testing.assert_close(as_tuple[0], as_output.prev_sample, rtol=0, atol=0)
    torch.testing.assert_close(as_tuple[1], as_output.pred_original_sample, rtol=0, atol=0)


def test_step_generator_reproducibility():
    scheduler, reference = DDPMScheduler(), ReferenceScheduler()
    model_output, sample = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)

    def step(seed):
        return scheduler.step(model_output, 500, sample, generator=torch.Generator().manual_seed(seed)).prev_sample

    torch.testing.assert_close(step(7), step(7), rtol=0, atol=0)
    assert not torch.allclose(step(7), step(8))
    # the noise comes only from the generator: the global RNG state does not matter
    torch.manual_seed(0)
    first = step(3)
    torch.manual_seed(1)
    torch.testing.assert_close(step(3), first, rtol=0, atol=0)
    # without a generator both draw from the global RNG, in the same way
    torch.manual_seed(11)
    ours = scheduler.step(model_output, 500, sample).prev_sample
    torch.manual_seed(11)
    torch.testing.assert_close(ours, reference.step(model_output, 500, sample).prev_sample, **TOLERANCE)


def test_no_noise_on_the_last_step():
    scheduler = DDPMScheduler()
    model_output, sample = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    a = scheduler.step(model_output, 0, sample, generator=torch.Generator().manual_seed(1)).prev_sample
    b = scheduler.step(model_output, 0, sample, generator=torch.Generator().manual_seed(2)).prev_sample
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_fixed_large_log_is_fixed_large_where_diffusers_gives_nan():
    model_output, sample = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    results = {}
    for variance_type in ("fixed_large", "fixed_large_log"):
        scheduler = DDPMScheduler(variance_type=variance_type)
        results[variance_type] = scheduler.step(model_output, 400, sample,
                                                generator=torch.Generator().manual_seed(0)).prev_sample
    torch.testing.assert_close(results["fixed_large_log"], results["fixed_large"], **TOLERANCE)
    quirky = ReferenceScheduler(variance_type="fixed_large_log").step(
        model_output, 400, sample, generator=torch.Generator().manual_seed(0)).prev_sample
    assert torch.isnan(quirky).all()  # the diffusers quirk this divergence is about


def test_epsilon_at_zero_snr_raises():
    scheduler = DDPMScheduler(rescale_betas_zero_snr=True, timestep_spacing="trailing")
    scheduler.set_timesteps(5)
    assert scheduler.alphas_cumprod[999] == 0
    with pytest.raises(ValueError, match="zero terminal SNR"):
        scheduler.step(torch.randn(1, 3, 2, 2), 999, torch.randn(1, 3, 2, 2))
    reference = ReferenceScheduler(rescale_betas_zero_snr=True, timestep_spacing="trailing", clip_sample=False)
    reference.set_timesteps(5)
    quirky = reference.step(torch.randn(1, 3, 2, 2), 999, torch.randn(1, 3, 2, 2)).pred_original_sample
    assert not torch.isfinite(quirky).any()


# ---------------------------------------------------------------------------------------------------------------------
# timesteps


@pytest.mark.parametrize("spacing", SPACINGS)
def test_set_timesteps_matches_diffusers_for_every_step_count(spacing):
    ours, reference = DDPMScheduler(timestep_spacing=spacing), ReferenceScheduler(timestep_spacing=spacing)
    for num_steps in range(1, NUM_TRAIN_TIMESTEPS + 1):
        ours.set_timesteps(num_steps)
        reference.set_timesteps(num_steps)
        expected = reference.timesteps.tolist()
        if len(expected) == num_steps + 1:  # the float-arange quirk of 'trailing', see the module docstring
            assert spacing == "trailing" and expected[-1] == -1, (num_steps, expected[-3:])
        assert ours.timesteps.tolist() == expected[:num_steps], num_steps
        assert ours.timesteps.dtype == torch.int64
        assert ours.num_inference_steps == num_steps and not ours.custom_timesteps


def test_leading_spacing_with_steps_offset_matches_diffusers():
    for num_steps in (1, 3, 7, 50, 999):
        ours, reference = DDPMScheduler(steps_offset=1), ReferenceScheduler(steps_offset=1)
        ours.set_timesteps(num_steps)
        reference.set_timesteps(num_steps)
        assert ours.timesteps.tolist() == reference.timesteps.tolist()


def test_custom_timesteps_match_diffusers():
    custom = [900, 640, 639, 200, 7]
    settings = {"variance_type": "fixed_large"}
    ours, reference = DDPMScheduler(**settings), ReferenceScheduler(**settings)
    ours.set_timesteps(timesteps=custom, device="cpu")
    reference.set_timesteps(timesteps=custom)
    assert ours.timesteps.tolist() == custom and ours.timesteps.device == torch.device("cpu")
    assert ours.custom_timesteps and ours.num_inference_steps == len(custom)
    for t in custom:
        assert ours.previous_timestep(t) == int(reference.previous_timestep(t))
    assert assert_steps_match(ours, reference, settings) == len(custom)
    ours.set_timesteps(timesteps=torch.tensor([5, 3]))
    assert ours.timesteps.tolist() == [5, 3]


def test_previous_timestep():
    ours, reference = DDPMScheduler(), ReferenceScheduler()
    assert [ours.previous_timestep(t) for t in (999, 10, 0)] == [998, 9, -1]
    ours.set_timesteps(10)
    reference.set_timesteps(10)
    for t in ours.timesteps:
        got, expected = ours.previous_timestep(t), reference.previous_timestep(t)
        assert isinstance(got, torch.Tensor) and got.ndim == 0 and got.item() == expected.item()
    assert ours.previous_timestep(0).item() == -1 and isinstance(ours.previous_timestep(int(ours.timesteps[3])),
                                                                  torch.Tensor)
    with pytest.raises(ValueError, match="timestep 5 is not one of"):
        ours.previous_timestep(5)


def test_positional_constructor_and_order_as_diffusers():
    arguments = (500, 0.001, 0.03, "scaled_linear", None, "fixed_large")
    ours, reference = DDPMScheduler(*arguments), ReferenceScheduler(*arguments)
    assert ours.config.num_train_timesteps == 500 and ours.config.variance_type == "fixed_large"
    torch.testing.assert_close(ours.alphas_cumprod, reference.alphas_cumprod.to(ours.alphas_cumprod.dtype))
    assert DDPMScheduler.order == ReferenceScheduler.order == 1


def test_step_output_indexes_like_diffusers():
    scheduler = DDPMScheduler()
    scheduler.set_timesteps(10)
    output = scheduler.step(torch.randn(1, 3, 4, 4), scheduler.timesteps[0], torch.randn(1, 3, 4, 4))
    assert output[0] is output.prev_sample and output[1] is output.pred_original_sample
    assert list(output.keys()) == ["prev_sample", "pred_original_sample"]
    assert output.to_tuple() == (output.prev_sample, output.pred_original_sample)
    assert list(DDPMSchedulerOutput(prev_sample=output.prev_sample).keys()) == ["prev_sample"]  # None is no key


def test_initial_state_and_attributes_match_diffusers():
    for schedule, zero_snr in itertools.product(SCHEDULES, [False, True]):
        settings = {**schedule_settings(schedule), "rescale_betas_zero_snr": zero_snr}
        ours, reference = DDPMScheduler(**settings), ReferenceScheduler(**settings)
        for name in ("betas", "alphas", "alphas_cumprod"):
            torch.testing.assert_close(getattr(ours, name), getattr(reference, name), **TOLERANCE)
        assert ours.timesteps.tolist() == reference.timesteps.tolist()
        assert ours.init_noise_sigma == reference.init_noise_sigma == 1.0
        assert ours.num_inference_steps is None and ours.custom_timesteps is False
        assert len(ours) == len(reference) == NUM_TRAIN_TIMESTEPS


def test_scale_model_input_is_identity():
    sample = torch.randn(2, 3, 4, 4)
    assert DDPMScheduler().scale_model_input(sample, 10) is sample


# ---------------------------------------------------------------------------------------------------------------------
# forward process


@pytest.mark.parametrize("shape", [(4, 3, 4, 4), (4, 8), (4, 2, 3, 5, 5)])
def test_add_noise_and_get_velocity_match_diffusers(shape):
    settings = {"beta_schedule": "squaredcos_cap_v2"}
    ours, reference = DDPMScheduler(**settings), ReferenceScheduler(**settings)
    generator = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(shape, generator=generator), torch.randn(shape, generator=generator)
    timesteps = torch.tensor([0, 17, 500, 999])
    torch.testing.assert_close(ours.add_noise(x0, noise, timesteps), reference.add_noise(x0, noise, timesteps),
                               **TOLERANCE)
    torch.testing.assert_close(ours.get_velocity(x0, noise, timesteps), reference.get_velocity(x0, noise, timesteps),
                               **TOLERANCE)


def test_add_noise_one_timestep_for_all_and_half_precision():
    ours, reference = DDPMScheduler(), ReferenceScheduler()
    x0, noise = torch.randn(3, 2, 4, 4).half(), torch.randn(3, 2, 4, 4).half()
    timestep = torch.tensor(250)
    result = ours.add_noise(x0, noise, timestep)
    assert result.dtype == torch.float16
    torch.testing.assert_close(result, reference.add_noise(x0, noise, timestep))


def test_add_noise_rejects_bad_timesteps():
    scheduler, x0 = DDPMScheduler(), torch.randn(2, 3)
    with pytest.raises(ValueError, match=r"\[3, 1000\] leave the training range \[0, 999\]"):
        scheduler.add_noise(x0, x0, torch.tensor([3, 1000]))
    with pytest.raises(ValueError, match="must be integers"):
        scheduler.get_velocity(x0, x0, torch.tensor([3.0, 1.0]))


# ---------------------------------------------------------------------------------------------------------------------
# config


def test_defaults_match_the_seed_and_diffusers():
    assert DDPMSchedulerConfig().to_dict() == SEED_DEFAULTS
    signature = inspect.signature(DDPMScheduler)
    assert {name: p.default for name, p in signature.parameters.items()} == SEED_DEFAULTS
    reference = {k: v for k, v in ReferenceScheduler().config.items() if not k.startswith("_")}
    assert reference == SEED_DEFAULTS


def test_config_reads_like_diffusers_config_dict():
    config, reference = DDPMScheduler(500).config, ReferenceScheduler(500).config
    settings = {k: v for k, v in reference.items() if not k.startswith("_")}
    assert dict(config.items()) == settings and list(config) == list(settings) and len(config) == len(settings)
    assert config.values() == list(settings.values())
    assert config.get("num_train_timesteps") == reference.get("num_train_timesteps") == 500
    assert config.get("no_such_key", "default") == reference.get("no_such_key", "default") == "default"


def test_config_round_trip_and_diffusers_interchange(tmp_path):
    settings = {"num_train_timesteps": 10, "trained_betas": np.linspace(0.01, 0.2, 10), "variance_type": "learned",
                "prediction_type": "v_prediction", "timestep_spacing": "trailing", "thresholding": True,
                "sample_max_value": 3.0, "steps_offset": 2, "rescale_betas_zero_snr": True, "clip_sample": False}
    ours = DDPMScheduler(**settings)
    ours.save_pretrained(tmp_path / "ours")
    written = json.loads((tmp_path / "ours" / "scheduler_config.json").read_text())
    assert written["_class_name"] == "DDPMScheduler"
    assert DDPMScheduler.from_pretrained(tmp_path / "ours").config == ours.config

    from_ours = ReferenceScheduler.from_pretrained(tmp_path / "ours")
    assert {k: from_ours.config[k] for k in SEED_DEFAULTS} == ours.config.to_dict()
    torch.testing.assert_close(from_ours.alphas_cumprod, ours.alphas_cumprod, **TOLERANCE)

    ReferenceScheduler(**settings).save_pretrained(tmp_path / "reference")
    from_reference = DDPMScheduler.from_pretrained(tmp_path / "reference")
    assert from_reference.config == ours.config
    overridden = DDPMScheduler.from_config(ours.config, prediction_type="sample")
    assert overridden.config.prediction_type == "sample" and overridden.config.trained_betas == ours.config.trained_betas


def test_diffusers_checkpoint_layout_with_subfolder(tmp_path):
    ReferenceScheduler(beta_schedule="scaled_linear", clip_sample=False).save_pretrained(tmp_path / "scheduler")
    loaded = DDPMScheduler.from_pretrained(tmp_path, subfolder="scheduler")
    assert loaded.config.beta_schedule == "scaled_linear" and loaded.config.clip_sample is False


def test_exported_from_the_package():
    assert vqbatch.DDPMScheduler is DDPMScheduler and vqbatch.DDPMSchedulerOutput is DDPMSchedulerOutput


# ---------------------------------------------------------------------------------------------------------------------
# invalid arguments


@pytest.mark.parametrize("key, value, allowed", [
    ("beta_schedule", "sigmoid", "squaredcos_cap_v2"),
    ("beta_schedule", "cosine", "scaled_linear"),
    ("variance_type", "fixed", "learned_range"),
    ("prediction_type", "noise", "v_prediction"),
    ("timestep_spacing", "uniform", "trailing"),
])
def test_unknown_option_names_key_value_and_allowed(key, value, allowed):
    with pytest.raises(ValueError) as error:
        DDPMScheduler(**{key: value})
    assert key in str(error.value) and repr(value) in str(error.value) and allowed in str(error.value)


@pytest.mark.parametrize("settings, fragment", [
    ({"num_train_timesteps": 0}, "num_train_timesteps"),
    ({"beta_end": 1.5}, "beta_end"),
    ({"dynamic_thresholding_ratio": 0.0}, "dynamic_thresholding_ratio"),
    ({"steps_offset": -1}, "steps_offset"),
    ({"num_train_timesteps": 4, "trained_betas": [0.1, 0.2]}, "2 betas for num_train_timesteps=4"),
    ({"num_train_timesteps": 2, "trained_betas": [0.1, 1.2]}, "(0, 1]"),
])
def test_invalid_config_values(settings, fragment):
    with pytest.raises(ValueError, match=fragment.replace("(", r"\(").replace("]", r"\]")):
        DDPMScheduler(**settings)


def test_unknown_key_in_config_file(tmp_path):
    (tmp_path / "scheduler_config.json").write_text(json.dumps({"_class_name": "DDPMScheduler", "beta_stat": 0.1}))
    with pytest.raises(ValueError, match="unknown key 'beta_stat'"):
        DDPMScheduler.from_pretrained(tmp_path)


@pytest.mark.parametrize("kwargs, fragment", [
    ({"num_inference_steps": 0}, r"integer in \[1, num_train_timesteps=1000\], got 0"),
    ({"num_inference_steps": -3}, "got -3"),
    ({"num_inference_steps": 1001}, "got 1001"),
    ({"num_inference_steps": 2.5}, "got 2.5"),
    ({"num_inference_steps": True}, "got True"),
    ({}, "exactly one of num_inference_steps or timesteps"),
    ({"num_inference_steps": 10, "timesteps": [5, 1]}, "exactly one of num_inference_steps or timesteps"),
    ({"timesteps": []}, "empty"),
    ({"timesteps": [10, 10, 3]}, "strictly descending, but 10 is followed by 10"),
    ({"timesteps": [10, 30]}, "strictly descending, but 10 is followed by 30"),
    ({"timesteps": [1000, 10]}, r"\[1000\] are outside the training range \[0, 999\]"),
    ({"timesteps": [10, -1]}, r"\[-1\] are outside"),
    ({"timesteps": [10.5, 3]}, "must be integers"),
])
def test_set_timesteps_rejects_invalid_arguments(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        DDPMScheduler().set_timesteps(**kwargs)


def test_steps_offset_past_the_last_training_step():
    with pytest.raises(ValueError, match="steps_offset=1 moves the first of 1000 'leading' timesteps to 1000"):
        DDPMScheduler(steps_offset=1).set_timesteps(1000)


def test_step_rejects_invalid_inputs():
    scheduler = DDPMScheduler(variance_type="learned_range")
    sample = torch.randn(2, 3, 4, 4)
    with pytest.raises(ValueError, match=r"model_output has shape \(2, 3, 4, 4\), expected \(2, 6, 4, 4\)"):
        scheduler.step(torch.randn(2, 3, 4, 4), 10, sample)
    with pytest.raises(ValueError, match=r"expected \(2, 3, 4, 4\)"):
        DDPMScheduler().step(torch.randn(2, 6, 4, 4), 10, sample)
    with pytest.raises(ValueError, match=r"timestep 1000 is outside the training range \[0, 999\]"):
        DDPMScheduler().step(sample, 1000, sample)
    scheduler = DDPMScheduler()
    scheduler.set_timesteps(10)
    with pytest.raises(ValueError, match="timestep 11 is not one of"):
        scheduler.step(sample, 11, sample)
