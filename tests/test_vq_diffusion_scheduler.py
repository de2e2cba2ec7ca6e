"""VQDiffusionScheduler: parity with diffusers' reference, the skipping schedule's math, per-row generators, config."""

import json
import re

import pytest
import torch
from diffusers import VQDiffusionScheduler as ReferenceScheduler
from diffusers.schedulers.scheduling_vq_diffusion import index_to_log_onehot

from vqbatch.schedulers.vq_diffusion import VQDiffusionScheduler, VQDiffusionSchedulerOutput, Workspace

CLASSES_AND_PIXELS = [(3, 1), (3, 7), (17, 33), (257, 7), (4097, 1), (4097, 7)]  # (num_vec_classes, pixels)
TIMESTEPS = [0, 1, 37, 98, 99]
SCHEDULE_ARRAYS = ["log_at", "log_bt", "log_ct", "log_cumprod_at", "log_cumprod_bt", "log_cumprod_ct"]
BATCH = 3


def close(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-6)


def random_tokens(num_classes, batch, pixels, seed, mask_fraction=0.5):
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, num_classes - 1, (batch, pixels), generator=generator)
    masked = torch.rand((batch, pixels), generator=generator) < mask_fraction
    return tokens.masked_fill(masked, num_classes - 1)  # (B, P)


def random_log_p_x_0(num_classes, batch, pixels, seed, truncate=True):
    """A normalized log p(x_0 | x_t) like the transformer's, with the low tail cut to log 0 like the pipeline's
    truncation (the top class of every pixel survives)."""
    generator = torch.Generator().manual_seed(seed)
    logits = 3 * torch.randn((batch, num_classes - 1, pixels), generator=generator)
    log_p = logits.log_softmax(dim=1)  # (B, K, P)
    if truncate and num_classes > 3:
        cut = log_p < log_p.amax(dim=1, keepdim=True) - 4
        log_p = log_p.masked_fill(cut, float("-inf")).log_softmax(dim=1)
    return log_p


def seeded(seed):
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------------------------------------
# parity with diffusers


@pytest.mark.parametrize("settings", [dict(num_vec_classes=17), dict(num_vec_classes=4097),
                                      dict(num_vec_classes=9, num_train_timesteps=12, alpha_cum_start=0.9,
                                           alpha_cum_end=0.2, gamma_cum_start=0.05, gamma_cum_end=0.7)])
def test_schedule_arrays_match_reference(settings):
    ours, reference = VQDiffusionScheduler(**settings), ReferenceScheduler(**settings)
    for name in SCHEDULE_ARRAYS:
        close(getattr(ours, name), getattr(reference, name))
    assert (ours.num_embed, ours.mask_class) == (reference.num_embed, reference.mask_class)
    assert torch.equal(ours.timesteps, reference.timesteps) and ours.num_inference_steps is None


@pytest.mark.parametrize("num_classes,pixels", CLASSES_AND_PIXELS)
@pytest.mark.parametrize("cumulative", [True, False])
def test_log_Q_t_matches_reference(num_classes, pixels, cumulative):
    ours, reference = VQDiffusionScheduler(num_classes), ReferenceScheduler(num_classes)
    x_t = random_tokens(num_classes, BATCH, pixels, seed=pixels)
    log_onehot = index_to_log_onehot(x_t, num_classes)
    for t in TIMESTEPS:
        expected = reference.log_Q_t_transitioning_to_known_class(
            t=t, x_t=x_t, log_onehot_x_t=log_onehot, cumulative=cumulative)
        actual = ours.log_Q_t_transitioning_to_known_class(
            t=t, x_t=x_t, log_onehot_x_t=log_onehot, cumulative=cumulative)
        close(actual, expected)


@pytest.mark.parametrize("num_classes,pixels", CLASSES_AND_PIXELS)
def test_q_posterior_matches_reference(num_classes, pixels):
    ours, reference = VQDiffusionScheduler(num_classes), ReferenceScheduler(num_classes)
    for t in TIMESTEPS:
        x_t = random_tokens(num_classes, BATCH, pixels, seed=t)
        log_p_x_0 = random_log_p_x_0(num_classes, BATCH, pixels, seed=t + 1)
        close(ours.q_posterior(log_p_x_0, x_t, t), reference.q_posterior(log_p_x_0, x_t, t))


