"""`vqbatch train`: the default model, trained from nothing on the shapes dataset, in two stages.

    1. VQ-VAE: images (side `image_size`) <-> token grids (side image_size / 2^(levels-1)); then every training
       image is encoded once into its tokens x_0. With `vqvae_from`, a VQ-VAE trained before is taken instead, as
       the original code trains its transformer on a VQ-VAE trained beforehand.
    2. Diffusion: the VQ-Diffusion transformer, the CLIP text encoder and the learned "no prompt" embeddings,
       together, on L_vlb + λ L_x0 (`vqbatch.train.diffusion`).

The result is a diffusers-layout checkpoint that `VQDiffusionPipeline.from_pretrained` loads. Every random draw
of step s of a stage comes from a generator seeded with (seed, stage, s), and `train_state.pt` (written every
`checkpoint_every` steps and at the end of each stage) holds everything else, so a resumed run continues exactly
where the interrupted one was.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from transformers import CLIPTextModel, CLIPTokenizer

from vqbatch.choices import TimestepSampling
from vqbatch.models.embeddings import LearnedClassifierFreeSamplingEmbeddings
from vqbatch.models.transformer import VQDiffusionTransformer
from vqbatch.models.vq_model import VQModel
from vqbatch.pipeline import VQDiffusionPipeline
from vqbatch.schedulers.vq_diffusion import VQDiffusionScheduler
from vqbatch.train.diffusion import Schedule, TimestepSampler, diffusion_loss, q_sample
from vqbatch.train.shapes import ShapesDataset
from vqbatch.train.text import build_text_encoder, build_tokenizer, conditions, longest_prompt
from vqbatch.train.vqvae import EMACodebook, build_vqvae, encode_tokens, images_to_tensor, vqvae_loss

STATE_NAME = "train_state.pt"
STAGES = ("vqvae", "diffusion", "done")
# A resumed run may train a stage longer or shorter: its learning-rate schedule then follows the new length.
CHANGEABLE_ON_RESUME = ("vq_steps", "diffusion_steps", "checkpoint_every", "log_every")


class TrainConfig(BaseModel):
    """Everything a run depends on; a resumed run must be given the same config, but for CHANGEABLE_ON_RESUME."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    seed: int = Field(0, ge=0)
    # data
    image_size: int = Field(32, ge=16)
    dataset_size: int = Field(20000, ge=1)  # distinct training scenes, indexed like `ShapesDataset`
    two_object_fraction: float = Field(0.3, ge=0, le=1)
    jitter: float = Field(0.0, ge=0, le=0.05)  # 0: every scene has exactly one image, which the model can learn
    # VQ-VAE
    vq_channels: tuple[int, ...] = (16, 32, 64)  # one per level; 3 levels make 32x32 images 8x8 token grids
    codebook_size: int = Field(512, ge=2)  # > the ~390 distinct 4x4 patches of the scenes
    vq_embed_dim: int = Field(32, ge=1)
    vq_steps: int = Field(3000, ge=0)
    vq_batch_size: int = Field(32, ge=1)
    vq_learning_rate: float = Field(5e-3, gt=0)
    # A trained VQ-VAE to build on instead of stage 1 (vq_* steps and rates then unused): a checkpoint folder with a
    # `vqvae` subfolder, or a VQModel folder; its shape must be the one the vq_* settings above build. The shipped
    # model's diffusion stage was trained on the VQ-VAE of the model before it (README, "The default model").
    vqvae_from: str | None = None
    # text encoder
    text_hidden_size: int = Field(64, ge=8)
    text_layers: int = Field(2, ge=1)
    text_heads: int = Field(2, ge=1)
    # diffusion transformer
    num_layers: int = Field(3, ge=1)
    num_heads: int = Field(4, ge=1)
    head_dim: int = Field(32, ge=4)
    num_timesteps: int = Field(100, ge=2)
    # Twice the first recipe's 3000: with drop_rate 0.2 the "no prompt" branch sees 4x the samples it saw (38,400
    # instead of 9,600) and the prompted branch 1.8x; an estimated 80-95 minutes on the 2-core CPU, VQ-VAE included
    diffusion_steps: int = Field(6000, ge=0)
    batch_size: int = Field(32, ge=1)
    learning_rate: float = Field(1e-3, gt=0)
    warmup_steps: int = Field(100, ge=0)
    # Share of samples trained with the learned "no prompt" embeddings, the unconditional branch of guidance. The
    # reference fine-tunes its learnable null embedding with 10% on top of a long prompted training; a short run from
    # nothing needs more (Ho & Salimans found 0.1-0.2 best, 0.5 too many): at 10% guidance scattered specks.
    drop_rate: float = Field(0.2, ge=0, lt=1)
    # How each sample's t is drawn (vqbatch.choices.TIMESTEP_SAMPLINGS); importance, as the reference trains
    timestep_sampling: TimestepSampling = "importance"
    # λ of L_x0: 0.1, not the paper's 5e-4, since on a short CPU run the bound alone barely trains large t
    aux_weight: float = Field(0.1, ge=0)
    checkpoint_every: int = Field(100, ge=1)
    log_every: int = Field(20, ge=1)


