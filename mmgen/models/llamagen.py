"""LlamaGen's GPT (Sun et al. 2024, "Autoregressive Model Beats Diffusion: Llama for Scalable Image Generation",
arXiv 2406.06525), written here so its released checkpoints load under their own parameter names.

A LLaMA decoder (Touvron et al. 2023) over VQ codes: RMSNorm (eps 1e-5), attention with one fused q|k|v
projection (`wqkv`), SwiGLU with hidden width find_multiple(int(2 * 4 * dim / 3), 256), no biases. The
condition is a prefix of `cls_token_num` embeddings: a class embedding (c2i; `num_classes + 1` rows, the
last the null class of classifier-free guidance) or projected T5 features (t2i; `cap_proj` MLP with tanh-GELU,
`uncond_embedding` the null caption). 2-D RoPE: each head's rotary pairs (interleaved: dims 2i, 2i + 1) are
split in half, the first half turned by the token's grid row, the second by its column; the condition slots
get an all-zero table, so their queries and keys are zero (their values still count).

The model only computes; sampling lives in `mmgen.pipelines.llamagen`. Sequence slots: condition j at slot j,
image token k at slot cls_token_num + k; the rotary table is indexed by slot.

Shape letters: B batch, T query length, S key length, H heads, K kv heads, D head dim, C width, V codebook.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config

from mmgen.models.transformer import KVCache, RMSNorm

MODEL_TYPES = ("c2i", "t2i")


def find_multiple(n: int, k: int) -> int:
    return n if n % k == 0 else n + k - n % k


def swiglu_hidden(dim: int, multiple_of: int = 256) -> int:
    """LlamaGen's (and LLaMA's) SwiGLU width for a model width."""
    return find_multiple(int(2 * 4 * dim / 3), multiple_of)


def rope_table(grid: int, head_dim: int, base: float, cond_tokens: int) -> torch.Tensor:
    """(cond_tokens + grid^2, D/2, 2) (cos, sin) per slot and rotary pair: zeros for the condition slots, then the
    image tokens in raster order, pair i < D/4 turned by row * f_i and pair D/4 + i by column * f_i."""
    half = head_dim // 2
    freqs = 1.0 / base ** (torch.arange(0, half, 2)[: half // 2].float() / half)
    t = torch.arange(grid).float()
    angles = torch.outer(t, freqs)  # (grid, D/4)
    grid_angles = torch.cat([angles[:, None, :].expand(-1, grid, -1), angles[None, :, :].expand(grid, -1, -1)], -1)
    table = torch.stack([grid_angles.cos(), grid_angles.sin()], -1).flatten(0, 1)  # (grid^2, D/2, 2)
    return torch.cat([torch.zeros(cond_tokens, half, 2), table])


def apply_rotary(x_BTHD: torch.Tensor, table_BTP2: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[2i], x[2i+1]) by the table's (cos, sin); a zero table zeroes the vector."""
    x = x_BTHD.float().reshape(*x_BTHD.shape[:-1], -1, 2)
    cos, sin = table_BTP2[:, :, None, :, 0], table_BTP2[:, :, None, :, 1]
    out = torch.stack([x[..., 0] * cos - x[..., 1] * sin, x[..., 1] * cos + x[..., 0] * sin], -1)
    return out.flatten(3).type_as(x_BTHD)


class Attention(nn.Module):
    def __init__(self, dim: int, n_head: int, n_kv_head: int):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = n_head, n_kv_head, dim // n_head
        self.wqkv = nn.Linear(dim, (n_head + 2 * n_kv_head) * self.head_dim, bias=False)
        self.wo = nn.Linear(dim, dim, bias=False)

    def forward(self, x_BTC, table, mask, cache: KVCache | None, layer: int, start):
        B, T, C = x_BTC.shape
        H, K, D = self.n_head, self.n_kv_head, self.head_dim
        q, k, v = self.wqkv(x_BTC).split([H * D, K * D, K * D], dim=-1)
        q = apply_rotary(q.view(B, T, H, D), table).transpose(1, 2)
        k = apply_rotary(k.view(B, T, K, D), table).transpose(1, 2)
        v = v.view(B, T, K, D).transpose(1, 2)
        if cache is not None:
            k, v = cache.update(layer, start, k, v)  # (B, K, S, D)
        if K != H:
            k, v = k.repeat_interleave(H // K, dim=1), v.repeat_interleave(H // K, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, T, D)
        return self.wo(y.transpose(1, 2).reshape(B, T, C))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, dim, n_head, n_kv_head, hidden, eps):
        super().__init__()
        self.attention = Attention(dim, n_head, n_kv_head)
        self.feed_forward = FeedForward(dim, hidden)
        self.attention_norm = RMSNorm(dim, eps)
        self.ffn_norm = RMSNorm(dim, eps)

    def forward(self, x, table, mask, cache, layer, start):
        h = x + self.attention(self.attention_norm(x), table, mask, cache, layer, start)
        return h + self.feed_forward(self.ffn_norm(h))


class LabelEmbedder(nn.Module):
    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, dim)  # row num_classes: the null class

    def forward(self, labels_B):
        return self.embedding_table(labels_B).unsqueeze(1)  # (B, 1, C)


