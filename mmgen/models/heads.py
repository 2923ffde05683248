"""Output heads on the decoder's hidden states.

`LogitsHead`: the discrete classifier over the unified vocabulary (LLaMA's `lm_head`).
"""

from __future__ import annotations

import torch.nn as nn


class LogitsHead(nn.Module):
    def __init__(self, dim: int, vocab_size: int):
        super().__init__()
        self.proj = nn.Linear(dim, vocab_size, bias=False)

    def forward(self, h_BTC):
        return self.proj(h_BTC)
