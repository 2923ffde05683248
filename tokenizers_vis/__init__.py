"""Visual tokenizers: images (B, 3, H, W) in [-1, 1] <-> token ids (B, h, w), and their training losses.

VQGAN (Esser et al., 2021) with the ViT-VQGAN codebook (Yu et al., 2022). This package does not import
`mmgen`; `mmgen` builds on it.
"""

from tokenizers_vis.features import EfficientNetLite0Features
from tokenizers_vis.losses import PatchDiscriminator, PerceptualLoss, VQGANLoss
from tokenizers_vis.quantize import FactorizedQuantizer, QuantizerOutput
from tokenizers_vis.vqgan import VQGAN, VQGANOutput

__all__ = [
    "EfficientNetLite0Features",
    "FactorizedQuantizer",
    "PatchDiscriminator",
    "PerceptualLoss",
    "QuantizerOutput",
    "VQGAN",
    "VQGANLoss",
    "VQGANOutput",
]
