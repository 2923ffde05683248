"""Sampling: logits processors, CFG, and sampling stages."""

from mmgen.sampling.logits import SamplingConfig, cfg_combine, process_logits, sample, top_k_filter, top_p_filter

__all__ = ["SamplingConfig", "cfg_combine", "process_logits", "sample", "top_k_filter", "top_p_filter"]
