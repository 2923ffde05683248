"""Random image distortions for training encoders that must read images back after they were shared.

`distort(images, generator)` applies to each 8-bit image (B, 3, H, W) one distortion drawn from `DISTORTIONS`
with its strength drawn from a range: what a published image meets on its way to a detector (JPEG at quality
50-95, Gaussian noise, blur, brightness, a small down- and up-scale). Geometric changes that move the token
grid (crops, flips, rotations) are not among them: a raster watermark read without a synchronisation step
cannot survive those, and training towards them would only blur the encoder. Every draw comes from the
generator passed in, so a seeded run sees the same distortions again on resume.
"""

from __future__ import annotations

import io

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from torchvision.transforms.functional import gaussian_blur

# name -> (low, high) of its strength; "none" keeps the image
DISTORTIONS = {
    "none": (0.0, 0.0),
    "jpeg": (50, 95),  # quality
    "noise": (0.01, 0.08),  # sigma on the [0, 1] scale
    "blur": (0.4, 1.2),  # Gaussian sigma in pixels
    "brightness": (0.75, 1.3),  # factor
    "resize": (0.5, 0.9),  # scale of the intermediate image
}


def _uniform(lo: float, hi: float, generator: torch.Generator) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=generator))


def distort_one(image: torch.Tensor, name: str, strength: float, generator: torch.Generator) -> torch.Tensor:
    """One uint8 image (3, H, W) through distortion `name` at `strength`; returns uint8 (3, H, W)."""
    if name == "none":
        return image
    if name == "jpeg":  # through PIL, as the detector's JPEG inputs usually were
        buffer = io.BytesIO()
        PIL.Image.fromarray(image.permute(1, 2, 0).numpy()).save(buffer, "JPEG", quality=int(round(strength)))
        return torch.from_numpy(np.array(PIL.Image.open(buffer).convert("RGB"))).permute(2, 0, 1).contiguous()
    x = image.float() / 255
    if name == "noise":
        x = x + strength * torch.randn(x.shape, generator=generator)
    elif name == "blur":
        x = gaussian_blur(x[None], kernel_size=2 * int(3 * strength + 0.5) + 1, sigma=strength)[0]
    elif name == "brightness":
        x = x * strength
    elif name == "resize":
        size = image.shape[-2:]
        small = [max(1, round(s * strength)) for s in size]
        x = F.interpolate(x[None], size=small, mode="bicubic", align_corners=False, antialias=True)
        x = F.interpolate(x, size=size, mode="bicubic", align_corners=False)[0]
    else:
        raise ValueError(f"distortion must be one of {', '.join(DISTORTIONS)}; got {name!r}")
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)


def distort(images: torch.Tensor, generator: torch.Generator, names: tuple[str, ...] = tuple(DISTORTIONS)
            ) -> torch.Tensor:
    """Each uint8 image of (B, 3, H, W) through one distortion drawn uniformly from `names`, at a strength drawn
    uniformly from its range; returns uint8 (B, 3, H, W)."""
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be uint8 (B, 3, H, W), got {images.dtype} {tuple(images.shape)}")
    unknown = [n for n in names if n not in DISTORTIONS]
    if unknown or not names:
        raise ValueError(f"distortions must be a non-empty subset of {', '.join(DISTORTIONS)}; got {names!r}")
    out = []
    for image in images:
        name = names[int(torch.randint(len(names), (), generator=generator))]
        out.append(distort_one(image, name, _uniform(*DISTORTIONS[name], generator), generator))
    return torch.stack(out)


def _straight_through(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """`y`'s values with `x`'s gradient (for rounding and JPEG, which have none)."""
    return x + (y - x).detach()


def quantize_8bit(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] floats rounded to the 256 levels of an 8-bit image, with a straight-through gradient."""
    return _straight_through(x, (x.clamp(0, 1) * 255).round() / 255)


def distort_differentiable(x: torch.Tensor, generator: torch.Generator,
                           names: tuple[str, ...] = tuple(DISTORTIONS)) -> torch.Tensor:
    """`distort` for float images (B, 3, H, W) in [0, 1] that a network produced, keeping the gradient: the image
    is rounded to 8 bits, goes through one distortion drawn per image as `distort` draws it, and is rounded
    again. Noise, blur, brightness and rescaling are differentiable as they are; rounding and JPEG pass the
    gradient straight through (Bengio et al. 2013), as watermark decoders trained through JPEG usually do."""
    if x.dim() != 4 or x.shape[1] != 3 or not x.is_floating_point():
        raise ValueError(f"x must be float (B, 3, H, W), got {x.dtype} {tuple(x.shape)}")
    unknown = [n for n in names if n not in DISTORTIONS]
    if unknown or not names:
        raise ValueError(f"distortions must be a non-empty subset of {', '.join(DISTORTIONS)}; got {names!r}")
    x = quantize_8bit(x)
    out = []
    for image in x:
        name = names[int(torch.randint(len(names), (), generator=generator))]
        strength = _uniform(*DISTORTIONS[name], generator)
        if name == "jpeg":
            u8 = (image.detach().clamp(0, 1) * 255).round().to(torch.uint8).cpu()
            y = _straight_through(image, distort_one(u8, name, strength, generator).to(image.device).float() / 255)
        elif name == "noise":
            y = image + strength * torch.randn(image.shape, generator=generator).to(image.device)
        elif name == "blur":
            y = gaussian_blur(image[None], kernel_size=2 * int(3 * strength + 0.5) + 1, sigma=strength)[0]
        elif name == "brightness":
            y = image * strength
        elif name == "resize":
            size = image.shape[-2:]
            small = [max(1, round(s * strength)) for s in size]
            y = F.interpolate(image[None], size=small, mode="bicubic", align_corners=False, antialias=True)
            y = F.interpolate(y, size=size, mode="bicubic", align_corners=False)[0]
        else:
            y = image
        out.append(quantize_8bit(y))
    return torch.stack(out)
