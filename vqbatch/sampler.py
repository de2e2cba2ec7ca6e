"""The actor's model, without Ray: load it once, then sample batches of (prompt, seed) rows.

    build_model(model config, sampling config)       PipelineModel (a checkpoint) or NoopModel ("noop")
      -> model.sample(prompts, seeds)                tokens (N, P) and uint8 pixels (N, H, W, 3)
      -> model.prompt_truncated(prompts)             whether the tokenizer cuts each prompt
    sample_rows(model, prompts, seeds)               all three per row, what an engine actor stores

Everything that samples a dataset's rows goes through here: the engine's actors (`vqbatch.engine` wraps this in a
Ray actor), `rerun` and `verify` (`vqbatch.proof`), batch-size probing (`vqbatch.batch_size`) and the benchmarks.
This module imports no Ray, so it runs and is tested on a machine without it.
"""

from __future__ import annotations

import numpy as np

from vqbatch.config import NOOP_MODEL, ModelConfig, SamplingConfig
from vqbatch.io.images import to_uint8

NOOP_IMAGE_SIZE = 8  # the no-op model's images are NOOP_IMAGE_SIZE x NOOP_IMAGE_SIZE mid-grey squares
NOOP_LATENT_PIXELS = 16  # and its tokens are this many zeros


class PipelineModel:
    """VQ-Diffusion: each image sampled with its own `torch.Generator().manual_seed(seed)`."""

    def __init__(self, model: ModelConfig, sampling: SamplingConfig):
        import torch
        import transformers

        from vqbatch.pipeline import VQDiffusionPipeline

        transformers.utils.logging.disable_progress_bar()  # no one watches an actor's weight-loading bar
        self.device = ("cuda" if torch.cuda.is_available() else "cpu") if model.device == "auto" else model.device
        self.pipe = VQDiffusionPipeline.from_pretrained(model.uri, torch_dtype=getattr(torch, model.dtype),
                                                        device=self.device)
        if model.compile:
            self.pipe.compile_transformer(model.compile)
        self.sampling = sampling

    def sample(self, prompts: list[str], seeds: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """Tokens (N, P) int and pixels (N, H, W, 3) uint8 of one image per (prompt, seed)."""
        import torch

        output = self.pipe(prompts, num_inference_steps=self.sampling.steps,
                           guidance_scale=self.sampling.guidance_scale, truncation_rate=self.sampling.truncation_rate,
                           timestep_spacing=self.sampling.timestep_spacing, sampler=self.sampling.sampler,
                           prior_weight=self.sampling.prior_weight, noise=self.sampling.noise, output_type="latent",
                           generator=[torch.Generator().manual_seed(seed) for seed in seeds])
        return output.tokens.cpu().numpy(), self.decode(output.tokens)

    def decode(self, tokens) -> np.ndarray:
        """Pixels (N, H, W, 3) uint8 of tokens (N, P), each image decoded alone: the decoder's rounding then does not
        depend on the batch it was sampled in (and `vqbatch decode` re-renders the stored images exactly)."""
        images = np.concatenate([self.pipe.decode_tokens(row[None], output_type="np") for row in tokens])
        return to_uint8(images)

    def prompt_truncated(self, prompts: list[str]) -> list[bool]:
        """Whether the sampler cuts each prompt: its tokens, start and end marks included, pass the tokenizer's limit
        (77 for CLIP), counted by the loaded model's own tokenizer."""
        tokenizer = self.pipe.tokenizer
        lengths = [len(ids) for ids in tokenizer(prompts, truncation=False, verbose=False).input_ids]
        return [length > tokenizer.model_max_length for length in lengths]


class NoopModel:
    """No model at all: zero tokens and a fixed tiny grey image per row, to measure the data plane alone."""

    device = "cpu"  # where auto batch sizing measures it: no activations, so it gets the largest batch

    def __init__(self, model: ModelConfig, sampling: SamplingConfig):
        self.pixels = np.full((NOOP_IMAGE_SIZE, NOOP_IMAGE_SIZE, 3), 128, np.uint8)

    def sample(self, prompts: list[str], seeds: list[int]) -> tuple[np.ndarray, np.ndarray]:
        count = len(prompts)
        return np.zeros((count, NOOP_LATENT_PIXELS), np.int64), np.broadcast_to(self.pixels, (count, *self.pixels.shape))

    def prompt_truncated(self, prompts: list[str]) -> list[None]:
        return [None] * len(prompts)  # no tokenizer: not known


def build_model(model: ModelConfig, sampling: SamplingConfig) -> PipelineModel | NoopModel:
    """`model.uri == "noop"` selects `NoopModel`; anything else is a checkpoint for `PipelineModel`."""
    return NoopModel(model, sampling) if model.uri == NOOP_MODEL else PipelineModel(model, sampling)


def sample_rows(model: PipelineModel | NoopModel, prompts: list[str],
                seeds: list[int]) -> list[tuple[list[int], np.ndarray, bool | None]]:
    """(tokens, pixels (H, W, 3) uint8, prompt truncated) per (prompt, seed) row, in order."""
    tokens, pixels = model.sample(prompts, seeds)
    return list(zip(tokens.tolist(), pixels, model.prompt_truncated(prompts)))
