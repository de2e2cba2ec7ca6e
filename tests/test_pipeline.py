"""VQDiffusionPipeline against diffusers' reference on the same tiny weights and random numbers; its own contracts."""

import numpy as np
import pytest
import torch
from vq_reference import assert_same_generation, reference_components, reference_pipeline, run_ours, run_reference

from vqbatch.models.embeddings import LearnedClassifierFreeSamplingEmbeddings
from vqbatch.pipeline import ImagePipelineOutput, VQDiffusionPipeline, truncate
from vqbatch.tiny import IMAGE_SIZE, LATENT_SIZE, CODEBOOK_SIZE, tiny_components, write_tiny_checkpoint

PROMPT = "a red circle above a blue square"
PROMPTS = ["a red circle", "two green stars", "a red circle"]  # a repeated prompt is encoded once


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), seed=0)


@pytest.fixture(scope="module")
def pipe(checkpoint):
    return VQDiffusionPipeline.from_pretrained(checkpoint)


@pytest.fixture(scope="module")
def reference(checkpoint):
    return reference_pipeline(reference_components(checkpoint))


@pytest.fixture(scope="module")
def empty_prompt_checkpoint(tmp_path_factory):
    """A checkpoint without learned unconditional embeddings: guidance encodes the empty prompt."""
    components = tiny_components(seed=1)
    components["learned_classifier_free_sampling_embeddings"] = LearnedClassifierFreeSamplingEmbeddings(learnable=False)
    return VQDiffusionPipeline(**components).save_pretrained(tmp_path_factory.mktemp("not-learnable"))


# ---------------------------------------------------------------------------------------------------------------
# Parity with diffusers: identical tokens, images within 1e-5


def test_default_call_matches_reference(pipe, reference):
    """All defaults: 100 steps, guidance 5, no truncation."""
    assert_same_generation(run_ours(pipe, PROMPT, seed=0), run_reference(reference, PROMPT, seed=0))


@pytest.mark.parametrize("prompt, options", [
    (PROMPT, dict(guidance_scale=1.0)),
    (PROMPT, dict(guidance_scale=0.5, truncation_rate=0.86)),
    (PROMPT, dict(truncation_rate=0.86)),
    (PROMPTS, dict(truncation_rate=0.86)),
    (PROMPTS, dict(guidance_scale=1.0, num_images_per_prompt=2)),
    (["one prompt", "another prompt"], dict(guidance_scale=3.0, num_images_per_prompt=3, truncation_rate=0.9)),
])
def test_matches_reference(pipe, reference, prompt, options):
    options = dict(num_inference_steps=12, **options)
    assert_same_generation(run_ours(pipe, prompt, seed=3, **options), run_reference(reference, prompt, seed=3, **options))


def test_given_latents_match_reference(pipe, reference):
    start = torch.randint(0, CODEBOOK_SIZE + 1, (2, LATENT_SIZE ** 2), generator=torch.Generator().manual_seed(5))
    options = dict(num_inference_steps=8, truncation_rate=0.86, latents=start)
    assert_same_generation(run_ours(pipe, PROMPTS[:2], seed=4, **options),
                           run_reference(reference, PROMPTS[:2], seed=4, **options))


def test_empty_prompt_guidance_matches_reference(empty_prompt_checkpoint):
    pipe = VQDiffusionPipeline.from_pretrained(empty_prompt_checkpoint)
    assert not pipe.learned_classifier_free_sampling_embeddings.learnable
    reference = reference_pipeline(reference_components(empty_prompt_checkpoint))
    options = dict(num_inference_steps=10, guidance_scale=4.0, num_images_per_prompt=2)
    assert_same_generation(run_ours(pipe, PROMPTS, seed=6, **options), run_reference(reference, PROMPTS, seed=6, **options))


def test_embeddings_without_a_parameter_have_a_device_and_dtype():
    """Like diffusers' models without tensors: the CPU and the default dtype, not a StopIteration."""
    from diffusers.pipelines.deprecated.vq_diffusion.pipeline_vq_diffusion import \
        LearnedClassifierFreeSamplingEmbeddings as Reference

    ours, reference = LearnedClassifierFreeSamplingEmbeddings(learnable=False), Reference(learnable=False)
    assert (ours.device, ours.dtype) == (reference.device, reference.dtype) == (torch.device("cpu"), torch.float32)


def test_pil_images_match_reference(pipe, reference):
    options = dict(num_inference_steps=6, num_images_per_prompt=2)
    ours = pipe(PROMPT, generator=torch.Generator().manual_seed(2), **options).images
    theirs = reference(PROMPT, generator=torch.Generator().manual_seed(2), **options).images
    assert [image.size for image in ours] == [(IMAGE_SIZE, IMAGE_SIZE)] * 2
    for our_image, their_image in zip(ours, theirs):
        assert our_image.mode == their_image.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(our_image), np.asarray(their_image))


