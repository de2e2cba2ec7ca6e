"""vqbatch: VQ-Diffusion text-to-image datasets at scale, on torch, transformers and Ray Data.

The public names are imported on first use, so `import vqbatch` stays cheap (Ray workers and the CLI import it).
"""

from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    "VQDiffusionScheduler": "vqbatch.schedulers.vq_diffusion",
    "VQDiffusionSchedulerOutput": "vqbatch.schedulers.vq_diffusion",
    "DDPMScheduler": "vqbatch.schedulers.ddpm",
    "DDPMSchedulerOutput": "vqbatch.schedulers.ddpm",
    "VQModel": "vqbatch.models.vq_model",
    "VQEncoderOutput": "vqbatch.models.vq_model",
    "VQDiffusionTransformer": "vqbatch.models.transformer",
    "Transformer2DModel": "vqbatch.models.transformer",
    "Transformer2DModelOutput": "vqbatch.models.transformer",
    "DecoderOutput": "vqbatch.models.vq_model",
    "BaseOutput": "vqbatch.outputs",
    "LearnedClassifierFreeSamplingEmbeddings": "vqbatch.models.embeddings",
    "VQDiffusionPipeline": "vqbatch.pipeline",
    "ImagePipelineOutput": "vqbatch.pipeline",
    "read_dataset": "vqbatch.io.view",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'vqbatch' has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name]), name)
