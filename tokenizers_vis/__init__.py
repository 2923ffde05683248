"""Visual tokenizers: images (B, 3, H, W) in [-1, 1] <-> tokens."""

from tokenizers_vis.quantize import FactorizedQuantizer, QuantizerOutput
from tokenizers_vis.vqgan import VQGAN, VQGANOutput

__all__ = ["FactorizedQuantizer", "QuantizerOutput", "VQGAN", "VQGANOutput"]
