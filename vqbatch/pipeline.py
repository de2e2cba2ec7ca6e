"""`VQDiffusionPipeline`: prompts -> CLIP text embeddings -> discrete diffusion over VQ tokens -> VQ-VAE images.

Sampling follows VQ-Diffusion (Gu et al. 2022) with classifier-free guidance and truncation (Tang et al. 2022,
Improved VQ-Diffusion). With the defaults it draws the same random numbers as diffusers' reference pipeline and
returns the same tokens; the speed comes from work it does not repeat: text encoded once per distinct prompt,
cross-attention keys and values computed once per call, one sort per truncation, no guidance pass when
`guidance_scale <= 1`.

The module also reads and writes whole checkpoints in the diffusers layout (`model_index.json` + one folder per
component).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from numbers import Real
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from transformers import CLIPTextModel, CLIPTokenizer

from vqbatch.choices import (COMPILE_MODES, NOISES, OUTPUT_TYPES, TRUNCATION_TARGETS, Noise, TruncationTarget,
                             check_choice)
from vqbatch.configuration import DIFFUSERS_VERSION, read_json, write_json
from vqbatch.hub import local_checkpoint
from vqbatch.models.embeddings import LearnedClassifierFreeSamplingEmbeddings
from vqbatch.models.modeling import DEFAULT_MAX_SHARD_SIZE, PretrainedModel, resolve_dtype
from vqbatch.models.transformer import TextCache, VQDiffusionTransformer
from vqbatch.models.vq_model import VQModel
from vqbatch.outputs import BaseOutput
from vqbatch.schedulers.purity import DEFAULT_PRIOR_WEIGHT, PurityPriorScheduler, check_sampler
from vqbatch.schedulers.vq_diffusion import VQDiffusionScheduler

LOG_ZERO_FLOOR = -70.0  # log-probabilities are clamped here so that log(0) = -inf never reaches the scheduler


@dataclass
class ImagePipelineOutput(BaseOutput):
    """diffusers' pipeline output plus the sampled tokens: `out.images`, `out[0]` and `out.to_tuple()[0]` are the
    images (for output_type="latent", which leaves `images` None, the tokens). Built with the images alone, as
    diffusers builds it, it has diffusers' one key."""

    images: list[PIL.Image.Image] | np.ndarray | None  # None for output_type="latent"
    tokens: torch.LongTensor | None = None  # (B, P) final VQ codebook indices, one row per image; set by the pipeline


# ---------------------------------------------------------------------------------------------------------------
# Sampling math
# ---------------------------------------------------------------------------------------------------------------

def truncate(log_p_x_0: torch.Tensor, truncation_rate: float) -> torch.Tensor:
    """Keep, per latent pixel, the most likely classes whose probabilities before them sum to < truncation_rate.

    The most likely class is always kept; every other class becomes log(0) = -inf. Input (B, K, P), unchanged.
    """
    return truncate_(log_p_x_0.clone(), truncation_rate)


def truncate_(log_p_x_0: torch.Tensor, truncation_rate: float) -> torch.Tensor:
    """In-place `truncate`."""
    return log_p_x_0.masked_fill_(truncated_classes(log_p_x_0, truncation_rate), -torch.inf)


def truncated_classes(log_p_x_0: torch.Tensor, truncation_rate: float) -> torch.Tensor:
    """The classes `truncate` drops, (B, K, P) bool: one descending sort, a cumulative sum, scattered back."""
    sorted_log_p, order = log_p_x_0.sort(dim=1, descending=True)  # (B, K, P) each
    mass_so_far = sorted_log_p.exp_().cumsum_(dim=1)  # mass of the k most likely classes, k = 1..K
    dropped_sorted = torch.empty_like(mass_so_far, dtype=torch.bool)  # (B, K, P)
    dropped_sorted[:, 0] = False
    torch.ge(mass_so_far[:, :-1], truncation_rate, out=dropped_sorted[:, 1:])  # class k+1 dropped once mass >= rate
    return torch.empty_like(dropped_sorted).scatter_(1, order, dropped_sorted)  # back to class order


