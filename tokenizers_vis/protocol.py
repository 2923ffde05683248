"""The one interface every visual tokenizer offers to mmgen, ours and (through adapters) other libraries'.

    kind          "codes" (ids on a 2-D grid: VQGAN, SEED's and the PCA tokenizer's 1 x N), "scale_codes"
                  (VAR: the ids of every scale, flattened and concatenated coarse to fine), "latents" (continuous,
                  e.g. AutoencoderKL)
    image_size    side of the square images it reads and writes
    token_shape   per-image shape of its tokens: (h, w), (L,) or (C, h, w)
    vocab_size    codebook size (0 for latents)
    codebook      (codes only) the (V, D) vectors the ids index
    encode_tokens(images (B, 3, H, W) in [-1, 1]) -> tokens (B, *token_shape)
    decode_tokens(tokens) -> images (B, 3, H, W) in [-1, 1]

Our tokenizer classes implement it directly; `as_visual_tokenizer` wraps a component that does not: a diffusers
`AutoencoderKL` (continuous latents) or `VQModel` (codes), each stored as itself in saved pipelines. Callers use
the protocol, never the class.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
from diffusers import AutoencoderKL, VQModel

from tokenizers_vis.multiscale import MultiScaleVQGAN
from tokenizers_vis.pca import PCATokenizer
from tokenizers_vis.seed import SEEDTokenizer
from tokenizers_vis.vae import decode_latents, encode_latents, latent_channels, vae_grid
from tokenizers_vis.var_vqvae import VARVQVAE
from tokenizers_vis.vqgan import VQGAN

KINDS = ("codes", "scale_codes", "latents")


@runtime_checkable
class VisualTokenizer(Protocol):
    kind: str

    @property
    def image_size(self) -> int: ...

    @property
    def token_shape(self) -> tuple[int, ...]: ...

    @property
    def vocab_size(self) -> int: ...

    def encode_tokens(self, images: torch.Tensor) -> torch.Tensor: ...

    def decode_tokens(self, tokens: torch.Tensor) -> torch.Tensor: ...


class VAETokenizer:
    """`AutoencoderKL` as a visual tokenizer: scaled latents (`tokenizers_vis.vae.encode_latents`) are its tokens."""

    kind = "latents"
    vocab_size = 0

    def __init__(self, vae: AutoencoderKL):
        self.vae = vae

    @property
    def image_size(self) -> int:
        return self.vae.config.sample_size

    @property
    def token_shape(self) -> tuple[int, int, int]:
        return (latent_channels(self.vae), *vae_grid(self.vae))

    @property
    def device(self) -> torch.device:
        return self.vae.device

    def encode_tokens(self, images: torch.Tensor) -> torch.Tensor:
        return encode_latents(self.vae, images)

    def decode_tokens(self, latents: torch.Tensor) -> torch.Tensor:
        return decode_latents(self.vae, latents)


class _WrappedVQ:
    """What the adapters of other libraries' VQ models share: the model in `self.vq`, whose quantizer keeps its
    codebook in `quantize.embedding` (diffusers VQModel, Janus and Emu3 VQ-VAEs alike)."""

    kind = "codes"

    @property
    def codebook(self) -> torch.Tensor:
        return self.vq.quantize.embedding.weight

    @property
    def device(self) -> torch.device:
        return self.vq.device


class VQModelTokenizer(_WrappedVQ):
    """A diffusers `VQModel` (VQGAN as in latent diffusion / taming-transformers) as a visual tokenizer: codebook
    indices on the latent grid, decoded through the codebook, `post_quant_conv` and the decoder."""

    def __init__(self, vq: VQModel):
        self.vq = vq

    @property
    def image_size(self) -> int:
        return self.vq.config.sample_size

    @property
    def token_shape(self) -> tuple[int, int]:
        side = self.image_size // 2 ** (len(self.vq.config.block_out_channels) - 1)
        return side, side

    @property
    def vocab_size(self) -> int:
        return self.vq.config.num_vq_embeddings

    def encode_tokens(self, images: torch.Tensor) -> torch.Tensor:
        h = self.vq.encode(images).latents
        _, _, (_, _, ids) = self.vq.quantize(h)
        return ids.view(len(images), *self.token_shape)

    def decode_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        B, (h, w) = len(ids), self.token_shape
        if tuple(ids.shape[1:]) != (h, w):
            raise ValueError(f"codes must have shape (B, {h}, {w}), got {tuple(ids.shape)}")
        z_q = self.vq.quantize.get_codebook_entry(ids.reshape(-1), (B, h, w, self.vq.config.vq_embed_dim or
                                                                     self.vq.config.latent_channels))
        return self.vq.decode(z_q, force_not_quantize=True).sample.clamp(-1, 1)


class _PixelNorm:
    """Our images are in [-1, 1]; a transformers image processor normalizes [0, 1] pixels with its mean/std."""

    def _norm(self, mean, std, device):
        shape = (1, 3, 1, 1)
        return (torch.tensor(mean, device=device).view(shape), torch.tensor(std, device=device).view(shape))

    def to_model(self, images: torch.Tensor) -> torch.Tensor:
        mean, std = self._norm(self.image_mean, self.image_std, images.device)
        return ((images + 1) / 2 - mean) / std

    def from_model(self, pixels: torch.Tensor) -> torch.Tensor:
        mean, std = self._norm(self.image_mean, self.image_std, pixels.device)
        return ((pixels * std + mean) * 2 - 1).clamp(-1, 1)


class JanusVQTokenizer(_WrappedVQ, _PixelNorm):
    """transformers' `JanusVQVAE` (Janus / Janus-Pro image generation codes) as a visual tokenizer: its own
    `encode` (nearest codebook entry) and `decode` (l2-normalized codebook lookup, as Janus generation decodes).
    `image_mean`/`image_std`: the pixel normalization its processor uses (default: [-1, 1] as is)."""

    def __init__(self, vqvae, image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5)):
        self.vq, self.image_mean, self.image_std = vqvae, tuple(image_mean), tuple(image_std)

    @property
    def token_shape(self) -> tuple[int, int]:
        return tuple(self.vq.quantize.quant_state_dims)

    @property
    def image_size(self) -> int:
        return self.token_shape[0] * 2 ** (len(self.vq.config.channel_multiplier) - 1)

    @property
    def vocab_size(self) -> int:
        return self.vq.config.num_embeddings

    def encode_tokens(self, images: torch.Tensor) -> torch.Tensor:
        ids = self.vq.encode(self.to_model(images)).image_tokens
        return ids.view(len(images), *self.token_shape)

    def decode_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        return self.from_model(self.vq.decode(ids.reshape(len(ids), -1)))


class Emu3VQTokenizer(_WrappedVQ, _PixelNorm):
    """transformers' `Emu3VQVAE` (Emu3 image codes; an image is one temporal frame) as a visual tokenizer."""

    def __init__(self, vqvae, image_size: int, image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5)):
        self.vq, self.image_mean, self.image_std = vqvae, tuple(image_mean), tuple(image_std)
        self._image_size = image_size  # Emu3 reads any size; the pipeline fixes one
        if image_size % vqvae.vision_spatial_factor:
            raise ValueError(f"image_size must be a multiple of {vqvae.vision_spatial_factor}, got {image_size}")

    @property
    def image_size(self) -> int:
        return self._image_size

    @property
    def token_shape(self) -> tuple[int, int]:
        side = self._image_size // self.vq.vision_spatial_factor
        return side, side

    @property
    def vocab_size(self) -> int:
        return self.vq.config.codebook_size

    def encode_tokens(self, images: torch.Tensor) -> torch.Tensor:
        sizes = torch.tensor([list(images.shape[-2:])] * len(images))
        return torch.stack(self.vq.encode(self.to_model(images), image_sizes=sizes).image_tokens)

    def decode_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        return self.from_model(self.vq.decode(ids))


