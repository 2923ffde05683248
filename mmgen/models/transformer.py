"""Decoder-only transformer backbone, LLaMA style (Touvron et al., 2023).

RMSNorm, SwiGLU, grouped-query attention through `F.scaled_dot_product_attention` with any boolean mask,
and rotary position embeddings with 2-D positions for image tokens: half of each head's rotary pairs turn
with the row, the other half with the column (the M-RoPE idea of Qwen2-VL; text tokens put the same 1-D
position on both axes). With `rope_2d=False` the rotary layout is exactly LLaMA's, so weights can be moved
to `transformers.LlamaForCausalLM`.

The model only computes: no sampling loop lives here. Decoding uses a static `KVCache` that can be rolled
back to any length (speculative decoding needs it). Optional adaLN conditioning (DiT-style shift/scale/gate
from a condition vector, zero-initialised) is there for paradigms that condition on a class or a time.

Shape letters: B batch, T query length, S key length, H heads, K kv heads, D head dim, C model width.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config

from mmgen.models.heads import LogitsHead


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        if x.dtype == self.weight.dtype == torch.float32 and not torch.is_grad_enabled():
            # one fused kernel at inference, bit-identical to the composite below (tested); training keeps the
            # composite so its autograd graph and gradients stay as they were
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class KVCache:
    """Static key/value buffers for all layers; `length` is the valid prefix and can be rolled back."""

    def __init__(self, n_layers, batch_size, n_kv_heads, max_len, head_dim, dtype=torch.float32, device=None):
        shape = (n_layers, batch_size, n_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len
        self.length = 0
        self.row_end = 0  # with per-row starts: max over rows of start + T, set by the model each forward

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    def update(self, layer: int, start, k_BKTD, v_BKTD):
        """Write T new keys/values at `start` and return the buffers up to the written end.

        `start` is an int (every row writes at the same slots) or a (B,) LongTensor of per-row write offsets,
        which lets rows of one batch sit at different lengths (speculative decoding with per-sample
        acceptance); the caller's mask then decides which slots each row may see."""
        T = k_BKTD.shape[2]
        if not torch.is_tensor(start):
            end = start + T
            self.k[layer, :, :, start:end] = k_BKTD
            self.v[layer, :, :, start:end] = v_BKTD
            return self.k[layer, :, :, :end], self.v[layer, :, :, :end]
        B, K, _, D = k_BKTD.shape
        slots = (start[:, None] + torch.arange(T, device=start.device))[:, None, :, None].expand(B, K, T, D)
        self.k[layer].scatter_(2, slots, k_BKTD)
        self.v[layer].scatter_(2, slots, v_BKTD)
        end = self.row_end
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def rollback(self, length: int) -> None:
        if not 0 <= length <= self.length:
            raise ValueError(f"rollback length must be in [0, {self.length}], got {length}")
        self.length = length

    def reorder(self, index: torch.Tensor) -> None:
        """Select / repeat batch rows (e.g. to expand one prefix into several samples)."""
        self.k = self.k[:, index]
        self.v = self.v[:, index]


