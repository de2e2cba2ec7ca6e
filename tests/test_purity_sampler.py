"""The purity-prior sampler (Improved VQ-Diffusion): its invariants, its randomness, its settings end to end."""

import numpy as np
import pyarrow as pa
import pytest
import torch

from test_pipeline import checkpoint, pipe  # noqa: F401  (the tiny checkpoint and its pipeline)
from vqbatch.cli import GENERATE_FLAGS, build_parser, main
from vqbatch.config import ModelConfig, SamplingConfig, load_job_config
from vqbatch.io.formats import metadata_table, sampled_table
from vqbatch.io.prompts import IMAGE_ROW_SCHEMA
from vqbatch.proof import parameter_groups
from vqbatch.sampler import PipelineModel
from vqbatch.schedulers.purity import PurityPriorScheduler, check_sampler, pixels_to_unmask
from vqbatch.schedulers.vq_diffusion import VQDiffusionScheduler
from vqbatch.tiny import CODEBOOK_SIZE, LATENT_SIZE

K, P, T = 6, 24, 20  # codebook classes, latent pixels, training timesteps of the small chains below
MASK = K


def scheduler(prior_weight=0.0):
    return PurityPriorScheduler(num_vec_classes=K + 1, num_train_timesteps=T, prior_weight=prior_weight)


def gamma_bar(s, config):
    """γ̄_s of the linear schedule, written out here; s = -1 is x_0 (nothing masked)."""
    if s == -1:
        return 0.0
    start, end = config.gamma_cum_start, config.gamma_cum_end
    return start + s / (config.num_train_timesteps - 1) * (end - start)


def random_log_p(generator, classes=K, pixels=P):
    """A model output: (1, classes, pixels) log-probabilities with a clear favourite per pixel."""
    favourite = torch.randint(classes, (1, pixels), generator=generator)
    logits = torch.randn((1, classes, pixels), generator=generator) * 0.5
    logits += 4 * torch.nn.functional.one_hot(favourite, classes).permute(0, 2, 1)
    return logits.log_softmax(dim=1)


def run_chain(sampler, model_seeds, generator, steps, spacing="reference", start=None):
    """Every x along the chain, x_T first. Image b's model outputs come from its own seed, so they do not depend
    on the batch; `generator` is the sampler's (one, or one per image)."""
    models = [torch.Generator().manual_seed(seed) for seed in model_seeds]
    x = torch.full((len(model_seeds), P), MASK) if start is None else start
    chain = [x]
    sampler.set_timesteps(steps, spacing=spacing)
    for t in sampler.timesteps:
        log_p = torch.cat([random_log_p(model) for model in models])  # (B, K, P)
        x = sampler.step(log_p, t, x, generator=generator).prev_sample
        chain.append(x)
    return sampler.timesteps.tolist(), chain


def check_only_unmasking(chain):
    for x_t, x_s in zip(chain, chain[1:]):
        kept = x_t != MASK
        assert torch.equal(x_s[kept], x_t[kept]), "a token once unmasked never changes"
        assert ((x_s == MASK) <= (x_t == MASK)).all(), "a pixel never becomes masked"
    assert ((chain[-1] >= 0) & (chain[-1] < K)).all(), "no mask token at the end"


# ---------------------------------------------------------------------------------------------------------------
# The step's invariants


@pytest.mark.parametrize("steps, spacing", [(T, "reference"), (7, "reference"), (7, "skip"), (1, "skip")])
@pytest.mark.parametrize("prior_weight", [0.0, 1.0])
def test_only_unmasks_on_the_forward_chains_schedule_and_ends_unmasked(steps, spacing, prior_weight):
    sampler = scheduler(prior_weight)
    timesteps, chain = run_chain(sampler, [1, 2, 3], torch.Generator().manual_seed(0), steps, spacing)
    check_only_unmasking(chain)
    for t, s, x_s in zip(timesteps, timesteps[1:] + [-1], chain[1:]):
        left = round(P * gamma_bar(s, sampler.config))  # as many masked as q(x_s | x_0) masks
        assert (x_s == MASK).sum(dim=1).tolist() == [left] * 3, (t, s)


