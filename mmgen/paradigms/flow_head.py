"""Raster next-token prediction on continuous tokens with a per-token flow-matching head, after MAR ("Autoregressive
Image Generation without Vector Quantization", Li et al., 2024, arXiv 2406.11838) in its causal raster form.

Sequence layout (text exactly as in `mmgen.paradigms.next_token`)::

    [PAD ... PAD] [text ids] <boi> [x_0 ... x_{n-2}]      (n = h * w latent tokens, raster order)

Image positions carry `in_proj(x_i)` of the *previous* latent token (teacher forcing), so the backbone state z at
<boi> conditions token 0 and the state at x_i conditions token i + 1. There is no <eoi>: the length is fixed.
The backbone never sees a vocabulary for images; a small `FlowHead` turns z into a token by integrating a
rectified flow (`mmgen.sampling.flow`) instead of MAR's diffusion, so the loss is MSE on the velocity.
MAR's `diffusion_batch_mul` trick is kept as `flow_batch_mul`: each token's z is reused with several times and
noises, which makes the cheap head see more samples per (expensive) backbone pass.

Shape letters: B images, R = B (or 2B with CFG: cond rows then uncond rows), n image tokens, D token dim,
C backbone width, L sequence length.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config

from mmgen.models.heads import FlowHead
from mmgen.models.transformer import KVCache, Transformer
from mmgen.paradigms.next_token import NextTokenLayout
from mmgen.paradigms.protocol import FlowConfig, GenerationCost, ModelConfig
from mmgen.paradigms.sequence import attention_mask, prompt_block, text_block
from mmgen.sampling.flow import flow_generators, initial_noise, interpolate, logit_normal_t, sample_flow
from mmgen.sampling.logits import SamplingConfig, guidance_at, guide
from mmgen.text import UnifiedVocab


@dataclass
class RasterFlowLayout:
    vocab: UnifiedVocab  # text ids and specials; image_vocab_size is 0 since image tokens are continuous
    max_text_len: int
    grid: tuple[int, int]  # (h, w) latent grid
    token_dim: int  # D, the latent channels
    rope_2d: bool = True
    flow_batch_mul: int = 4  # training: (t, noise) draws per token and step (MAR's diffusion_batch_mul)

    def __post_init__(self):
        if len(self.grid) != 2 or min(self.grid) < 1:
            raise ValueError(f"grid must be (h, w) with h, w >= 1, got {self.grid}")
        if self.token_dim < 1:
            raise ValueError(f"token_dim must be >= 1, got {self.token_dim}")

    @property
    def num_image_tokens(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def boi_index(self) -> int:
        return self.max_text_len

    @property
    def seq_len(self) -> int:
        """Text, <boi> and every image token; the model's input is one shorter (the last token is never fed)."""
        return self.max_text_len + 1 + self.num_image_tokens

    def positions(self, batch_size: int, device=None) -> torch.Tensor:
        """(B, seq_len, 2): next_token's positions without its <eoi> slot."""
        discrete = NextTokenLayout(self.vocab, self.max_text_len, tuple(self.grid), self.rope_2d)
        return discrete.positions(batch_size, device)[:, : self.seq_len]


class RasterFlowModel(ModelMixin, ConfigMixin):
    """Backbone (no logits head) + input projection of latent tokens + per-token flow head; forward only."""

    @register_to_config
    def __init__(self, vocab_size: int, token_dim: int, max_seq_len: int, dim: int = 256, n_layers: int = 6,
                 n_heads: int = 8, n_kv_heads: int | None = None, mlp_hidden: int | None = None,
                 rope_2d: bool = True, head_width: int = 256, head_depth: int = 3):
        super().__init__()
        self.transformer = Transformer(vocab_size, dim=dim, n_layers=n_layers, n_heads=n_heads,
                                       n_kv_heads=n_kv_heads, mlp_hidden=mlp_hidden, max_seq_len=max_seq_len,
                                       rope_2d=rope_2d, logits_head=False)
        self.in_proj = nn.Linear(token_dim, dim)
        self.head = FlowHead(token_dim, dim, head_width, head_depth)

    def forward(self, text_tokens: torch.Tensor | None, image_tokens: torch.Tensor | None, positions: torch.Tensor,
                mask: torch.Tensor, cache: KVCache | None = None, start: int | None = None) -> torch.Tensor:
        """Hidden states (B, T, C) for text ids (B, Tt) followed by latent tokens (B, n, D); either may be None
        (prefill has no image tokens, a decode step no text)."""
        parts = []
        if text_tokens is not None:
            parts.append(self.transformer.tok_emb(text_tokens))
        if image_tokens is not None:
            parts.append(self.in_proj(image_tokens.to(self.in_proj.weight.dtype)))
        if not parts:
            raise ValueError("forward needs text_tokens, image_tokens or both")
        x_BTC = torch.cat(parts, 1)
        return self.transformer(inputs_embeds=x_BTC, positions=positions, mask=mask, cache=cache, start=start)


