"""Raster next-token prediction over s x s windows: Token-Shuffle (Ma et al., 2025, "Token-Shuffle: Towards
High-Resolution Image Generation with Autoregressive Models", arXiv 2504.17789), on `TokenShuffleTransformer`.

Sequence layout (next_token's, over the window grid)::

    [PAD ... PAD] [text ids] <boi> [window 0] [window 1] ... [window N-2]
    |---------- max_text_len ---------|

The text block is next_token's (left-padded, <null> for unconditional rows). Window j is the s x s block of
image codes at window-grid cell j (raster over (h/s, w/s), slot order of `mmgen.models.shuffle`), merged into
one input token. <boi> predicts window 0 and the input of window j - 1 predicts window j: s^2 codes per
position, one head each, cross-entropy over all of them. The last window is never an input, so there is no
<eoi>: the image ends after N windows by construction. Positions are next_token's 2-D RoPE on the window grid.

Sampling emits s^2 codes per forward pass with a KV cache (h*w/s^2 passes per image). CFG batches conditional
and <null> rows; the guidance is constant or ramps by step, w_j = 1 + (w - 1) j / (N - 1): the paper schedules
CFG by token position and we use the ramp that VAR and FlowAR use over scales. The watermark reweights each of
a window's s^2 distributions, keyed by tokens of earlier windows (`watermark_key_order`: the same slot of the
window to the left, of the window above in the first window column), never by a token of the same pass.

Letters: B batch (R = rows incl. the unconditional half), T0 = max_text_len + 1 text block, N windows,
K = s^2 codes per window, V image vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mmgen.models.shuffle import TokenShuffleTransformer, check_window, shuffle_ids, unshuffle_ids
from mmgen.models.transformer import KVCache
from mmgen.paradigms.next_token import NextTokenLayout
from mmgen.paradigms.protocol import FlowConfig, GenerationCost, ModelConfig
from mmgen.paradigms.sequence import attention_mask, prompt_block, text_block
from mmgen.sampling.logits import SamplingConfig, guidance_at, guide, process_logits, sample
from mmgen.text import UnifiedVocab
from mmgen.watermark import KeyOrder


@dataclass
class TokenShuffleLayout(NextTokenLayout):
    """next_token's layout with `grid` the window grid (h/s, w/s): one decoder position per window. Build it
    from the tokenizer's grid with `for_tokens`."""

    window: int = 2

    def __post_init__(self):
        check_window(self.token_grid, self.window)

    @classmethod
    def for_tokens(cls, vocab: UnifiedVocab, max_text_len: int, token_grid: tuple[int, int], window: int,
                   rope_2d: bool = True) -> TokenShuffleLayout:
        check_window(tuple(token_grid), window)
        h, w = token_grid
        return cls(vocab, max_text_len, (h // window, w // window), rope_2d, window)

    @property
    def token_grid(self) -> tuple[int, int]:
        return self.grid[0] * self.window, self.grid[1] * self.window

    @property
    def tokens_per_step(self) -> int:
        return self.window * self.window

    @property
    def seq_len(self) -> int:
        return self.max_text_len + 1 + self.num_image_tokens - 1  # no <eoi>; the last window is never an input

    def positions(self, batch_size: int, device=None) -> torch.Tensor:
        """(B, seq_len, 2): text on the diagonal, window (r, c) at (o + r, o + c)."""
        return super().positions(batch_size, device)[:, : self.seq_len]


DEFAULT_CFG_SCHEDULE = "constant"
TOKENS = "codes"


def make_layout(tokenizer, vocab: UnifiedVocab, max_text_len: int, model: ModelConfig,
                flow: FlowConfig | None = None) -> TokenShuffleLayout:
    return TokenShuffleLayout.for_tokens(vocab, max_text_len, tuple(tokenizer.token_shape), model.shuffle_window,
                                         rope_2d=model.rope_2d)


def layout_from_model(decoder: TokenShuffleTransformer, tokenizer, vocab: UnifiedVocab,
                      max_text_len: int) -> TokenShuffleLayout:
    if decoder.config.image_vocab_size != tokenizer.vocab_size:
        raise ValueError(f"transformer.image_vocab_size={decoder.config.image_vocab_size} differs from the "
                         f"tokenizer's {tokenizer.vocab_size} codes")
    return TokenShuffleLayout.for_tokens(vocab, max_text_len, tuple(tokenizer.token_shape),
                                         decoder.config.shuffle_window, rope_2d=decoder.config.rope_2d)


def make_model(layout: TokenShuffleLayout, model: ModelConfig, flow: FlowConfig | None = None):
    return TokenShuffleTransformer(layout.vocab.size, layout.vocab.image_vocab_size, shuffle_window=layout.window,
                                   max_seq_len=layout.seq_len, rope_2d=layout.rope_2d, **model.backbone())


def _check_model(model: TokenShuffleTransformer, layout: TokenShuffleLayout) -> None:
    c = model.config
    if (c.vocab_size, c.image_vocab_size, c.shuffle_window) != (layout.vocab.size, layout.vocab.image_vocab_size,
                                                                layout.window):
        raise ValueError(f"the model (vocab_size {c.vocab_size}, image_vocab_size {c.image_vocab_size}, "
                         f"shuffle_window {c.shuffle_window}) does not fit the layout (vocab size {layout.vocab.size}, "
                         f"image vocab {layout.vocab.image_vocab_size}, window {layout.window})")


@dataclass
class TokenShuffleBatch:
    text: torch.Tensor  # (B, T0) text block ending with <boi>
    windows: torch.Tensor  # (B, N - 1, K) input windows 0..N-2 (codes)
    targets: torch.Tensor  # (B, N, K) codes of windows 0..N-1
    positions: torch.Tensor  # (B, seq_len, 2)
    mask: torch.Tensor  # (B, 1, seq_len, seq_len) bool


def build_batch(layout: TokenShuffleLayout, text_ids, image_codes_BHW: torch.Tensor, cond_drop_prob: float = 0.0,
                generator: torch.Generator | None = None, *, tokenizer=None) -> TokenShuffleBatch:
    """Teacher-forced training batch from caption ids and tokenizer codes (B, h, w)."""
    B = image_codes_BHW.shape[0]
    if tuple(image_codes_BHW.shape[1:]) != layout.token_grid:
        raise ValueError(f"image codes have grid {tuple(image_codes_BHW.shape[1:])}, the model expects "
                         f"{layout.token_grid}")
    if len(text_ids) != B:
        raise ValueError(f"got {len(text_ids)} captions for {B} images")
    drop = torch.rand(B, generator=generator) < cond_drop_prob if cond_drop_prob > 0 else None
    text, text_valid = text_block(layout, text_ids, drop)
    dev = image_codes_BHW.device
    targets = shuffle_ids(image_codes_BHW.long(), layout.window)
    valid = torch.cat([text_valid, torch.ones(B, layout.num_image_tokens - 1, dtype=torch.bool)], 1)
    return TokenShuffleBatch(text.to(dev), targets[:, :-1], targets, layout.positions(B, dev),
                             attention_mask(valid).to(dev))


def loss_fn(model: TokenShuffleTransformer, batch: TokenShuffleBatch, layout: TokenShuffleLayout) -> torch.Tensor:
    """Cross-entropy over all s^2 codes of every window."""
    _check_model(model, layout)
    logits = model(batch.text, batch.windows, batch.positions, batch.mask, logits_to_keep=layout.num_image_tokens)
    return F.cross_entropy(logits.flatten(0, 2).float(), batch.targets.flatten())


# ---- sampling: small functions, the loop stays visible -------------------------------------------------


def prefill(model: TokenShuffleTransformer, text_RT, positions_RT2, key_valid_RT, cache: KVCache) -> torch.Tensor:
    """Run the text block, filling the cache; returns the logits at <boi>, which predict window 0, (R, K, V)."""
    return model(text_RT, None, positions_RT2, attention_mask(key_valid_RT), cache=cache, start=0,
                 logits_to_keep=1)[:, -1]


def decode_step(model: TokenShuffleTransformer, window_RK, position_R2, key_valid_RS, cache: KVCache):
    """Feed one window per row at the cache end; returns the logits of the next window (R, K, V)."""
    mask = key_valid_RS[:, None, None, : cache.length + 1]
    return model(None, window_RK[:, None], position_R2[:, None], mask, cache=cache)[:, -1]


def slot_positions(layout: TokenShuffleLayout, device=None) -> torch.Tensor:
    """(N, K): the raster index in the token grid of slot k of window j."""
    h, w = layout.token_grid
    return shuffle_ids(torch.arange(h * w, device=device).view(1, h, w), layout.window)[0]


def watermark_key_order(layout: TokenShuffleLayout) -> KeyOrder:
    """The watermark's key context of token (r, c): the same slot of the window to its left, (r, c - s) (then
    (r, c - 2s), ...), in the first window column the same slot of the window above, (r - s, c): always a token
    of an earlier pass, since a pass samples its window's s^2 tokens together. Keys are spent in decoding order,
    window by window and slot by slot inside one."""
    (h, w), s = layout.token_grid, layout.window
    parents = tuple(t - s if t % w >= s else (t - s * w if t >= s * w else -1) for t in range(h * w))
    return KeyOrder(parents, tuple(slot_positions(layout).flatten().tolist()))


@torch.no_grad()
def generate(model: TokenShuffleTransformer, layout: TokenShuffleLayout, text_ids: Sequence[Sequence[int]],
             sampling: SamplingConfig, generators: Sequence[torch.Generator] | None = None, *, tokenizer=None,
             callback: Callable[[int], None] | None = None, processor=None):
    """Sample image codes (B, h, w), in the tokenizer's raster order, for B tokenized prompts: s^2 codes per
    forward pass. Returns the codes and their `GenerationCost` (h*w / s^2 decoder passes). `processor`: a
    `mmgen.watermark.WatermarkProcessor`, keyed by `watermark_key_order`."""
    _check_model(model, layout)
    N, K, B = layout.num_image_tokens, layout.tokens_per_step, len(text_ids)
    schedule = sampling.schedule(DEFAULT_CFG_SCHEDULE)
    weights = [guidance_at(sampling.guidance_scale, j, N, schedule) for j in range(N)]
    device = model.device
    use_cfg, text, valid, key_valid = prompt_block(layout, text_ids, sampling.guidance_scale, layout.seq_len, device,
                                                   generators)
    R, T0 = text.shape
    positions = layout.positions(R, device)
    cache = model.new_cache(R, layout.seq_len)
    greedy = sampling.temperature == 0
    # one generator per image drives all K codes of its window, so an image does not depend on its batch mates
    gens = None if generators is None else [g for g in generators for _ in range(K)]
    windows = torch.zeros(B, N, K, dtype=torch.long, device=device)
    if processor is not None:  # the codes decoded so far in raster order, which the keys read
        order, slots = watermark_key_order(layout), slot_positions(layout, device)
        codes, rows = torch.zeros(B, N * K, dtype=torch.long, device=device), torch.arange(B, device=device)
        rows = rows.repeat_interleave(K)

    logits = prefill(model, text, positions[:, :T0], valid, cache)
    for j in range(N):
        logits = process_logits(guide(logits.float(), weights[j], use_cfg).flatten(0, 1), sampling)  # (B K, V)
        if processor is not None:
            logits = processor.keyed_by(order, logits, codes, rows, slots[j].repeat(B))
        windows[:, j] = sample(logits, gens, greedy).view(B, K)
        if processor is not None:
            codes[:, slots[j]] = windows[:, j]
        if callback is not None:
            callback(j)
        if j + 1 == N:
            break
        window = torch.cat([windows[:, j], windows[:, j]]) if use_cfg else windows[:, j]
        logits = decode_step(model, window, positions[:, T0 + j], key_valid, cache)
    return unshuffle_ids(windows, layout.window, layout.token_grid), GenerationCost(N)