@pytest.mark.parametrize("num_classes,pixels", CLASSES_AND_PIXELS)
def test_step_draws_the_reference_tokens(num_classes, pixels):
    ours, reference = VQDiffusionScheduler(num_classes), ReferenceScheduler(num_classes)
    for t in TIMESTEPS:
        x_t = random_tokens(num_classes, BATCH, pixels, seed=10 + t)
        log_p_x_0 = random_log_p_x_0(num_classes, BATCH, pixels, seed=20 + t)
        expected = reference.step(log_p_x_0, t, x_t, generator=seeded(t)).prev_sample
        output = ours.step(log_p_x_0, t, x_t, generator=seeded(t))
        assert isinstance(output, VQDiffusionSchedulerOutput)
        assert torch.equal(output.prev_sample, expected)
        assert output[0] is output["prev_sample"] is output.prev_sample and output.to_tuple() == (output.prev_sample,)
        assert list(output.keys()) == ["prev_sample"] and ours.order == reference.order == 1
        as_tuple = ours.step(log_p_x_0, torch.tensor(t), x_t, generator=seeded(t), return_dict=False)
        assert isinstance(as_tuple, tuple) and len(as_tuple) == 1 and torch.equal(as_tuple[0], expected)


@pytest.mark.parametrize("num_inference_steps", [1, 25, 100])
def test_set_timesteps_matches_reference(num_inference_steps):
    ours, reference = VQDiffusionScheduler(17), ReferenceScheduler(17)
    ours.set_timesteps(num_inference_steps, device="cpu")
    reference.set_timesteps(num_inference_steps, device="cpu")
    assert torch.equal(ours.timesteps, reference.timesteps)
    assert ours.num_inference_steps == reference.num_inference_steps == num_inference_steps
    for name in SCHEDULE_ARRAYS:
        close(getattr(ours, name), getattr(reference, name))


class FakeModel:
    """A deterministic stand-in for the transformer: log p(x_0 | x_t) read from a fixed table by token and step."""

    def __init__(self, num_classes, seed=0):
        self.table = 2 * torch.randn((num_classes, num_classes - 1), generator=seeded(seed))  # (C, K)

    def __call__(self, sample, t):
        logits = self.table[sample].permute(0, 2, 1) + 0.01 * int(t)  # (B, K, P)
        return logits.log_softmax(dim=1)


def sample_chain(scheduler, model, batch, pixels, generator, keep_history=False):
    sample = torch.full((batch, pixels), scheduler.mask_class)  # all masked
    history = [sample]
    for t in scheduler.timesteps:
        sample = scheduler.step(model(sample, t), t, sample, generator=generator).prev_sample
        history.append(sample)
    return history if keep_history else sample


def test_fewer_reference_steps_run_matches_reference():
    ours, reference = VQDiffusionScheduler(17), ReferenceScheduler(17)
    ours.set_timesteps(25)
    reference.set_timesteps(25)
    model = FakeModel(17)
    ours_history = sample_chain(ours, model, BATCH, 33, seeded(3), keep_history=True)
    reference_history = sample_chain(reference, model, BATCH, 33, seeded(3), keep_history=True)
    for actual, expected in zip(ours_history, reference_history, strict=True):
        assert torch.equal(actual, expected)


# ---------------------------------------------------------------------------------------------------------------------
# one generator per row


@pytest.mark.parametrize("spacing", ["reference", "skip"])
def test_a_row_sampled_alone_equals_the_row_in_its_batch(spacing):
    scheduler, model = VQDiffusionScheduler(257), FakeModel(257)
    scheduler.set_timesteps(6, spacing=spacing)
    seeds = [11, 5, 11]  # rows 0 and 2 share a seed, so they must agree
    batch = sample_chain(scheduler, model, len(seeds), 7, [seeded(s) for s in seeds])
    for row, seed in enumerate(seeds):
        assert torch.equal(batch[row:row + 1], sample_chain(scheduler, model, 1, 7, seeded(seed)))
    assert torch.equal(batch[0], batch[2]) and not torch.equal(batch[0], batch[1])


