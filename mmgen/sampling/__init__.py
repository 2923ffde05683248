"""Sampling: guidance, logits processors, per-row randomness, and sampling stages."""

from mmgen.sampling.logits import (RowRandom, SamplingConfig, cfg_combine, guide, process_logits, sample, top_k_filter,
                                   top_p_filter)

__all__ = ["RowRandom", "SamplingConfig", "cfg_combine", "guide", "process_logits", "sample", "top_k_filter",
           "top_p_filter"]