def guide_(log_p_uncond: torch.Tensor, log_p_text: torch.Tensor, guidance_scale: float,
           prompted_truncation_rate: float | None = None) -> torch.Tensor:
    """Classifier-free guidance in log space, renormalised over classes; overwrites and returns `log_p_text`.

    log p = log p(x0|0) + s (log p(x0|y) - log p(x0|0)), minus its log-sum-exp over the K classes. With
    `prompted_truncation_rate`, the classes that truncating p(x0|y) at that rate drops get log 0 before the
    renormalisation: guidance re-weights only what the prompt makes likely. Without it, a class both predictions
    call unlikely but the unconditional one more so is multiplied up by (p(x0|y) / p(x0|0))^(s-1), and the many
    such classes of a large codebook together draw stray specks.
    """
    dropped = None if prompted_truncation_rate is None else truncated_classes(log_p_text, prompted_truncation_rate)
    guided = log_p_text.sub_(log_p_uncond).mul_(guidance_scale).add_(log_p_uncond)  # (B, K, P)
    if dropped is not None:
        guided.masked_fill_(dropped, -torch.inf)
    return guided.sub_(torch.logsumexp(guided, dim=1, keepdim=True))


# ---------------------------------------------------------------------------------------------------------------
# Text conditions
# ---------------------------------------------------------------------------------------------------------------

def encode_prompts(tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel, prompts: Sequence[str]) -> torch.Tensor:
    """CLIP's last hidden state of each prompt, each token vector scaled to unit L2 norm (as VQ-Diffusion does)."""
    ids = tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids  # (N, L)
    hidden = text_encoder(ids.to(text_encoder.device))[0]  # (N, L, D)
    return hidden / hidden.norm(dim=-1, keepdim=True)


def distinct_prompt_rows(prompts: Sequence[str], num_images_per_prompt: int) -> tuple[list[str], torch.Tensor]:
    """The distinct prompts in first-seen order, and for each image the row of its prompt among them."""
    distinct = list(dict.fromkeys(prompts))
    row_of = {prompt: row for row, prompt in enumerate(distinct)}
    rows = torch.tensor([row_of[prompt] for prompt in prompts for _ in range(num_images_per_prompt)])  # (B,)
    return distinct, rows


def select_rows(text: TextCache, rows: torch.Tensor) -> TextCache:
    """The cache of the text conditions `rows` (N,), each block's keys and values gathered along the batch."""
    return TextCache(tuple((key.index_select(0, rows), value.index_select(0, rows))
                           for key, value in text.keys_values))  # each (N, nh, T, hs)


def fit_tokenizer_length(tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel) -> None:
    """A tokenizer saved without `model_max_length` would pad to ~1e30 tokens: use the encoder's context length."""
    context = text_encoder.config.max_position_embeddings
    if tokenizer.model_max_length > context:
        tokenizer.model_max_length = context


# ---------------------------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------------------------

def to_numpy_images(decoded: torch.Tensor) -> np.ndarray:
    """VQ-VAE output in [-1, 1], (B, C, H, W) -> float32 array in [0, 1], (B, H, W, C)."""
    return (decoded.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()


def to_pil_images(images: np.ndarray) -> list[PIL.Image.Image]:
    pixels = (images * 255).round().astype(np.uint8)  # (B, H, W, C)
    return [PIL.Image.fromarray(image.squeeze(-1), mode="L") if image.shape[-1] == 1 else PIL.Image.fromarray(image)
            for image in pixels]


# ---------------------------------------------------------------------------------------------------------------
# Argument checks
# ---------------------------------------------------------------------------------------------------------------

def check_output_type(output_type: str) -> None:
    check_choice("output_type", output_type, OUTPUT_TYPES)


def check_call_arguments(prompts: list[str], num_images_per_prompt: int, output_type: str, callback_steps: int,
                         generator: torch.Generator | list[torch.Generator] | None, batch_size: int) -> None:
    if not prompts:
        raise ValueError("prompt is an empty list; give at least one prompt")
    if not all(isinstance(prompt, str) for prompt in prompts):
        raise ValueError(f"prompt must be a string or a list of strings, got {[type(p).__name__ for p in prompts]}")
    if not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
        raise ValueError(f"num_images_per_prompt must be a positive integer, got {num_images_per_prompt!r}")
    check_output_type(output_type)
    if not isinstance(callback_steps, int) or callback_steps <= 0:
        raise ValueError(f"callback_steps must be a positive integer, got {callback_steps!r}")
    if isinstance(generator, list) and len(generator) != batch_size:
        raise ValueError(f"generator is a list of {len(generator)} generators but {batch_size} images are sampled "
                         f"({len(prompts)} prompts x {num_images_per_prompt} per prompt); give one per image")


def check_guidance_and_truncation(guidance_scale: float, truncation_rate: float) -> None:
    """Both finite: an infinite guidance scale or truncation rate makes NaN log-probabilities (diffusers returns NaN
    images); a truncation rate keeps a share of the probability mass, so it lies in (0, 1]."""
    def is_real(value) -> bool:
        return isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value)

    if not is_real(guidance_scale):
        raise ValueError(f"guidance_scale must be a finite number (<= 1 disables guidance), got {guidance_scale!r}")
    if not is_real(truncation_rate) or not 0 < truncation_rate <= 1:
        raise ValueError(f"truncation_rate must be a number in (0, 1] (1 keeps every class), got {truncation_rate!r}")