SMOKE_CONFIG = dict(image_size=16, dataset_size=64, vq_channels=(16, 16, 16), codebook_size=16, vq_embed_dim=8,
                    vq_steps=100, vq_batch_size=8, vq_learning_rate=1e-2, text_hidden_size=16, text_layers=1,
                    text_heads=2, num_layers=1, num_heads=2, head_dim=8, num_timesteps=10, diffusion_steps=30,
                    batch_size=8, warmup_steps=0, checkpoint_every=10, log_every=10, learning_rate=3e-3)


@dataclass
class Models:
    vqvae: VQModel
    tokenizer: CLIPTokenizer
    text_encoder: CLIPTextModel
    transformer: VQDiffusionTransformer
    unconditional: LearnedClassifierFreeSamplingEmbeddings
    scheduler: VQDiffusionScheduler

    def trained(self) -> dict[str, torch.nn.Module]:
        return {"vqvae": self.vqvae, "text_encoder": self.text_encoder, "transformer": self.transformer,
                "unconditional": self.unconditional}

    def diffusion_parameters(self) -> list[torch.nn.Parameter]:
        return [p for name in ("text_encoder", "transformer", "unconditional")
                for p in self.trained()[name].parameters()]

    def pipeline(self) -> VQDiffusionPipeline:
        return VQDiffusionPipeline(vqvae=self.vqvae, text_encoder=self.text_encoder, tokenizer=self.tokenizer,
                                   transformer=self.transformer, scheduler=self.scheduler,
                                   learned_classifier_free_sampling_embeddings=self.unconditional)


# ---------------------------------------------------------------- data and models

def training_data(config: TrainConfig) -> tuple[torch.Tensor, list[str]]:
    """Every training image (N, H, W, 3) uint8 and its caption."""
    dataset = ShapesDataset(config.dataset_size, seed=config.seed, image_size=config.image_size,
                            two_object_fraction=config.two_object_fraction, jitter=config.jitter)
    samples = [dataset[i] for i in range(len(dataset))]
    return torch.from_numpy(np.stack([s.image for s in samples])), [s.caption for s in samples]


def build_models(config: TrainConfig, captions: list[str]) -> Models:
    """Freshly initialised models; the same config gives the same weights."""
    torch.manual_seed(config.seed)
    vqvae = build_vqvae(image_size=config.image_size, channels=config.vq_channels,
                        codebook_size=config.codebook_size, embed_dim=config.vq_embed_dim)
    with tempfile.TemporaryDirectory() as folder:
        tokenizer = build_tokenizer(folder, captions)
    text_length = longest_prompt(tokenizer, captions)
    text_encoder = build_text_encoder(tokenizer, hidden_size=config.text_hidden_size, num_layers=config.text_layers,
                                      num_heads=config.text_heads, max_length=text_length)
    latent_side = config.image_size // 2 ** (len(config.vq_channels) - 1)
    transformer = VQDiffusionTransformer(
        num_attention_heads=config.num_heads, attention_head_dim=config.head_dim, num_layers=config.num_layers,
        cross_attention_dim=config.text_hidden_size, sample_size=latent_side,
        num_vector_embeds=config.codebook_size + 1, num_embeds_ada_norm=config.num_timesteps)
    unconditional = LearnedClassifierFreeSamplingEmbeddings(learnable=True, hidden_size=config.text_hidden_size,
                                                            length=text_length)
    scheduler = VQDiffusionScheduler(num_vec_classes=config.codebook_size + 1,
                                     num_train_timesteps=config.num_timesteps)
    return Models(vqvae, tokenizer, text_encoder, transformer, unconditional, scheduler)