def test_given_tokens_are_kept_and_a_less_masked_start_unmasks_only_what_the_schedule_asks():
    start = torch.full((2, P), MASK)
    start[0, ::2] = torch.arange(P // 2) % K  # half given
    start[1] = torch.arange(P) % K  # nothing masked
    sampler = scheduler(1.0)
    timesteps, chain = run_chain(sampler, [4, 5], torch.Generator().manual_seed(1), 6, "skip", start)
    check_only_unmasking(chain)
    assert torch.equal(chain[-1][1], start[1])
    for s, x_s in zip(timesteps[1:] + [-1], chain[1:]):
        assert (x_s[0] == MASK).sum() == min(P // 2, round(P * gamma_bar(s, sampler.config)))


def test_a_large_prior_weight_takes_each_pixels_most_likely_token():
    """Eq. 11: (1 + r s_i) log p sharpens towards the favourite as r grows (s_i >= 1/K > 0)."""
    log_p = torch.cat([random_log_p(torch.Generator().manual_seed(seed)) for seed in range(3)])  # (3, K, P)
    sampler = scheduler(prior_weight=1e4)
    sampler.set_timesteps(1)  # one step from x_0's predecessor to x_0: every pixel unmasked
    x_0 = sampler.step(log_p, 0, torch.full((3, P), MASK), generator=torch.Generator().manual_seed(2)).prev_sample
    assert torch.equal(x_0, log_p.argmax(dim=1))


@pytest.mark.parametrize("prior_weight", [0.0, 3.0])
def test_tokens_follow_eq_11(prior_weight):
    """Pixel 0 is the surest (s = 1), pixel 1 has s = 0.45 / 0.5: its token ∝ p^(1 + r s)."""
    p = torch.tensor([[0.5, 0.25, 0.25], [0.45, 0.35, 0.2]]).T  # (K=3, P=2)
    rows = 4000
    log_p = p.log().expand(rows, 3, 2)
    sampler = PurityPriorScheduler(num_vec_classes=4, num_train_timesteps=T, prior_weight=prior_weight)
    sampler.set_timesteps(1)
    x_0 = sampler.step(log_p, 0, torch.full((rows, 2), 3), generator=torch.Generator().manual_seed(3)).prev_sample
    frequencies = torch.bincount(x_0[:, 1], minlength=3).float() / rows
    expected = p[:, 1] ** (1 + prior_weight * 0.45 / 0.5)
    torch.testing.assert_close(frequencies, expected / expected.sum(), atol=0.025, rtol=0)


# ---------------------------------------------------------------------------------------------------------------
# Which pixels: drawn without replacement with probability ∝ purity, as the official torch.multinomial draws them

PURITY = torch.tensor([0.9, 0.8, 0.6, 0.3, 0.2])  # pixel 1 is already unmasked
MASKED = torch.tensor([True, False, True, True, True])


@pytest.mark.parametrize("count", [1, 2])
def test_pixels_are_drawn_in_proportion_to_purity(count):
    rows = 4000
    chosen = pixels_to_unmask(PURITY.log().expand(rows, 5), MASKED.expand(rows, 5), torch.full((rows,), count),
                              torch.Generator().manual_seed(4))
    assert (chosen.sum(dim=1) == count).all() and not chosen[:, 1].any()
    official = torch.multinomial((PURITY * MASKED).expand(rows, 5), count, generator=torch.Generator().manual_seed(5))
    official_inclusion = torch.zeros(rows, 5).scatter_(1, official, 1.0).mean(dim=0)
    torch.testing.assert_close(chosen.float().mean(dim=0), official_inclusion, atol=0.035, rtol=0)
    if count == 1:
        weights = PURITY * MASKED
        torch.testing.assert_close(chosen.float().mean(dim=0), weights / weights.sum(), atol=0.03, rtol=0)


def test_the_surest_masked_pixel_is_the_likeliest_first_choice():
    rows = 4000
    chosen = pixels_to_unmask(PURITY.log().expand(rows, 5), MASKED.expand(rows, 5), torch.ones(rows, dtype=torch.long),
                              torch.Generator().manual_seed(6))
    frequencies = chosen.float().mean(dim=0)[MASKED]
    assert (frequencies[:-1] > frequencies[1:]).all()  # purity order: 0.9 > 0.6 > 0.3 > 0.2


# ---------------------------------------------------------------------------------------------------------------
# Randomness per image


def test_an_image_alone_gets_the_tokens_it_gets_in_a_batch():
    seeds, model_seeds = [10, 11, 12], [20, 21, 22]
    _, batch = run_chain(scheduler(1.0), model_seeds, [torch.Generator().manual_seed(s) for s in seeds], 6, "skip")
    for row, (seed, model_seed) in enumerate(zip(seeds, model_seeds)):
        _, alone = run_chain(scheduler(1.0), [model_seed], [torch.Generator().manual_seed(seed)], 6, "skip")
        assert all(torch.equal(x_alone[0], x_batch[row]) for x_alone, x_batch in zip(alone, batch))
    assert not torch.equal(batch[-1][0], batch[-1][1])


def test_the_purity_scheduler_keeps_the_chain_of_the_scheduler_it_is_made_from():
    base = VQDiffusionScheduler(num_vec_classes=K + 1, num_train_timesteps=T, gamma_cum_end=0.9)
    purity = PurityPriorScheduler.from_scheduler(base, prior_weight=2.0)
    assert purity.config == base.config and purity.prior_weight == 2.0
    assert torch.equal(purity.gamma_bar, base.gamma_bar)


# ---------------------------------------------------------------------------------------------------------------
# Settings


@pytest.mark.parametrize("sampler, prior_weight, message", [
    ("maskgit", 0.0, "sampler must be one of 'reference', 'purity'; got 'maskgit'"),
    ("purity", -1.0, "prior_weight .* must be a finite number >= 0, got -1.0"),
    ("purity", float("inf"), "must be a finite number >= 0, got inf"),
    ("purity", "1", "must be a finite number >= 0, got '1'"),
    ("reference", 1.0, "prior_weight=1.0 applies only to sampler='purity'"),
])
def test_bad_sampler_settings_are_named(sampler, prior_weight, message):
    with pytest.raises(ValueError, match=message):
        check_sampler(sampler, prior_weight)


def test_a_negative_prior_weight_is_refused_by_the_scheduler():
    with pytest.raises(ValueError, match="prior_weight"):
        scheduler(prior_weight=-0.5)


JOB = {"input.paths": "prompts.parquet", "model.uri": "noop", "output.uri": "out"}


def test_the_job_config_takes_the_sampler():
    sampling = load_job_config(None, {**JOB, "sampling.sampler": "purity", "sampling.prior_weight": 1.5}).sampling
    assert (sampling.sampler, sampling.prior_weight) == ("purity", 1.5)
    assert (SamplingConfig().sampler, SamplingConfig().prior_weight) == ("reference", 0.0)


@pytest.mark.parametrize("overrides, field, message", [
    ({"sampling.sampler": "greedy"}, "sampling.sampler", "'reference' or 'purity'"),
    ({"sampling.sampler": "purity", "sampling.prior_weight": -1}, "sampling.prior_weight", "greater than or equal"),
    ({"sampling.sampler": "purity", "sampling.prior_weight": float("nan")}, "sampling.prior_weight", "finite"),
    ({"sampling.prior_weight": 2}, "sampling.prior_weight", "applies only to sampler 'purity'"),
])
def test_the_job_config_rejects_bad_sampler_settings(overrides, field, message):
    with pytest.raises(ValueError, match=field) as error:
        load_job_config(None, {**JOB, **overrides})
    assert message in str(error.value)


def test_the_cli_flags_set_the_sampler(tmp_path, capsys):
    args = build_parser().parse_args(["generate", "--input", "p.parquet", "--output", "out", "--model", "noop",
                                      "--sampler", "purity", "--prior-weight", "0.5"])
    config = load_job_config(None, {key: getattr(args, key) for _, key, _, _ in GENERATE_FLAGS})
    assert (config.sampling.sampler, config.sampling.prior_weight) == ("purity", 0.5)
    code = main(["generate", "--input", str(tmp_path / "p.parquet"), "--output", str(tmp_path / "out"),
                 "--model", "noop", "--prior-weight", "1"])  # refused before Ray starts
    assert code == 2 and "applies only to sampler 'purity'" in capsys.readouterr().err


def test_each_row_records_its_sampler_and_a_rerun_uses_it():
    config = load_job_config(None, {**JOB, "sampling.sampler": "purity", "sampling.prior_weight": 0.5})
    rows = pa.table({"id": ["a"], "prompt": ["a red circle"], "image_index": [0], "seed": [7], "status": ["ok"],
                     "error": [None]}, schema=IMAGE_ROW_SCHEMA)
    image_columns = {"image": pa.array(["a.png"]), "file_name": pa.array(["a.png"])}  # the files format's columns
    metadata = metadata_table(sampled_table(rows, [[1, 2]], [np.zeros((2, 2, 3), np.uint8)]), image_columns, config)
    assert metadata.select(["sampler", "prior_weight"]).to_pylist() == [{"sampler": "purity", "prior_weight": 0.5}]
    manifest = {"model": {"dtype": "float32"}, "sampling": SamplingConfig().model_dump(mode="json")}
    [((_, sampling), positions)] = parameter_groups(metadata, manifest, "cpu")
    assert (sampling.sampler, sampling.prior_weight, positions) == ("purity", 0.5, [0])
    older = metadata.drop_columns(["sampler", "prior_weight"])  # written before the columns: the manifest decides
    manifest["sampling"].update(sampler="purity", prior_weight=2.0)
    [((_, sampling), _)] = parameter_groups(older, manifest, "cpu")
    assert (sampling.sampler, sampling.prior_weight) == ("purity", 2.0)


# ---------------------------------------------------------------------------------------------------------------
# The pipeline and the engine on the tiny model


def test_the_pipeline_samples_by_purity_with_guidance_truncation_and_skip_spacing(pipe):
    chain = []
    output = pipe(["a red circle", "a blue square"], num_inference_steps=5, guidance_scale=3.0, truncation_rate=0.9,
                  timestep_spacing="skip", sampler="purity", prior_weight=1.0, output_type="latent",
                  generator=[torch.Generator().manual_seed(s) for s in (1, 2)],
                  callback=lambda step, t, tokens: chain.append(tokens.clone()))
    start = torch.full_like(output.tokens, CODEBOOK_SIZE)
    check_masks_only_fall(CODEBOOK_SIZE, [start, *chain])
    landings = [74, 50, 25, 0, -1]  # skip spacing: round(linspace(99, 0, 5)) = 99, 74, 50, 25, 0, then x_0
    expected = [[round(LATENT_SIZE ** 2 * gamma_bar(s, pipe.scheduler.config))] * 2 for s in landings]
    assert [(x == CODEBOOK_SIZE).sum(dim=1).tolist() for x in chain] == expected
    assert torch.equal(chain[-1], output.tokens) and not (output.tokens == CODEBOOK_SIZE).any()


def check_masks_only_fall(mask, chain):
    for x_t, x_s in zip(chain, chain[1:]):
        kept = x_t != mask
        assert torch.equal(x_s[kept], x_t[kept]) and ((x_s == mask) <= (x_t == mask)).all()


def test_pipeline_images_alone_match_the_batch_and_given_tokens_stay(pipe):
    options = dict(num_inference_steps=4, guidance_scale=3.0, truncation_rate=0.9, sampler="purity",
                   prior_weight=1.0, output_type="latent")
    latents = torch.full((3, LATENT_SIZE ** 2), CODEBOOK_SIZE)
    latents[:, :8] = torch.arange(8)
    prompts = ["a red circle", "two green stars", "a red circle"]
    batch = pipe(prompts, latents=latents, generator=[torch.Generator().manual_seed(s) for s in (5, 6, 7)], **options)
    assert (batch.tokens[:, :8] == torch.arange(8)).all()
    alone = pipe(prompts[2], latents=latents[2:], generator=[torch.Generator().manual_seed(7)], **options)
    assert torch.equal(alone.tokens[0], batch.tokens[2])


def test_the_reference_sampler_is_the_default(pipe):
    options = dict(num_inference_steps=3, output_type="latent")
    default = pipe("a red circle", generator=torch.Generator().manual_seed(0), **options)
    reference = pipe("a red circle", generator=torch.Generator().manual_seed(0), sampler="reference", **options)
    assert torch.equal(default.tokens, reference.tokens)


@pytest.mark.parametrize("arguments, message", [
    (dict(sampler="purity-prior"), "sampler must be one of 'reference', 'purity'"),
    (dict(sampler="purity", prior_weight=-2.0), "prior_weight .* must be a finite number >= 0"),
    (dict(prior_weight=1.0), "applies only to sampler='purity'"),
])
def test_the_pipeline_rejects_bad_sampler_settings(pipe, arguments, message):
    with pytest.raises(ValueError, match=message):
        pipe("a red circle", num_inference_steps=2, **arguments)


def test_the_engine_samples_with_the_configured_sampler(pipe, checkpoint):
    sampling = SamplingConfig(steps=4, guidance_scale=1.0, sampler="purity", prior_weight=1.0)
    model = PipelineModel.load(ModelConfig(uri=str(checkpoint), device="cpu"), sampling, 2)
    tokens, _ = model.sample(["a red circle", "a blue square"], [3, 4])
    direct = pipe(["a red circle", "a blue square"], num_inference_steps=4, guidance_scale=1.0, sampler="purity",
                  prior_weight=1.0, generator=[torch.Generator().manual_seed(s) for s in (3, 4)], output_type="latent",
                  noise="categorical")  # the engine's default noise
    assert tokens.tolist() == direct.tokens.tolist()
    reference = pipe(["a red circle", "a blue square"], num_inference_steps=4, guidance_scale=1.0,
                     generator=[torch.Generator().manual_seed(s) for s in (3, 4)], output_type="latent")
    assert tokens.tolist() != reference.tokens.tolist()