def check_tokens(tokens: torch.Tensor, num_latent_pixels: int, num_classes: int, name: str,
                 batch_size: int | None = None) -> None:
    """Token grids are integer tensors (B, P) with every value in [0, num_classes)."""
    expected = (batch_size if batch_size is not None else "B", num_latent_pixels)
    if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor of codebook indices, got dtype {tokens.dtype}")
    if tokens.ndim != 2 or tokens.shape[1] != num_latent_pixels or batch_size not in (None, tokens.shape[0]):
        raise ValueError(f"{name} has shape {tuple(tokens.shape)}, expected {expected}")
    if tokens.numel() and (tokens.min() < 0 or tokens.max() >= num_classes):
        raise ValueError(f"{name} values must lie in [0, {num_classes - 1}], got values from {int(tokens.min())} "
                         f"to {int(tokens.max())}")


# ---------------------------------------------------------------------------------------------------------------
# The pipeline
# ---------------------------------------------------------------------------------------------------------------

class VQDiffusionPipeline:
    """Text-to-image with VQ-Diffusion: the diffusers `VQDiffusionPipeline` API, plus the sampled tokens."""

    def __init__(self, vqvae: VQModel, text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer,
                 transformer: VQDiffusionTransformer, scheduler: VQDiffusionScheduler,
                 learned_classifier_free_sampling_embeddings: LearnedClassifierFreeSamplingEmbeddings):
        fit_tokenizer_length(tokenizer, text_encoder)
        self.vqvae = vqvae.eval()
        self.text_encoder = text_encoder.eval()
        self.tokenizer = tokenizer
        self.transformer = transformer.eval()
        self.scheduler = scheduler
        self.learned_classifier_free_sampling_embeddings = learned_classifier_free_sampling_embeddings.eval()
        self.cuda_graphs = False  # set by compile_transformer(mode="reduce-overhead")
        self.progress_bar_config: dict = {}  # tqdm options of the sampling loop (set_progress_bar_config)

    @property
    def components(self) -> dict[str, object]:
        return {name: getattr(self, name) for name in COMPONENT_CLASSES}

    @property
    def device(self) -> torch.device:
        return self.transformer.device

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.dtype

    def to(self, device: str | torch.device | torch.dtype | None = None,
           dtype: torch.dtype | None = None) -> "VQDiffusionPipeline":
        """Move every model to `device` and/or cast it to `dtype` (either may be given alone, as with torch)."""
        if isinstance(device, torch.dtype):
            device, dtype = None, device
        for model in self.models():
            model.to(device=device, dtype=dtype)
        return self

    def models(self) -> list[torch.nn.Module]:
        return [self.vqvae, self.text_encoder, self.transformer, self.learned_classifier_free_sampling_embeddings]

    def compile_transformer(self, mode: str = "default") -> "VQDiffusionPipeline":
        """Run the transformer's forward through `torch.compile` from now on (inductor); returns the pipeline.

        Shapes are static: each batch size compiles once, on its first call (a minute or two on a CPU). `mode` is
        torch.compile's: "reduce-overhead" also replays each step as a CUDA graph (GPU only; the static shapes make
        that valid), "max-autotune" also searches matrix-product kernels. The compiled forward fuses the elementwise
        work, so its log-probabilities may differ from the eager ones in the last bits, and with them, rarely, a
        sampled token; `benchmarks.run model --compile` checks the tokens against the reference.
        """
        check_choice("compile mode", mode, COMPILE_MODES)
        self.transformer.compile(mode=mode, dynamic=False)
        self.cuda_graphs = mode == "reduce-overhead"
        return self

    def set_progress_bar_config(self, **options) -> None:
        """tqdm options of the sampling loop's progress bar, e.g. `disable=False` to show it (hidden by default: the
        batch engine runs many calls) or `desc`, `leave`, `position`."""
        self.progress_bar_config = dict(options)

    def progress_bar(self, iterable=None, total: int | None = None):
        """A tqdm bar over `iterable`, or one of `total` steps to update by hand, with the configured options."""
        from tqdm.auto import tqdm

        if (iterable is None) == (total is None):
            raise ValueError("progress_bar takes exactly one of iterable and total")
        return tqdm(iterable, total=total, **{"disable": True, **self.progress_bar_config})

    # ----------------------------------------------------------------------------------------- generation

    @torch.no_grad()
    def __call__(self, prompt: str | list[str], num_inference_steps: int = 100, guidance_scale: float = 5.0,
                 truncation_rate: float = 1.0, num_images_per_prompt: int = 1,
                 generator: torch.Generator | list[torch.Generator] | None = None,
                 latents: torch.LongTensor | None = None, output_type: str = "pil", return_dict: bool = True,
                 callback: Callable[[int, int, torch.LongTensor], None] | None = None,
                 callback_steps: int = 1, timestep_spacing: str = "reference", sampler: str = "reference",
                 prior_weight: float = DEFAULT_PRIOR_WEIGHT, noise: Noise = "gumbel",
                 truncation_target: TruncationTarget = "guided") -> ImagePipelineOutput | tuple:
        """Sample `num_images_per_prompt` images per prompt; images are ordered prompt by prompt.

        `generator` is one generator for the whole batch (the reference's random stream) or one per image, so that
        each image depends only on its own generator. `latents` (B, P) are the starting tokens (default: all
        masked). `callback(step, timestep, tokens)` runs every `callback_steps` steps. `timestep_spacing`: "reference"
        runs the last `num_inference_steps` steps of the chain (diffusers' behaviour), "skip" spreads fewer steps
        over the whole chain (see `VQDiffusionScheduler.set_timesteps`). `sampler`: "reference" samples every
        token at every step (diffusers' behaviour), "purity" unmasks the tokens the model is surest of first and
        keeps them (Improved VQ-Diffusion's purity prior, `vqbatch.schedulers.purity`), its sampling sharpened by
        `prior_weight` (r >= 0). Returns an `ImagePipelineOutput`, or with `return_dict=False` the tuple `(images,)`
        as diffusers does (`(tokens,)` for output_type="latent"). `noise`: "gumbel" draws each token by Gumbel-max
        (diffusers' random stream, token for token), "categorical" by inverse CDF from one uniform per latent pixel
        (the same distribution; the same noise on every device). Generators may live on any device.
        `truncation_target`: "guided" truncates the guided prediction (diffusers' behaviour), "prompted" the prompted
        one before guidance, so that guidance only re-weights the classes the prompt makes likely (no stray specks);
        without guidance the two are the same.

        Every input is checked before the loop; the loop itself only queues device work (no reads back to the host),
        unless `callback` reads the tokens.
        """
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        batch_size = len(prompts) * num_images_per_prompt
        check_call_arguments(prompts, num_images_per_prompt, output_type, callback_steps, generator, batch_size)
        check_guidance_and_truncation(guidance_scale, truncation_rate)
        check_sampler(sampler, prior_weight)
        check_choice("noise", noise, NOISES)
        check_choice("truncation_target", truncation_target, TRUNCATION_TARGETS)
        guided = guidance_scale > 1.0
        before_guidance = guided and truncation_target == "prompted"  # else truncation follows guidance
        text = self.text_conditions(prompts, num_images_per_prompt, guided)  # 2B or B rows
        sample = self.initial_tokens(latents, batch_size)  # (B, P)
        scheduler = self.sampling_scheduler(sampler, prior_weight)
        scheduler.set_timesteps(num_inference_steps, device=self.device, spacing=timestep_spacing)
        # each timestep as an int for the scheduler and as a device tensor for the model: no read off the device
        steps = list(zip(scheduler.timestep_values, scheduler.timesteps))
        for step, (t, t_device) in enumerate(self.progress_bar(steps)):
            log_p_x_0 = self.predict_log_p_x_0(sample, text, t_device, guidance_scale if guided else None,
                                               truncation_rate if before_guidance else None)
            if not before_guidance:
                log_p_x_0 = truncate_(log_p_x_0, truncation_rate)
            log_p_x_0 = log_p_x_0.clamp_(min=LOG_ZERO_FLOOR)  # (B, K-1, P)
            sample = scheduler.step(log_p_x_0, timestep=t, sample=sample, generator=generator, noise=noise).prev_sample
            if callback is not None and step % callback_steps == 0:
                callback(step, t_device, sample)
        images = None if output_type == "latent" else self.decode_tokens(sample, output_type)
        tokens = sample.cpu()
        output = ImagePipelineOutput(images=images, tokens=tokens)
        return output if return_dict else output.to_tuple()[:1]  # (images,) as diffusers; (tokens,) for "latent"

    def sampling_scheduler(self, sampler: str, prior_weight: float) -> VQDiffusionScheduler:
        """What steps a call: the pipeline's scheduler, or for sampler="purity" a purity-prior one of the same chain."""
        if sampler == "purity":
            return PurityPriorScheduler.from_scheduler(self.scheduler, prior_weight)
        return self.scheduler

    def predict_log_p_x_0(self, sample: torch.LongTensor, text: TextCache, t: torch.Tensor,
                          guidance_scale: float | None, prompted_truncation_rate: float | None = None) -> torch.Tensor:
        """log p(x_0 | x_t, y), guided when `guidance_scale` is given: one forward over the doubled batch; see
        `guide_` for `prompted_truncation_rate`."""
        if self.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()  # the last step's outputs are used up: their buffers may go
        if guidance_scale is None:
            return self.transformer(sample, timestep=t, text_cache=text, return_dict=False)[0]  # (B, K-1, P)
        both = self.transformer(torch.cat([sample, sample]), timestep=t, text_cache=text,
                                return_dict=False)[0]  # (2B, K-1, P)
        log_p_uncond, log_p_text = both.chunk(2)
        return guide_(log_p_uncond, log_p_text, guidance_scale, prompted_truncation_rate)

    def text_conditions(self, prompts: list[str], num_images_per_prompt: int, guided: bool) -> TextCache:
        """Cross-attention keys and values per image (B rows; 2B with guidance, the unconditional rows first).

        Each distinct prompt is encoded, and its keys and values computed, once; images share its rows.
        """
        distinct, rows = distinct_prompt_rows(prompts, num_images_per_prompt)  # U prompts, (B,) rows
        text = encode_prompts(self.tokenizer, self.text_encoder, distinct).to(self.dtype)  # (U, L, D)
        if guided:
            text = torch.cat([self.unconditional_embedding().to(text), text])  # (1 + U, L, D)
            rows = torch.cat([torch.zeros_like(rows), rows + 1])  # (2B,)
        return select_rows(self.transformer.precompute_text(text), rows.to(text.device))

    def unconditional_embedding(self) -> torch.Tensor:
        """The "no prompt" condition (1, L, D): the learned embeddings, or else the empty prompt's encoding."""
        learned = self.learned_classifier_free_sampling_embeddings
        if learned.learnable:
            return learned.embeddings.unsqueeze(0)
        return encode_prompts(self.tokenizer, self.text_encoder, [""])

    def initial_tokens(self, latents: torch.LongTensor | None, batch_size: int) -> torch.LongTensor:
        """The starting x_T (B, P): the given tokens after checks, or every latent pixel masked."""
        shape = (batch_size, self.transformer.num_latent_pixels)
        num_classes = self.transformer.num_vector_embeds  # codebook entries + the mask class (the last one)
        if latents is None:
            return torch.full(shape, num_classes - 1, dtype=torch.long, device=self.device)
        check_tokens(latents, shape[1], num_classes, "latents", batch_size)
        return latents.to(device=self.device, dtype=torch.long)

    def truncate(self, log_p_x_0: torch.Tensor, truncation_rate: float) -> torch.Tensor:
        """See `truncate`: classes after the `truncation_rate` share of the mass get log-probability -inf."""
        return truncate(log_p_x_0, truncation_rate)

    @torch.no_grad()
    def decode_tokens(self, tokens: torch.LongTensor, output_type: str = "pil") -> list[PIL.Image.Image] | np.ndarray:
        """Images of the given codebook tokens (B, P): the images the call that sampled them returned."""
        check_output_type(output_type)
        if output_type == "latent":
            raise ValueError("decode_tokens makes images: output_type must be 'pil' or 'np', got 'latent'")
        height, width = self.transformer.height, self.transformer.width
        check_tokens(tokens, height * width, self.vqvae.config.num_vq_embeddings, "tokens")
        shape = (tokens.shape[0], height, width, self.vqvae.config.vq_embed_dim or self.vqvae.config.latent_channels)
        z_q = self.vqvae.quantize.get_codebook_entry(tokens.to(self.vqvae.device), shape=shape)  # (B, D, h, w)
        images = to_numpy_images(self.vqvae.decode(z_q, force_not_quantize=True).sample)  # (B, H, W, C)
        return to_pil_images(images) if output_type == "pil" else images

    # ----------------------------------------------------------------------------------------- checkpoints

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, torch_dtype: torch.dtype | None = None,
                        variant: str | None = None, device: str | torch.device | None = None, *,
                        dtype: torch.dtype | None = None, revision: str | None = None,
                        use_safetensors: bool | None = None, low_cpu_mem_usage: bool = True,
                        **components) -> "VQDiffusionPipeline":
        """Load a diffusers-layout checkpoint (e.g. microsoft/vq-diffusion-ithq): local folder, s3:// URI or hub id
        (at `revision`, a branch, tag or commit).

        Every model gets one dtype: `torch_dtype` (or its newer name `dtype`), or else the dtype of the stored
        transformer weights. `variant` picks `*.<variant>.safetensors` weight files in the components that have
        them, the others load their plain files (diffusers' rule); sharded weights (an `*.index.json` and its shards)
        load like single files. A component given by name (`scheduler=...`, as diffusers takes it) is used as it is
        instead of the checkpoint's.
        """
        unknown = sorted(set(components) - set(COMPONENT_CLASSES))
        if unknown:
            raise TypeError(f"from_pretrained got unexpected keyword arguments {unknown}; components that may be "
                            f"passed: {', '.join(COMPONENT_CLASSES)}")
        folder = local_checkpoint(pretrained_model_name_or_path, revision=revision)
        index = read_json(folder / MODEL_INDEX_NAME)
        classes = {name: component_class(index, name) for name in COMPONENT_CLASSES if name not in components}
        variants = component_variants(folder, variant)
        options = dict(device=device, use_safetensors=use_safetensors, low_cpu_mem_usage=low_cpu_mem_usage)
        if "transformer" not in components:
            components["transformer"] = load_component(classes.pop("transformer"), folder / "transformer",
                                                       resolve_dtype(torch_dtype, dtype), variants["transformer"],
                                                       **options)
        dtype = resolve_dtype(torch_dtype, dtype) or components["transformer"].dtype
        return cls(**components, **{name: load_component(component, folder / name, dtype, variants[name], **options)
                                    for name, component in classes.items()})

    def save_pretrained(self, save_directory: str | Path, variant: str | None = None, safe_serialization: bool = True,
                        max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE) -> Path:
        """Write the diffusers layout: `model_index.json` naming diffusers' classes, and one folder per component;
        a model larger than `max_shard_size` is written as shards with an index, as diffusers writes it."""
        folder = Path(save_directory)
        for name, component in self.components.items():
            save_component(component, folder / name, variant, safe_serialization, max_shard_size)
        index = {name: [COMPONENT_CLASSES[name][0], diffusers_class_name(component)]
                 for name, component in self.components.items()}
        write_json(folder / MODEL_INDEX_NAME, {"_class_name": PIPELINE_CLASS_NAME,
                                               "_diffusers_version": DIFFUSERS_VERSION, **index})
        return folder


