"""`parts`: each speed change of vqbatch's sampling loop timed alone against the reference code it replaces.

One denoising step at batch `batch` (2 x batch rows with guidance), on the same weights and inputs:
    transformer   one guided forward; the reference projects the text to cross-attention keys and values in every
                  forward, vqbatch once per call (`precompute_text`) and reuses them
    guidance      combining the two halves in log space (reference: new tensors; vqbatch: in place)
    truncate      keeping the classes within the truncation mass (reference: two sorts; vqbatch: one sort)
    scheduler     one reverse step p(x_{t-1} | x_t) with Gumbel sampling, in the middle of the chain
    scheduler at ITHQ size, 4097 classes x 1024 pixels, batch 8 (synthetic log p(x_0 | x_t), whatever `--config`):
                  the reference's step against vqbatch's with Gumbel noise (same tokens) and with categorical noise
                  (one uniform per pixel; same distribution, other tokens: checked that every drawn class is possible)
    text          conditioning `batch` images that repeat one prompt (reference: encodes each; vqbatch: once)
Each part checks that both sides give the same result (tokens equal, tensors equal or within 1e-5).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from benchmarks.pipelines import SIZES, distinct_prompts, pipeline_pair
from benchmarks.report import Report, machine, median, timing_of
from vqbatch.pipeline import encode_prompts, guide_, truncate
from vqbatch.schedulers.vq_diffusion import VQDiffusionScheduler

ITHQ_STEP = dict(num_classes=4097, pixels=1024, batch=8)  # the scheduler step of microsoft/vq-diffusion-ithq

TRUNCATION_RATE, GUIDANCE_SCALE = 0.86, 5.0


@dataclass(frozen=True)
class Settings:
    size: str
    batch: int
    repeats: int
    seed: int


def compare(name: str, reference: Callable[[], object], ours: Callable[[], object], same: Callable, repeats: int,
            what: str) -> dict:
    """Median timings of both sides, after one warm-up call each, taking turns so that load changes hit both."""
    reference(), ours()
    reference_timings, vqbatch_timings = [], []
    for _ in range(repeats):
        timing, theirs = timing_of(reference, "cpu")
        reference_timings.append(timing)
        timing, mine = timing_of(ours, "cpu")
        vqbatch_timings.append(timing)
    reference_s, vqbatch_s = median([t.wall_s for t in reference_timings]), median([t.wall_s for t in vqbatch_timings])
    reference_cpu_s = median([t.cpu_s for t in reference_timings])
    vqbatch_cpu_s = median([t.cpu_s for t in vqbatch_timings])
    return {"part": name, "reference_ms": 1e3 * reference_s, "vqbatch_ms": 1e3 * vqbatch_s,
            "speedup": reference_s / vqbatch_s, "speedup_cpu_time": reference_cpu_s / vqbatch_cpu_s,
            "same_result": bool(same(theirs, mine)), "what": what}


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    finite = torch.isfinite(a)
    return torch.equal(finite, torch.isfinite(b)) and torch.allclose(a[finite], b[finite], atol=1e-5, rtol=1e-5)


def same_first_keys(ours) -> Callable:
    """Whether the reference's text embeddings, projected by vqbatch's first block, give vqbatch's cached keys."""
    attention = ours.transformer.transformer_blocks[0].attn2

    def check(embeddings: torch.Tensor, cache) -> bool:
        return close(attention.split_heads(attention.to_k(embeddings)), cache.keys_values[0][0])
    return check


@torch.no_grad()
def step_inputs(ours, batch: int, seed: int, t: torch.Tensor):
    """Mid-chain tokens x_t (B, P), the 2B-row text (reference form and vqbatch's cache), and guided log p(x_0)."""
    generator = torch.Generator().manual_seed(seed)
    transformer = ours.transformer
    sample = torch.randint(0, transformer.num_vector_embeds, (batch, transformer.num_latent_pixels),
                           generator=generator)  # (B, P)
    text_cache = ours.text_conditions(distinct_prompts(batch), 1, guided=True)
    unconditional = ours.unconditional_embedding().expand(batch, -1, -1)
    text = torch.cat([unconditional, encode_prompts(ours.tokenizer, ours.text_encoder, distinct_prompts(batch))])
    log_p = ours.predict_log_p_x_0(sample, text_cache, t, GUIDANCE_SCALE)  # (B, K, P)
    return sample, text, text_cache, log_p


