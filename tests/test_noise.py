"""Randomness through `uniform_noise`: categorical noise has Gumbel-max's distribution from one uniform per pixel,
each image draws from its own generator wherever it lives, and a step reads nothing back from the device."""

import pytest
import torch

from vqbatch.choices import NOISES
from vqbatch.config import SamplingConfig
from vqbatch.pipeline import VQDiffusionPipeline
from vqbatch.schedulers.purity import PurityPriorScheduler
from vqbatch.schedulers.vq_diffusion import VQDiffusionScheduler, categorical_sample_, draw_classes, uniform_noise
from vqbatch.tiny import write_tiny_checkpoint

CHI_SQUARE_999 = {7: 24.32, 16: 39.25}  # 99.9% quantiles of chi-square by degrees of freedom


def seeded(seed):
    return torch.Generator().manual_seed(seed)


def chi_square(counts: torch.Tensor, probabilities: torch.Tensor) -> float:
    """Pearson's statistic of observed class counts against the expected ones (classes of probability 0 left out)."""
    expected = probabilities * counts.sum()
    kept = expected > 0
    return float(((counts[kept] - expected[kept]) ** 2 / expected[kept]).sum())


def class_counts(tokens: torch.Tensor, num_classes: int) -> torch.Tensor:
    return torch.bincount(tokens.flatten(), minlength=num_classes).double()


# ---------------------------------------------------------------------------------------------------------------
# the distribution


PROBABILITIES = torch.tensor([0.30, 0.20, 0.15, 0.12, 0.10, 0.08, 0.05, 0.0, 0.0])  # two impossible classes


@pytest.mark.parametrize("noise", NOISES)
def test_draws_follow_the_class_probabilities(noise):
    pixels = 20_000
    log_p = PROBABILITIES.log().clamp(min=-70).add(3.0)  # unnormalised, log(0) floored as the pipeline does
    log_p = log_p[None, :, None].expand(2, -1, pixels).contiguous()  # (B, C, P)
    tokens = draw_classes(log_p, [seeded(1), seeded(2)], noise, overwrite=False)  # (B, P)
    counts = class_counts(tokens, len(PROBABILITIES))
    assert counts[7:].sum() == 0  # a floored class is never drawn
    assert chi_square(counts, PROBABILITIES) < CHI_SQUARE_999[7]


@pytest.mark.parametrize("sampler", ["reference", "purity"])
def test_categorical_and_gumbel_steps_draw_the_same_posterior(sampler):
    """Many pixels share one x_t and one p(x_0 | x_t): both noises' token frequencies fit the step's distribution,
    the posterior (reference) or the model's p(x_0 | x_t) at the unmasked pixels (purity with r = 0)."""
    num_classes, pixels = 17, 20_000
    scheduler = VQDiffusionScheduler(num_classes) if sampler == "reference" else PurityPriorScheduler(num_classes)
    logits = torch.linspace(-2, 2, num_classes - 1).sin() * 2
    log_p_x_0 = logits.log_softmax(0)[None, :, None].expand(1, -1, pixels).contiguous()  # (1, K, P)
    x_t = torch.full((1, pixels), num_classes - 1)  # all masked
    t = 40
    scheduler.set_timesteps(100)
    if sampler == "reference":
        expected = scheduler.q_posterior(log_p_x_0, x_t, t)[0, :, 0].exp()  # (K + 1,)
    else:
        expected = torch.cat([log_p_x_0[0, :, 0].exp(), torch.zeros(1)])
    for noise, seed in zip(NOISES, (3, 4)):
        tokens = scheduler.step(log_p_x_0, t, x_t, generator=seeded(seed), noise=noise).prev_sample
        if sampler == "purity":
            tokens = tokens[tokens != num_classes - 1]  # the pixels this step unmasked
            assert tokens.numel() > 100
        assert chi_square(class_counts(tokens, num_classes), expected) < CHI_SQUARE_999[16]


def test_categorical_noise_is_one_uniform_per_pixel_from_each_images_generator():
    """Row b's draw is the inverse CDF at torch.rand((1, 1, P), generator=g_b): the classes follow from it alone."""
    log_p = torch.randn((3, 50, 64), generator=seeded(0))  # (B, C, P)
    log_p[2] = log_p[0]  # the same image twice: the same seed must give the same tokens
    tokens = categorical_sample_(log_p.clone(), [seeded(s) for s in (7, 8, 7)])
    for row, seed in enumerate((7, 8, 7)):
        u = torch.rand((1, 1, 64), generator=seeded(seed))[0, 0]  # (P,)
        cdf = log_p[row].softmax(dim=0).double().cumsum(dim=0)  # (C, P)
        expected = (cdf <= u * cdf[-1]).sum(dim=0)
        assert (tokens[row] == expected).float().mean() > 0.98  # float32 sums may move a boundary by one rounding
    assert torch.equal(tokens[0], tokens[2]) and not torch.equal(tokens[0], tokens[1])


