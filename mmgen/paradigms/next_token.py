"""Raster next-token prediction for text-to-image (LlamaGen, Sun et al. 2024; Lumina-mGPT, Liu et al. 2024).

Sequence layout (one unified vocabulary, see `mmgen.text`)::

    [PAD ... PAD] [text ids] <boi> [image ids, raster order] <eoi>
    |---------- max_text_len ---------|

Text is left-padded so every sample's <boi> sits at the same index, which lets a batch decode in lock step
with one static KV cache. Pads are masked out as keys. Conditioning is dropped to the single token <null> with
probability `cond_drop_prob` (10% by default) so one model gives both terms of classifier-free guidance.

Positions are 2-D: a text token at sequence index i gets (i, i); image token (r, c) gets (o + r, o + c)
with o the index just after <boi>, so rows and columns are explicit to the 2-D RoPE.

Sampling is split into gpt-fast style small functions: `prefill` runs the prompt once, `decode_step`
feeds one token; `generate` is only the loop.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mmgen.models.compiled_decode import (WINDOW_PASS_COST, compiled_decode_step, compiled_window_step,
                                          measure_pass_costs, window_widths)
from mmgen.models.transformer import KVCache, Transformer
from mmgen.paradigms.protocol import FlowConfig, GenerationCost, ModelConfig
from mmgen.sampling.logits import RowRandom, SamplingConfig, guidance_at, guide, process_logits, sample
from mmgen.paradigms.sequence import IGNORE_INDEX, attention_mask, guided_text_block, text_block
from mmgen.sampling.sjd import PassCost, SJDConfig, SJDStats, jacobi_sample, speculation_pays, window_mask
from mmgen.text import UnifiedVocab

@dataclass
class NextTokenLayout:
    vocab: UnifiedVocab
    max_text_len: int
    grid: tuple[int, int]  # (h, w) image token grid
    rope_2d: bool = True  # False: plain 1-D positions (both coordinates = sequence index), LLaMA's layout

    @property
    def num_image_tokens(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def boi_index(self) -> int:
        return self.max_text_len

    @property
    def seq_len(self) -> int:
        return self.max_text_len + 1 + self.num_image_tokens + 1

    def positions(self, batch_size: int, device=None) -> torch.Tensor:
        """(B, seq_len, 2) integer positions for the full sequence."""
        if not self.rope_2d:
            idx = torch.arange(self.seq_len, device=device)
            return torch.stack([idx, idx], -1).unsqueeze(0).expand(batch_size, -1, -1)
        h, w = self.grid
        idx = torch.arange(self.boi_index + 1, device=device)
        text = torch.stack([idx, idx], -1)
        o = self.boi_index + 1
        rows, cols = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
        image = torch.stack([rows.flatten() + o, cols.flatten() + o], -1)
        eoi = torch.tensor([[o + h, o + w]], device=device)
        return torch.cat([text, image, eoi]).unsqueeze(0).expand(batch_size, -1, -1)


DEFAULT_CFG_SCHEDULE = "constant"
TOKENS = "codes"  # VQGAN codes (h, w), or SEED's 1-D causal codes as a (1, N) grid


def make_layout(tokenizer, vocab: UnifiedVocab, max_text_len: int, model: ModelConfig,
                flow: FlowConfig | None = None) -> NextTokenLayout:
    return NextTokenLayout(vocab, max_text_len, tuple(tokenizer.token_shape), rope_2d=model.rope_2d)


def layout_from_model(decoder: Transformer, tokenizer, vocab: UnifiedVocab, max_text_len: int) -> NextTokenLayout:
    return NextTokenLayout(vocab, max_text_len, tuple(tokenizer.token_shape), rope_2d=decoder.config.rope_2d)


def make_model(layout: NextTokenLayout, model: ModelConfig, flow: FlowConfig | None = None) -> Transformer:
    return Transformer(vocab_size=layout.vocab.size, max_seq_len=layout.seq_len, rope_2d=layout.rope_2d,
                       **model.backbone())


@dataclass
class NextTokenBatch:
    tokens: torch.Tensor  # (B, L) model input
    targets: torch.Tensor  # (B, L) next ids, IGNORE_INDEX outside image tokens and <eoi>
    positions: torch.Tensor  # (B, L, 2)
    mask: torch.Tensor  # (B, 1, L, L)


class TextTable:
    """Every caption's text block (`text_block`), built once: a training step then gathers rows on the device
    instead of padding Python lists. `rows(idx)` goes to `build_batch` in place of the id lists."""

    def __init__(self, layout: NextTokenLayout, text_ids: Sequence[Sequence[int]], device=None):
        self.tokens, self.valid = (t.to(device) for t in text_block(layout, text_ids))

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def rows(self, idx) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.as_tensor(idx, device=self.tokens.device)
        return self.tokens[idx], self.valid[idx]


def build_batch(layout: NextTokenLayout, text_ids, image_codes_BHW: torch.Tensor, cond_drop_prob: float = 0.0,
                generator: torch.Generator | None = None, *, tokenizer=None) -> NextTokenBatch:
    """Teacher-forced training batch from caption ids (lists, or `TextTable.rows`) and tokenizer codes; built on
    the codes' device."""
    B = image_codes_BHW.shape[0]
    if tuple(image_codes_BHW.shape[1:]) != tuple(layout.grid):
        raise ValueError(f"image codes have grid {tuple(image_codes_BHW.shape[1:])}, the model expects {layout.grid}")
    dev = image_codes_BHW.device
    drop = torch.rand(B, generator=generator) < cond_drop_prob if cond_drop_prob > 0 else None
    if isinstance(text_ids, tuple) and len(text_ids) == 2 and torch.is_tensor(text_ids[0]):
        text, text_valid = (t.to(dev) for t in text_ids)
        if drop is not None:
            null, null_valid = (t.to(dev) for t in text_block(layout, [[]]))
            keep = ~drop.to(dev)[:, None]
            text, text_valid = torch.where(keep, text, null), torch.where(keep, text_valid, null_valid)
    else:
        text, text_valid = (t.to(dev) for t in text_block(layout, text_ids, drop))
    image = layout.vocab.image_to_unified(image_codes_BHW.reshape(B, -1))
    eoi = torch.full((B, 1), layout.vocab.eoi, dtype=torch.long, device=dev)
    seq = torch.cat([text, image, eoi], 1)
    valid = torch.cat([text_valid, torch.ones(B, image.shape[1] + 1, dtype=torch.bool, device=dev)], 1)
    targets = seq[:, 1:].clone()
    targets[:, : layout.boi_index] = IGNORE_INDEX  # loss on image tokens (and <eoi>) only
    return NextTokenBatch(seq[:, :-1], targets, layout.positions(B, dev)[:, :-1], attention_mask(valid[:, :-1]))


