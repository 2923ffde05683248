"""Tokenizer training losses: the taming VQGAN recipe (Esser et al., 2021) with ViT-VQGAN weights (Yu et al.,
2022): L1 + L2 reconstruction, perceptual, codebook, and an adaptively weighted PatchGAN hinge loss.

Perceptual: an LPIPS-style distance (Zhang et al., 2018) on an ImageNet-pretrained EfficientNet-Lite0
(`tokenizers_vis.features`). LPIPS's learned per-channel weights are not available offline, so features are
unit-normalized over channels and weighted equally; this is not LPIPS and its values are not comparable with
LPIPS numbers.

Adversarial: pix2pix PatchGAN discriminator (Isola et al., 2017) with hinge losses. Its weight on the
generator is taming's adaptive lambda = ||grad L_rec|| / (||grad L_G|| + 1e-4), clamped to [0, 1e4], times
`disc_weight`, both gradients taken at the decoder's last layer; it is off (0) before `disc_start` steps.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from tokenizers_vis.features import LITE0_TAPS, EfficientNetLite0Features


class PerceptualLoss(nn.Module):
    """Mean over taps of sum_c (a_c / ||a|| - b_c / ||b||)^2, averaged over positions and batch (LPIPS-style,
    unweighted). 0 for identical images, at most 4 per tap."""

    def __init__(self, resize_to: int | None = 128, taps: tuple[int, ...] = LITE0_TAPS):
        super().__init__()
        self.features = EfficientNetLite0Features(resize_to, taps)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.shape != y.shape:
            raise ValueError(f"x and y must have the same shape, got {tuple(x.shape)} and {tuple(y.shape)}")
        fx, fy = self.features.feature_maps(x), self.features.feature_maps(y)
        per_tap = [(F.normalize(a, dim=1, eps=1e-10) - F.normalize(b, dim=1, eps=1e-10)).pow(2).sum(1).mean()
                   for a, b in zip(fx, fy)]
        return torch.stack(per_tap).mean()


class PatchDiscriminator(nn.Module):
    """NLayer PatchGAN: a map of real/fake logits, one per receptive-field patch. With n_layers=2 a 64x64 image
    gives 14x14 logits over 34x34 patches (pix2pix uses 3 layers and 70x70 patches at 256 px)."""

    def __init__(self, in_channels: int = 3, base_channels: int = 64, n_layers: int = 2):
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"n_layers must be >= 1, got {n_layers}")
        layers = [nn.Conv2d(in_channels, base_channels, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        c = base_channels
        for i in range(1, n_layers + 1):
            c_next = base_channels * min(2 ** i, 8)
            stride = 2 if i < n_layers else 1
            layers += [nn.Conv2d(c, c_next, 4, stride, 1, bias=False), nn.BatchNorm2d(c_next), nn.LeakyReLU(0.2, True)]
            c = c_next
        layers.append(nn.Conv2d(c, 1, 4, 1, 1))
        self.net = nn.Sequential(*layers)
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        # DCGAN / pix2pix initialization, as taming's weights_init
        if isinstance(m, nn.Conv2d):
            nn.init.normal_(m.weight, 0.0, 0.02)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor, *more: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """(B, 1, h', w') logits; with several batches, a tuple of logits from separate calls (BatchNorm sees
        each batch alone). One forward for real and fake keeps DDP to one forward per backward."""
        if more:
            return tuple(self.net(b) for b in (x, *more))
        return self.net(x)


def _f(t: torch.Tensor) -> float:
    return float(t.detach())


def hinge_d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean())


class VQGANLoss(nn.Module):
    def __init__(
        self,
        l1_weight: float = 1.0,
        l2_weight: float = 1.0,
        perceptual_weight: float = 0.1,
        codebook_weight: float = 1.0,
        disc_weight: float = 0.1,
        disc_start: int = 2000,
        disc_channels: int = 64,
        disc_layers: int = 2,
        perceptual_resize: int | None = 128,
    ):
        super().__init__()
        for name, v in dict(l1_weight=l1_weight, l2_weight=l2_weight, perceptual_weight=perceptual_weight,
                            codebook_weight=codebook_weight, disc_weight=disc_weight, disc_start=disc_start).items():
            if v < 0:
                raise ValueError(f"{name} must be >= 0, got {v}")
        self.l1_weight, self.l2_weight, self.perceptual_weight = l1_weight, l2_weight, perceptual_weight
        self.codebook_weight, self.disc_weight, self.disc_start = codebook_weight, disc_weight, disc_start
        # no EfficientNet at all when unused: tests and ablations stay fast
        self.perceptual = PerceptualLoss(perceptual_resize) if perceptual_weight > 0 else None
        self.discriminator = PatchDiscriminator(3, disc_channels, disc_layers)

    def adversarial_on(self, step: int) -> bool:
        return self.disc_weight > 0 and step >= self.disc_start

    def adaptive_weight(self, rec_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor) -> torch.Tensor:
        """Balances the two gradients at the decoder's last layer, so the GAN term never swamps reconstruction."""
        if not last_layer.requires_grad:
            raise ValueError("last_layer must require grad (pass model.last_layer of a model being trained)")
        rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
        g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
        return (rec_grad.norm() / (g_grad.norm() + 1e-4)).clamp(0, 1e4).detach() * self.disc_weight

    def generator_loss(self, images: torch.Tensor, recon: torch.Tensor, quant_loss: torch.Tensor,
                       last_layer: torch.Tensor, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        """Loss for the VQGAN's parameters and float logs. Under no_grad the adversarial term is left out
        (lambda needs gradients)."""
        if images.shape != recon.shape:
            raise ValueError(f"images and recon must have the same shape, got {tuple(images.shape)} and "
                             f"{tuple(recon.shape)}")
        diff = recon - images
        l1, l2 = diff.abs().mean(), diff.pow(2).mean()
        rec = self.l1_weight * l1 + self.l2_weight * l2
        logs = {"l1": _f(l1), "l2": _f(l2)}
        if self.perceptual is not None:
            p = self.perceptual(recon, images)
            rec = rec + self.perceptual_weight * p
            logs["perceptual"] = _f(p)
        loss = rec + self.codebook_weight * quant_loss
        logs["rec"], logs["quant"] = _f(rec), _f(quant_loss)
        lam = 0.0
        if self.adversarial_on(step) and torch.is_grad_enabled():
            g = -self.discriminator(recon).mean()
            lam = self.adaptive_weight(rec, g, last_layer)
            loss = loss + lam * g
            logs["g_adv"], lam = _f(g), _f(lam)
        logs["adaptive_weight"], logs["loss"] = lam, _f(loss)
        return loss, logs

    def discriminator_loss(self, images: torch.Tensor, recon: torch.Tensor,
                           step: int) -> tuple[torch.Tensor, dict[str, float]]:
        """Hinge loss for the discriminator; before `disc_start` a constant 0 with no graph (do not step)."""
        if not self.adversarial_on(step):
            return torch.zeros((), device=images.device), {}
        real, fake = self.discriminator(images, recon.detach())
        d = hinge_d_loss(real, fake)
        return d, {"d_loss": _f(d), "logits_real": _f(real.mean()), "logits_fake": _f(fake.mean())}