def ithq_step_inputs(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x_t (B, P) half masked, a truncated log p(x_0 | x_t) (B, K, P) as the pipeline hands it on, and t."""
    generator = torch.Generator().manual_seed(seed)
    classes, pixels, batch = ITHQ_STEP["num_classes"], ITHQ_STEP["pixels"], ITHQ_STEP["batch"]
    tokens = torch.randint(0, classes - 1, (batch, pixels), generator=generator)
    masked = torch.rand((batch, pixels), generator=generator) < 0.5
    log_p = truncate((3 * torch.randn((batch, classes - 1, pixels), generator=generator)).log_softmax(dim=1),
                     TRUNCATION_RATE).clamp_(min=-70.0)
    return tokens.masked_fill(masked, classes - 1), log_p, torch.tensor(50)


def ithq_scheduler_rows(repeats: int, seed: int) -> list[dict]:
    """The reference's step against vqbatch's with each noise, at ITHQ size."""
    from diffusers import VQDiffusionScheduler as ReferenceScheduler

    sample, log_p, t = ithq_step_inputs(seed)
    ours, reference = VQDiffusionScheduler(ITHQ_STEP["num_classes"]), ReferenceScheduler(ITHQ_STEP["num_classes"])
    ours.set_timesteps(100)
    reference.set_timesteps(100)
    posterior = ours.q_posterior(log_p, sample, int(t))  # (B, K + 1, P)

    def reference_step():
        return reference.step(log_p, t, sample, generator=torch.Generator().manual_seed(1)).prev_sample

    def our_step(noise):
        return lambda: ours.step(log_p, int(t), sample, generator=torch.Generator().manual_seed(1),
                                 noise=noise).prev_sample

    def possible(_, tokens):  # every drawn class above the log-zero floor of the posterior
        return bool((posterior.gather(1, tokens.unsqueeze(1)) > -60).all())

    shape = "{num_classes} classes x {pixels} pixels, batch {batch}".format(**ITHQ_STEP)
    return [compare("scheduler ITHQ gumbel", reference_step, our_step("gumbel"), torch.equal, repeats,
                    f"{shape}, t = {int(t)}: Gumbel noise, one uniform per class"),
            compare("scheduler ITHQ categorical", reference_step, our_step("categorical"), possible, repeats,
                    f"{shape}: categorical noise, one uniform per pixel (same_result: every drawn class possible)")]


@torch.no_grad()
def run(settings: Settings) -> Report:
    size = SIZES[settings.size]
    where = machine("cpu")
    ours, reference = pipeline_pair(size, seed=settings.seed)
    batch, repeats, t = settings.batch, settings.repeats, torch.tensor(size.num_train_timesteps // 2)
    sample, text, text_cache, log_p = step_inputs(ours, batch, settings.seed, t)
    doubled = torch.cat([sample, sample])
    halves = reference.transformer(doubled, encoder_hidden_states=text, timestep=t).sample.chunk(2)
    ours.scheduler.set_timesteps(size.num_train_timesteps)
    reference.scheduler.set_timesteps(size.num_train_timesteps)
    repeated = ["a lighthouse on a cliff at sunset"] * batch

    def reference_guidance():
        uncond, cond = halves
        guided = uncond + GUIDANCE_SCALE * (cond - uncond)
        return guided - torch.logsumexp(guided, dim=1, keepdim=True)

    rows = [
        compare("transformer", lambda: reference.transformer(doubled, encoder_hidden_states=text, timestep=t).sample,
                lambda: ours.transformer(doubled, timestep=t, text_cache=text_cache).sample, close, repeats,
                "one guided forward (2B rows)"),
        compare("guidance", reference_guidance, lambda: guide_(halves[0].clone(), halves[1].clone(), GUIDANCE_SCALE),
                close, repeats, "combine the halves, renormalise (vqbatch's time includes two input copies)"),
        compare("truncate", lambda: reference.truncate(log_p, TRUNCATION_RATE),
                lambda: truncate(log_p, TRUNCATION_RATE), close, repeats, f"truncation rate {TRUNCATION_RATE}"),
        compare("scheduler", lambda: reference.scheduler.step(log_p, t, sample,
                                                               generator=torch.Generator().manual_seed(1)).prev_sample,
                lambda: ours.scheduler.step(log_p, t, sample, generator=torch.Generator().manual_seed(1)).prev_sample,
                torch.equal, repeats, f"reverse step at t = {int(t)}, Gumbel sampling"),
        compare("text", lambda: reference._encode_prompt(repeated, 1, True),
                lambda: ours.text_conditions(repeated, 1, guided=True), same_first_keys(ours), repeats,
                f"{batch} images of one prompt, guided (same_result: first block's cross-attention keys)"),
        *ithq_scheduler_rows(repeats, settings.seed),
    ]
    report = Report("parts", asdict(settings), where, columns=[
        "part", "reference_ms", "vqbatch_ms", "speedup", "speedup_cpu_time", "same_result", "what"], rows=rows)
    report.notes += [f"config {settings.size!r}, batch {batch} (2 x {batch} transformer rows with guidance), "
                     f"float32 on CPU; median of {repeats} timed calls after a warm-up, the two sides taking turns."]
    return report