def loss_fn(model: Transformer, batch: NextTokenBatch, layout: NextTokenLayout | None = None) -> torch.Tensor:
    logits = model(batch.tokens, positions=batch.positions, mask=batch.mask)
    return F.cross_entropy(logits.flatten(0, 1).float(), batch.targets.flatten(), ignore_index=IGNORE_INDEX)


def loss_and_image_hidden(model: Transformer, batch: NextTokenBatch, layout: NextTokenLayout, layer: int):
    """The AR loss and the hidden states after block `layer` at the image-token positions (B, h*w, C),
    for alignment losses (`mmgen.alignment`)."""
    logits, hiddens = model(batch.tokens, positions=batch.positions, mask=batch.mask, output_hidden_states=True)
    ce = F.cross_entropy(logits.flatten(0, 1).float(), batch.targets.flatten(), ignore_index=IGNORE_INDEX)
    start = layout.boi_index + 1
    return ce, hiddens[layer - 1][:, start: start + layout.num_image_tokens]


# ---- sampling: small functions, the loop stays visible -------------------------------------------------


def prefill(model: Transformer, tokens_BT, positions_BT2, key_valid_BT, cache: KVCache) -> torch.Tensor:
    """Run the prompt through the model, filling the cache; returns last-position logits (B, V)."""
    logits = model(tokens_BT, positions=positions_BT2, mask=attention_mask(key_valid_BT), cache=cache, start=0)
    return logits[:, -1]


def decode_step(model: Transformer, token_B, position_B2, key_valid_BS, cache: KVCache, rope=None) -> torch.Tensor:
    """Feed one token per row at the cache end; returns its logits (B, V). `key_valid_BS` is bool (True = may
    attend) or the same as an additive float mask (0 / -inf: what attention turns a bool mask into, so a loop
    builds it once); `rope`: this step's (cos, sin) from `Transformer.rope_cos_sin`, in place of positions."""
    S = cache.length + 1
    mask = key_valid_BS[:, None, None, :S]
    positions = None if rope is not None else position_B2[:, None]
    logits = model(token_B[:, None], positions=positions, mask=mask, cache=cache, rope=rope)
    return logits[:, -1]


