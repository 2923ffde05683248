"""Next-scale prediction for text-to-image (VAR, Tian et al., 2024, "Visual Autoregressive Modeling: Scalable
Image Generation via Next-Scale Prediction", arXiv 2404.02905), on the multi-scale residual tokenizer
`tokenizers_vis.multiscale.MultiScaleVQGAN`.

Sequence layout (one unified vocabulary, see `mmgen.text`)::

    [PAD ... PAD] [text ids] <boi> [inputs of scale 2] [inputs of scale 3] ... [inputs of scale K]
    |---------- max_text_len ---------|

The text block is next_token's (left-padded, <null> for unconditional rows). <boi> plays VAR's start token: it
predicts scale 1 (s_1 = 1, one token). The inputs of scale k are the tokenizer's f_hat after scales 1..k-1,
area-downsampled to s_k x s_k (`MultiScaleVQGAN.next_scale_inputs`), projected by `word_embed`, plus a
learned level embedding; position j of scale k predicts token j of scale k. Attention is block-causal: a scale
sees the text, <boi> and every scale up to itself (full attention inside a scale), so a whole scale is
predicted in one forward pass.

Positions are 2-D: text index i -> (i, i); token (r, c) of an s_k x s_k scale sits at the center of the cell
it covers in the finest G x G grid, o + (r + 0.5) G / s_k - 0.5 on each axis (o = the index after <boi>), so
RoPE relates a coarse token to the fine tokens under it. Positions are floats; `level_emb` tells scales apart.

Sampling follows gpt-fast's split into small functions (`prefill`, `scale_step`); `generate` is the loop,
one forward pass per scale with a KV cache. CFG batches conditional and <null> rows; guidance is constant or
ramps linearly over scales, w_k = 1 + (w - 1) k / (K - 1) (VAR's and FlowAR's schedule).

Letters: B batch (R = rows incl. the unconditional half), T0 = max_text_len + 1 text block, L image input
positions, N image tokens, V vocabulary, C model width, K scales.
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
from mmgen.paradigms.protocol import FlowConfig, GenerationCost, ModelConfig
from mmgen.paradigms.sequence import prompt_block, text_block
from mmgen.sampling.logits import SamplingConfig, guidance_at, guide, process_logits, sample
from mmgen.text import UnifiedVocab

def _check_scales(scales) -> tuple[int, ...]:
    sc = tuple(scales)
    if (not sc or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in sc)
            or any(a >= b for a, b in zip(sc, sc[1:])) or sc[0] != 1):
        # <boi> is the single start position, VAR's start token, so scale 1 must be one token
        raise ValueError(f"scales must be strictly increasing positive ints starting at 1, got {scales!r}")
    return sc


@dataclass
class NextScaleLayout:
    vocab: UnifiedVocab
    max_text_len: int
    scales: tuple[int, ...]
    feature_dim: int | None = None  # the tokenizer's code-vector width (the decoder's input features)

    def __post_init__(self):
        self.scales = _check_scales(self.scales)

    @property
    def num_image_tokens(self) -> int:
        return sum(s * s for s in self.scales)

    @property
    def boi_index(self) -> int:
        return self.max_text_len

    @property
    def seq_len(self) -> int:
        return self.max_text_len + 1 + self.num_image_tokens - self.scales[0] ** 2

    def scale_slices(self) -> list[tuple[int, int]]:
        """[start, end) in the sequence of the positions that predict each scale: <boi> for scale 1, then
        the inputs of scale k for k >= 2."""
        out, start = [(self.boi_index, self.boi_index + 1)], self.boi_index + 1
        for s in self.scales[1:]:
            out.append((start, start + s * s))
            start += s * s
        return out

    def levels(self, device=None) -> torch.Tensor:
        """(L,) scale index (0-based) of every image input position."""
        sizes = torch.tensor([s * s for s in self.scales], device=device)
        return torch.arange(len(self.scales), device=device).repeat_interleave(sizes)[1:]  # s_1 = 1 is <boi>

    def positions(self, batch_size: int, device=None) -> torch.Tensor:
        """(B, seq_len, 2) float positions: text on the diagonal, scale tokens at their cell centers."""
        idx = torch.arange(self.boi_index + 1, device=device, dtype=torch.float32)
        parts = [torch.stack([idx, idx], -1)]
        o, G = self.boi_index + 1, self.scales[-1]
        for s in self.scales[1:]:
            centers = o + (torch.arange(s, device=device, dtype=torch.float32) + 0.5) * G / s - 0.5
            rows, cols = torch.meshgrid(centers, centers, indexing="ij")
            parts.append(torch.stack([rows.flatten(), cols.flatten()], -1))
        return torch.cat(parts).unsqueeze(0).expand(batch_size, -1, -1)

    def block_mask(self) -> torch.Tensor:
        """(seq_len, seq_len) bool, True = may attend, before pads are masked: causal over the text block,
        then one block per scale that sees everything up to and including itself."""
        T0 = self.boi_index + 1
        block = torch.cat([torch.arange(T0), T0 - 1 + self.levels()])  # a key is visible iff its block <= the query's
        return block[None, :] <= block[:, None]


def full_mask(layout: NextScaleLayout, key_valid_BS: torch.Tensor) -> torch.Tensor:
    """(B, 1, S, S) block mask with pad keys hidden; a query always sees itself so no softmax row is empty."""
    S = key_valid_BS.shape[1]
    eye = torch.eye(S, dtype=torch.bool, device=key_valid_BS.device)
    return ((layout.block_mask().to(key_valid_BS.device) & key_valid_BS[:, None, :]) | eye).unsqueeze(1)


class NextScaleModel(ModelMixin, ConfigMixin):
    """The decoder transformer plus VAR's input side: `word_embed` for the continuous scale inputs and one
    learned embedding per scale. Forward only."""

    @register_to_config
    def __init__(
        self,
        vocab_size: int,
        feature_dim: int,
        scales: tuple[int, ...],
        dim: int = 256,
        n_layers: int = 6,
        n_heads: int = 8,
        n_kv_heads: int | None = None,
        mlp_hidden: int | None = None,
        max_seq_len: int = 256,
        rope_theta: float = 10000.0,
        norm_eps: float = 1e-5,
    ):
        super().__init__()
        if not isinstance(feature_dim, int) or feature_dim < 1:
            raise ValueError(f"feature_dim must be a positive int (the tokenizer's embed_dim), got {feature_dim!r}")
        self.register_to_config(scales=_check_scales(scales))  # a tuple, also after a JSON round trip
        self.transformer = Transformer(vocab_size, dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads,
                                       mlp_hidden=mlp_hidden, max_seq_len=max_seq_len, rope_theta=rope_theta,
                                       rope_2d=True, norm_eps=norm_eps)
        self.word_embed = nn.Linear(feature_dim, dim)
        self.level_emb = nn.Embedding(len(scales), dim)
        nn.init.normal_(self.level_emb.weight, std=0.02)

    def new_cache(self, batch_size: int, max_len: int | None = None) -> KVCache:
        return self.transformer.new_cache(batch_size, max_len)

    def forward(
        self,
        text_tokens: torch.Tensor | None,
        scale_inputs: torch.Tensor | None,
        positions: torch.Tensor,
        mask: torch.Tensor,
        cache: KVCache | None = None,
        start: int | None = None,
        levels: torch.Tensor | None = None,
        output_hidden_states: bool = False,
    ):
        """Logits (B, T0 + L, V) over the unified vocabulary for text tokens (B, T0) followed by scale inputs
        (B, L, feature_dim) with their scale indices `levels` (L,) or (B, L); either part may be None.

        The last text token is <boi>, VAR's start position: it gets level 0's embedding, as VAR's start tokens do.
        positions (B, T0 + L, 2) float, mask (B, 1, T0 + L, S) bool; cache/start as in `Transformer.forward`.
        """
        parts = []
        if text_tokens is not None:
            x_BTC = self.transformer.tok_emb(text_tokens)
            parts.append(torch.cat([x_BTC[:, :-1], x_BTC[:, -1:] + self.level_emb.weight[0]], 1))
        if scale_inputs is not None:
            if levels is None:
                raise ValueError("levels (the scale index of every scale input) are required with scale_inputs")
            parts.append(self.word_embed(scale_inputs) + self.level_emb(levels))
        if not parts:
            raise ValueError("give text_tokens, scale_inputs or both")
        x = torch.cat(parts, 1) if len(parts) > 1 else parts[0]
        return self.transformer(inputs_embeds=x, positions=positions, mask=mask, cache=cache, start=start,
                                output_hidden_states=output_hidden_states)


DEFAULT_CFG_SCHEDULE = "constant"  # VAR also offers the linear ramp
TOKENS = "scale_codes"  # MultiScaleVQGAN: every scale's ids, flattened and concatenated coarse to fine


def make_layout(tokenizer, vocab: UnifiedVocab, max_text_len: int, model: ModelConfig | None = None,
                flow: FlowConfig | None = None) -> NextScaleLayout:
    return NextScaleLayout(vocab, max_text_len, tuple(tokenizer.scales), tokenizer.feature_dim)


def layout_from_model(decoder: NextScaleModel, tokenizer, vocab: UnifiedVocab, max_text_len: int) -> NextScaleLayout:
    if tuple(decoder.config.scales) != tuple(tokenizer.scales):
        raise ValueError(f"transformer scales {tuple(decoder.config.scales)} differ from the tokenizer's "
                         f"{tuple(tokenizer.scales)}")
    return make_layout(tokenizer, vocab, max_text_len)


def make_model(layout: NextScaleLayout, model: ModelConfig, flow: FlowConfig | None = None) -> NextScaleModel:
    return NextScaleModel(vocab_size=layout.vocab.size, feature_dim=layout.feature_dim, scales=list(layout.scales),
                          max_seq_len=layout.seq_len, **model.backbone())


def _check_model(model: NextScaleModel, layout: NextScaleLayout) -> None:
    if model.config.vocab_size != layout.vocab.size or tuple(model.config.scales) != layout.scales:
        raise ValueError(f"the model (vocab_size {model.config.vocab_size}, scales {tuple(model.config.scales)}) "
                         f"does not fit the layout (vocab size {layout.vocab.size}, scales {layout.scales})")


def _check_tokenizer(layout: NextScaleLayout, vq) -> None:
    if tuple(vq.scales) != layout.scales:
        raise ValueError(f"the tokenizer's scales {tuple(vq.scales)} differ from the layout's {layout.scales}")
    if vq.vocab_size != layout.vocab.image_vocab_size:
        raise ValueError(f"the tokenizer has {vq.vocab_size} codes, the vocabulary's image_vocab_size is "
                         f"{layout.vocab.image_vocab_size}")


@dataclass
class NextScaleBatch:
    text: torch.Tensor  # (B, T0) text block ending with <boi>
    scale_inputs: torch.Tensor  # (B, L, feature_dim) teacher-forced inputs of scales 2..K
    targets: torch.Tensor  # (B, N) image ids (codebook space), all scales raster, coarse to fine
    levels: torch.Tensor  # (L,) scale index of each input
    positions: torch.Tensor  # (B, seq_len, 2) float
    mask: torch.Tensor  # (B, 1, seq_len, seq_len) bool


def build_batch(layout: NextScaleLayout, text_ids, tokens_BL: torch.Tensor, cond_drop_prob: float = 0.0,
                generator: torch.Generator | None = None, *, tokenizer) -> NextScaleBatch:
    """Teacher-forced training batch from caption ids and the tokenizer's scale codes (B, L)
    (`encode_tokens`); the tokenizer turns them into the inputs of scales 2..K."""
    vq = tokenizer
    _check_tokenizer(layout, vq)
    ids_list = vq.split_scales(tokens_BL)
    B = ids_list[0].shape[0]
    if len(text_ids) != B:
        raise ValueError(f"got {len(text_ids)} captions for {B} images")
    dev = ids_list[0].device  # the batch lives where the codes are, whatever device the tokenizer is on
    with torch.no_grad():
        inputs = vq.next_scale_inputs(ids_list).to(dev)  # validates the ids
    drop = torch.rand(B, generator=generator) < cond_drop_prob if cond_drop_prob > 0 else None
    text, text_valid = text_block(layout, text_ids, drop)
    valid = torch.cat([text_valid, torch.ones(B, inputs.shape[1], dtype=torch.bool)], 1).to(dev)
    targets = torch.cat([ids.reshape(B, -1) for ids in ids_list], 1).long().to(dev)
    return NextScaleBatch(text.to(dev), inputs, targets, layout.levels(dev), layout.positions(B, dev),
                          full_mask(layout, valid))


def _image_logits(layout: NextScaleLayout, logits_BTV: torch.Tensor) -> torch.Tensor:
    """Logits of the positions that predict image tokens (<boi> and the scale inputs), image ids only."""
    off = layout.vocab.image_offset
    return logits_BTV[:, layout.boi_index:, off: off + layout.vocab.image_vocab_size].float()


def _forward_batch(model: NextScaleModel, batch: NextScaleBatch, output_hidden_states: bool = False):
    return model(batch.text, batch.scale_inputs, batch.positions, batch.mask, levels=batch.levels,
                 output_hidden_states=output_hidden_states)


def loss_fn(model: NextScaleModel, batch: NextScaleBatch, layout: NextScaleLayout) -> torch.Tensor:
    _check_model(model, layout)
    logits = _image_logits(layout, _forward_batch(model, batch))  # (B, N, V_img)
    return F.cross_entropy(logits.flatten(0, 1), batch.targets.flatten())


def loss_and_image_hidden(model: NextScaleModel, batch: NextScaleBatch, layout: NextScaleLayout, layer: int):
    """The loss and the hidden states after block `layer` at the N positions that predict image tokens
    (B, N, C), for alignment losses (`mmgen.alignment`)."""
    _check_model(model, layout)
    logits, hiddens = _forward_batch(model, batch, output_hidden_states=True)
    ce = F.cross_entropy(_image_logits(layout, logits).flatten(0, 1), batch.targets.flatten())
    return ce, hiddens[layer - 1][:, layout.boi_index:]


# ---- sampling: small functions, the loop stays visible -------------------------------------------------


def guidance_schedule(guidance_scale: float, num_scales: int, schedule: str = "constant") -> list[float]:
    """Guidance weight per scale: constant w, or VAR/FlowAR's ramp w_k = 1 + (w - 1) k / (K - 1)."""
    return [guidance_at(guidance_scale, k, num_scales, schedule) for k in range(num_scales)]


