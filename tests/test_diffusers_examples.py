"""The VQ-Diffusion examples of the seed documents and diffusers' docs, run with `from vqbatch import` in place of
`from diffusers import` and nothing else changed: the hub id is served from a hub-laid-out cache of tiny checkpoints
(its `main` and `fp16` revisions), offline."""

import textwrap

import numpy as np
import PIL.Image
import pytest
import torch
from vq_reference import hub_cache

from vqbatch.pipeline import VQDiffusionPipeline
from vqbatch.tiny import IMAGE_SIZE, tiny_components

# shared/seeds/003 ("VQ-Diffusion", the diffusers blog post): load the pipeline
LOAD = """
from diffusers import VQDiffusionPipeline
pipe = VQDiffusionPipeline.from_pretrained("microsoft/vq-diffusion-ithq")
"""
# the same document: FP16 weights, move to the GPU, run the pipeline
FP16_AND_RUN = """
from diffusers import VQDiffusionPipeline
import torch
pipe = VQDiffusionPipeline.from_pretrained("microsoft/vq-diffusion-ithq", torch_dtype=torch.float16, revision="fp16")
pipe.to("cuda")
prompt = "A teddy bear playing in the pool."
image = pipe(prompt).images[0]
"""


def as_vqbatch(example: str) -> str:
    """The one change a diffusers user makes; "cuda" becomes "cpu" only on a machine without a GPU."""
    code = textwrap.dedent(example).replace("from diffusers import", "from vqbatch import")
    return code if torch.cuda.is_available() else code.replace('"cuda"', '"cpu"')


@pytest.fixture
def ithq_in_hub_cache(offline_hub, tmp_path):
    full = VQDiffusionPipeline(**tiny_components(seed=8))
    half = VQDiffusionPipeline(**tiny_components(seed=9)).to(torch.float16)
    hub_cache(offline_hub, "microsoft/vq-diffusion-ithq", {"main": full.save_pretrained(tmp_path / "main"),
                                                           "fp16": half.save_pretrained(tmp_path / "fp16")})
    return full, half


def test_examples_use_diffusers_imports():
    assert all("from diffusers import VQDiffusionPipeline" in example for example in (LOAD, FP16_AND_RUN))
    assert "from diffusers" not in as_vqbatch(FP16_AND_RUN)


def test_load_example(ithq_in_hub_cache):
    full, _ = ithq_in_hub_cache
    namespace = {}
    exec(as_vqbatch(LOAD), namespace)
    pipe = namespace["pipe"]
    assert isinstance(pipe, VQDiffusionPipeline) and pipe.dtype == torch.float32
    assert torch.equal(pipe.transformer.out.weight, full.transformer.out.weight)


def test_fp16_example_samples_an_image(ithq_in_hub_cache):
    _, half = ithq_in_hub_cache
    namespace = {}
    exec(as_vqbatch(FP16_AND_RUN), namespace)
    pipe, image = namespace["pipe"], namespace["image"]
    assert pipe.dtype == torch.float16 and torch.equal(pipe.transformer.out.weight.cpu(), half.transformer.out.weight)
    assert isinstance(image, PIL.Image.Image) and image.size == (IMAGE_SIZE, IMAGE_SIZE)
    assert np.asarray(image).std() > 0  # a sampled picture, not a blank


def test_diffusers_names_of_the_model_stack_import_from_vqbatch():
    import diffusers

    import vqbatch

    names = ["VQDiffusionPipeline", "ImagePipelineOutput", "VQModel", "Transformer2DModel", "VQDiffusionScheduler",
             "DDPMScheduler"]
    for name in names:
        assert hasattr(diffusers, name), name
        assert name in vqbatch.__all__ and getattr(vqbatch, name) is not None, name
    assert vqbatch.Transformer2DModel is vqbatch.VQDiffusionTransformer