def step_generator(seed: int, stage: str, step: int) -> torch.Generator:
    """The generator of every random draw of one training step."""
    entropy = np.random.SeedSequence([seed, STAGES.index(stage), step]).generate_state(2, np.uint64)
    return torch.Generator().manual_seed(int(entropy[0] >> np.uint64(1)))


def learning_rate(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up to `peak`, then cosine decay to a tenth of it."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


# ---------------------------------------------------------------- checkpoints

class TrainState:
    """Where a run is: stage, step, weights, optimiser, codebook and timestep statistics, the encoded tokens."""

    def __init__(self, config: TrainConfig):
        self.config, self.stage, self.step, self.elapsed = config, STAGES[0], 0, 0.0
        self.optimizer: dict | None = None
        self.codebook: dict | None = None
        self.timesteps: dict | None = None  # the diffusion stage's TimestepSampler state
        self.tokens: torch.Tensor | None = None  # (N, P) x_0 of every training image, after stage 1

    def save(self, folder: Path, models: Models) -> None:
        payload = {"config": self.config.model_dump(mode="json"), "stage": self.stage, "step": self.step,
                   "elapsed": self.elapsed, "optimizer": self.optimizer, "codebook": self.codebook,
                   "timesteps": self.timesteps, "tokens": self.tokens,
                   "models": {k: m.state_dict() for k, m in models.trained().items()}}
        partial = folder / (STATE_NAME + ".partial")
        torch.save(payload, partial)
        os.replace(partial, folder / STATE_NAME)

    @classmethod
    def load(cls, folder: Path, config: TrainConfig, models: Models) -> "TrainState":
        payload = torch.load(folder / STATE_NAME, weights_only=False)
        saved = TrainConfig(**payload["config"])
        changed = {k: (getattr(saved, k), getattr(config, k)) for k in TrainConfig.model_fields
                   if getattr(saved, k) != getattr(config, k) and k not in CHANGEABLE_ON_RESUME}
        if changed:
            raise ValueError(f"cannot resume {folder}: it was trained with a different config; changed "
                             f"(saved, given): {changed}; only {', '.join(CHANGEABLE_ON_RESUME)} may change")
        for name, model in models.trained().items():
            model.load_state_dict(payload["models"][name])
        state = cls(config)
        for key in ("stage", "step", "elapsed", "optimizer", "codebook", "tokens"):
            setattr(state, key, payload[key])
        state.timesteps = payload.get("timesteps")  # absent from runs saved before importance sampling
        return state


# ---------------------------------------------------------------- the two stages

Log = Callable[[dict], None]


def train_vqvae(models: Models, images: torch.Tensor, state: TrainState, folder: Path, log: Log) -> None:
    config, model = state.config, models.vqvae
    codebook = EMACodebook(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.vq_learning_rate,
                                  weight_decay=0.0)
    if state.codebook is not None:
        codebook.load_state_dict(state.codebook)
        optimizer.load_state_dict(state.optimizer)
    model.train()
    while state.step < config.vq_steps:
        started, generator = time.perf_counter(), step_generator(config.seed, "vqvae", state.step)
        batch = images[torch.randint(0, len(images), (config.vq_batch_size,), generator=generator)]
        set_learning_rate(optimizer, learning_rate(state.step, config.vq_steps, config.vq_learning_rate, 0))
        loss = vqvae_loss(model, images_to_tensor(batch))
        optimizer.zero_grad(set_to_none=True)
        loss.total.backward()
        optimizer.step()
        restarted = codebook.update(loss.latents, loss.indices, generator)
        state.step, state.elapsed = state.step + 1, state.elapsed + time.perf_counter() - started
        if state.step % config.log_every == 0 or state.step == config.vq_steps:
            log({"stage": "vqvae", "step": state.step, "loss": round(loss.total.item(), 5),
                 "l1": round(loss.reconstruction.item(), 5), "restarted_codes": restarted,
                 "elapsed_s": round(state.elapsed, 1)})
        if state.step % config.checkpoint_every == 0:
            state.optimizer, state.codebook = optimizer.state_dict(), codebook.state_dict()
            state.save(folder, models)
    end_vqvae_stage(models, images, state, folder, log)


def adopt_vqvae(models: Models, trained: VQModel, images: torch.Tensor, state: TrainState, folder: Path,
                log: Log) -> None:
    """Stage 1 from `config.vqvae_from`: its weights (`trained`) replace the fresh VQ-VAE's, then encode the training
    images."""
    models.vqvae.load_state_dict(trained.state_dict())
    log({"stage": "vqvae", "from": state.config.vqvae_from})
    end_vqvae_stage(models, images, state, folder, log)


def load_vqvae_from(config: TrainConfig) -> VQModel:
    """The VQ-VAE `config.vqvae_from` names, in float32; a ValueError saying what differs when it is not one the
    config's vq_* settings build."""
    source = Path(config.vqvae_from)
    folder = source / "vqvae" if (source / "vqvae" / "config.json").is_file() else source
    if not (folder / "config.json").is_file():
        raise ValueError(f"vqvae_from {source} holds no VQ-VAE: neither {source}/vqvae/config.json nor "
                         f"{source}/config.json exists")
    trained = VQModel.from_pretrained(folder).to(dtype=torch.float32)
    theirs = trained.config.model_dump()
    ours = build_vqvae(image_size=config.image_size, channels=config.vq_channels, codebook_size=config.codebook_size,
                       embed_dim=config.vq_embed_dim).config.model_dump()
    differs = {key: (theirs[key], ours[key]) for key in VQVAE_SHAPE_KEYS if theirs[key] != ours[key]}
    if differs:
        raise ValueError(f"the VQ-VAE in {folder} is not the one this config builds; differing (theirs, this "
                         f"config's): {differs}; set image_size, vq_channels, codebook_size and vq_embed_dim to match")
    return trained


VQVAE_SHAPE_KEYS = ("block_out_channels", "num_vq_embeddings", "vq_embed_dim", "latent_channels", "sample_size",
                    "down_block_types", "up_block_types", "layers_per_block", "norm_num_groups")


def end_vqvae_stage(models: Models, images: torch.Tensor, state: TrainState, folder: Path, log: Log) -> None:
    """Encode every training image into its tokens x_0 and move on to the diffusion stage."""
    models.vqvae.eval()
    state.tokens = encode_tokens(models.vqvae, images)
    log({"stage": "vqvae", "done": True, "codes_in_use": int(state.tokens.unique().numel())})
    state.stage, state.step, state.optimizer, state.codebook = "diffusion", 0, None, None
    state.save(folder, models)


def prompt_draws(config: TrainConfig, num_captions: int,
                 generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One diffusion step's training rows (B,) and which of them get the "no prompt" condition (B,) bool."""
    rows = torch.randint(0, num_captions, (config.batch_size,), generator=generator)  # (B,)
    dropped = torch.rand(config.batch_size, generator=generator) < config.drop_rate  # (B,)
    return rows, dropped


def train_diffusion(models: Models, captions: list[str], state: TrainState, folder: Path, log: Log) -> None:
    config, schedule = state.config, Schedule.of(models.scheduler)
    optimizer = torch.optim.AdamW(models.diffusion_parameters(), lr=config.learning_rate, betas=(0.9, 0.98),
                                  weight_decay=0.01)
    timesteps = TimestepSampler(config.num_timesteps, importance=config.timestep_sampling == "importance")
    if state.optimizer is not None:
        optimizer.load_state_dict(state.optimizer)
    if state.timesteps is not None:
        timesteps.load_state_dict(state.timesteps)
    for model in (models.text_encoder, models.transformer, models.unconditional):
        model.train()
    while state.step < config.diffusion_steps:
        started, generator = time.perf_counter(), step_generator(config.seed, "diffusion", state.step)
        rows, dropped = prompt_draws(config, len(captions), generator)  # (B,), (B,)
        t, weights = timesteps.sample(config.batch_size, generator)  # (B,), (B,)
        x_0 = state.tokens[rows]  # (B, P)
        x_t = q_sample(x_0, t, schedule, generator)
        text = conditions(models.tokenizer, models.text_encoder, models.unconditional,
                          [captions[i] for i in rows.tolist()], dropped)  # (B, L, D)
        log_p_x_0 = models.transformer(x_t, text, t, log_softmax_dtype=torch.float32).sample  # (B, K, P)
        loss = diffusion_loss(log_p_x_0, x_0, x_t, t, schedule, config.aux_weight, weights)
        set_learning_rate(optimizer, learning_rate(state.step, config.diffusion_steps, config.learning_rate,
                                                   config.warmup_steps))
        optimizer.zero_grad(set_to_none=True)
        loss.total.backward()
        torch.nn.utils.clip_grad_norm_(models.diffusion_parameters(), 1.0)
        optimizer.step()
        timesteps.update(t, loss.per_sample_vlb)
        state.step, state.elapsed = state.step + 1, state.elapsed + time.perf_counter() - started
        if state.step % config.log_every == 0 or state.step == config.diffusion_steps:
            log({"stage": "diffusion", "step": state.step, "loss": round(loss.total.item(), 5),
                 "vlb": round(loss.vlb.item(), 5), "x0_nll": round(loss.x0.item(), 5),
                 "elapsed_s": round(state.elapsed, 1)})
        if state.step % config.checkpoint_every == 0:
            state.optimizer, state.timesteps = optimizer.state_dict(), timesteps.state_dict()
            state.save(folder, models)
    state.stage, state.step, state.optimizer, state.timesteps = "done", 0, None, None
    state.save(folder, models)


def set_learning_rate(optimizer: torch.optim.Optimizer, value: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = value


# ---------------------------------------------------------------- the command

def train(output: str | Path, config: TrainConfig = TrainConfig(), *, resume: bool = False,
          dtype: torch.dtype = torch.float32, threads: int | None = None,
          log: Log = lambda record: print(json.dumps(record), flush=True)) -> Path:
    """Train (or, with `resume`, continue training) into `output`, then write the pipeline there in `dtype`.

    `threads` sets torch's intra-op threads; on a CPU shared with other work one thread is often the fastest.
    """
    folder = Path(output)
    if threads is not None:
        torch.set_num_threads(threads)
    if (folder / STATE_NAME).exists() and not resume:
        raise ValueError(f"{folder} already holds a training run ({STATE_NAME}); pass resume=True (--resume) to "
                         "continue it, or choose another output folder")
    adopted = load_vqvae_from(config) if config.vqvae_from else None  # a wrong source fails before the data is drawn
    folder.mkdir(parents=True, exist_ok=True)
    images, captions = training_data(config)
    models = build_models(config, captions)
    state = TrainState.load(folder, config, models) if resume and (folder / STATE_NAME).exists() else \
        TrainState(config)
    if state.stage == "vqvae":
        if adopted is not None:
            adopt_vqvae(models, adopted, images, state, folder, log)
        else:
            train_vqvae(models, images, state, folder, log)
    if state.stage == "diffusion":
        train_diffusion(models, captions, state, folder, log)
    pipeline = models.pipeline().to(dtype=dtype)
    pipeline.save_pretrained(folder)
    log({"stage": "done", "output": str(folder), "dtype": str(dtype), "train_seconds": round(state.elapsed, 1)})
    return folder