# ---------------------------------------------------------------------------------------------------------------
# Checkpoint layout
# ---------------------------------------------------------------------------------------------------------------

MODEL_INDEX_NAME = "model_index.json"
PIPELINE_CLASS_NAME = "VQDiffusionPipeline"

# component folder -> (library written to model_index.json, {class name accepted in model_index.json: our class})
COMPONENT_CLASSES: dict[str, tuple[str, dict[str, type]]] = {
    "vqvae": ("diffusers", {"VQModel": VQModel}),
    "text_encoder": ("transformers", {"CLIPTextModel": CLIPTextModel}),
    "tokenizer": ("transformers", {"CLIPTokenizer": CLIPTokenizer, "CLIPTokenizerFast": CLIPTokenizer}),
    "transformer": ("diffusers", {"Transformer2DModel": VQDiffusionTransformer,
                                  "VQDiffusionTransformer": VQDiffusionTransformer}),
    "scheduler": ("diffusers", {"VQDiffusionScheduler": VQDiffusionScheduler}),
    "learned_classifier_free_sampling_embeddings": (
        "diffusers", {"LearnedClassifierFreeSamplingEmbeddings": LearnedClassifierFreeSamplingEmbeddings}),
}


def component_class(index: dict, name: str) -> type:
    """Our class for the component `name` of a `model_index.json`, which names it [library, class name]."""
    entry = index.get(name)
    if not (isinstance(entry, list) and len(entry) == 2):
        raise ValueError(f"{MODEL_INDEX_NAME} must map {name!r} to [library, class name], got {entry!r}")
    classes = COMPONENT_CLASSES[name][1]
    if entry[1] not in classes:
        raise ValueError(f"{MODEL_INDEX_NAME}: unknown class {entry[1]!r} for component {name!r}; "
                         f"supported: {', '.join(classes)}")
    return classes[entry[1]]


