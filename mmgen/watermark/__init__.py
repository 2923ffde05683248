"""Distortion-free watermarking of generated image tokens (C-reweight) and its baselines; see `core`."""

from mmgen.watermark.core import (METHODS, Detection, KeyedPermutations, WatermarkConfig, WatermarkProcessor,
                                  alpha_reweight, cluster_codebook, detect_tokens, kmeans)

__all__ = ["METHODS", "Detection", "KeyedPermutations", "WatermarkConfig", "WatermarkProcessor", "alpha_reweight",
           "cluster_codebook", "detect_tokens", "kmeans"]