def test_one_generator_per_row_is_required():
    scheduler = VQDiffusionScheduler(17)
    x_t = random_tokens(17, 3, 7, seed=0)
    with pytest.raises(ValueError, match="2 generators for a batch of 3 rows"):
        scheduler.step(random_log_p_x_0(17, 3, 7, seed=1), 5, x_t, generator=[seeded(0), seeded(1)])


# ---------------------------------------------------------------------------------------------------------------------
# the skipping schedule


@pytest.mark.parametrize("num_inference_steps", [1, 2, 7, 25, 99, 100])
def test_skip_timesteps_cover_the_whole_chain(num_inference_steps):
    scheduler = VQDiffusionScheduler(17)
    scheduler.set_timesteps(num_inference_steps, spacing="skip")
    timesteps = scheduler.timesteps.tolist()
    assert len(timesteps) == num_inference_steps and timesteps[0] == 99
    assert num_inference_steps == 1 or timesteps[-1] == 0
    gaps = [a - b for a, b in zip(timesteps, timesteps[1:])]
    assert all(gap >= 1 for gap in gaps) and (not gaps or max(gaps) - min(gaps) <= 1)
    chain = [scheduler.previous_timestep(t) for t in timesteps]
    assert chain == timesteps[1:] + [-1]


def test_single_step_jump_is_the_reference_step():
    ours, reference = VQDiffusionScheduler(257), ReferenceScheduler(257)
    for t in range(100):
        jump = ours.transition_log_probs(t - 1, t)
        for actual, expected in zip(jump, (reference.log_at[t], reference.log_bt[t], reference.log_ct[t])):
            assert torch.equal(actual, expected)
    ours.set_timesteps(100, spacing="skip")
    assert torch.equal(ours.timesteps, reference.timesteps)
    for t in (99, 50, 1):
        x_t = random_tokens(257, BATCH, 7, seed=t)
        log_p_x_0 = random_log_p_x_0(257, BATCH, 7, seed=t + 1)
        assert ours.previous_timestep(t) == t - 1
        expected = reference.step(log_p_x_0, t, x_t, generator=seeded(t)).prev_sample
        assert torch.equal(ours.step(log_p_x_0, t, x_t, generator=seeded(t)).prev_sample, expected)


def dense_step_matrix(alpha, gamma, num_classes):
    """Q[i, j] = q(x_u = j | x_{u-1} = i) of one mask-and-replace step, float64, (C, C)."""
    K = num_classes - 1
    beta = (1 - alpha - gamma) / K
    matrix = torch.zeros((num_classes, num_classes), dtype=torch.float64)
    matrix[:K, :K] = beta + alpha * torch.eye(K, dtype=torch.float64)
    matrix[:K, K] = gamma
    matrix[K, K] = 1
    return matrix


def dense_chain(settings):
    """The single-step matrices of the chain, built from its linear ᾱ and γ̄ (Gu et al. eq. 7)."""
    T, C = settings["num_train_timesteps"], settings["num_vec_classes"]
    fractions = torch.arange(T, dtype=torch.float64) / (T - 1)
    alpha_bar = settings["alpha_cum_start"] + fractions * (settings["alpha_cum_end"] - settings["alpha_cum_start"])
    gamma_bar = settings["gamma_cum_start"] + fractions * (settings["gamma_cum_end"] - settings["gamma_cum_start"])
    alpha_bar, keep_bar = torch.cat((torch.ones(1), alpha_bar)), torch.cat((torch.ones(1), 1 - gamma_bar))
    return [dense_step_matrix(alpha_bar[u + 1] / alpha_bar[u], 1 - keep_bar[u + 1] / keep_bar[u], C) for u in range(T)]


def dense_product(matrices, num_classes):
    product = torch.eye(num_classes, dtype=torch.float64)
    for matrix in matrices:
        product = product @ matrix
    return product


JUMP_SETTINGS = dict(num_vec_classes=5, num_train_timesteps=12, alpha_cum_start=0.95, alpha_cum_end=0.05,
                     gamma_cum_start=0.01, gamma_cum_end=0.9)


