"""The actor's model, without Ray: load it once, then sample batches of (prompt, seed) rows.

    build_model(model, sampling, batch_shape, s3)    PipelineModel (a checkpoint) or NoopModel ("noop")
      -> model.sample(prompts, seeds)                tokens (N, P) and uint8 pixels (N, H, W, 3)
      -> model.prompt_truncated(prompts)             whether the tokenizer cuts each prompt
    sample_rows(model, prompts, seeds)               all three per row, what an engine actor stores

Everything that samples a dataset's rows goes through here: the engine's actors (`vqbatch.engine` wraps this in a
Ray actor), `rerun` and `verify` (`vqbatch.proof`), batch-size probing (`vqbatch.batch_size`) and the benchmarks.
This module imports no Ray, so it runs and is tested on a machine without it.

Batch-invariant tokens and pixels: a kernel library may pick another kernel for another batch shape (cuBLAS, oneDNN),
and a changed last bit can change a drawn token. So every transformer call samples exactly `batch_shape` images (the
job's `compute.batch_size`; rows beyond it go in further calls, and a short batch is filled up with copies of its
last row, whose results are dropped), and every decode takes `decode_batch` images (`DECODE_BATCH`, or the batch
shape if smaller), filled up the same way. Each image draws its noise from its own generator, so the filler rows
change nothing but the shape: an image gets the same tokens and pixels whichever rows share its batch, and `rerun`
and `verify` regenerate it by sampling at the dataset's batch shape (recorded in its generation fingerprint).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from vqbatch.config import NOOP_MODEL, ModelConfig, S3Config, SamplingConfig
from vqbatch.io.images import to_uint8

if TYPE_CHECKING:  # torch loads only where a model samples: not in Ray's read and write workers
    import torch

NOOP_IMAGE_SIZE = 8  # the no-op model's images are NOOP_IMAGE_SIZE x NOOP_IMAGE_SIZE mid-grey squares
NOOP_LATENT_PIXELS = 16  # and its tokens are this many zeros
DECODE_BATCH = 8  # images per VQ-VAE decode: enough to keep a GPU busy, and one shape for every decode


def padded(items: list, size: int) -> list:
    """`items` filled up to `size` entries with copies of its last one."""
    return items + items[-1:] * (size - len(items))


def batches(count: int, size: int) -> list[slice]:
    return [slice(start, min(start + size, count)) for start in range(0, count, size)]


class PipelineModel:
    """VQ-Diffusion: each image sampled with its own `torch.Generator().manual_seed(seed)`, every transformer call
    at `batch_shape` images and every decode at `decode_batch` (see the module docstring)."""

    def __init__(self, pipe, sampling: SamplingConfig, batch_shape: int):
        if isinstance(batch_shape, bool) or not isinstance(batch_shape, int) or batch_shape < 1:
            raise ValueError(f"batch_shape must be a positive number of images, got {batch_shape!r}")
        self.pipe, self.sampling = pipe, sampling  # pipe: a loaded vqbatch.pipeline.VQDiffusionPipeline
        self.batch_shape, self.decode_batch = batch_shape, min(DECODE_BATCH, batch_shape)
        self.device = pipe.device.type

    @classmethod
    def load(cls, model: ModelConfig, sampling: SamplingConfig, batch_shape: int,
             s3: S3Config = S3Config()) -> "PipelineModel":
        """Load the checkpoint `model.uri` (an s3:// one read with the job's `s3` settings) in `model.dtype` on
        `model.device` (auto: cuda when there is one)."""
        import torch
        import transformers

        from vqbatch.hub import local_checkpoint
        from vqbatch.pipeline import VQDiffusionPipeline

        transformers.utils.logging.disable_progress_bar()  # no one watches an actor's weight-loading bar
        device = ("cuda" if torch.cuda.is_available() else "cpu") if model.device == "auto" else model.device
        pipe = VQDiffusionPipeline.from_pretrained(local_checkpoint(model.uri, s3=s3),
                                                   torch_dtype=getattr(torch, model.dtype), device=device)
        if model.compile:
            pipe.compile_transformer(model.compile)
        return cls(pipe, sampling, batch_shape)

    def reshaped(self, batch_shape: int) -> "PipelineModel":
        """The same loaded pipeline, sampling at another batch shape."""
        return PipelineModel(self.pipe, self.sampling, batch_shape)

    def sample(self, prompts: list[str], seeds: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """Tokens (N, P) int and pixels (N, H, W, 3) uint8 of one image per (prompt, seed)."""
        import torch  # here, not at the top: actors of the no-op model and Ray's read/write workers never load it

        tokens = torch.cat([self.sample_tokens(prompts[rows], seeds[rows])
                            for rows in batches(len(prompts), self.batch_shape)])  # (N, P)
        return tokens.numpy(), self.decode(tokens)

    def sample_tokens(self, prompts: list[str], seeds: list[int]) -> torch.Tensor:
        """Tokens (N, P) of at most `batch_shape` rows, sampled in a call of exactly `batch_shape` images."""
        import torch

        generators = [torch.Generator().manual_seed(seed) for seed in padded(seeds, self.batch_shape)]
        output = self.pipe(padded(prompts, self.batch_shape), num_inference_steps=self.sampling.steps,
                           guidance_scale=self.sampling.guidance_scale, truncation_rate=self.sampling.truncation_rate,
                           timestep_spacing=self.sampling.timestep_spacing, sampler=self.sampling.sampler,
                           prior_weight=self.sampling.prior_weight, noise=self.sampling.noise,
                           truncation_target=self.sampling.truncation_target, output_type="latent",
                           generator=generators)
        return output.tokens[:len(prompts)]

    def decode(self, tokens: torch.Tensor) -> np.ndarray:
        """Pixels (N, H, W, 3) uint8 of tokens (N, P), decoded `decode_batch` at a time, a short chunk filled up with
        copies of its last row: the images the sampler stored (`vqbatch decode` re-renders them with this)."""
        images = [self.decode_chunk(tokens[rows]) for rows in batches(len(tokens), self.decode_batch)]
        return to_uint8(np.concatenate(images))

    def decode_chunk(self, tokens: torch.Tensor) -> np.ndarray:
        """Float images (N, H, W, C) of at most `decode_batch` token rows, in one decode of `decode_batch` rows."""
        import torch

        filled = torch.cat([tokens, tokens[-1:].expand(self.decode_batch - len(tokens), -1)])
        return self.pipe.decode_tokens(filled, output_type="np")[:len(tokens)]

    def prompt_truncated(self, prompts: list[str]) -> list[bool]:
        """Whether the sampler cuts each prompt: its tokens, start and end marks included, pass the tokenizer's limit
        (77 for CLIP), counted by the loaded model's own tokenizer."""
        tokenizer = self.pipe.tokenizer
        lengths = [len(ids) for ids in tokenizer(prompts, truncation=False, verbose=False).input_ids]
        return [length > tokenizer.model_max_length for length in lengths]


class NoopModel:
    """No model at all: zero tokens and a fixed tiny grey image per row, to measure the data plane alone."""

    device = "cpu"  # where auto batch sizing measures it: no activations, so it gets the largest batch

    def __init__(self, model: ModelConfig, sampling: SamplingConfig, batch_shape: int):
        self.pixels = np.full((NOOP_IMAGE_SIZE, NOOP_IMAGE_SIZE, 3), 128, np.uint8)
        self.batch_shape = batch_shape  # no kernels to choose: any shape gives the same rows

    def reshaped(self, batch_shape: int) -> "NoopModel":
        return self

    def sample(self, prompts: list[str], seeds: list[int]) -> tuple[np.ndarray, np.ndarray]:
        count = len(prompts)
        return np.zeros((count, NOOP_LATENT_PIXELS), np.int64), np.broadcast_to(self.pixels, (count, *self.pixels.shape))

    def prompt_truncated(self, prompts: list[str]) -> list[None]:
        return [None] * len(prompts)  # no tokenizer: not known


def build_model(model: ModelConfig, sampling: SamplingConfig, batch_shape: int,
                s3: S3Config = S3Config(), identity: dict | None = None) -> PipelineModel | NoopModel:
    """`model.uri == "noop"` selects `NoopModel`; anything else is a checkpoint for `PipelineModel`, an s3:// one read
    with the job's `s3` settings. With `identity` (the model part of a generation fingerprint), a checkpoint whose
    identity differs is refused before it loads (`vqbatch.lineage.ModelChanged`, naming each changed file)."""
    if identity is not None:
        from vqbatch.lineage import check_model_unchanged  # lineage imports this module

        check_model_unchanged(model, s3, identity)
    if model.uri == NOOP_MODEL:
        return NoopModel(model, sampling, batch_shape)
    return PipelineModel.load(model, sampling, batch_shape, s3)


def sample_rows(model: PipelineModel | NoopModel, prompts: list[str],
                seeds: list[int]) -> list[tuple[list[int], np.ndarray, bool | None]]:
    """(tokens, pixels (H, W, 3) uint8, prompt truncated) per (prompt, seed) row, in order."""
    tokens, pixels = model.sample(prompts, seeds)
    return list(zip(tokens.tolist(), pixels, model.prompt_truncated(prompts)))