def test_categorical_tokens_are_exactly_those_of_the_counting_definition():
    """The class drawn is the number of classes whose cumulative mass (torch's cumsum over the classes in order) is
    at most u times the total. The binary search must give exactly those tokens, ruled-out classes and peaked
    distributions included: datasets sampled before it must still rerun to their own tokens."""
    for shape, scale in (((4, 4097, 256), 4.0), ((3, 50, 64), 1.0), ((2, 2, 7), 30.0), ((1, 513, 1), 0.1)):
        log_p = torch.randn(shape, generator=seeded(1)) * scale  # (B, C, P)
        log_p[0, :shape[1] // 2] = -torch.inf  # classes ruled out
        tokens = categorical_sample_(log_p.clone(), [seeded(s) for s in range(shape[0])])
        u = torch.cat([torch.rand((1, 1, shape[2]), generator=seeded(s)) for s in range(shape[0])])  # (B, 1, P)
        cdf = (log_p - log_p.amax(dim=1, keepdim=True)).exp().cumsum(dim=1)  # (B, C, P)
        expected = (cdf <= u * cdf[:, -1:]).sum(dim=1).clamp(max=shape[1] - 1)  # (B, P)
        assert torch.equal(tokens, expected)
        assert bool((tokens[0] >= shape[1] // 2).all())


# ---------------------------------------------------------------------------------------------------------------
# generators on any device


def test_a_cpu_generator_draws_on_the_cpu_for_another_device():
    """torch refuses a CPU generator for a CUDA tensor; uniform_noise draws where the generator lives and moves the
    noise ('meta' stands in for the other device): the CPU generator advances exactly as by a CPU draw."""
    for shape in ((2, 1, 3), (2, 17, 3)):
        generator, twin = seeded(0), seeded(0)
        noise = uniform_noise(shape, torch.device("meta"), [generator, seeded(1)])
        torch.rand((1, *shape[1:]), generator=twin)
        assert noise.device.type == "meta" and noise.shape == shape
        assert torch.equal(generator.get_state(), twin.get_state())


def test_noise_does_not_depend_on_the_batch_or_the_target():
    rows = uniform_noise((3, 1, 5), torch.device("cpu"), [seeded(s) for s in (1, 2, 3)])
    for row, seed in enumerate((1, 2, 3)):
        assert torch.equal(rows[row:row + 1], torch.rand((1, 1, 5), generator=seeded(seed)))


# ---------------------------------------------------------------------------------------------------------------
# no host sync inside the loop


@pytest.mark.parametrize("scheduler_class", [VQDiffusionScheduler, PurityPriorScheduler])
@pytest.mark.parametrize("noise", NOISES)
def test_steps_read_nothing_back_from_the_device(scheduler_class, noise):
    """Meta tensors have no values: a step that read one (`.item()`, `int()`, `.any()`) would raise."""
    scheduler = scheduler_class(17)
    scheduler.set_timesteps(10, device="meta", spacing="skip")
    sample = torch.full((2, 7), 16, device="meta")
    log_p_x_0 = torch.empty((2, 16, 7), device="meta")
    for t in scheduler.timestep_values:
        sample = scheduler.step(log_p_x_0, t, sample, generator=[seeded(1), seeded(2)], noise=noise).prev_sample
    assert sample.device.type == "meta" and sample.shape == (2, 7)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), seed=0)


def test_the_pipeline_loop_reads_nothing_back_from_the_device(checkpoint):
    """The whole loop (guidance, truncation, steps) on meta tensors; only the final copy to the CPU must fail."""
    pipe = VQDiffusionPipeline.from_pretrained(checkpoint).to("meta")
    steps = []
    with pytest.raises(NotImplementedError):  # "Cannot copy out of meta tensor": after the loop, not in it
        pipe(["a red circle", "a cat"], num_inference_steps=4, guidance_scale=3.0, truncation_rate=0.9,
             generator=[seeded(1), seeded(2)], noise="categorical", output_type="latent",
             callback=lambda step, t, tokens: steps.append(step))
    assert steps == [0, 1, 2, 3]


# ---------------------------------------------------------------------------------------------------------------
# the pipeline and the engine


def test_categorical_images_alone_equal_the_batch_and_differ_from_gumbel(checkpoint):
    pipe = VQDiffusionPipeline.from_pretrained(checkpoint)
    prompts, seeds = ["a red circle", "a cat", "a red circle"], [5, 6, 7]
    settings = dict(num_inference_steps=6, guidance_scale=3.0, truncation_rate=0.9, output_type="latent")
    batch = pipe(prompts, generator=[seeded(s) for s in seeds], noise="categorical", **settings).tokens
    for row, (prompt, seed) in enumerate(zip(prompts, seeds)):
        alone = pipe(prompt, generator=seeded(seed), noise="categorical", **settings).tokens
        assert torch.equal(alone[0], batch[row])
    gumbel = pipe(prompts, generator=[seeded(s) for s in seeds], **settings).tokens
    assert not torch.equal(gumbel, batch)


def test_the_pipeline_names_a_bad_noise(checkpoint):
    pipe = VQDiffusionPipeline.from_pretrained(checkpoint)
    with pytest.raises(ValueError, match="noise must be one of 'gumbel', 'categorical'; got 'uniform'"):
        pipe("a cat", num_inference_steps=2, noise="uniform")


def test_the_engine_samples_categorically_by_default():
    assert SamplingConfig().noise == "categorical"
    with pytest.raises(ValueError):
        SamplingConfig(noise="uniform")
