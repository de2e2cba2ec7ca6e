"""Training the VQ-VAE (van den Oord et al. 2017) of the default model: images <-> a grid of codebook tokens.

Loss: reconstruction + β ||z - sg[e]||² (the commitment term). The reconstruction term is a squared error on
images in [-1, 1] that weighs pixels unlike the image's median colour (the shapes, against a plain background)
`FOREGROUND_WEIGHT` times more: most pixels are background, and without the weight an autoencoder first settles
for a blurred background and learns the shapes' colours much later. The codebook is not moved by gradients but by
exponential moving averages of the encoder outputs assigned to each code (van den Oord et al., appendix A.1), and a
code that nobody picked for a while is restarted at a random encoder output of the batch, so that every code stays
in use.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vqbatch.models.vq_model import VQModel

COMMITMENT_WEIGHT = 0.25  # β
EMA_DECAY = 0.95  # γ of the codebook moving averages
DEAD_USAGE = 0.03  # a code whose moving-average use per batch falls below this is restarted
FOREGROUND_WEIGHT = 10.0  # weight of pixels far from the image's median colour in the reconstruction loss
FOREGROUND_DISTANCE = 0.3  # summed |RGB difference| (in [-1, 1] units) from the median that makes a pixel foreground


def build_vqvae(*, image_size: int, channels: tuple[int, ...], codebook_size: int, embed_dim: int) -> VQModel:
    """A VQModel with len(channels) levels: latents of side image_size / 2^(levels - 1)."""
    levels = len(channels)
    return VQModel(down_block_types=("DownEncoderBlock2D",) * levels, up_block_types=("UpDecoderBlock2D",) * levels,
                   block_out_channels=channels, layers_per_block=1, latent_channels=embed_dim,
                   sample_size=image_size, num_vq_embeddings=codebook_size, norm_num_groups=min(8, min(channels)),
                   vq_embed_dim=embed_dim)


def images_to_tensor(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float (B, 3, H, W) in [-1, 1], the VQ-VAE's range."""
    return images.permute(0, 3, 1, 2).float() / 127.5 - 1.0


class EMACodebook:
    """Moves `model.quantize.embedding` to the running mean of the encoder outputs assigned to each code."""

    def __init__(self, model: VQModel):
        self.weight = model.quantize.embedding.weight  # (K, D), updated in place
        self.weight.requires_grad_(False)
        self.usage = torch.ones(self.weight.shape[0])  # (K,) moving-average count per batch
        self.sums = self.weight.detach().clone()  # (K, D) moving-average sum of assigned vectors

    @torch.no_grad()
    def update(self, z: torch.Tensor, indices: torch.Tensor, generator: torch.Generator) -> int:
        """Fold one batch of encoder outputs z (B, D, h, w) with their codes (B, h*w) in; return codes restarted."""
        flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])  # (N, D)
        one_hot = F.one_hot(indices.reshape(-1), self.weight.shape[0]).float()  # (N, K)
        self.usage.mul_(EMA_DECAY).add_(one_hot.sum(0), alpha=1 - EMA_DECAY)
        self.sums.mul_(EMA_DECAY).add_(one_hot.T @ flat, alpha=1 - EMA_DECAY)
        self.weight.copy_(self.sums / self.usage.clamp(min=1e-5).unsqueeze(1))
        dead = (self.usage < DEAD_USAGE).nonzero().squeeze(1)  # (n_dead,)
        if len(dead):
            picks = torch.randint(0, flat.shape[0], (len(dead),), generator=generator)
            self.weight[dead] = flat[picks]
            self.sums[dead] = flat[picks]
            self.usage[dead] = 1.0
        return len(dead)

    def state_dict(self) -> dict:
        return {"usage": self.usage, "sums": self.sums}

    def load_state_dict(self, state: dict) -> None:
        self.usage.copy_(state["usage"])
        self.sums.copy_(state["sums"])


@dataclass(frozen=True)
class VQLoss:
    total: torch.Tensor  # scalar, what is minimised
    reconstruction: torch.Tensor  # scalar, mean absolute pixel error in [-1, 1] units (unweighted)
    indices: torch.Tensor  # (B, h*w) the codes of the batch
    latents: torch.Tensor  # (B, D, h, w) encoder outputs, for the codebook update


def vqvae_loss(model: VQModel, images: torch.Tensor) -> VQLoss:
    """images (B, 3, H, W) in [-1, 1] -> reconstruction + commitment loss, straight-through to the encoder."""
    z = model.encode(images).latents  # (B, D, h, w)
    z_q, _, indices = model.quantize(z)  # straight-through z_q; the module's own loss moves the codebook: unused
    reconstruction = model.decode(z_q, force_not_quantize=True).sample  # (B, 3, H, W)
    squared = (foreground_weights(images) * (reconstruction - images) ** 2).mean()
    commitment = F.mse_loss(z, z_q.detach())  # the straight-through z_q's value is the code e
    total = squared + COMMITMENT_WEIGHT * commitment
    return VQLoss(total, F.l1_loss(reconstruction, images).detach(), indices, z.detach())


def foreground_weights(images: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W): FOREGROUND_WEIGHT where a pixel is far from its image's median colour, else 1."""
    median = images.flatten(2).median(dim=2).values[:, :, None, None]  # (B, 3, 1, 1)
    foreground = (images - median).abs().sum(dim=1, keepdim=True) > FOREGROUND_DISTANCE
    return 1.0 + (FOREGROUND_WEIGHT - 1.0) * foreground.float()


@torch.no_grad()
def encode_tokens(model: VQModel, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """uint8 images (N, H, W, 3) -> codebook tokens (N, h*w), the transformer's x_0."""
    chunks = [model.quantize(model.encode(images_to_tensor(images[i:i + batch_size])).latents).indices
              for i in range(0, len(images), batch_size)]
    return torch.cat(chunks)