def component_variants(folder: Path, variant: str | None) -> dict[str, str | None]:
    """The variant each component loads (diffusers' rule): `variant` where the component folder has files of it,
    plain files elsewhere; when no component has any, every one is asked for it and names the files it lacks."""
    def has_variant(name: str) -> bool:
        files = (folder / name).iterdir() if (folder / name).is_dir() else ()
        return any(f".{variant}." in path.name or f".{variant}-" in path.name for path in files)

    holders = {name for name in COMPONENT_CLASSES if variant is not None and has_variant(name)}
    return {name: variant if name in holders or not holders else None for name in COMPONENT_CLASSES}


def load_component(component: type, folder: Path, torch_dtype: torch.dtype | None, variant: str | None,
                   device: str | torch.device | None, use_safetensors: bool | None, low_cpu_mem_usage: bool):
    if not folder.is_dir():
        raise FileNotFoundError(f"checkpoint has no component folder {folder}")
    if issubclass(component, PretrainedModel):
        return component.from_pretrained(folder, torch_dtype=torch_dtype, variant=variant, device=device,
                                         use_safetensors=use_safetensors, low_cpu_mem_usage=low_cpu_mem_usage)
    if issubclass(component, CLIPTextModel):
        model = component.from_pretrained(folder, dtype=torch_dtype, variant=variant, use_safetensors=use_safetensors)
        return model.to(device) if device is not None else model
    return component.from_pretrained(folder)  # tokenizer and scheduler: files only, no weights


def save_component(component, folder: Path, variant: str | None, safe_serialization: bool,
                   max_shard_size: int | str) -> None:
    if isinstance(component, (PretrainedModel, CLIPTextModel)):
        component.save_pretrained(folder, variant=variant, safe_serialization=safe_serialization,
                                  max_shard_size=max_shard_size)
    else:  # tokenizer and scheduler: no weights
        component.save_pretrained(folder)


def diffusers_class_name(component) -> str:
    return getattr(component, "diffusers_name", type(component).__name__)