def as_visual_tokenizer(component) -> VisualTokenizer:
    """The protocol view of a pipeline's tokenizer component: itself, or its adapter."""
    if isinstance(component, VisualTokenizer):
        return component
    if isinstance(component, AutoencoderKL):
        return VAETokenizer(component)
    if isinstance(component, VQModel):
        return VQModelTokenizer(component)
    if type(component).__name__ == "JanusVQVAE":  # by name: importing transformers' Janus is not free
        return JanusVQTokenizer(component)
    raise TypeError(f"{type(component).__name__} is not a visual tokenizer: expected one of "
                    f"{', '.join(TOKENIZER_CLASSES)} or a class implementing tokenizers_vis.protocol.VisualTokenizer")


# saved tokenizer directories name their class in config.json's `_class_name`
TOKENIZER_CLASSES = {cls.__name__: cls for cls in (VQGAN, MultiScaleVQGAN, SEEDTokenizer, AutoencoderKL, VQModel,
                                                   VARVQVAE, PCATokenizer)}
CLASS_KINDS = {"VQGAN": "codes", "SEEDTokenizer": "codes", "PCATokenizer": "codes", "MultiScaleVQGAN": "scale_codes",
               "AutoencoderKL": "latents", "VQModel": "codes", "VARVQVAE": "scale_codes"}


def tokenizer_class_name(directory: str | Path) -> str:
    """The class a saved tokenizer directory holds, read from its config.json without loading it."""
    config = Path(directory) / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"tokenizer {str(directory)!r} is not a saved tokenizer directory (no config.json)")
    name = json.loads(config.read_text()).get("_class_name")
    if name not in TOKENIZER_CLASSES:
        raise ValueError(f"tokenizer {str(directory)!r} holds {name!r}; accepted: {', '.join(TOKENIZER_CLASSES)}")
    return name


def load_tokenizer_component(directory: str | Path):
    """A saved tokenizer as the module a pipeline stores (float32, eval mode, frozen)."""
    cls = TOKENIZER_CLASSES[tokenizer_class_name(directory)]
    return cls.from_pretrained(str(directory)).float().eval().requires_grad_(False)
