"""The VAR transformer (Tian et al., 2024, "Visual Autoregressive Modeling: Scalable Image Generation via
Next-Scale Prediction", arXiv 2404.02905) in the layout of its released class-conditional checkpoints
(`var_d16.pth` ... `var_d30.pth`), so `mmgen convert var` loads them by name.

A GPT-2-like stack whose every LayerNorm (eps 1e-6, no affine) is modulated by the class (AdaLN, as in DiT):
per block `ada_lin` = SiLU + Linear(D, 6C) gives gamma1, gamma2, scale1, scale2, shift1, shift2 and
x <- x + attn(ln(x) (1 + scale1) + shift1) gamma1, then the same for the GELU(tanh) MLP; with `shared_aln` one
`shared_ada_lin` feeds every block and each block adds its own `ada_gss`. Attention takes q and v biases and no k
bias; with `attn_l2_norm`, q and k are unit vectors and q is scaled per head by exp(min(scale_mul, log 100)),
softmax scale 1 (else 0.25 / sqrt(head_dim)). `head_nm` is one more AdaLN before the `head` over the VQ vocabulary.

Inputs: the class embedding (`num_classes + 1` rows, the last the null class for guidance) is both the AdaLN
condition and the start token (+ `pos_start`) that predicts scale 1; scale k >= 2 reads the VQ's f_hat after
scales 1..k-1 at its own size through `word_embed`. Every position adds an absolute `pos_1LC` and its scale's
`lvl_embed`. Attention is block-causal: a scale sees itself and the scales before it. Forward only; the
pipeline (`mmgen.pipelines.var`) holds the loop, one cached pass per scale.

Letters: B images, R rows (2B under guidance: conditional, then null), L positions (all scales, or one scale's
l = s_k^2), C width, D condition width (= C), H heads, V vocabulary, Cv the VQ's code width.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config

from tokenizers_vis.var_vqvae import _check_patch_nums  # one check of VAR's scale list, shared with its VQVAE

MAX_SCALE_MUL = torch.log(torch.tensor(100.0)).item()  # VAR's clamp of the per-head query scale, in float32


@dataclass
class VARCache:
    """Keys and values of every scale fed so far, per block: (R, H, L, C/H)."""

    k: list = field(default_factory=list)
    v: list = field(default_factory=list)

    def extend(self, i: int, k_RHlc: torch.Tensor, v_RHlc: torch.Tensor):
        if i == len(self.k):
            self.k.append(k_RHlc)
            self.v.append(v_RHlc)
        else:
            self.k[i] = torch.cat([self.k[i], k_RHlc], 2)
            self.v[i] = torch.cat([self.v[i], v_RHlc], 2)
        return self.k[i], self.v[i]


class SelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, attn_l2_norm: bool):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.mat_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_bias, self.v_bias = nn.Parameter(torch.zeros(dim)), nn.Parameter(torch.zeros(dim))
        self.attn_l2_norm = attn_l2_norm
        if attn_l2_norm:
            self.scale_mul_1H11 = nn.Parameter(torch.full((1, num_heads, 1, 1), 4.0).log())
        self.proj = nn.Linear(dim, dim)

    def forward(self, x_RLC, mask=None, cache: VARCache | None = None, index: int = 0):
        R, L, C = x_RLC.shape
        bias = torch.cat([self.q_bias, torch.zeros_like(self.q_bias), self.v_bias])
        qkv = F.linear(x_RLC, self.mat_qkv.weight, bias).view(R, L, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (R, H, L, C/H)
        scale = 0.25 / math.sqrt(self.head_dim)
        if self.attn_l2_norm:
            q = F.normalize(q, dim=-1).mul(self.scale_mul_1H11.clamp_max(MAX_SCALE_MUL).exp())
            k, scale = F.normalize(k, dim=-1), 1.0
        if cache is not None:
            k, v = cache.extend(index, k, v)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
        return self.proj(out.transpose(1, 2).reshape(R, L, C))


class FFN(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class AdaLNBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_hidden: int, norm_eps: float, shared_aln: bool,
                 attn_l2_norm: bool):
        super().__init__()
        self.dim, self.eps = dim, norm_eps
        self.attn = SelfAttention(dim, num_heads, attn_l2_norm)
        self.ffn = FFN(dim, mlp_hidden)
        self.shared_aln = shared_aln
        if shared_aln:
            self.ada_gss = nn.Parameter(torch.randn(1, 1, 6, dim) / dim ** 0.5)
        else:
            self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x_RLC, cond, mask=None, cache: VARCache | None = None, index: int = 0):
        """cond: the class embedding (R, D), or with `shared_aln` the shared modulation (R, 1, 6, C)."""
        mod = self.ada_gss + cond if self.shared_aln else self.ada_lin(cond).view(-1, 1, 6, self.dim)
        gamma1, gamma2, scale1, scale2, shift1, shift2 = mod.unbind(2)  # (R, 1, C) each
        ln = lambda x: F.layer_norm(x, (self.dim,), eps=self.eps)  # noqa: E731
        x_RLC = x_RLC + self.attn(ln(x_RLC).mul(scale1 + 1).add(shift1), mask, cache, index).mul(gamma1)
        return x_RLC + self.ffn(ln(x_RLC).mul(scale2 + 1).add(shift2)).mul(gamma2)


class AdaLNBeforeHead(nn.Module):
    def __init__(self, dim: int, norm_eps: float):
        super().__init__()
        self.dim, self.eps = dim, norm_eps
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x_RLC, cond_RD):
        scale, shift = self.ada_lin(cond_RD).view(-1, 1, 2, self.dim).unbind(2)
        return F.layer_norm(x_RLC, (self.dim,), eps=self.eps).mul(scale + 1).add(shift)


class VARTransformer(ModelMixin, ConfigMixin):
    """VAR's class-conditional next-scale transformer (defaults: `var_d16.pth`)."""

    @register_to_config
    def __init__(
        self,
        num_classes: int = 1000,
        depth: int = 16,
        embed_dim: int = 1024,
        num_heads: int = 16,
        mlp_hidden: int = 4096,
        vae_dim: int = 32,
        vocab_size: int = 4096,
        patch_nums: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16),
        norm_eps: float = 1e-6,
        shared_aln: bool = False,
        attn_l2_norm: bool = True,
    ):
        super().__init__()
        for name, v in dict(num_classes=num_classes, depth=depth, embed_dim=embed_dim, num_heads=num_heads,
                            mlp_hidden=mlp_hidden, vae_dim=vae_dim, vocab_size=vocab_size).items():
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be a multiple of num_heads ({num_heads})")
        pn = _check_patch_nums(patch_nums)
        self.register_to_config(patch_nums=pn)  # a tuple, also after a JSON round trip
        C, L = embed_dim, sum(s * s for s in pn)
        self.word_embed = nn.Linear(vae_dim, C)
        self.class_emb = nn.Embedding(num_classes + 1, C)
        self.pos_start = nn.Parameter(torch.zeros(1, pn[0] ** 2, C))
        self.pos_1LC = nn.Parameter(torch.zeros(1, L, C))
        self.lvl_embed = nn.Embedding(len(pn), C)
        self.shared_ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(C, 6 * C)) if shared_aln else None
        self.blocks = nn.ModuleList(AdaLNBlock(C, num_heads, mlp_hidden, norm_eps, shared_aln, attn_l2_norm)
                                    for _ in range(depth))
        self.head_nm = AdaLNBeforeHead(C, norm_eps)
        self.head = nn.Linear(C, vocab_size)
        sizes = torch.tensor([s * s for s in pn])
        self.register_buffer("levels_L", torch.arange(len(pn)).repeat_interleave(sizes), persistent=False)
        self.begin_ends = [(int(b - n), int(b)) for b, n in zip(sizes.cumsum(0), sizes)]

    @property
    def patch_nums(self) -> tuple[int, ...]:
        return tuple(self.config.patch_nums)

    @property
    def null_class(self) -> int:
        return self.config.num_classes

    def new_cache(self) -> VARCache:
        return VARCache()

    def _lvl_pos(self) -> torch.Tensor:
        return self.lvl_embed(self.levels_L).unsqueeze(0) + self.pos_1LC  # (1, L, C)

    def start_input(self, cond_RD: torch.Tensor) -> torch.Tensor:
        """The start tokens (R, s_1^2, C) from the class embeddings: they predict scale 1."""
        R, n = cond_RD.shape[0], self.pos_start.shape[1]
        return cond_RD.unsqueeze(1).expand(R, n, -1) + self.pos_start.expand(R, n, -1) + self._lvl_pos()[:, :n]

    def scale_input(self, f_RlCv: torch.Tensor, k: int) -> torch.Tensor:
        """Scale k's input (R, s_k^2, C) (k 0-based, >= 1) from the VQ's f_hat at that size (R, s_k^2, Cv)."""
        begin, end = self.begin_ends[k]
        return self.word_embed(f_RlCv) + self._lvl_pos()[:, begin:end]

    def block_causal_mask(self, device=None) -> torch.Tensor:
        """(L, L) bool, True = may attend: every scale sees itself and the coarser scales."""
        levels = self.levels_L.to(device)
        return levels[None, :] <= levels[:, None]

    def teacher_forced_input(self, cond_RD: torch.Tensor, scale_inputs_RLCv: torch.Tensor) -> torch.Tensor:
        """All positions at once (R, L, C): the start tokens and the inputs of scales 2..K (R, L - s_1^2, Cv)."""
        first = self.start_input(cond_RD)
        return torch.cat([first, self.word_embed(scale_inputs_RLCv) + self._lvl_pos()[:, first.shape[1]:]], 1)

    def forward(self, x_RLC: torch.Tensor, cond_RD: torch.Tensor, mask: torch.Tensor | None = None,
                cache: VARCache | None = None) -> torch.Tensor:
        """Logits (R, L, V). With `cache`, x is the next scale's positions and sees every cached one (no mask);
        without, pass `block_causal_mask()` for a whole teacher-forced sequence."""
        cond = cond_RD if self.shared_ada_lin is None else self.shared_ada_lin(cond_RD).view(-1, 1, 6,
                                                                                             x_RLC.shape[-1])
        for i, block in enumerate(self.blocks):
            x_RLC = block(x_RLC, cond, mask, cache, i)
        return self.head(self.head_nm(x_RLC, cond_RD))
