"""On a CUDA device: parity with diffusers, generators on either device, categorical noise equal on CPU and GPU.

Marked `gpu`; they skip only where torch sees no CUDA device. `python -m benchmarks.run gpu` runs them first.
"""

import pytest
import torch
from vq_reference import reference_components, reference_pipeline

from vqbatch.pipeline import VQDiffusionPipeline
from vqbatch.schedulers.vq_diffusion import VQDiffusionScheduler
from vqbatch.tiny import write_tiny_checkpoint

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

PROMPTS = ["a red circle", "two green stars", "a red circle"]
SETTINGS = dict(num_inference_steps=8, guidance_scale=3.0, truncation_rate=0.9)


def seeded(seed, device="cpu"):
    return torch.Generator(device).manual_seed(seed)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), seed=0)


@pytest.fixture(scope="module")
def on_cuda(checkpoint):
    return VQDiffusionPipeline.from_pretrained(checkpoint, torch_dtype=torch.float32, device="cuda")


@pytest.fixture(scope="module")
def on_cpu(checkpoint):
    return VQDiffusionPipeline.from_pretrained(checkpoint, torch_dtype=torch.float32)


def test_cuda_tokens_match_diffusers_with_cuda_generators(checkpoint, on_cuda):
    reference = reference_pipeline(reference_components(checkpoint)).to("cuda")
    final = {}
    reference(PROMPTS, generator=seeded(3, "cuda"), output_type="np",
              callback=lambda step, t, sample: final.update(tokens=sample), **SETTINGS)
    ours = on_cuda(PROMPTS, generator=seeded(3, "cuda"), output_type="latent", **SETTINGS).tokens
    assert torch.equal(ours, final["tokens"].cpu())


@pytest.mark.parametrize("noise", ["gumbel", "categorical"])
def test_a_cpu_generator_drives_a_cuda_model(on_cuda, noise):
    tokens = on_cuda(PROMPTS, generator=[seeded(s) for s in (1, 2, 1)], output_type="latent", noise=noise,
                     **SETTINGS).tokens
    assert tokens.shape == (3, on_cuda.transformer.num_latent_pixels) and torch.equal(tokens[0], tokens[2])


def test_categorical_noise_is_the_same_on_cpu_and_gpu():
    """The step's draw on each device from the same CPU generators and the same log-probabilities: equal tokens."""
    scheduler = VQDiffusionScheduler(4097)
    log_p = torch.randn((2, 4096, 256), generator=seeded(0)).log_softmax(dim=1)
    x_t = torch.full((2, 256), 4096)
    tokens = {}
    for device in ("cpu", "cuda"):
        scheduler.set_timesteps(100, device=device)
        tokens[device] = scheduler.step(log_p.to(device), 0, x_t.to(device), generator=[seeded(5), seeded(6)],
                                        noise="categorical").prev_sample.cpu()
    agreement = (tokens["cpu"] == tokens["cuda"]).float().mean()
    assert agreement > 0.999  # the same uniforms; only a cumulative sum's last bit may move a boundary


def test_categorical_pipeline_tokens_agree_on_cpu_and_gpu(on_cpu, on_cuda):
    arguments = dict(output_type="latent", noise="categorical", **SETTINGS)
    cpu = on_cpu(PROMPTS, generator=[seeded(s) for s in (1, 2, 3)], **arguments).tokens
    cuda = on_cuda(PROMPTS, generator=[seeded(s) for s in (1, 2, 3)], **arguments).tokens
    assert (cpu == cuda).float().mean() > 0.9  # the same noise; the devices' arithmetic differs in the last bits