DEFAULT_CFG_SCHEDULE = "constant"
TOKENS = "latents"  # AutoencoderKL latents (C, h, w), one token per latent position


def make_layout(tokenizer, vocab: UnifiedVocab, max_text_len: int, model: ModelConfig,
                flow: FlowConfig) -> RasterFlowLayout:
    C, h, w = tokenizer.token_shape
    return RasterFlowLayout(vocab, max_text_len, (h, w), C, rope_2d=model.rope_2d, flow_batch_mul=flow.flow_batch_mul)


def layout_from_model(decoder: RasterFlowModel, tokenizer, vocab: UnifiedVocab, max_text_len: int) -> RasterFlowLayout:
    C, h, w = tokenizer.token_shape
    if decoder.config.token_dim != C:
        raise ValueError(f"transformer.token_dim={decoder.config.token_dim} differs from the VAE's {C} latent channels")
    return RasterFlowLayout(vocab, max_text_len, (h, w), C, rope_2d=decoder.config.rope_2d)


def make_model(layout: RasterFlowLayout, model: ModelConfig, flow: FlowConfig) -> RasterFlowModel:
    return RasterFlowModel(vocab_size=layout.vocab.size, token_dim=layout.token_dim, max_seq_len=layout.seq_len,
                           rope_2d=layout.rope_2d, head_width=flow.head_width, head_depth=flow.head_depth,
                           **model.backbone())


def latents_to_tokens(layout: RasterFlowLayout, latents_BDhw: torch.Tensor) -> torch.Tensor:
    """(B, D, h, w) -> (B, n, D) in raster order."""
    if latents_BDhw.dim() != 4 or latents_BDhw.shape[1] != layout.token_dim \
            or tuple(latents_BDhw.shape[2:]) != tuple(layout.grid):
        raise ValueError(f"latents must have shape (B, {layout.token_dim}, {layout.grid[0]}, {layout.grid[1]}), "
                         f"got {tuple(latents_BDhw.shape)}")
    return latents_BDhw.flatten(2).transpose(1, 2)


def tokens_to_latents(layout: RasterFlowLayout, tokens_BnD: torch.Tensor) -> torch.Tensor:
    return tokens_BnD.transpose(1, 2).reshape(tokens_BnD.shape[0], layout.token_dim, *layout.grid)


@dataclass
class RasterFlowBatch:
    text: torch.Tensor  # (B, max_text_len + 1) text ids and <boi>
    image_inputs: torch.Tensor  # (B, n - 1, D) teacher-forced latent tokens 0..n-2
    targets: torch.Tensor  # (B, n, D) latent tokens 0..n-1
    positions: torch.Tensor  # (B, L, 2), L = max_text_len + n
    mask: torch.Tensor  # (B, 1, L, L)


def build_batch(layout: RasterFlowLayout, text_ids, latents: torch.Tensor, cond_drop_prob: float = 0.0,
                generator: torch.Generator | None = None, *, tokenizer=None) -> RasterFlowBatch:
    """Teacher-forced training batch from caption ids and scaled VAE latents (B, D, h, w)."""
    tokens = latents_to_tokens(layout, latents)
    B, dev = tokens.shape[0], latents.device
    if len(text_ids) != B:
        raise ValueError(f"got {len(text_ids)} captions for {B} latents")
    drop = torch.rand(B, generator=generator) < cond_drop_prob if cond_drop_prob > 0 else None
    text, text_valid = text_block(layout, text_ids, drop)
    valid = torch.cat([text_valid, torch.ones(B, layout.num_image_tokens - 1, dtype=torch.bool)], 1)
    return RasterFlowBatch(text.to(dev), tokens[:, :-1], tokens, layout.positions(B, dev)[:, :-1],
                           attention_mask(valid).to(dev))


