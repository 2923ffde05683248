"""Distortion-free watermarking of generated image tokens (C-reweight) and its baselines; see `core`."""

from mmgen.watermark.core import (CLUSTERINGS, KEYINGS, METHODS, STATISTICS, Detection, KeyedPermutations,
                                  WatermarkConfig, WatermarkProcessor, alpha_reweight, cluster_by_confusion,
                                  cluster_codebook, confusion_matrix, detect_tokens, kmeans)

__all__ = ["CLUSTERINGS", "KEYINGS", "METHODS", "STATISTICS", "Detection", "KeyedPermutations", "WatermarkConfig",
           "WatermarkProcessor", "alpha_reweight", "cluster_by_confusion", "cluster_codebook", "confusion_matrix",
           "detect_tokens", "kmeans"]