class CaptionMLP(nn.Module):
    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.fc1 = nn.Linear(in_dim, dim, bias=False)
        self.fc2 = nn.Linear(dim, dim, bias=False)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class CaptionEmbedder(nn.Module):
    def __init__(self, caption_dim: int, dim: int, tokens: int):
        super().__init__()
        self.cap_proj = CaptionMLP(caption_dim, dim)
        self.register_buffer("uncond_embedding", torch.zeros(tokens, caption_dim))  # the null caption (learned)

    def forward(self, caption_BTE):
        return self.cap_proj(caption_BTE)  # (B, T, C)


class LlamaGenGPT(ModelMixin, ConfigMixin):
    """LlamaGen's GPT. State-dict keys are LlamaGen's own (`tok_embeddings`, `layers.i.attention.wqkv`, ...)."""

    @register_to_config
    def __init__(
        self,
        vocab_size: int = 16384,
        dim: int = 768,
        n_layer: int = 12,
        n_head: int = 12,
        n_kv_head: int | None = None,
        ffn_hidden: int | None = None,
        norm_eps: float = 1e-5,
        rope_base: float = 10000.0,
        model_type: str = "c2i",
        num_classes: int = 1000,
        caption_dim: int = 2048,
        cls_token_num: int = 1,
        grid_size: int = 16,
    ):
        super().__init__()
        n_kv_head = n_kv_head or n_head
        if model_type not in MODEL_TYPES:
            raise ValueError(f"model_type must be one of {', '.join(MODEL_TYPES)}; got {model_type!r}")
        if dim % n_head or n_head % n_kv_head or (dim // n_head) % 4:
            raise ValueError(f"dim ({dim}) must divide by n_head ({n_head}) into a head width that divides by 4 "
                             f"(2-D RoPE), and n_head by n_kv_head ({n_kv_head})")
        if model_type == "c2i" and cls_token_num != 1:
            raise ValueError(f"a c2i model has one condition token (its class), got cls_token_num={cls_token_num}")
        self.cls_embedding = (LabelEmbedder(num_classes, dim) if model_type == "c2i"
                              else CaptionEmbedder(caption_dim, dim, cls_token_num))
        self.tok_embeddings = nn.Embedding(vocab_size, dim)
        hidden = ffn_hidden or swiglu_hidden(dim)
        self.layers = nn.ModuleList(TransformerBlock(dim, n_head, n_kv_head, hidden, norm_eps) for _ in range(n_layer))
        self.norm = RMSNorm(dim, norm_eps)
        self.output = nn.Linear(dim, vocab_size, bias=False)

    @property
    def num_image_tokens(self) -> int:
        return self.config.grid_size ** 2

    @property
    def null_class(self) -> int:
        return self.config.num_classes

    def rope(self, device) -> torch.Tensor:
        """The rotary table (slots, D/2, 2), built once per device (a plain attribute, not saved)."""
        cached = self.__dict__.get("_rope")
        if cached is None or cached.device != torch.device(device):
            c = self.config
            cached = rope_table(c.grid_size, c.dim // c.n_head, c.rope_base, c.cls_token_num).to(device)
            self.__dict__["_rope"] = cached
        return cached

    def embed_condition(self, cond: torch.Tensor) -> torch.Tensor:
        """Class ids (B,) or caption features (B, cls_token_num, caption_dim) -> condition prefix (B, T, C)."""
        return self.cls_embedding(cond)

    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        c, w = self.config, self.tok_embeddings.weight
        return KVCache(c.n_layer, batch_size, c.n_kv_head or c.n_head, max_len, c.dim // c.n_head, dtype=w.dtype,
                       device=w.device)

    def forward(self, x_BTC: torch.Tensor, slots_BT: torch.Tensor, mask: torch.Tensor | None = None,
                cache: KVCache | None = None, start: int | torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, T, V), float32, for input embeddings (`embed_condition` / `tok_embeddings`) at sequence
        `slots_BT` (the rotary table's index; slots past its end take the last image position).

        mask: bool (B or 1, 1, T, S), True = may attend; default causal over [0, start + T).
        cache/start: write keys/values at [start, start + T) (default cache.length); `start` may be a (B,)
        LongTensor of per-row offsets (then `mask` must be given and spans S = max(start) + T)."""
        B, T, _ = x_BTC.shape
        if cache is not None:
            start = cache.length if start is None else start
            end = int(start.max()) + T if torch.is_tensor(start) else start + T
            if end > cache.max_len:
                raise ValueError(f"sequence of {end} slots exceeds the cache length {cache.max_len}")
            cache.row_end = end
        else:
            start, end = 0, T
        if mask is None:
            if torch.is_tensor(start):
                raise ValueError("mask is required when start is a per-row tensor")
            mask = torch.ones(T, end, dtype=torch.bool, device=x_BTC.device).tril(diagonal=end - T)
        rope = self.rope(x_BTC.device)
        table = rope[slots_BT.clamp_max(len(rope) - 1)]
        h = x_BTC
        for i, layer in enumerate(self.layers):
            h = layer(h, table, mask, cache, i, start)
        if cache is not None:
            cache.length = end
        return self.output(self.norm(h)).float()
