"""Continuous visual tokenizer: the KL-regularised autoencoder of latent diffusion (Rombach et al., 2022, "High-
Resolution Image Synthesis with Latent Diffusion Models"), as used by MAR (Li et al., 2024), FlowAR and xAR.

The model is a plain `diffusers.AutoencoderKL`, so a checkpoint saved here is an ordinary diffusers VAE and any
diffusers VAE directory loads here. This file only adds what the generators need around it: the latent grid,
scaled latents, the Stable Diffusion recipe for the scaling factor, and the training forward.

Latent scaling follows the diffusers convention: a generator sees z' = (z - shift_factor) * scaling_factor, with
shift_factor = 0 when unset, so that z' has about unit variance and the flow/diffusion noise matches its scale.

Images are float (B, 3, H, W) in [-1, 1] with H = W = sample_size; latents are (B, C, h, w), h = H / f with
f = 2 ** (number of blocks - 1).
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL


def make_vae(image_size: int = 64, latent_channels: int = 4, block_out_channels=(32, 64, 64, 64),
             layers_per_block: int = 1, norm_num_groups: int = 16, scaling_factor: float = 1.0) -> AutoencoderKL:
    """A small AutoencoderKL; 4 blocks downsample 8x, so 64 px images give the VQGAN's 8x8 token grid."""
    n = len(block_out_channels)
    f = 2 ** (n - 1)
    if image_size < f or image_size % f:
        raise ValueError(f"image_size must be a positive multiple of the downsampling factor {f}, got {image_size}")
    bad = [c for c in block_out_channels if c % norm_num_groups]
    if bad:
        raise ValueError(f"block_out_channels {list(block_out_channels)} must all be divisible by "
                         f"norm_num_groups={norm_num_groups}")
    return AutoencoderKL(
        in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(block_out_channels), layers_per_block=layers_per_block,
        latent_channels=latent_channels, norm_num_groups=norm_num_groups, sample_size=image_size,
        scaling_factor=scaling_factor,
    )


def vae_grid(vae: AutoencoderKL) -> tuple[int, int]:
    f = 2 ** (len(vae.config.block_out_channels) - 1)
    return vae.config.sample_size // f, vae.config.sample_size // f


def latent_channels(vae: AutoencoderKL) -> int:
    return vae.config.latent_channels


def _shift(vae: AutoencoderKL) -> float:
    return vae.config.shift_factor or 0.0


def check_images(vae: AutoencoderKL, images) -> None:
    size = vae.config.sample_size
    if not isinstance(images, torch.Tensor) or not images.is_floating_point():
        raise ValueError(f"images must be a float tensor (B, 3, {size}, {size}) in [-1, 1], got "
                         f"{type(images).__name__ if not isinstance(images, torch.Tensor) else images.dtype}")
    if images.dim() != 4 or images.shape[1] != 3 or tuple(images.shape[2:]) != (size, size):
        raise ValueError(f"images must have shape (B, 3, {size}, {size}), got {tuple(images.shape)}")
    lo, hi = images.aminmax()
    if lo < -1 or hi > 1:
        raise ValueError(f"images must lie in [-1, 1], got values in [{lo.item():.3f}, {hi.item():.3f}]")


def encode_latents(vae: AutoencoderKL, images: torch.Tensor, sample: bool = False,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """Scaled latents (B, C, h, w): the posterior mean, or a posterior sample when `sample`."""
    check_images(vae, images)
    posterior = vae.encode(images).latent_dist
    z = posterior.sample(generator) if sample else posterior.mean
    return (z - _shift(vae)) * vae.config.scaling_factor


def decode_latents(vae: AutoencoderKL, latents: torch.Tensor) -> torch.Tensor:
    """Images (B, 3, H, W) in [-1, 1] from scaled latents."""
    if latents.dim() != 4 or latents.shape[1] != latent_channels(vae):
        raise ValueError(f"latents must have shape (B, {latent_channels(vae)}, h, w), got {tuple(latents.shape)}")
    z = latents / vae.config.scaling_factor + _shift(vae)
    return vae.decode(z.to(vae.dtype)).sample.float().clamp(-1, 1)  # a bf16 / fp16 VAE returns float32 images


@torch.no_grad()
def estimate_scaling_factor(vae: AutoencoderKL, images: torch.Tensor, batch_size: int = 64) -> float:
    """1 / std of the unscaled posterior means over `images` (how Stable Diffusion found 0.18215). Store it with
    `vae.register_to_config(scaling_factor=...)` so it is saved with the weights."""
    check_images(vae, images)
    means = torch.cat([vae.encode(images[i: i + batch_size]).latent_dist.mean
                       for i in range(0, len(images), batch_size)])
    return 1.0 / means.float().std().item()


def vae_training_forward(vae: AutoencoderKL, images: torch.Tensor, generator: torch.Generator | None = None):
    """Reconstruction from a posterior sample (B, 3, H, W), not clamped so the loss keeps its gradient, and the
    KL to N(0, I) averaged per latent element (a scalar)."""
    check_images(vae, images)
    posterior = vae.encode(images).latent_dist
    recon = vae.decode(posterior.sample(generator)).sample
    kl = posterior.kl().mean() / posterior.mean[0].numel()
    return recon, kl


def vae_last_layer(vae: AutoencoderKL) -> torch.Tensor:
    """The decoder's output conv weight, for the adaptive GAN weight of `tokenizers_vis.losses.VQGANLoss`."""
    return vae.decoder.conv_out.weight