def loss_fn(model: RasterFlowModel, batch: RasterFlowBatch, layout: RasterFlowLayout, flow_batch_mul: int | None = None,
            generator: torch.Generator | None = None) -> torch.Tensor:
    """Velocity MSE of the flow head at every image token, each token seen with `flow_batch_mul` (t, noise) draws
    (default: the layout's)."""
    flow_batch_mul = layout.flow_batch_mul if flow_batch_mul is None else flow_batch_mul
    if isinstance(flow_batch_mul, bool) or not isinstance(flow_batch_mul, int) or flow_batch_mul < 1:
        raise ValueError(f"flow_batch_mul must be an integer >= 1, got {flow_batch_mul}")
    hidden = model(batch.text, batch.image_inputs, batch.positions, batch.mask)
    start, n = layout.boi_index, layout.num_image_tokens
    z_NC = hidden[:, start: start + n].flatten(0, 1).repeat(flow_batch_mul, 1)
    x0_ND = batch.targets.flatten(0, 1).repeat(flow_batch_mul, 1)
    dev = x0_ND.device
    t_N = logit_normal_t(x0_ND.shape[0], generator, dev)
    noise = torch.randn(x0_ND.shape, generator=generator, device=generator.device if generator else dev).to(dev)
    x_t, v_target = interpolate(x0_ND, noise, t_N)
    return F.mse_loss(model.head(x_t, t_N, z_NC).float(), v_target.float())


# ---- sampling: small functions, the loop stays visible -------------------------------------------------


def prefill(model: RasterFlowModel, text_RT, positions_RT2, key_valid_RT, cache: KVCache) -> torch.Tensor:
    """Run text + <boi> once, filling the cache; returns the state that conditions token 0 (R, C)."""
    return model(text_RT, None, positions_RT2, attention_mask(key_valid_RT), cache=cache, start=0)[:, -1]


def decode_step(model: RasterFlowModel, token_RD, position_R2, key_valid_RS, cache: KVCache) -> torch.Tensor:
    """Feed one latent token per row at the cache end; returns the state for the next token (R, C)."""
    mask = key_valid_RS[:, None, None, : cache.length + 1]
    return model(None, token_RD[:, None], position_R2[:, None], mask, cache=cache)[:, -1]


def sample_token(model: RasterFlowModel, z_RC, noise_BD, guidance: float, use_cfg: bool, steps: int, method: str):
    """Integrate the head's flow for one token per image; CFG mixes the velocities of cond and uncond rows."""

    def velocity(x_BD, t_B):
        if not use_cfg:
            return model.head(x_BD, t_B, z_RC)
        return guide(model.head(torch.cat([x_BD, x_BD]), torch.cat([t_B, t_B]), z_RC), guidance)

    return sample_flow(velocity, noise_BD, steps, method)[0]


@torch.no_grad()
def generate(model: RasterFlowModel, layout: RasterFlowLayout, text_ids: Sequence[Sequence[int]],
             sampling: SamplingConfig, generators: Sequence[torch.Generator] | None = None, *, tokenizer=None,
             callback: Callable[[int], None] | None = None):
    """Sample scaled latents (B, D, h, w) for B tokenized prompts; returns them and their `GenerationCost` (one
    backbone pass per token). Each token's flow runs `sampling.num_inference_steps` steps of
    `sampling.flow_sampler`; guidance is constant by default (`sampling.cfg_schedule`).

    Token i's starting noise comes from generators[b], so an image does not depend on its batch mates."""
    B, n, D = len(text_ids), layout.num_image_tokens, layout.token_dim
    generators = flow_generators(sampling, generators, B)
    guidance_scale, temperature = sampling.guidance_scale, sampling.temperature
    cfg_schedule = sampling.schedule(DEFAULT_CFG_SCHEDULE)
    steps, method = sampling.num_inference_steps, sampling.flow_sampler
    device = model.device
    slots = layout.seq_len - 1  # the last token is sampled, never fed back
    use_cfg, text, valid, key_valid = prompt_block(layout, text_ids, guidance_scale, slots, device)
    R, T0 = text.shape
    positions = layout.positions(R, device)
    cache = model.transformer.new_cache(R, slots)
    tokens = torch.zeros(B, n, D, device=device)

    z = prefill(model, text, positions[:, :T0], valid, cache)
    for i in range(n):
        noise = initial_noise((D,), generators, temperature, device)
        guidance = guidance_at(guidance_scale, i, n, cfg_schedule)
        tokens[:, i] = sample_token(model, z, noise, guidance, use_cfg, steps, method)
        if callback is not None:
            callback(i)
        if i + 1 == n:
            break
        token = torch.cat([tokens[:, i], tokens[:, i]]) if use_cfg else tokens[:, i]
        z = decode_step(model, token, positions[:, T0 + i], key_valid, cache)
    return tokens_to_latents(layout, tokens), GenerationCost(n)
