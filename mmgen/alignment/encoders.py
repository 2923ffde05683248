"""Frozen target encoders for alignment losses.

Every encoder takes images (B, 3, H, W) in [-1, 1] (the project's convention), applies its own resizing and
normalization, and returns a global feature (B, D) and patch features (B, N, Dp) on an h x w grid
(`patch_grid` after the call). Encoders never receive gradients and stay in eval mode.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

ENCODERS = ("efficientnet_lite0", "open_clip", "tokenizer")


class TargetEncoder(nn.Module):
    global_dim: int
    patch_dim: int

    def __init__(self):
        super().__init__()
        self.patch_grid: tuple[int, int] | None = None

    def train(self, mode: bool = True):
        return super().train(False)  # frozen: BatchNorm/Dropout stay in inference mode

    def _freeze(self):
        self.requires_grad_(False)
        self.eval()

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W) in [-1, 1], got {tuple(images.shape)}")
        g, patch_map = self.encode(images.float())
        self.patch_grid = tuple(patch_map.shape[-2:])
        return g, patch_map.flatten(2).transpose(1, 2)


class EfficientNetLite0Target(TargetEncoder):
    """ImageNet EfficientNet-Lite0 (real weights, offline): global = pooled 1280-d head feature; patches =
    the output of block `tap` (320 channels at the last block). Its preprocessing is [-1, 1] already."""

    def __init__(self, resize_to: int = 128, tap: int = 15):
        super().__init__()
        from tokenizers_vis.features import EfficientNetLite0Features
        self.net = EfficientNetLite0Features(resize_to=resize_to, taps=(tap,))
        self.global_dim = 1280
        self.patch_dim = self.net.net._blocks[tap]._project_conv.out_channels
        self._freeze()

    def encode(self, images):
        maps, g = self.net(images)
        return g, maps[0]


class OpenCLIPTarget(TargetEncoder):
    """An open_clip image tower: global = the projected image embedding; patches = the ViT's output tokens.
    `pretrained` is a local checkpoint path (nothing is downloaded); None gives random weights (tests)."""

    def __init__(self, model_name: str = "ViT-B-32", pretrained: str | None = None):
        super().__init__()
        try:
            import open_clip
        except ImportError:
            raise ImportError("alignment.encoder=open_clip needs the align extra: pip install 'mmgen[align]' "
                              "(open_clip_torch)") from None
        model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=pretrained)
        self.visual = model.visual
        self.visual.output_tokens = True
        size = self.visual.image_size
        self.image_size = size if isinstance(size, int) else size[0]
        norm = next(t for t in preprocess.transforms if t.__class__.__name__ == "Normalize")
        self.register_buffer("mean", torch.tensor(norm.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(norm.std).view(1, 3, 1, 1), persistent=False)
        self.global_dim = model.visual.output_dim
        self.patch_dim = model.visual.transformer.width if hasattr(model.visual, "transformer") else self.global_dim
        self._freeze()

    def encode(self, images):
        x = F.interpolate((images + 1) / 2, size=(self.image_size, self.image_size), mode="bicubic",
                          align_corners=False).clamp(0, 1)
        pooled, tokens = self.visual((x - self.mean) / self.std)
        n = int(tokens.shape[1] ** 0.5)
        return pooled, tokens.transpose(1, 2).reshape(len(images), -1, n, n)


class TokenizerTarget(TargetEncoder):
    """The project's own VQGAN encoder: patches = its feature map on the token grid; global = their mean."""

    def __init__(self, vq):
        super().__init__()
        import copy
        self.encoder = copy.deepcopy(vq.encoder)
        self.global_dim = self.patch_dim = vq.config.embed_dim
        self._freeze()

    def encode(self, images):
        maps = self.encoder(images)
        return maps.mean((2, 3)), maps


def make_target_encoder(name: str, vq=None, **kwargs) -> TargetEncoder:
    """name: efficientnet_lite0 | open_clip[:MODEL[@CHECKPOINT]] | tokenizer (needs `vq`)."""
    base, _, rest = name.partition(":")
    if base == "efficientnet_lite0":
        return EfficientNetLite0Target(**kwargs)
    if base == "open_clip":
        model, _, ckpt = rest.partition("@")
        return OpenCLIPTarget(model or "ViT-B-32", ckpt or None)
    if base == "tokenizer":
        if vq is None:
            raise ValueError("alignment encoder 'tokenizer' needs the VQGAN")
        return TokenizerTarget(vq)
    raise ValueError(f"alignment encoder must be one of {', '.join(ENCODERS)} (open_clip:MODEL@CHECKPOINT); "
                     f"got {name!r}")