def random_log_probs(seed, shape=(3, 40, 21), ties=False):
    logits = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 3
    if ties:  # coarse logits: many classes share a probability, so the sort's order among equals matters
        logits = logits.round()
    return logits.log_softmax(dim=1)


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("rate", [1.0, 0.99999, 0.86, 0.5, 0.0])
def test_truncate_matches_reference(reference, ties, rate):
    for seed in range(4):
        log_p = random_log_probs(seed, ties=ties)
        before = log_p.clone()
        assert torch.equal(truncate(log_p, rate), reference.truncate(log_p, rate))
        assert torch.equal(log_p, before)  # the input is left alone


def test_truncate_keeps_the_most_likely_class_and_drops_the_tail(pipe):
    log_p = random_log_probs(9)
    kept = pipe.truncate(log_p, 0.5) > -torch.inf  # (B, K, P)
    most_likely = log_p.argmax(dim=1, keepdim=True)
    assert kept.gather(1, most_likely).all()
    kept_mass = torch.where(kept, log_p.exp(), 0).sum(dim=1)
    dropped_best = torch.where(kept, -torch.inf, log_p).amax(dim=1)
    kept_worst = torch.where(kept, log_p, torch.inf).amin(dim=1)
    assert (dropped_best <= kept_worst).all()  # a kept class is never less likely than a dropped one
    assert (kept_mass - kept_worst.exp() < 0.5).all()  # without its least likely class the kept mass is below the rate


# ---------------------------------------------------------------------------------------------------------------
# Our own contracts


def test_each_generator_of_a_list_makes_its_own_image(pipe):
    seeds = [11, 12, 13, 14]
    prompts = ["a red circle", "a blue square"]
    options = dict(num_inference_steps=10, truncation_rate=0.9, num_images_per_prompt=2, output_type="np")
    batch = pipe(prompts, generator=[torch.Generator().manual_seed(s) for s in seeds], **options)
    for row, (seed, prompt) in enumerate(zip(seeds, [p for p in prompts for _ in range(2)])):
        alone = pipe(prompt, generator=[torch.Generator().manual_seed(seed)], **{**options, "num_images_per_prompt": 1})
        assert torch.equal(alone.tokens[0], batch.tokens[row])
        np.testing.assert_allclose(alone.images[0], batch.images[row], atol=1e-5, rtol=0)
    assert not torch.equal(batch.tokens[0], batch.tokens[1])  # same prompt, different seeds


def test_decode_tokens_reproduces_the_images(pipe):
    output = pipe(PROMPTS, num_inference_steps=5, generator=torch.Generator().manual_seed(0), output_type="np")
    assert isinstance(output, ImagePipelineOutput)
    assert output.tokens.shape == (3, LATENT_SIZE ** 2) and output.tokens.dtype == torch.long
    np.testing.assert_allclose(pipe.decode_tokens(output.tokens, output_type="np"), output.images, atol=1e-6, rtol=0)
    pil = pipe.decode_tokens(output.tokens)
    np.testing.assert_array_equal(np.asarray(pil[1]), (output.images[1] * 255).round().astype(np.uint8))


def test_latent_output_and_tuple_return(pipe, reference):
    seeded = dict(num_inference_steps=3, generator=torch.Generator().manual_seed(1))
    latent = pipe(PROMPT, output_type="latent", **seeded)
    assert latent.images is None and list(latent.keys()) == ["tokens"] and latent[0] is latent.tokens
    seeded["generator"].manual_seed(1)
    as_tuple = pipe(PROMPT, output_type="np", return_dict=False, **seeded)
    seeded["generator"].manual_seed(1)
    expected = reference(PROMPT, output_type="np", return_dict=False, **seeded)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == len(expected) == 1  # (images,) as diffusers returns
    np.testing.assert_allclose(as_tuple[0], expected[0], atol=1e-5, rtol=0)
    seeded["generator"].manual_seed(1)
    (tokens,) = pipe(PROMPT, output_type="latent", return_dict=False, **seeded)
    assert torch.equal(tokens, latent.tokens)


