"""Speculative Jacobi decoding for transformers causal LMs (LlamaForCausalLM and any model whose attention
calls `past_key_values.update(...)` and accepts a 4-D attention mask and explicit position ids).

`RowOffsetCache` is a transformers `Cache` whose layers hold static buffers and write each row at its own
offset, so samples of one batch can accept different numbers of drafts. Positions follow transformers'
`generate()` for left-padded prompts (pads take no position), so greedy Jacobi decoding reproduces
`generate(do_sample=False)` token for token.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from mmgen.sampling.logits import guide
from mmgen.sampling.sjd import window_mask


class RowOffsetLayer(CacheLayerMixin):
    """One layer's keys/values, (B, H, capacity, D), written at `owner.start` (B,) per row."""

    def __init__(self, owner: RowOffsetCache):
        super().__init__()
        self.owner = owner

    def lazy_initialization(self, key_states, value_states):
        B, H, _, D = key_states.shape
        shape = (B, H, self.owner.capacity, D)
        self.keys = torch.zeros(shape, dtype=key_states.dtype, device=key_states.device)
        self.values = torch.zeros(shape, dtype=value_states.dtype, device=value_states.device)
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        B, H, T, D = key_states.shape
        slots = (self.owner.start[:, None] + torch.arange(T, device=key_states.device))
        slots = slots[:, None, :, None].expand(B, H, T, D)
        self.keys.scatter_(2, slots, key_states)
        self.values.scatter_(2, slots, value_states)
        end = self.owner.end
        return self.keys[:, :, :end], self.values[:, :, :end]

    def get_seq_length(self) -> int:
        return self.owner.end

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.owner.end, 0

    def get_max_length(self) -> int:
        return self.owner.capacity

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.is_initialized:
            self.keys, self.values = self.keys[beam_idx], self.values[beam_idx]


class RowOffsetCache(Cache):
    def __init__(self, num_layers: int, capacity: int):
        self.capacity = capacity
        self.start = None  # (B,) LongTensor, set before each forward
        self.end = 0
        super().__init__(layers=[RowOffsetLayer(self) for _ in range(num_layers)])

    def set_window(self, start: torch.Tensor, length: int) -> None:
        end = int(start.max()) + length
        if end > self.capacity:
            raise ValueError(f"window ends at {end}, beyond the cache capacity {self.capacity}")
        self.start, self.end = start, end


def window_attention(cache: RowOffsetCache, start: torch.Tensor, length: int, key_valid: torch.Tensor,
                     pads: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Point `cache` at a window of `length` tokens written from each row's `start` slot; returns the additive
    4-D attention mask (R, 1, length, keys) and the position ids (R, length), pads taking no position as in
    transformers' generate()."""
    cache.set_window(start, length)
    slots = start[:, None] + torch.arange(length, device=start.device)
    allowed = window_mask(slots, key_valid[:, : cache.end])
    mask = torch.zeros(allowed.shape, dtype=dtype, device=start.device)
    mask = mask.masked_fill(~allowed, torch.finfo(dtype).min).unsqueeze(1)
    return mask, (slots - pads[:, None]).clamp_min(0)


class CausalLMBackend:
    """`mmgen.sampling.sjd.JacobiBackend` for a transformers causal LM.

    prompts: token id lists; the last id of each is the start token of generation (e.g. <boi>).
    The draft vocabulary is model ids [vocab_offset, vocab_offset + vocab_size). With guidance_scale != 1,
    `uncond_prompts` give the unconditional rows of classifier-free guidance (same convention as mmgen's AR
    sampler: logits restricted to the draft vocabulary, then u + s (c - u)).
    """

    supports_leaves = False  # chains only: forward takes no token-tree leaves

    def __init__(self, model, prompts: Sequence[Sequence[int]], vocab_offset: int, vocab_size: int,
                 num_tokens: int, window: int, guidance_scale: float = 1.0,
                 uncond_prompts: Sequence[Sequence[int]] | None = None, pad_token_id: int = 0):
        self.model, self.offset, self.vocab_size = model, vocab_offset, vocab_size
        self.num_samples, self.guidance_scale = len(prompts), guidance_scale
        self.use_cfg = guidance_scale != 1.0
        if self.use_cfg:
            if uncond_prompts is None or len(uncond_prompts) != len(prompts):
                raise ValueError("guidance_scale != 1 needs one uncond prompt per prompt")
            prompts = list(prompts) + list(uncond_prompts)
        if any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token (its last token starts generation)")
        self.device = model.device
        P = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), P), pad_token_id, dtype=torch.long)
        valid = torch.zeros(len(prompts), P, dtype=torch.bool)
        for r, p in enumerate(prompts):
            ids[r, P - len(p):] = torch.tensor(list(p))
            valid[r, P - len(p):] = True
        self.ids, self.prefix = ids.to(self.device), P - 1  # prompt slots before the start token
        self.capacity = P + num_tokens + window
        self.key_valid = torch.ones(len(prompts), self.capacity, dtype=torch.bool, device=self.device)
        self.key_valid[:, :P] = valid.to(self.device)
        self.pads = (~valid).sum(1).to(self.device)  # positions skip the pads, as in generate()
        self.cache = RowOffsetCache(model.config.num_hidden_layers, self.capacity)
        self.prefilled = False

    def forward(self, window_AT: torch.Tensor, n_A: torch.Tensor) -> torch.Tensor:
        A, T = window_AT.shape
        tokens = window_AT + self.offset
        if self.use_cfg:
            tokens, n_A = torch.cat([tokens, tokens]), torch.cat([n_A, n_A])  # rows: [cond; uncond]
        tokens[:, 0] = torch.where(n_A == 0, self.ids[:, -1], tokens[:, 0])
        start = self.prefix + n_A
        if not self.prefilled:  # the first pass carries the prompt: no separate prefill pass
            tokens, start = torch.cat([self.ids[:, : self.prefix], tokens], 1), torch.zeros_like(start)
            self.prefilled = True
        mask, positions = window_attention(self.cache, start, tokens.shape[1], self.key_valid, self.pads,
                                           self.model.dtype)
        logits = self.model(input_ids=tokens, attention_mask=mask, position_ids=positions,
                            past_key_values=self.cache, use_cache=True).logits[:, -T:]
        logits = logits[..., self.offset: self.offset + self.vocab_size].float()
        return guide(logits, self.guidance_scale, self.use_cfg)

    def keep(self, keep_A: torch.Tensor) -> None:
        rows = keep_A.nonzero().squeeze(-1)
        if self.use_cfg:
            rows = torch.cat([rows, rows + len(keep_A)])
        self.cache.reorder_cache(rows)
        self.ids, self.key_valid, self.pads = self.ids[rows], self.key_valid[rows], self.pads[rows]