def image_logits(layout: NextTokenLayout, logits_BV: torch.Tensor, guidance_scale: float,
                 use_cfg: bool | None = None) -> torch.Tensor:
    """Restrict to image ids and apply CFG; the batch is [cond rows; uncond rows] when guidance is on (`use_cfg`,
    by default guidance_scale != 1; a ramp may pass scale 1 at its first step with the rows still doubled)."""
    off = layout.vocab.image_offset
    return guided_logits(logits_BV[:, off: off + layout.vocab.image_vocab_size], guidance_scale, use_cfg)


def guided_logits(logits_BV: torch.Tensor, guidance_scale: float, use_cfg: bool | None = None) -> torch.Tensor:
    """`image_logits` for logits already restricted to the image ids."""
    return guide(logits_BV.float(), guidance_scale, guidance_scale != 1.0 if use_cfg is None else use_cfg)


@torch.no_grad()
def generate(model: Transformer, layout: NextTokenLayout, text_ids: Sequence[Sequence[int]], sampling: SamplingConfig,
             generators: Sequence[torch.Generator] | None = None, *, tokenizer=None,
             callback: Callable[[int], None] | None = None, processor: Callable | None = None,
             compile: bool = False):
    """Sample image codes (B, h, w) for B tokenized prompts. Returns codes and their `GenerationCost`.
    `sampling.cfg_schedule`: guidance constant (default), or ramped linearly from 1 at the first token to
    `sampling.guidance_scale`.

    `processor(logits (B, V), prefix (B, L), lengths (B,))` runs after the standard processors on the final
    sampling distribution (e.g. `mmgen.watermark.WatermarkProcessor`).

    `compile`: decode through `mmgen.models.compiled_decode` (torch.compile of the one-token step, compiled once
    per batch size and kept on the model; the same values up to float rounding)."""
    cfg_schedule = sampling.schedule(DEFAULT_CFG_SCHEDULE)
    B = len(text_ids)
    use_cfg = sampling.guidance_scale != 1.0
    device = model.device
    text, valid = guided_text_block(layout, text_ids, use_cfg, device)
    R = text.shape[0]
    positions = layout.positions(R, device)
    n_img, T0 = layout.num_image_tokens, text.shape[1]
    cache = model.new_cache(R, T0 + n_img)
    key_valid = torch.ones(R, T0 + n_img, dtype=torch.bool, device=device)
    key_valid[:, :T0] = valid
    greedy = sampling.temperature == 0
    codes = torch.zeros(B, n_img, dtype=torch.long, device=device)
    # built once instead of every step: the keys' additive mask, the rotary table, the rows' noise
    key_bias = torch.zeros(key_valid.shape, device=device).masked_fill(~key_valid, float("-inf"))
    cos, sin = model.rope_cos_sin(positions[:1])
    noise = None if greedy else RowRandom(generators, B, device).race_noise_steps(n_img, layout.vocab.image_vocab_size)

    image_rows = (layout.vocab.image_offset, layout.vocab.image_vocab_size)
    logits = prefill(model, text, positions[:, :T0], valid, cache)[:, image_rows[0]: sum(image_rows)]
    step = compiled_decode_step(model) if compile else None
    if step is not None:
        key_bias[:, T0:] = float("-inf")  # the compiled step attends every slot: image slots open as written
    for i in range(n_img):
        guidance = guidance_at(sampling.guidance_scale, i, n_img, cfg_schedule) if use_cfg else 1.0
        logits = process_logits(guided_logits(logits, guidance, use_cfg), sampling)
        if processor is not None:
            logits = processor(logits, codes, torch.full((B,), i, dtype=torch.long, device=device))
        codes[:, i] = sample(logits, generators, greedy, None if noise is None else next(noise))
        if callback is not None:
            callback(i)
        if i + 1 == n_img:
            break
        token = layout.vocab.image_to_unified(codes[:, i])
        token = torch.cat([token, token]) if use_cfg else token
        slot = slice(T0 + i, T0 + i + 1)
        if step is not None:
            logits = step(token, cos[0, slot], sin[0, slot], key_bias, cache, head_rows=image_rows)
            key_bias[:, slot] = 0.0
        else:
            logits = decode_step(model, token, None, key_bias, cache, rope=(cos[:, slot], sin[:, slot]))
            logits = logits[:, image_rows[0]: sum(image_rows)]
    return codes.view(B, *layout.grid), GenerationCost(n_img)


