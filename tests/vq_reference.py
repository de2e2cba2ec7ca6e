"""Helpers shared by the pipeline and checkpoint tests: diffusers' reference pipeline, loaded component by component,
and checkpoints laid out like the hub's cache.

diffusers 0.42.1's `DiffusionPipeline.from_pretrained` cannot resolve `LearnedClassifierFreeSamplingEmbeddings`, so the
reference is assembled from its components, each read with its own class's `from_pretrained`.
"""

from pathlib import Path

import numpy as np
import torch


def reference_components(folder):
    from diffusers import Transformer2DModel, VQDiffusionScheduler, VQModel
    from diffusers.pipelines.deprecated.vq_diffusion.pipeline_vq_diffusion import \
        LearnedClassifierFreeSamplingEmbeddings
    from transformers import CLIPTextModel, CLIPTokenizer

    return dict(
        vqvae=VQModel.from_pretrained(folder, subfolder="vqvae"),
        text_encoder=CLIPTextModel.from_pretrained(folder, subfolder="text_encoder"),
        tokenizer=CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer"),
        transformer=Transformer2DModel.from_pretrained(folder, subfolder="transformer"),
        scheduler=VQDiffusionScheduler.from_pretrained(folder, subfolder="scheduler"),
        learned_classifier_free_sampling_embeddings=LearnedClassifierFreeSamplingEmbeddings.from_pretrained(
            folder, subfolder="learned_classifier_free_sampling_embeddings"))


def reference_pipeline(components):
    from diffusers.pipelines.deprecated.vq_diffusion.pipeline_vq_diffusion import VQDiffusionPipeline

    pipe = VQDiffusionPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_reference(pipe, prompt, seed, **options):
    """The reference's images (np) and final tokens, read through its callback (it returns no tokens)."""
    steps = []
    images = pipe(prompt, generator=torch.Generator().manual_seed(seed), output_type="np",
                  callback=lambda step, t, sample: steps.append(sample), **options).images
    return images, steps[-1]


def run_ours(pipe, prompt, seed, **options):
    output = pipe(prompt, generator=torch.Generator().manual_seed(seed), output_type="np", **options)
    return output.images, output.tokens


def assert_same_generation(ours, reference):
    (our_images, our_tokens), (reference_images, reference_tokens) = ours, reference
    assert torch.equal(our_tokens, reference_tokens)
    assert our_images.shape == reference_images.shape
    np.testing.assert_allclose(our_images, reference_images, atol=1e-5, rtol=0)


def hub_cache(root: Path, repo_id: str, snapshots: dict[str, Path]) -> None:
    """Lay checkpoints out as huggingface_hub's cache does: refs/<revision> holds a commit, snapshots/<commit>."""
    repo = root / f"models--{repo_id.replace('/', '--')}"
    for number, (revision, checkpoint) in enumerate(snapshots.items()):
        commit = f"{number + 1:040x}"
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / revision).write_text(commit)
        for path in sorted(checkpoint.rglob("*")):
            if path.is_file():
                target = repo / "snapshots" / commit / path.relative_to(checkpoint)
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(path.read_bytes())
