"""Distortion-free watermarking of generated image tokens (C-reweight) and its baselines; see `core`.

This package works on tokens only and imports no pipeline (the pipelines import it). What drives a pipeline
lives above it: the attack suite in `mmgen.bench.watermark`, the retokenization-channel measurement that builds
a confusion cluster table in `scripts/watermark_channel.py`."""

from mmgen.watermark.core import (CLUSTERINGS, KEYINGS, METHODS, STATISTICS, Detection, KeyedPermutations,
                                  KeyOrder, WatermarkConfig, WatermarkProcessor, alpha_reweight, cluster_by_confusion,
                                  cluster_codebook, confusion_matrix, detect_tokens,
                                  detect_tokens_combined, kmeans)

__all__ = ["CLUSTERINGS", "KEYINGS", "METHODS", "STATISTICS", "Detection", "KeyedPermutations", "KeyOrder",
           "WatermarkConfig",
           "WatermarkProcessor", "alpha_reweight", "cluster_by_confusion", "cluster_codebook", "confusion_matrix",
           "detect_tokens", "detect_tokens_combined", "kmeans"]
