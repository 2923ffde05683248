"""Next-block prediction, semi-autoregressive (Ren et al., 2025, "Next Block Prediction: Video Generation via
Semi-Autoregressive Modeling", arXiv 2502.07737), with the rows of the token grid as blocks.

Sequence layout (next_token's text block and 2-D RoPE)::

    [PAD ... PAD] [text ids] <boi> [query row: w learned embeddings] [image rows 0 .. h-2, raster order]
    |---------- max_text_len ---------|

Attention is bidirectional inside a block and causal across blocks (the text block is causal token by token,
pads masked). Every position predicts the token at the same column of the next block: image row r predicts row
r + 1. The first row has no block above it, so the decoder carries a row of w learned query embeddings
(`NextBlockTransformer.block_queries`) placed as a virtual row -1 (2-D position (o - 1, o + c), just above the
image): they see the condition and each other and predict row 0, exactly as a real row predicts the next one. The
last row predicts nothing and is never an input. Loss: cross-entropy over the image ids at every image token.

Sampling: the prompt pass runs the text block and the query row together and gives row 0; each later pass feeds
the row just decoded (w tokens, bidirectional among themselves, every earlier slot visible) and gives the next:
h passes per image (the prompt pass counted, as next_token counts it). CFG batches conditional and <null> rows,
constant or ramped over the rows. The watermark keys each token by the token above it (`watermark_key_order`: a
token's left neighbour is decoded in the same pass). SJD is not available: it verifies a raster sequence one token
per position. The grid needs h >= 2 (a single block would be one-shot prediction, not autoregression).

Letters: B images, R rows (B, or 2B with the <null> rows of CFG), T0 = max_text_len + 1 text block, h x w token
grid (blocks of w), N = h*w image tokens, V image vocabulary, C model width.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config

from mmgen.models.transformer import KVCache, Transformer
from mmgen.paradigms.next_neighbor import ImageIdsDecoder, check_grid, check_tokenizer
from mmgen.paradigms.next_token import NextTokenLayout
from mmgen.paradigms.protocol import FlowConfig, GenerationCost, ModelConfig
from mmgen.paradigms.sequence import grid_batch, prompt_block
from mmgen.sampling.logits import SamplingConfig, guidance_at, guide, process_logits, sample
from mmgen.text import UnifiedVocab
from mmgen.watermark import KeyOrder

DEFAULT_CFG_SCHEDULE = "constant"
TOKENS = "codes"


@dataclass
class NextBlockLayout(NextTokenLayout):
    """next_token's text block and image positions, with the query row between <boi> and the image rows."""

    def __post_init__(self):
        check_grid(self.grid, "next_block")

    @property
    def block_size(self) -> int:
        return self.grid[1]

    @property
    def seq_len(self) -> int:
        return self.max_text_len + 1 + self.num_image_tokens  # query row + image rows 0..h-2

    @property
    def num_steps(self) -> int:
        """Decoder passes per image: one per row."""
        return self.grid[0]

    def positions(self, batch_size: int, device=None) -> torch.Tensor:
        """(B, seq_len, 2): text on the diagonal, query column c at (o - 1, o + c), image (r, c) at (o + r, o + c)."""
        if not self.rope_2d:
            return super().positions(batch_size, device)[:, : self.seq_len]
        T0, w = self.max_text_len + 1, self.grid[1]
        base = super().positions(1, device)[0]  # text, image rows 0..h-1, <eoi>
        queries = base[T0: T0 + w] - torch.tensor([1, 0], device=device)
        seq = torch.cat([base[:T0], queries, base[T0: T0 + self.num_image_tokens - w]])
        return seq.unsqueeze(0).expand(batch_size, -1, -1)

    def blocks(self, device=None) -> torch.Tensor:
        """(seq_len,) block index of every slot: text slots each their own block (-T0 .. -1), the query row 0, image
        row r block r + 1. A slot sees the slots of its own and earlier blocks."""
        T0, w = self.max_text_len + 1, self.grid[1]
        text = torch.arange(-T0, 0, device=device)
        return torch.cat([text, torch.arange(self.num_image_tokens, device=device) // w])


def make_layout(tokenizer, vocab: UnifiedVocab, max_text_len: int, model: ModelConfig,
                flow: FlowConfig | None = None) -> NextBlockLayout:
    return NextBlockLayout(vocab, max_text_len, check_tokenizer(tokenizer, "next_block"), rope_2d=model.rope_2d)


def layout_from_model(decoder: NextBlockTransformer, tokenizer, vocab: UnifiedVocab,
                      max_text_len: int) -> NextBlockLayout:
    grid = check_tokenizer(tokenizer, "next_block")
    c = decoder.config
    if (c.image_vocab_size, c.block_size) != (tokenizer.vocab_size, grid[1]):
        raise ValueError(f"transformer (image_vocab_size {c.image_vocab_size}, block_size {c.block_size}) does not "
                         f"fit the tokenizer ({tokenizer.vocab_size} codes, rows of {grid[1]} tokens)")
    return NextBlockLayout(vocab, max_text_len, grid, rope_2d=c.rope_2d)


def make_model(layout: NextBlockLayout, model: ModelConfig, flow: FlowConfig | None = None) -> NextBlockTransformer:
    return NextBlockTransformer(layout.vocab.size, layout.vocab.image_vocab_size, layout.block_size,
                                max_seq_len=layout.seq_len, rope_2d=layout.rope_2d, **model.backbone())


class NextBlockTransformer(ImageIdsDecoder):
    """The decoder `Transformer` plus the row of `block_size` learned query embeddings that predicts the first
    block. Returns logits over the image ids. Forward only."""

    @register_to_config
    def __init__(
        self,
        vocab_size: int,
        image_vocab_size: int,
        block_size: int,
        dim: int = 256,
        n_layers: int = 6,
        n_heads: int = 8,
        n_kv_heads: int | None = None,
        mlp_hidden: int | None = None,
        max_seq_len: int = 512,
        rope_theta: float = 10000.0,
        rope_2d: bool = True,
        norm_eps: float = 1e-5,
    ):
        super().__init__()
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size (tokens per block: the token grid's width) must be an integer >= 1, "
                             f"got {block_size!r}")
        self.build_trunk(vocab_size, image_vocab_size, dim=dim, n_layers=n_layers, n_heads=n_heads,
                         n_kv_heads=n_kv_heads, mlp_hidden=mlp_hidden, max_seq_len=max_seq_len, rope_theta=rope_theta,
                         rope_2d=rope_2d, norm_eps=norm_eps)
        self.block_queries = nn.Parameter(torch.randn(block_size, dim) * 0.02)  # as the token embeddings

    def new_cache(self, batch_size: int, max_len: int | None = None) -> KVCache:
        return self.transformer.new_cache(batch_size, max_len)

    def forward(self, text_tokens: torch.Tensor | None, image_tokens: torch.Tensor | None = None,
                positions: torch.Tensor | None = None, mask: torch.Tensor | None = None, cache: KVCache | None = None,
                start: int | None = None) -> torch.Tensor:
        """Image logits (B, T, V) of the text block (B, T0) followed by the query row (the two make the prompt),
        then image ids (B, T') (either part may be None; T = T0 + block_size + T'). positions (B or 1, T, 2), mask
        (required: the block mask), cache, start: as in `Transformer.forward`."""
        if mask is None:
            raise ValueError("NextBlockTransformer needs an attention mask (the block mask of next_block)")
        emb = self.transformer.tok_emb
        parts = []
        if text_tokens is not None:
            queries = self.block_queries.to(emb.weight.dtype).expand(text_tokens.shape[0], -1, -1)
            parts += [emb(text_tokens), queries]
        if image_tokens is not None:
            parts.append(emb(image_tokens))
        if not parts:
            raise ValueError("give text_tokens, image_tokens or both")
        logits = self.transformer(inputs_embeds=torch.cat(parts, 1), positions=positions, mask=mask, cache=cache,
                                  start=start)
        return logits[..., self.image_offset:]


def block_mask(layout: NextBlockLayout, key_valid_BL: torch.Tensor) -> torch.Tensor:
    """(B, 1, L, L) bool: a slot sees the valid slots of its own and earlier blocks, and always itself."""
    blocks = layout.blocks(key_valid_BL.device)[: key_valid_BL.shape[1]]
    eye = torch.eye(len(blocks), dtype=torch.bool, device=key_valid_BL.device)
    return (((blocks[None, :] <= blocks[:, None]) & key_valid_BL[:, None, :]) | eye).unsqueeze(1)


@dataclass
class NextBlockBatch:
    text: torch.Tensor  # (B, T0) text block ending with <boi>; the query row follows it inside the model
    rows: torch.Tensor  # (B, N - w) image rows 0..h-2 (unified ids)
    targets: torch.Tensor  # (B, N) image codes
    positions: torch.Tensor  # (B, L, 2), L = T0 + N
    mask: torch.Tensor  # (B, 1, L, L) the block mask


def build_batch(layout: NextBlockLayout, text_ids, image_codes_BHW: torch.Tensor, cond_drop_prob: float = 0.0,
                generator: torch.Generator | None = None, *, tokenizer=None) -> NextBlockBatch:
    """Teacher-forced training batch from condition ids and tokenizer codes (B, h, w)."""
    codes, text, text_valid = grid_batch(layout, text_ids, image_codes_BHW, cond_drop_prob, generator)
    B, dev = codes.shape[0], codes.device
    rows = layout.vocab.image_to_unified(codes[:, : codes.shape[1] - layout.block_size])
    valid = torch.cat([text_valid, torch.ones(B, codes.shape[1], dtype=torch.bool, device=dev)], 1)
    return NextBlockBatch(text, rows, codes, layout.positions(B, dev), block_mask(layout, valid))


def _check_model(model: NextBlockTransformer, layout: NextBlockLayout) -> None:
    c = model.config
    if not isinstance(model, NextBlockTransformer) or (c.vocab_size, c.image_vocab_size, c.block_size) != (
            layout.vocab.size, layout.vocab.image_vocab_size, layout.block_size):
        raise ValueError(f"next_block needs a NextBlockTransformer over vocab size {layout.vocab.size} with "
                         f"{layout.vocab.image_vocab_size} image ids and block_size {layout.block_size}; got "
                         f"{type(model).__name__} ({dict(c)})")


def loss_fn(model: NextBlockTransformer, batch: NextBlockBatch, layout: NextBlockLayout) -> torch.Tensor:
    """Cross-entropy of every image token, predicted from the same column of the block before it (the query row
    for row 0)."""
    _check_model(model, layout)
    logits = model(batch.text, batch.rows, positions=batch.positions, mask=batch.mask)
    T0 = layout.max_text_len + 1
    return F.cross_entropy(logits[:, T0:].flatten(0, 1).float(), batch.targets.flatten())


# ---- sampling: small functions, the loop stays visible -------------------------------------------------


def prefill(model: NextBlockTransformer, text_RT, positions_L2, mask_RTT, cache: KVCache) -> torch.Tensor:
    """Run the text block and the query row, filling the cache; the logits of row 0, (R, w, V)."""
    w = model.config.block_size
    return model(text_RT, None, positions=positions_L2[None], mask=mask_RTT, cache=cache, start=0)[:, -w:]


def decode_step(model: NextBlockTransformer, row_Rw, positions_w2, key_valid_RS, cache: KVCache) -> torch.Tensor:
    """Feed one decoded row at the cache end (it sees every slot written so far and itself, bidirectionally);
    returns the logits of the next row, (R, w, V)."""
    R, w = row_Rw.shape
    S = cache.length + w
    mask = key_valid_RS[:, None, None, :S].expand(R, 1, w, S)
    return model(None, row_Rw, positions=positions_w2[None], mask=mask, cache=cache)


def watermark_key_order(layout: NextBlockLayout) -> KeyOrder:
    """The watermark's key context of token (r, c): the token above it (then the one above that, ...), decoded in an
    earlier pass; keys are spent in raster order (row by row)."""
    h, w = layout.grid
    return KeyOrder(tuple(t - w if t >= w else -1 for t in range(h * w)), tuple(range(h * w)))


@torch.no_grad()
def generate(model: NextBlockTransformer, layout: NextBlockLayout, text_ids: Sequence[Sequence[int]],
             sampling: SamplingConfig, generators: Sequence[torch.Generator] | None = None, *, tokenizer=None,
             callback: Callable[[int], None] | None = None, processor=None):
    """Sample image codes (B, h, w) for B condition id lists, one row per decoder pass. Returns the codes and their
    `GenerationCost` (h passes, the prompt pass included). `sampling.cfg_schedule`: constant (default) or linear
    over the rows. `processor`: a `mmgen.watermark.WatermarkProcessor`, keyed by `watermark_key_order`. Image b's
    tokens are drawn from generators[b] alone, row by row."""
    _check_model(model, layout)
    B, (h, w) = len(text_ids), layout.grid
    device = model.device
    use_cfg, text, valid, key_valid = prompt_block(layout, text_ids, sampling.guidance_scale, layout.seq_len, device,
                                                   generators)
    R, T0 = text.shape
    positions = layout.positions(1, device)[0]  # (L, 2): text, query row, image rows 0..h-2
    cache = model.new_cache(R, layout.seq_len)
    schedule = sampling.schedule(DEFAULT_CFG_SCHEDULE)
    greedy = sampling.temperature == 0
    gens = None if generators is None else [g for g in generators for _ in range(w)]
    codes = torch.zeros(B, h * w, dtype=torch.long, device=device)
    order = watermark_key_order(layout) if processor is not None else None
    cols = torch.arange(w, device=device)

    logits = prefill(model, text, positions[: T0 + w], block_mask(layout, key_valid[:, : T0 + w]), cache)
    for r in range(h):
        weight = guidance_at(sampling.guidance_scale, r, h, schedule) if use_cfg else 1.0
        logits = process_logits(guide(logits.float(), weight, use_cfg).flatten(0, 1), sampling)  # (B w, V)
        if processor is not None:
            logits = processor.keyed_by(order, logits, codes, torch.arange(B, device=device).repeat_interleave(w),
                                        (r * w + cols).repeat(B))
        codes[:, r * w: (r + 1) * w] = sample(logits, gens, greedy).view(B, w)
        if callback is not None:
            callback(r)
        if r + 1 == h:
            break
        row = layout.vocab.image_to_unified(codes[:, r * w: (r + 1) * w])
        row = torch.cat([row, row]) if use_cfg else row
        slots = slice(T0 + (r + 1) * w, T0 + (r + 2) * w)  # after the query row and rows < r
        logits = decode_step(model, row, positions[slots], key_valid, cache)
    return codes.view(B, h, w), GenerationCost(h)
