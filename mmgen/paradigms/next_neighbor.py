"""Next-neighbour prediction: NAR (He et al., 2025, "Neighboring Autoregressive Modeling for Efficient Visual
Generation", arXiv 2503.10696).

Generation is progressive outpainting from the top-left token in order of Manhattan distance: every token of the
next anti-diagonal (r + c = d) is predicted in one decoder pass, so an h x w grid takes h + w - 1 passes (15 for
8x8, 31 for 16x16) where raster next-token takes h*w.

Sequence layout (training; next_token's text block and 2-D RoPE)::

    [PAD ... PAD] [text ids] <boi> [image ids in raster order, all but the last]
    |---------- max_text_len ---------|

Inputs stay in raster order under the diagonal mask: image token (r, c) sees the condition block and every image
token with r' + c' <= r + c, its own anti-diagonal included (the whole diagonal is decoded in one pass). The text
block is causal with pads masked, as in next_token. The last token (h-1, w-1) predicts nothing and is never an
input.

Dimension-oriented heads (`NARTransformer`): the trunk's ordinary head predicts the token to the RIGHT; one extra
transformer block stacked after the trunk, with its own norm and linear, predicts the token BELOW (the paper's
code calls them the output and "medusa" heads). The logits of token (i, j) are the mean of the right head at
(i, j-1) and the bottom head at (i-1, j); first row: right head only; first column: bottom head only; the first
token: the mean of both heads at <boi>. The loss is cross-entropy on these mixed logits over the image ids, as
the paper's code trains them.

Sampling: the prompt pass fills the KV cache and gives the first token; every later pass feeds one decoded
anti-diagonal (its cache slots in decoding order: attention reads keys by their RoPE positions, so slot order
does not matter and the diagonal mask becomes "every slot written so far") and both heads' outputs give the next
anti-diagonal. The prompt pass counts as the first of the h + w - 1 (next_token counts its prompt pass the same
way). CFG batches conditional and <null> rows, constant or ramped over the passes. The watermark keys each token
by already-decoded neighbours (`watermark_key_order`: its left neighbour, the one above in the first column).
SJD is not available: it verifies a raster sequence one token per position.

The token grid must be 2-D (h, w >= 2): on a 1 x N grid (SEED's causal 1-D codes) next-neighbour order is raster
order and the bottom head never trains; that is next_token.

Letters: B images, R rows (B, or 2B with the <null> rows of CFG), T0 = max_text_len + 1 text block, N = h*w
image tokens, n tokens of one anti-diagonal, S shifted positions (0 = <boi>, k + 1 = image token k), V image
vocabulary, C model width.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config

from mmgen.models.heads import LogitsHead
from mmgen.models.transformer import Block, KVCache, RMSNorm, Transformer
from mmgen.paradigms.next_token import NextTokenLayout
from mmgen.paradigms.protocol import FlowConfig, GenerationCost, ModelConfig
from mmgen.paradigms.sequence import attention_mask, grid_batch, prompt_block
from mmgen.sampling.logits import SamplingConfig, guidance_at, guide, process_logits, sample
from mmgen.text import UnifiedVocab
from mmgen.watermark import KeyOrder

DEFAULT_CFG_SCHEDULE = "constant"
TOKENS = "codes"


def check_grid(grid: tuple[int, ...], paradigm: str = "next_neighbor") -> tuple[int, int]:
    """The (h, w) token grid of a codes tokenizer, refused unless both sides are >= 2."""
    if len(grid) != 2 or min(grid) < 2:
        raise ValueError(f"paradigm {paradigm} needs a 2-D token grid with h >= 2 and w >= 2 (tokenizer token_shape); "
                         f"got {tuple(grid)}: a 1 x N grid (e.g. SEED's causal 1-D codes) has no second dimension, "
                         f"use paradigm next_token")
    return int(grid[0]), int(grid[1])


def check_tokenizer(tokenizer, paradigm: str = "next_neighbor") -> tuple[int, int]:
    """The token grid of `tokenizer`, which must give discrete codes on a 2-D grid."""
    if tokenizer.kind != TOKENS:
        raise ValueError(f"paradigm {paradigm} needs a tokenizer of kind {TOKENS!r} (VQGAN, a diffusers VQModel, "
                         f"...); got kind {tokenizer.kind!r} ({type(tokenizer).__name__})")
    return check_grid(tuple(tokenizer.token_shape), paradigm)


@dataclass
class NARLayout(NextTokenLayout):
    """next_token's layout and positions, without <eoi> and without the last image token as an input."""

    def __post_init__(self):
        check_grid(self.grid)

    @property
    def seq_len(self) -> int:
        return self.max_text_len + 1 + self.num_image_tokens - 1

    @property
    def num_steps(self) -> int:
        """Decoder passes per image: one per anti-diagonal."""
        return self.grid[0] + self.grid[1] - 1

    def positions(self, batch_size: int, device=None) -> torch.Tensor:
        """(B, seq_len, 2): text on the diagonal, image token (r, c) at (o + r, o + c)."""
        return super().positions(batch_size, device)[:, : self.seq_len]

    def diagonals(self, device=None) -> list[torch.Tensor]:
        """Raster indices of each anti-diagonal r + c = d, by row: the decoding order."""
        h, w = self.grid
        return [torch.tensor([r * w + d - r for r in range(max(0, d - w + 1), min(d, h - 1) + 1)], device=device)
                for d in range(self.num_steps)]

    def head_sources(self, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """For each image token t = (i, j), the shifted position (0 = <boi>, k + 1 = image token k) whose right head
        predicts it ((i, j-1); <boi> for the first token) and whose bottom head does ((i-1, j); <boi> for the first
        token); -1 where that head does not predict it (first column / first row). Both (N,)."""
        h, w = self.grid
        t = torch.arange(h * w, device=device)
        right = torch.where(t % w > 0, t, -1)
        bottom = torch.where(t >= w, t - w + 1, -1)
        right[0] = bottom[0] = 0
        return right, bottom


def make_layout(tokenizer, vocab: UnifiedVocab, max_text_len: int, model: ModelConfig,
                flow: FlowConfig | None = None) -> NARLayout:
    return NARLayout(vocab, max_text_len, check_tokenizer(tokenizer), rope_2d=model.rope_2d)


def layout_from_model(decoder: NARTransformer, tokenizer, vocab: UnifiedVocab, max_text_len: int) -> NARLayout:
    grid = check_tokenizer(tokenizer)
    if decoder.config.image_vocab_size != tokenizer.vocab_size:
        raise ValueError(f"transformer.image_vocab_size={decoder.config.image_vocab_size} differs from the "
                         f"tokenizer's {tokenizer.vocab_size} codes")
    return NARLayout(vocab, max_text_len, grid, rope_2d=decoder.config.rope_2d)


def make_model(layout: NARLayout, model: ModelConfig, flow: FlowConfig | None = None) -> NARTransformer:
    return NARTransformer(layout.vocab.size, layout.vocab.image_vocab_size, max_seq_len=layout.seq_len,
                          rope_2d=layout.rope_2d, **model.backbone())


class ImageIdsDecoder(ModelMixin, ConfigMixin):
    """What the NAR and next-block decoders share: a `Transformer` trunk over the unified vocabulary, built by
    `build_trunk`, whose heads read the image ids (the vocabulary's last `image_vocab_size` ids) only."""

    _no_split_modules = ["Block"]

    def build_trunk(self, vocab_size: int, image_vocab_size: int, **trunk) -> None:
        if isinstance(image_vocab_size, bool) or not isinstance(image_vocab_size, int) \
                or not 1 <= image_vocab_size < vocab_size:
            raise ValueError(f"image_vocab_size must be an integer in [1, vocab_size={vocab_size}) (image ids are "
                             f"the last ones of the unified vocabulary), got {image_vocab_size!r}")
        self.transformer = Transformer(vocab_size, **trunk)

    @property
    def image_offset(self) -> int:
        return self.config.vocab_size - self.config.image_vocab_size


class NARTransformer(ImageIdsDecoder):
    """The decoder trunk (`Transformer`, whose head is the right head) plus the bottom head: one more `Block` after
    the trunk's last layer (before its final norm), its own RMSNorm and linear over the image ids. Forward only."""

    @register_to_config
    def __init__(
        self,
        vocab_size: int,
        image_vocab_size: int,
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
        self.build_trunk(vocab_size, image_vocab_size, dim=dim, n_layers=n_layers, n_heads=n_heads,
                         n_kv_heads=n_kv_heads, mlp_hidden=mlp_hidden, max_seq_len=max_seq_len, rope_theta=rope_theta,
                         rope_2d=rope_2d, norm_eps=norm_eps)
        hidden = self.transformer.layers[0].mlp.w1.out_features
        self.bottom_block = Block(dim, n_heads, self.transformer.n_kv_heads, hidden, norm_eps, None)
        self.bottom_norm = RMSNorm(dim, norm_eps)
        self.bottom_head = LogitsHead(dim, image_vocab_size)
        for name, p in [*self.bottom_block.named_parameters(), ("head", self.bottom_head.proj.weight)]:
            if p.dim() == 2:  # the trunk's initialisation, residual projections scaled as GPT-2 does
                std = 0.02 / math.sqrt(2 * (n_layers + 1)) if name.endswith(("wo.weight", "w2.weight")) else 0.02
                nn.init.normal_(p, std=std)

    def new_cache(self, batch_size: int, max_len: int | None = None) -> KVCache:
        """A cache with one layer more than the trunk: the bottom block's keys and values."""
        t = self.transformer
        return KVCache(len(t.layers) + 1, batch_size, t.n_kv_heads, max_len or self.config.max_seq_len, t.head_dim,
                       dtype=t.tok_emb.weight.dtype, device=t.tok_emb.weight.device)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                cache: KVCache | None = None, start: int | None = None, rope=None):
        """Image logits of the right head and of the bottom head at every position, each (B, T, V). `mask` is
        required (the paradigm's, never a plain causal one); positions / rope, cache / start as in
        `Transformer.forward` (an int start only)."""
        if mask is None:
            raise ValueError("NARTransformer needs an attention mask (the diagonal mask of next_neighbor)")
        trunk = self.transformer
        start = (cache.length if start is None else start) if cache is not None else 0
        rope = trunk.rope_cos_sin(positions) if rope is None else rope
        logits, hiddens = trunk(tokens, mask=mask, cache=cache, start=start, rope=rope, output_hidden_states=True)
        x = self.bottom_block(hiddens[-1], *rope, mask, cache, len(trunk.layers), start)
        return logits[..., self.image_offset:], self.bottom_head(self.bottom_norm(x))


def mix_heads(right_RSV: torch.Tensor, bottom_RSV: torch.Tensor, src_right: torch.Tensor,
              src_bottom: torch.Tensor) -> torch.Tensor:
    """Logits (R, n, V) of n tokens from the heads' outputs at S positions: token k takes the right head at
    src_right[k] and the bottom head at src_bottom[k], their mean where both are given, the one given otherwise
    (-1 = not given)."""
    r = right_RSV[:, src_right.clamp_min(0)]
    b = bottom_RSV[:, src_bottom.clamp_min(0)]
    has_r, has_b = (src_right >= 0)[:, None], (src_bottom >= 0)[:, None]
    return torch.where(has_r & has_b, (r + b) / 2, torch.where(has_r, r, b))


def diagonal_mask(layout: NARLayout, key_valid_BL: torch.Tensor) -> torch.Tensor:
    """(B, 1, L, L) bool: text causal over valid keys (`attention_mask`); image token (r, c) sees the text block and
    every image token with r' + c' <= r + c."""
    L, T0 = key_valid_BL.shape[1], layout.max_text_len + 1
    h, w = layout.grid
    t = torch.arange(L - T0, device=key_valid_BL.device)
    d = t // w + t % w  # anti-diagonal of each image input
    mask = attention_mask(key_valid_BL).clone()
    mask[:, :, T0:, T0:] = d[None, :] <= d[:, None]
    return mask


@dataclass
class NARBatch:
    tokens: torch.Tensor  # (B, L) text block + image ids 0..N-2 in raster order (unified ids)
    targets: torch.Tensor  # (B, N) image codes 0..N-1
    positions: torch.Tensor  # (B, L, 2)
    mask: torch.Tensor  # (B, 1, L, L) the diagonal mask


def build_batch(layout: NARLayout, text_ids, image_codes_BHW: torch.Tensor, cond_drop_prob: float = 0.0,
                generator: torch.Generator | None = None, *, tokenizer=None) -> NARBatch:
    """Teacher-forced training batch from condition ids and tokenizer codes (B, h, w)."""
    codes, text, text_valid = grid_batch(layout, text_ids, image_codes_BHW, cond_drop_prob, generator)
    B, dev = codes.shape[0], codes.device
    tokens = torch.cat([text, layout.vocab.image_to_unified(codes[:, :-1])], 1)
    valid = torch.cat([text_valid, torch.ones(B, codes.shape[1] - 1, dtype=torch.bool, device=dev)], 1)
    return NARBatch(tokens, codes, layout.positions(B, dev), diagonal_mask(layout, valid))


def _check_model(model: NARTransformer, layout: NARLayout) -> None:
    c = model.config
    if not isinstance(model, NARTransformer) or (c.vocab_size, c.image_vocab_size) != (
            layout.vocab.size, layout.vocab.image_vocab_size):
        raise ValueError(f"next_neighbor needs an NARTransformer over vocab size {layout.vocab.size} with "
                         f"{layout.vocab.image_vocab_size} image ids; got {type(model).__name__} "
                         f"(vocab_size {c.vocab_size}, image_vocab_size {getattr(c, 'image_vocab_size', None)})")


def loss_fn(model: NARTransformer, batch: NARBatch, layout: NARLayout) -> torch.Tensor:
    """Cross-entropy of every image token under its mixed logits."""
    _check_model(model, layout)
    right, bottom = model(batch.tokens, positions=batch.positions, mask=batch.mask)
    T0 = layout.max_text_len + 1
    src_right, src_bottom = layout.head_sources(batch.tokens.device)
    logits = mix_heads(right[:, T0 - 1:], bottom[:, T0 - 1:], src_right, src_bottom)  # shifted: <boi>, image 0..
    return F.cross_entropy(logits.flatten(0, 1).float(), batch.targets.flatten())


# ---- sampling: small functions, the loop stays visible -------------------------------------------------


def prefill(model: NARTransformer, text_RT, positions_T2, key_valid_RT, cache: KVCache):
    """Run the text block, filling the cache; the heads' logits at <boi>, each (R, 1, V)."""
    right, bottom = model(text_RT, positions=positions_T2[None], mask=attention_mask(key_valid_RT), cache=cache,
                          start=0)
    return right[:, -1:], bottom[:, -1:]


def decode_step(model: NARTransformer, tokens_Rn, positions_n2, key_valid_RS, cache: KVCache):
    """Feed one anti-diagonal (n tokens per row) at the cache end; it sees every slot written so far and itself.
    Returns the heads' logits at its tokens, each (R, n, V)."""
    R, n = tokens_Rn.shape
    mask = key_valid_RS[:, None, None, : cache.length + n].expand(R, 1, n, cache.length + n)
    return model(tokens_Rn, positions=positions_n2[None], mask=mask, cache=cache)


def watermark_key_order(layout: NARLayout) -> KeyOrder:
    """The watermark's key context of token (r, c): its left neighbour (then that one's left, ...), in the first
    column the token above: all decoded on earlier anti-diagonals. Keys are spent in decoding order."""
    h, w = layout.grid
    parents = tuple(t - 1 if t % w else t - w for t in range(h * w))  # t = 0 gives -w < 0: no parent
    return KeyOrder(tuple(max(p, -1) for p in parents), tuple(torch.cat(layout.diagonals()).tolist()))


@torch.no_grad()
def generate(model: NARTransformer, layout: NARLayout, text_ids: Sequence[Sequence[int]], sampling: SamplingConfig,
             generators: Sequence[torch.Generator] | None = None, *, tokenizer=None,
             callback: Callable[[int], None] | None = None, processor=None):
    """Sample image codes (B, h, w) for B condition id lists, one anti-diagonal per decoder pass. Returns the codes
    and their `GenerationCost` (h + w - 1 passes, the prompt pass included). `sampling.cfg_schedule`: constant
    (default) or linear over the passes. `processor`: a `mmgen.watermark.WatermarkProcessor`, keyed by
    `watermark_key_order`. Image b's tokens are drawn from generators[b] alone, diagonal by diagonal."""
    _check_model(model, layout)
    B, D, N = len(text_ids), layout.num_steps, layout.num_image_tokens
    schedule = sampling.schedule(DEFAULT_CFG_SCHEDULE)
    greedy = sampling.temperature == 0
    device = model.device
    use_cfg, text, valid, key_valid = prompt_block(layout, text_ids, sampling.guidance_scale, layout.seq_len, device,
                                                   generators)
    R, T0 = text.shape
    positions = layout.positions(1, device)[0]  # (L, 2): text, then image token k at T0 + k
    cache = model.new_cache(R, layout.seq_len)
    diagonals = layout.diagonals(device)
    src_right, src_bottom = layout.head_sources(device)
    # shifted position -> its row in the pass that computed it: <boi> in the prompt pass, image token k in its diagonal
    in_diagonal = torch.zeros(N, dtype=torch.long, device=device)
    for diag in diagonals:
        in_diagonal[diag] = torch.arange(len(diag), device=device)
    in_pass = torch.cat([torch.zeros(1, dtype=torch.long, device=device), in_diagonal[:-1]])
    codes = torch.zeros(B, N, dtype=torch.long, device=device)
    order = watermark_key_order(layout) if processor is not None else None

    right, bottom = prefill(model, text, positions[:T0], valid, cache)
    for d, diag in enumerate(diagonals):
        n = len(diag)
        src_r, src_b = src_right[diag], src_bottom[diag]
        logits = mix_heads(right, bottom, torch.where(src_r >= 0, in_pass[src_r.clamp_min(0)], -1),
                           torch.where(src_b >= 0, in_pass[src_b.clamp_min(0)], -1))
        weight = guidance_at(sampling.guidance_scale, d, D, schedule) if use_cfg else 1.0
        logits = process_logits(guide(logits.float(), weight, use_cfg).flatten(0, 1), sampling)  # (B n, V)
        if processor is not None:
            logits = processor.keyed_by(order, logits, codes, torch.arange(B, device=device).repeat_interleave(n),
                                        diag.repeat(B))
        gens = None if generators is None else [g for g in generators for _ in range(n)]
        codes[:, diag] = sample(logits, gens, greedy).view(B, n)
        if callback is not None:
            callback(d)
        if d + 1 == D:
            break
        tokens = layout.vocab.image_to_unified(codes[:, diag])
        tokens = torch.cat([tokens, tokens]) if use_cfg else tokens
        right, bottom = decode_step(model, tokens, positions[T0 + diag], key_valid, cache)
    return codes.view(B, *layout.grid), GenerationCost(D)