def rope_angles(positions: torch.Tensor, head_dim: int, theta: float, two_d: bool) -> torch.Tensor:
    """Rotation angle of each rotary pair, (B, T, D/2), for integer positions (B, T, 2) or (B, T)."""
    if positions.dim() == 2:
        positions = positions.unsqueeze(-1).expand(*positions.shape, 2)
    pos = positions.float()
    if not two_d:
        inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=pos.device).float() / head_dim)
        return pos[..., 0:1] * inv
    quarter = head_dim // 4
    inv = 1.0 / theta ** (torch.arange(0, quarter, device=pos.device).float() * 2 / (head_dim // 2))
    return torch.cat([pos[..., 0:1] * inv, pos[..., 1:2] * inv], dim=-1)


def apply_rope(x_BHTD, cos_BTD, sin_BTD):
    # rotate-half convention (pairs i and i + D/2), identical to transformers' LLaMA
    x1, x2 = x_BHTD.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return x_BHTD * cos_BTD.unsqueeze(1) + rotated * sin_BTD.unsqueeze(1)


def _fused_weight(owner: nn.Module, name: str, linears) -> torch.Tensor:
    """The weights of `linears` stacked along the output dimension, built once and rebuilt whenever one of them
    is replaced or changed in place (optimizer steps, load_state_dict, .to()). One matmul then replaces several:
    fewer kernel launches per decode step with the same output values (each output is its own dot product)."""
    weights = [m.weight for m in linears]
    key = tuple((w.data_ptr(), w._version, w.dtype, w.device) for w in weights)
    cached = owner.__dict__.get(name)
    if cached is None or cached[0] != key:
        cached = (key, torch.cat([w.detach() for w in weights]))
        owner.__dict__[name] = cached
    return cached[1]


class Attention(nn.Module):
    def __init__(self, dim, n_heads, n_kv_heads):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, dim // n_heads
        self.wq = nn.Linear(dim, n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(dim, n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(dim, n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(n_heads * self.head_dim, dim, bias=False)

    def forward(self, x_BTC, cos, sin, mask, cache: KVCache | None, layer: int, start: int):
        B, T, _ = x_BTC.shape
        H, K, D = self.n_heads, self.n_kv_heads, self.head_dim
        if torch.is_grad_enabled():
            q = self.wq(x_BTC).view(B, T, H, D).transpose(1, 2)
            k = self.wk(x_BTC).view(B, T, K, D).transpose(1, 2)
            v = self.wv(x_BTC).view(B, T, K, D).transpose(1, 2)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        else:  # inference: one projection matmul, one rotary pass over the query and key heads together
            qkv = F.linear(x_BTC, _fused_weight(self, "_qkv", (self.wq, self.wk, self.wv))).view(B, T, H + 2 * K, D)
            qk = apply_rope(qkv[:, :, : H + K].transpose(1, 2), cos, sin)  # (B, H + K, T, D)
            q, k, v = qk[:, :H], qk[:, H:], qkv[:, :, H + K:].transpose(1, 2)
        if cache is not None:
            k, v = cache.update(layer, start, k, v)  # (B, K, S, D)
        if self.n_kv_heads != self.n_heads:
            rep = self.n_heads // self.n_kv_heads
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        if mask is None:
            # causal over [cached prefix, new block]
            S = k.shape[2]
            mask = torch.ones(T, S, dtype=torch.bool, device=x_BTC.device).tril(diagonal=S - T)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, T, D)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))


class SwiGLU(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        if torch.is_grad_enabled():
            return self.w2(F.silu(self.w1(x)) * self.w3(x))
        gate, up = F.linear(x, _fused_weight(self, "_w13", (self.w1, self.w3))).chunk(2, dim=-1)
        return self.w2(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, dim, n_heads, n_kv_heads, hidden, eps, cond_dim):
        super().__init__()
        self.attn_norm = RMSNorm(dim, eps)
        self.attn = Attention(dim, n_heads, n_kv_heads)
        self.mlp_norm = RMSNorm(dim, eps)
        self.mlp = SwiGLU(dim, hidden)
        self.ada = None
        if cond_dim:
            # DiT adaLN with zero-initialised modulation; gates are 1 + g so that at init the block is the
            # plain (unconditioned) LM block and conditioning is learned on top of it
            self.ada = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 6 * dim))

    def forward(self, x, cos, sin, mask, cache, layer, start, cond=None):
        if self.ada is None or cond is None:
            x = x + self.attn(self.attn_norm(x), cos, sin, mask, cache, layer, start)
            return x + self.mlp(self.mlp_norm(x))
        mod = self.ada(cond)
        if mod.dim() == 2:
            mod = mod.unsqueeze(1)  # one condition per sample, broadcast over tokens
        sh1, sc1, g1, sh2, sc2, g2 = mod.chunk(6, dim=-1)
        x = x + (1 + g1) * self.attn(self.attn_norm(x) * (1 + sc1) + sh1, cos, sin, mask, cache, layer, start)
        return x + (1 + g2) * self.mlp(self.mlp_norm(x) * (1 + sc2) + sh2)


class Transformer(ModelMixin, ConfigMixin):
    """LLaMA-style decoder over a unified vocabulary; forward only."""

    # diffusers' names: `enable_gradient_checkpointing()` recomputes each Block in the backward pass (training
    # only, never with a KV cache); FSDP (and Accelerate's auto-wrap) takes one unit per Block
    _supports_gradient_checkpointing = True
    _no_split_modules = ["Block"]

    @register_to_config
    def __init__(
        self,
        vocab_size: int,
        dim: int = 256,
        n_layers: int = 6,
        n_heads: int = 8,
        n_kv_heads: int | None = None,
        mlp_hidden: int | None = None,
        max_seq_len: int = 512,
        rope_theta: float = 10000.0,
        rope_2d: bool = True,
        norm_eps: float = 1e-5,
        cond_dim: int | None = None,
        logits_head: bool = True,
    ):
        super().__init__()
        n_kv_heads = n_kv_heads or n_heads
        if dim % n_heads or n_heads % n_kv_heads:
            raise ValueError(f"dim ({dim}) must divide by n_heads ({n_heads}), n_heads by n_kv_heads ({n_kv_heads})")
        head_dim = dim // n_heads
        if head_dim % (4 if rope_2d else 2):
            raise ValueError(f"head_dim {head_dim} must be a multiple of {4 if rope_2d else 2} for rope_2d={rope_2d}")
        hidden = mlp_hidden or 32 * math.ceil(dim * 8 / 3 / 32)
        self.head_dim, self.n_kv_heads = head_dim, n_kv_heads
        self.tok_emb = nn.Embedding(vocab_size, dim)
        self.layers = nn.ModuleList(Block(dim, n_heads, n_kv_heads, hidden, norm_eps, cond_dim) for _ in range(n_layers))
        self.norm = RMSNorm(dim, norm_eps)
        # continuous paradigms (flow heads) read the normed hidden states and have no use for logits
        self.head = LogitsHead(dim, vocab_size) if logits_head else None
        self.gradient_checkpointing = False
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("wo.weight") or name.endswith("w2.weight"):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * n_layers))  # GPT-2 residual scaling
            elif ".ada." in name:
                nn.init.zeros_(p)

    @staticmethod
    def _init_weights(m):
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)

    def new_cache(self, batch_size: int, max_len: int | None = None) -> KVCache:
        max_len = max_len or self.config.max_seq_len
        return KVCache(len(self.layers), batch_size, self.n_kv_heads, max_len, self.head_dim,
                       dtype=self.tok_emb.weight.dtype, device=self.tok_emb.weight.device)

    def rope_cos_sin(self, positions: torch.Tensor, dtype=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotary (cos, sin), each (B, T, D), for integer positions (B, T, 2) or (B, T)."""
        angles = rope_angles(positions, self.head_dim, self.config.rope_theta, self.config.rope_2d)
        angles = torch.cat([angles, angles], dim=-1)
        dtype = dtype or self.tok_emb.weight.dtype
        return angles.cos().to(dtype), angles.sin().to(dtype)

    def forward(
        self,
        tokens: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        start: int | None = None,
        inputs_embeds: torch.Tensor | None = None,
        cond: torch.Tensor | None = None,
        output_hidden_states: bool = False,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
    ):
        """Logits (B, T, V) for tokens (B, T) or inputs_embeds (B, T, C); with `logits_head=False` the final
        normed hidden states (B, T, C) instead.

        positions: (B, T, 2) or (B, T) ints; default 0..T-1 after the cache prefix.
        mask: bool (B or 1, 1 or H, T, S), True = may attend; S = start + T with a cache, else T. Default causal.
        cache/start: write keys/values at [start, start + T) (default: cache.length) and attend to [0, start + T).
            `start` may be a (B,) LongTensor of per-row offsets; then `positions` and `mask` must be given and
            the mask spans S = max(start) + T keys.
        rope: (cos, sin), each (B or 1, T, D), from `rope_cos_sin`, in place of `positions` (decode loops compute
            the table once and index it every step).
        """
        x = self.tok_emb(tokens) if inputs_embeds is None else inputs_embeds
        B, T, _ = x.shape
        if cache is not None:
            start = cache.length if start is None else start
            end = int(start.max()) + T if torch.is_tensor(start) else start + T
            if end > cache.max_len:
                raise ValueError(f"sequence of {end} tokens exceeds the cache length {cache.max_len}")
            cache.row_end = end
        else:
            start = end = 0
        if rope is not None:
            cos, sin = rope
        else:
            if positions is None:
                if torch.is_tensor(start):
                    raise ValueError("positions are required when start is a per-row tensor")
                positions = torch.arange(start, start + T, device=x.device).expand(B, T)
            cos, sin = self.rope_cos_sin(positions, x.dtype)
        hiddens = []
        recompute = self.gradient_checkpointing and cache is None and torch.is_grad_enabled()
        for i, layer in enumerate(self.layers):
            if recompute:
                x = self._gradient_checkpointing_func(layer, x, cos, sin, mask, cache, i, start, cond)
            else:
                x = layer(x, cos, sin, mask, cache, i, start, cond)
            if output_hidden_states:
                hiddens.append(x)
        if cache is not None:
            cache.length = end
        out = self.norm(x)
        logits = self.head(out) if self.head is not None else out
        return (logits, hiddens) if output_hidden_states else logits