@pytest.mark.parametrize("s,t", [(2, 7), (-1, 11), (0, 5), (6, 7), (-1, 0), (8, 11)])
def test_jump_posterior_equals_the_product_of_single_steps(s, t):
    """p(x_s | x_t) = Σ_{x_0} q(x_t | x_s) q(x_s | x_0) p(x_0) / q(x_t | x_0) with every q a product of dense
    single-step matrices."""
    scheduler, steps = VQDiffusionScheduler(**JUMP_SETTINGS), dense_chain(JUMP_SETTINGS)
    C, K = 5, 4
    s_to_t = dense_product(steps[s + 1:t + 1], C)  # (C, C)
    zero_to_s, zero_to_t = dense_product(steps[:s + 1], C), dense_product(steps[:t + 1], C)
    x_t = torch.tensor([[0, 1, 2, 3, 4, 4], [3, 4, 0, 0, 2, 1]])  # (B, P)
    p_x_0 = random_log_p_x_0(C, 2, 6, seed=s + 10 * t, truncate=False).exp().double()  # (B, K, P)
    expected = torch.einsum("jbp,xj,bxp,bxp->bjp", s_to_t[:, x_t], zero_to_s[:K], p_x_0,
                            1 / zero_to_t[:K][:, x_t].permute(1, 0, 2))  # (B, C, P)
    actual = scheduler.q_posterior(p_x_0.float().log(), x_t, t, t_prev=s).exp().double()
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("num_classes", [17, 257])
@pytest.mark.parametrize("s,t", [(98, 99), (66, 99), (40, 73), (-1, 99), (0, 33), (-1, 0)])
def test_posterior_is_a_distribution_and_masks_only_unmask(num_classes, s, t):
    scheduler = VQDiffusionScheduler(num_classes)
    mask = scheduler.mask_class
    x_t = random_tokens(num_classes, BATCH, 33, seed=t)
    log_post = scheduler.q_posterior(random_log_p_x_0(num_classes, BATCH, 33, seed=s + 2), x_t, t, t_prev=s)
    log_total = log_post.logsumexp(dim=1)  # (B, P)
    torch.testing.assert_close(log_total, torch.zeros_like(log_total), rtol=0, atol=1e-5)  # sums to one over x_s
    mask_probability = log_post[:, mask].exp()  # (B, P)
    unmasked = x_t != mask
    assert (mask_probability[unmasked] < 1e-20).all()  # the mask is absorbing: no way back into it
    stay_masked = scheduler.gamma_bar[s] / scheduler.gamma_bar[t]  # q(x_s = mask | x_t = mask) = γ̄_s / γ̄_t
    expected = torch.full_like(mask_probability[~unmasked], float(stay_masked))
    torch.testing.assert_close(mask_probability[~unmasked], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("spacing,num_inference_steps", [("reference", 30), ("skip", 10), ("skip", 1)])
def test_sampling_unmasks_for_good_and_ends_without_masks(spacing, num_inference_steps):
    scheduler, model = VQDiffusionScheduler(17), FakeModel(17, seed=4)
    scheduler.set_timesteps(num_inference_steps, spacing=spacing)
    history = sample_chain(scheduler, model, BATCH, 33, seeded(8), keep_history=True)
    for before, after in zip(history, history[1:]):
        assert not (after[before != scheduler.mask_class] == scheduler.mask_class).any()
    assert (history[0] == scheduler.mask_class).all() and not (history[-1] == scheduler.mask_class).any()


# ---------------------------------------------------------------------------------------------------------------------
# input errors


@pytest.mark.parametrize("bad", [0, -3, 101, 2.5, True])
def test_bad_number_of_steps_is_refused(bad):
    with pytest.raises(ValueError, match=r"num_inference_steps must be an integer in \[1, 100\].*" + str(bad)):
        VQDiffusionScheduler(17).set_timesteps(bad)


def test_unknown_spacing_is_refused():
    with pytest.raises(ValueError, match="'reference', 'skip'; got 'linspace'"):
        VQDiffusionScheduler(17).set_timesteps(10, spacing="linspace")


def test_training_timestep_outside_the_schedule_steps_to_its_predecessor():
    scheduler, reference = VQDiffusionScheduler(17), ReferenceScheduler(17)
    for spacing in ("reference", "skip"):
        scheduler.set_timesteps(25, spacing=spacing)
        reference.set_timesteps(25)
        x_t = random_tokens(17, 2, 7, seed=0)
        log_p_x_0 = random_log_p_x_0(17, 2, 7, seed=0)
        assert 51 not in scheduler.timesteps.tolist() and scheduler.previous_timestep(51) == 50
        got = scheduler.step(log_p_x_0, torch.tensor(51), x_t, generator=seeded(3)).prev_sample
        assert torch.equal(got, reference.step(log_p_x_0, torch.tensor(51), x_t, generator=seeded(3)).prev_sample)
    with pytest.raises(ValueError, match=r"timestep must lie in \[0, 99\].*got 100"):
        scheduler.step(log_p_x_0, 100, x_t)
    with pytest.raises(ValueError, match="timestep must be an integer"):
        scheduler.step(log_p_x_0, torch.tensor(3.0), x_t)


@pytest.mark.parametrize("bad_token", [-1, 17, 4000])
def test_tokens_out_of_range_are_refused(bad_token):
    scheduler = VQDiffusionScheduler(17)
    x_t = random_tokens(17, 2, 7, seed=0)
    x_t[1, 3] = bad_token
    log_p_x_0 = random_log_p_x_0(17, 2, 7, seed=0)
    with pytest.raises(ValueError, match=rf"x_t holds token {bad_token}; tokens must lie in \[0, 16\]"):
        scheduler.q_posterior(log_p_x_0, x_t, 5)  # step trusts the values (no device read); the pipeline checks them
    with pytest.raises(ValueError, match="integer tensor of shape"):
        scheduler.step(log_p_x_0, 5, x_t.float())


@pytest.mark.parametrize("shape", [(2, 17, 7), (2, 16, 8), (1, 16, 7), (16, 7)])
def test_model_output_of_the_wrong_shape_is_refused(shape):
    scheduler = VQDiffusionScheduler(17)
    expected = re.escape(f"model_output has shape {shape}") + ".*" + re.escape("(2, 16, 7)")
    with pytest.raises(ValueError, match=expected):
        scheduler.step(torch.zeros(shape), 5, random_tokens(17, 2, 7, seed=0))


def test_posterior_timesteps_are_checked():
    scheduler = VQDiffusionScheduler(17)
    x_t, log_p_x_0 = random_tokens(17, 1, 7, seed=0), random_log_p_x_0(17, 1, 7, seed=0)
    with pytest.raises(ValueError, match=r"t must lie in \[0, 99\].*got 100"):
        scheduler.q_posterior(log_p_x_0, x_t, 100)
    with pytest.raises(ValueError, match=r"t_prev must lie in \[-1, 9\].*got 10"):
        scheduler.q_posterior(log_p_x_0, x_t, 10, t_prev=10)


# ---------------------------------------------------------------------------------------------------------------------
# config files


CUSTOM = dict(num_vec_classes=33, num_train_timesteps=40, alpha_cum_start=0.999, alpha_cum_end=0.0001,
              gamma_cum_start=0.0001, gamma_cum_end=0.999)


def test_save_and_load_round_trip(tmp_path):
    scheduler = VQDiffusionScheduler(**CUSTOM)
    scheduler.save_pretrained(tmp_path / "scheduler")
    saved = json.loads((tmp_path / "scheduler" / "scheduler_config.json").read_text())
    assert saved["_class_name"] == "VQDiffusionScheduler" and saved["num_vec_classes"] == 33
    loaded = VQDiffusionScheduler.from_pretrained(tmp_path, subfolder="scheduler")
    assert loaded.config == scheduler.config and dict(loaded.config) == CUSTOM
    for name in SCHEDULE_ARRAYS:
        assert torch.equal(getattr(loaded, name), getattr(scheduler, name))
    assert VQDiffusionScheduler.from_config(scheduler.config, num_train_timesteps=20).config.num_train_timesteps == 20


def test_diffusers_config_loads_and_diffusers_loads_ours(tmp_path):
    ReferenceScheduler(**CUSTOM).save_pretrained(tmp_path / "theirs")
    ours = VQDiffusionScheduler.from_pretrained(tmp_path / "theirs")
    assert dict(ours.config) == CUSTOM
    reference = ReferenceScheduler(**CUSTOM)
    for name in SCHEDULE_ARRAYS:
        close(getattr(ours, name), getattr(reference, name))

    VQDiffusionScheduler(**CUSTOM).save_pretrained(tmp_path / "ours")
    theirs = ReferenceScheduler.from_pretrained(tmp_path / "ours")
    assert {key: theirs.config[key] for key in CUSTOM} == CUSTOM


def test_unknown_config_key_is_named(tmp_path):
    (tmp_path / "scheduler_config.json").write_text(json.dumps({"num_vec_classes": 17, "beta_start": 0.1}))
    with pytest.raises(ValueError, match="unknown key 'beta_start'"):
        VQDiffusionScheduler.from_pretrained(tmp_path)


@pytest.mark.parametrize("settings,key", [
    (dict(num_vec_classes=1), "num_vec_classes"),
    (dict(num_vec_classes=17, num_train_timesteps=1), "num_train_timesteps"),
    (dict(num_vec_classes=17, alpha_cum_start=1.5), "alpha_cum_start"),
    (dict(num_vec_classes=17, alpha_cum_end=0.0), "alpha_cum_end"),
    (dict(num_vec_classes=17, alpha_cum_start=0.5, alpha_cum_end=0.6), "alpha_cum_end"),
    (dict(num_vec_classes=17, alpha_cum_start=0.9, gamma_cum_start=0.2), "gamma_cum_start"),
    (dict(num_vec_classes=17, alpha_cum_start=0.4, gamma_cum_start=0.5, gamma_cum_end=0.4), "gamma_cum_end"),
    (dict(num_vec_classes=17, alpha_cum_start=0.5, alpha_cum_end=0.4, gamma_cum_end=0.9), "gamma_cum_end"),
])
def test_invalid_config_value_is_named(settings, key):
    with pytest.raises(ValueError, match=f"for '{key}'"):
        VQDiffusionScheduler(**settings)
    with pytest.raises(ValueError, match=f"for '{key}'"):
        VQDiffusionScheduler.from_config(settings)


@pytest.mark.parametrize("noise", ["gumbel", "categorical"])
def test_a_step_after_steps_of_other_shapes_equals_a_fresh_schedulers_step(noise):
    """The scheduler keeps its full-size temporaries between steps (`Workspace`): steps of growing, shrinking and
    other-dtype batches in turn return exactly what a fresh scheduler returns for each, and the reference's tokens."""
    used = VQDiffusionScheduler(num_vec_classes=33, num_train_timesteps=20)
    reference = ReferenceScheduler(num_vec_classes=33, num_train_timesteps=20)
    for batch, pixels, dtype in ((2, 16, torch.float32), (5, 16, torch.float32), (1, 4, torch.float64),
                                 (3, 16, torch.float32)):
        log_p_x_0 = torch.randn((batch, 32, pixels), generator=seeded(batch), dtype=dtype).log_softmax(dim=1)
        x_t = torch.randint(0, 33, (batch, pixels), generator=seeded(batch + 1))
        fresh = VQDiffusionScheduler(num_vec_classes=33, num_train_timesteps=20)
        for t in (12, 0):
            tokens = used.step(log_p_x_0, t, x_t, generator=seeded(7), noise=noise).prev_sample
            assert torch.equal(tokens, fresh.step(log_p_x_0, t, x_t, generator=seeded(7), noise=noise).prev_sample)
            if noise == "gumbel" and dtype == torch.float32:
                expected = reference.step(log_p_x_0, t, x_t, generator=seeded(7)).prev_sample
                assert torch.equal(tokens, expected)


def test_the_workspace_holds_tensors_on_the_cpu_only():
    """On the CPU a view reuses the storage kept under its name (growing it when needed); elsewhere every view is a
    fresh tensor and nothing is held ('meta' stands in for a GPU, whose caching allocator already reuses blocks)."""
    workspace = Workspace()
    first = workspace.view("scratch", (2, 3, 4), torch.float32, torch.device("cpu"))
    smaller = workspace.view("scratch", (3, 4), torch.float32, torch.device("cpu"))
    assert smaller.data_ptr() == first.data_ptr() and smaller.is_contiguous()
    larger = workspace.view("scratch", (5, 6), torch.float32, torch.device("cpu"))
    assert larger.shape == (5, 6) and workspace.tensors["scratch"].numel() == 30
    assert workspace.view("scratch", (2,), torch.float64, torch.device("cpu")).dtype == torch.float64
    elsewhere = workspace.view("other", (2, 3), torch.float32, torch.device("meta"))
    assert elsewhere.device.type == "meta" and "other" not in workspace.tensors