class NextTokenBackend:
    """`mmgen.sampling.sjd.JacobiBackend` for this paradigm. The first pass runs the prompt and the first
    window together; every later pass writes its window at per-row cache offsets (row a's window starts at
    the slot of its last committed image token) and sees its own committed prefix only. `compile`: the passes
    after the first (which carries the prompt) run through the compiled window step
    (`mmgen.models.compiled_decode.WindowStep`) over every row of the batch, finished ones included (a compiled
    shape per row count would recompile as samples finish); no token trees then."""

    supports_leaves = True  # forward(..., leaves=) scores a token tree (SJDConfig.tree_width)

    def __init__(self, model: Transformer, layout: NextTokenLayout, text_ids: Sequence[Sequence[int]],
                 guidance_scale: float, window: int, leaves: int = 0, compile: bool = False):
        self.model, self.layout, self.guidance_scale = model, layout, guidance_scale
        self.num_samples, self.vocab_size = len(text_ids), layout.vocab.image_vocab_size
        self.device = model.device
        self.use_cfg = guidance_scale != 1.0
        text, valid = guided_text_block(layout, text_ids, self.use_cfg, self.device)
        self.text, self.prefix = text, text.shape[1] - 1  # text slots before <boi>
        R, n_img = text.shape[0], layout.num_image_tokens
        self.capacity = self.prefix + n_img + window + leaves
        self.key_valid = torch.ones(R, self.capacity, dtype=torch.bool, device=self.device)
        self.key_valid[:, : self.prefix] = valid[:, : self.prefix]
        pos = layout.positions(1, self.device)[0]  # (seq_len, 2): slot -> 2-D position
        self.slot_positions = torch.cat([pos, pos[-1:].expand(self.capacity - len(pos), 2)])
        self.cache = model.new_cache(R, self.capacity)
        self.prefilled = False
        if compile and leaves:
            raise ValueError("the compiled window step scores chains only; token trees (leaves) run eagerly")
        self.window_step = compiled_window_step(model, window) if compile else None
        self.live = torch.arange(self.num_samples, device=self.device)  # compiled: the active samples' rows
        self.rope = tuple(t[0] for t in model.rope_cos_sin(self.slot_positions[None]))  # slot -> (cos, sin)

    def forward(self, window_AT: torch.Tensor, n_A: torch.Tensor,
                leaves: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """`leaves` (tokens (A, M), depth (M,)): extra candidates scored in the same pass (a token tree). Leaf m is
        a candidate for the token at window position depth[m]: it sits at that token's position, sees the
        committed prefix and the window's drafts before it, and its output (appended after the window's T)
        is the distribution of the token after it."""
        A, T = window_AT.shape
        tokens = self.layout.vocab.image_to_unified(window_AT)
        tokens[:, 0] = torch.where(n_A == 0, self.layout.vocab.boi, tokens[:, 0])
        M = 0 if leaves is None else leaves[0].shape[1]
        if M:
            tokens = torch.cat([tokens, self.layout.vocab.image_to_unified(leaves[0])], 1)
        start = self.prefix + n_A  # slot of row a's last committed token (<boi> is slot prefix)
        if self.window_step is not None and self.prefilled:
            return self._compiled_forward(tokens, start)
        if self.use_cfg:
            tokens, start = torch.cat([tokens, tokens]), torch.cat([start, start])
        lead = 0
        if not self.prefilled:  # the first pass carries the prompt: no separate prefill pass
            tokens, start = torch.cat([self.text[:, : self.prefix], tokens], 1), torch.zeros_like(start)
            lead, self.prefilled = self.prefix, True
        slots = start[:, None] + torch.arange(tokens.shape[1], device=self.device)
        S = int(start.max()) + tokens.shape[1]
        if not M:
            mask = window_mask(slots, self.key_valid[:, :S])
            positions = self.slot_positions[slots]
        else:  # a leaf sees keys up to its parent's slot, and itself; it takes its own token's position
            seen = slots.clone()
            seen[:, lead + T:] = slots[:, lead:lead + 1] + leaves[1].to(self.device)[None, :]
            keys = torch.arange(S, device=self.device)[None, None, :]
            mask = ((keys <= seen[:, :, None]) & self.key_valid[:, None, :S]) | (keys == slots[:, :, None])
            positions = self.slot_positions[seen.clone()]
            positions[:, lead + T:] = self.slot_positions[seen[:, lead + T:] + 1]
        logits = self.model(tokens, positions=positions, mask=mask.unsqueeze(1),
                            cache=self.cache, start=start)[:, -(T + M):]
        return image_logits(self.layout, logits.flatten(0, 1), self.guidance_scale).view(A, T + M, -1)

    def _compiled_forward(self, tokens_AT: torch.Tensor, start_A: torch.Tensor) -> torch.Tensor:
        """The window step over every sample's rows: finished samples run a window at <boi> (their own cache rows,
        never read again) and their outputs are dropped."""
        A, T = tokens_AT.shape
        tokens = torch.full((self.num_samples, T), self.layout.vocab.boi, device=self.device).index_copy(
            0, self.live, tokens_AT)
        start = torch.full((self.num_samples,), self.prefix, device=self.device).index_copy(0, self.live, start_A)
        if self.use_cfg:
            tokens, start = torch.cat([tokens, tokens]), torch.cat([start, start])
        slots = start[:, None] + torch.arange(T, device=self.device)
        logits = self.window_step(tokens, self.rope[0][slots], self.rope[1][slots], start, self.key_valid,
                                  self.cache, head_rows=(self.layout.vocab.image_offset, self.vocab_size))
        return guided_logits(logits.flatten(0, 1), self.guidance_scale).view(self.num_samples, T, -1)[self.live]

    def keep(self, keep_A: torch.Tensor) -> None:
        rows = keep_A.nonzero().squeeze(-1)
        if self.window_step is not None:
            self.live = self.live[rows]
            return
        if self.use_cfg:
            rows = torch.cat([rows, rows + len(keep_A)])
        self.cache.reorder(rows)
        self.key_valid, self.text = self.key_valid[rows], self.text[rows]


def window_pass_cost(model: Transformer, sjd: SJDConfig, backend: NextTokenBackend, ar_capacity: int) -> PassCost:
    """What adaptive widths weigh the compiled verify pass by, over all of `backend`'s rows: with shared noise,
    where the widths cannot change the tokens, this machine's measured times (`measure_pass_costs`), else the fixed
    constants of `WINDOW_PASS_COST` (so SJD's acceptance keeps reproducible widths)."""
    device = model.device.type if model.device.type in WINDOW_PASS_COST else "cuda"
    rows = backend.cache.batch_size
    if sjd.shared_noise:
        table, step = measure_pass_costs(model, rows, sjd.window, backend.capacity, ar_capacity,
                                         (backend.layout.vocab.image_offset, backend.vocab_size))
        return PassCost(table=table, step=step, all_rows=True)
    floor, step_floor = WINDOW_PASS_COST[device]
    table = tuple((w, floor + rows * w) for w in window_widths(sjd.window, device))
    return PassCost(floor, table, step_floor + rows, all_rows=True)


@torch.no_grad()
def generate_sjd(model: Transformer, layout: NextTokenLayout, text_ids: Sequence[Sequence[int]],
                 sampling: SamplingConfig, sjd: SJDConfig = SJDConfig(),
                 generators: Sequence[torch.Generator] | None = None,
                 callback: Callable[[int], None] | None = None, processor: Callable | None = None,
                 neighbours: torch.Tensor | None = None, compile: bool = False):
    """Like `generate`, with speculative Jacobi decoding. Returns codes (B, h, w) and `SJDStats`. `neighbours`: the
    codebook neighbour table of a lossy acceptance (`SJDConfig.lantern_delta`).

    `compile`: verify passes through the compiled window step (`NextTokenBackend`); adaptive widths then choose
    among its compiled widths by their cost (`window_pass_cost`), and a batch for which no width is expected to pay
    is sampled by plain AR through the compiled decode step instead (exact either way)."""
    B, N = len(text_ids), layout.num_image_tokens
    backend = NextTokenBackend(model, layout, text_ids, sampling.guidance_scale, sjd.window,
                               leaves=sjd.tree_depth * sjd.tree_width, compile=compile)
    cost = None
    if compile and sjd.adaptive:
        cost = window_pass_cost(model, sjd, backend, ar_capacity=backend.prefix + 1 + N)  # generate's cache
        if not speculation_pays(cost, sjd, B, backend.cache.batch_size, N):
            codes, _ = generate(model, layout, text_ids, sampling, generators, processor=processor, compile=True,
                                callback=None if callback is None else lambda i: callback(i + 1))
            return codes, SJDStats(tokens=N, decoder_passes=N, passes=[N] * B)
    codes, stats = jacobi_sample(backend, N, sampling, sjd, generators, grid_width=layout.grid[1], callback=callback,
                                 processor=processor, neighbours=neighbours, cost=cost)
    return codes.view(B, *layout.grid), stats
