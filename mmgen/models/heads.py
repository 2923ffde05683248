"""Output heads on the decoder's hidden states.

`LogitsHead`: the discrete classifier over the unified vocabulary (LLaMA's `lm_head`).
`FlowHead`: a per-token flow-matching head for continuous tokens, MAR's small MLP with adaLN ("Autoregressive
Image Generation without Vector Quantization", Li et al., 2024, arXiv 2406.11838), predicting the velocity of
the rectified-flow convention in `mmgen.sampling.flow` instead of MAR's diffusion noise.
`TimestepEmbedder`: DiT's sinusoidal time embedding (Peebles & Xie, 2023) followed by an MLP; defined in
`tokenizers_vis.flow` (the PCA tokenizer's flow decoder uses it too) and re-exported here.

Shape letters: N rows (tokens), D token dim, W head width, C condition dim.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from tokenizers_vis.flow import TimestepEmbedder  # re-exported: the flow paradigms import it here


class LogitsHead(nn.Module):
    def __init__(self, dim: int, vocab_size: int):
        super().__init__()
        self.proj = nn.Linear(dim, vocab_size, bias=False)

    def forward(self, h_BTC):
        return self.proj(h_BTC)


def modulate(x, shift, scale):
    return x * (1 + scale) + shift


class AdaLNResBlock(nn.Module):
    """LayerNorm -> shift/scale from c -> MLP -> gated residual; zero-initialised adaLN makes it start as identity."""

    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(width, 3 * width))
        nn.init.zeros_(self.ada[1].weight)
        nn.init.zeros_(self.ada[1].bias)

    def forward(self, x_NW, c_NW):
        shift, scale, gate = self.ada(c_NW).chunk(3, -1)
        return x_NW + gate * self.mlp(modulate(self.norm(x_NW), shift, scale))


class FlowHead(nn.Module):
    """v = FlowHead(x_t, t, cond): the velocity of one continuous token given its noisy value, the time and the
    backbone's state for that token (MAR's SimpleMLPAdaLN). Zero-initialised output: it starts predicting v = 0."""

    def __init__(self, token_dim: int, cond_dim: int, width: int = 256, depth: int = 3):
        super().__init__()
        for name, value in (("token_dim", token_dim), ("cond_dim", cond_dim), ("width", width), ("depth", depth)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value}")
        self.token_dim = token_dim
        self.time_embed = TimestepEmbedder(width)
        self.cond_embed = nn.Linear(cond_dim, width)
        self.input_proj = nn.Linear(token_dim, width)
        self.blocks = nn.ModuleList(AdaLNResBlock(width) for _ in range(depth))
        self.final_norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.final_ada = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))
        self.final_proj = nn.Linear(width, token_dim)
        for m in (self.final_ada[1], self.final_proj):
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    def forward(self, x_ND: torch.Tensor, t_N: torch.Tensor, cond_NC: torch.Tensor) -> torch.Tensor:
        c = self.time_embed(t_N) + self.cond_embed(cond_NC)
        h = self.input_proj(x_ND)
        for block in self.blocks:
            h = block(h, c)
        shift, scale = self.final_ada(c).chunk(2, -1)
        return self.final_proj(modulate(self.final_norm(h), shift, scale))