def test_output_indexes_like_diffusers(pipe):
    output = pipe(PROMPTS, num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    assert output[0] is output.images is output["images"] and len(output[0]) == 3
    assert list(output.keys()) == ["images", "tokens"] and output.to_tuple() == (output.images, output.tokens)
    assert output[-1] is output.tokens and dict(output) == {"images": output.images, "tokens": output.tokens}
    from diffusers import ImagePipelineOutput as Reference

    alone, reference = ImagePipelineOutput(images=output.images), Reference(images=output.images)
    assert list(alone.keys()) == list(reference.keys()) == ["images"] and alone.to_tuple() == reference.to_tuple()


def test_callback_every_callback_steps(pipe):
    calls = []
    pipe(PROMPT, num_inference_steps=7, callback=lambda *args: calls.append(args), callback_steps=3, output_type="latent")
    assert [(step, int(t)) for step, t, _ in calls] == [(0, 6), (3, 3), (6, 0)]
    assert calls[-1][2].shape == (1, LATENT_SIZE ** 2)


def test_skip_spacing_runs_fewer_steps_over_the_whole_chain(pipe):
    timesteps = []
    output = pipe(PROMPT, num_inference_steps=10, timestep_spacing="skip", output_type="latent",
                  generator=torch.Generator().manual_seed(0), callback=lambda step, t, sample: timesteps.append(int(t)))
    assert len(timesteps) == 10 and timesteps[0] == 99 and timesteps[-1] == 0
    assert output.tokens.max() < CODEBOOK_SIZE  # nothing left masked


def test_text_is_encoded_once_per_distinct_prompt_and_guidance_is_one_forward(pipe):
    text_batches, transformer_batches, cache_batches = [], [], []
    hooks = [pipe.text_encoder.register_forward_hook(lambda m, args, out: text_batches.append(args[0].shape[0])),
             pipe.transformer.register_forward_hook(lambda m, args, out: transformer_batches.append(args[0].shape[0]))]
    precompute = pipe.transformer.precompute_text
    pipe.transformer.precompute_text = lambda text: cache_batches.append(text.shape[0]) or precompute(text)
    try:
        pipe(PROMPTS, num_images_per_prompt=2, num_inference_steps=4, output_type="latent")
        assert text_batches == [2] and cache_batches == [3]  # 2 distinct prompts (+1 learned unconditional row)
        assert transformer_batches == [12] * 4  # 6 images, conditional and unconditional in one forward per step
        text_batches.clear(), transformer_batches.clear(), cache_batches.clear()
        pipe(PROMPTS, num_inference_steps=4, guidance_scale=1.0, output_type="latent")
        assert text_batches == [2] and cache_batches == [2] and transformer_batches == [3] * 4
    finally:
        del pipe.transformer.precompute_text
        for hook in hooks:
            hook.remove()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_gives_valid_images(dtype):
    pipe = VQDiffusionPipeline(**tiny_components(seed=2)).to(dtype)
    assert pipe.dtype == dtype and pipe.text_encoder.dtype == dtype
    output = pipe(PROMPTS[:2], num_inference_steps=5, truncation_rate=0.86, output_type="np",
                  generator=torch.Generator().manual_seed(0))
    assert output.images.dtype == np.float32 and output.images.shape == (2, IMAGE_SIZE, IMAGE_SIZE, 3)
    assert np.isfinite(output.images).all() and output.images.min() >= 0 and output.images.max() <= 1
    assert 0 <= output.tokens.min() and output.tokens.max() < CODEBOOK_SIZE


def test_to_moves_and_casts_every_model(pipe):
    fresh = VQDiffusionPipeline(**tiny_components(seed=3))
    assert fresh.to(torch.device("cpu"), dtype=torch.float64) is fresh
    assert {model.dtype for model in fresh.models()} == {torch.float64} and fresh.device == torch.device("cpu")


# ---------------------------------------------------------------------------------------------------------------
# Errors


def masked(batch):
    return torch.full((batch, LATENT_SIZE ** 2), CODEBOOK_SIZE)


@pytest.mark.parametrize("arguments, message", [
    (dict(prompt=[]), "empty list"),
    (dict(prompt=["ok", 3]), "list of strings"),
    (dict(output_type="jpeg"), "output_type must be one of 'pil', 'np', 'latent'; got 'jpeg'"),
    (dict(callback_steps=0), "callback_steps must be a positive integer, got 0"),
    (dict(num_images_per_prompt=0), "num_images_per_prompt must be a positive integer, got 0"),
    (dict(latents=masked(1) + 1), rf"latents values must lie in \[0, {CODEBOOK_SIZE}\]"),
    (dict(latents=masked(1) - CODEBOOK_SIZE - 1), rf"latents values must lie in \[0, {CODEBOOK_SIZE}\], got values from -1"),
    (dict(latents=masked(2)), rf"latents has shape \(2, {LATENT_SIZE ** 2}\), expected \(1, {LATENT_SIZE ** 2}\)"),
    (dict(latents=masked(1).float()), "latents must be an integer tensor"),
    (dict(generator=[torch.Generator()] * 2, num_images_per_prompt=3), "list of 2 generators but 3 images"),
    (dict(timestep_spacing="even"), "spacing must be one of"),
    (dict(guidance_scale=float("inf")), "guidance_scale must be a finite number .*got inf"),
    (dict(guidance_scale=float("nan")), "guidance_scale must be a finite number .*got nan"),
    (dict(truncation_rate=float("inf")), r"truncation_rate must be a number in \(0, 1\] .*got inf"),
    (dict(truncation_rate=0), r"truncation_rate must be a number in \(0, 1\] .*got 0"),
    (dict(truncation_rate=1.5), r"truncation_rate must be a number in \(0, 1\] .*got 1.5"),
])
def test_bad_arguments_are_named(pipe, arguments, message):
    with pytest.raises(ValueError, match=message):
        pipe(**{"prompt": PROMPT, "num_inference_steps": 2, **arguments})


def test_decode_tokens_rejects_masks_and_wrong_shapes(pipe):
    with pytest.raises(ValueError, match=rf"tokens values must lie in \[0, {CODEBOOK_SIZE - 1}\]"):
        pipe.decode_tokens(masked(1))
    with pytest.raises(ValueError, match=r"tokens has shape \(1, 5\)"):
        pipe.decode_tokens(torch.zeros(1, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="decode_tokens makes images"):
        pipe.decode_tokens(masked(1) - 1, output_type="latent")