def prefill(model: NextScaleModel, text_RT, positions_RT2, mask_R1TT, cache: KVCache) -> torch.Tensor:
    """Run the text block; returns the logits at <boi>, which predict scale 1, as (R, 1, V)."""
    return model(text_RT, None, positions_RT2, mask_R1TT, cache=cache, start=0)[:, -1:]


def scale_step(model: NextScaleModel, inputs_RlC, level: int, positions_Rl2, mask_R1lS, cache: KVCache):
    """Feed one scale's l = s_k^2 inputs at the cache end; returns their logits (R, l, V)."""
    levels = torch.full(inputs_RlC.shape[1:2], level, dtype=torch.long, device=inputs_RlC.device)
    return model(None, inputs_RlC, positions_Rl2, mask_R1lS, cache=cache, levels=levels)


def guided_image_logits(layout: NextScaleLayout, logits_RlV: torch.Tensor, guidance_scale: float,
                        use_cfg: bool) -> torch.Tensor:
    """Restrict to image ids and apply CFG over [cond rows; uncond rows] (`guide`)."""
    off = layout.vocab.image_offset
    return guide(logits_RlV[..., off: off + layout.vocab.image_vocab_size].float(), guidance_scale, use_cfg)


@torch.no_grad()
def generate(model: NextScaleModel, layout: NextScaleLayout, text_ids: Sequence[Sequence[int]],
             sampling: SamplingConfig, generators: Sequence[torch.Generator] | None = None, *, tokenizer,
             callback: Callable[[int], None] | None = None):
    """Sample the scale codes (B, L) (every scale's ids, raster, coarse to fine) for B tokenized prompts, one
    forward pass per scale; `tokenizer` (the MultiScaleVQGAN) builds each next scale's inputs. Returns the codes
    and their `GenerationCost` (K decoder passes). Guidance is constant or VAR's linear ramp
    (`sampling.cfg_schedule`)."""
    vq = tokenizer
    _check_model(model, layout)
    _check_tokenizer(layout, vq)
    K, B = len(layout.scales), len(text_ids)
    weights = guidance_schedule(sampling.guidance_scale, K, sampling.schedule(DEFAULT_CFG_SCHEDULE))
    device = model.device
    use_cfg, text, valid, key_valid = prompt_block(layout, text_ids, sampling.guidance_scale, layout.seq_len, device,
                                                   generators)
    R, T0 = text.shape
    mask = full_mask(layout, key_valid)
    positions = layout.positions(R, device)
    cache = model.new_cache(R, layout.seq_len)
    greedy = sampling.temperature == 0
    f_hat = torch.zeros(B, vq.feature_dim, *vq.grid_size, device=vq.device, dtype=vq.dtype)
    ids_list = []

    slices = layout.scale_slices()
    logits = prefill(model, text, positions[:, :T0], mask[:, :, :T0, :T0], cache)
    for k, s in enumerate(layout.scales):
        logits = process_logits(guided_image_logits(layout, logits, weights[k], use_cfg).flatten(0, 1), sampling)
        # one generator per image drives all of its s^2 tokens, so an image does not depend on its batch mates
        gens = None if generators is None else [g for g in generators for _ in range(s * s)]
        ids = sample(logits, gens, greedy).view(B, s, s)
        ids_list.append(ids)
        if callback is not None:
            callback(k)
        if k + 1 == K:
            break
        f_hat, inputs = vq.next_input(f_hat, ids.to(vq.device), k)
        inputs = inputs.to(device=device, dtype=model.dtype)
        inputs = torch.cat([inputs, inputs]) if use_cfg else inputs
        a, b = slices[k + 1]
        logits = scale_step(model, inputs, k + 1, positions[:, a:b], mask[:, :, a:b, :b], cache)
    return torch.cat([ids.flatten(1) for ids in ids_list], 1), GenerationCost(K)
