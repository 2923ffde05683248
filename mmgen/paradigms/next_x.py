"""Next-X prediction (xAR; Ren et al., 2025, "Beyond Next-Token: Next-X Prediction for Autoregressive Visual
Generation", arXiv 2502.20388): autoregression over *entities* of a continuous latent, each entity regressed by
flow matching in the decoder itself, trained with Noisy Context Learning.

Entities of a G x G latent (B, C, G, G) from a VAE, `Entities(kind, grid_side, size)`:

- ``token``: every latent position alone (G^2 entities of 1 token), raster order;
- ``cell``: `size` x `size` squares of neighbours (G^2 / size^2 entities), cells and their tokens in raster order;
- ``subsample``: non-local groups, entity (i, j) holds positions (i + size a, j + size b), a, b < G / size:
  `size`^2 interleaved low-resolution views of the image;
- ``scale``: coarse to fine: entity k is the latent area-downsampled to scales[k] (1, 2, 4, ..., G); the last
  scale is the latent itself, so the sequence holds sum(s^2) tokens;
- ``image``: the whole latent in one entity (a DiT inside the AR frame).

`group` turns a latent into (B, N, C) entity-ordered tokens and `ungroup` inverts it (for ``scale``, from the
finest level).

Sequence, one unified vocabulary (`mmgen.text`), text exactly as in `next_token`::

    [PAD ... PAD] [text ids] <boi> [entity 1 tokens] [entity 2 tokens] ... [entity K tokens]

Attention is block-causal: bidirectional inside an entity, causal across entities (a token sees the text and
every token of its own and earlier entities). Every image position carries the noisy token x_t = (1 - t) x + t e
of its entity, and its output is the velocity e - x of that same token; the entity's time t enters through
per-token adaLN (`Transformer(cond_dim=...)`, text positions at t = 0).

Noisy Context Learning: in training each entity draws its own t_k (logit-normal), so entity k's context is the
*noisy* earlier entities, never the clean ground truth. In sampling, entity k starts from noise and is integrated
from t = 1 to 0 with the earlier entities in the KV cache as clean tokens (t = 0); once done it is written to the
cache at t = 0 (the entity's one AR step) and the next entity starts. Guidance ramps over entities
(w_k = 1 + (w - 1) k / (K - 1)) by default, as in xAR.

Positions: text index i -> (i, i); latent position (r, c) -> (o + r, o + c) with o the index after <boi>; a
token of scale s sits at its cell centre on the same G x G frame (as in `flowar`).

Shape letters: B batch, R rows (B, or 2B with CFG: cond rows then uncond rows), C latent channels, G latent
side, K entities, N image tokens of the sequence, n tokens of one entity, T sequence length, D model width.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config

from mmgen.models.heads import TimestepEmbedder, modulate
from mmgen.models.transformer import KVCache, Transformer
from mmgen.paradigms.protocol import FlowConfig, GenerationCost, ModelConfig
from mmgen.paradigms.sequence import attention_mask, latent_pyramid, prompt_block, scale_positions, text_block
from mmgen.sampling.flow import flow_generators, initial_noise, interpolate, logit_normal_t, sample_flow
from mmgen.sampling.logits import SamplingConfig, guidance_at, guide
from mmgen.text import UnifiedVocab

ENTITY_KINDS = ("token", "cell", "subsample", "scale", "image")


def default_entity_size(kind: str, grid_side: int) -> int:
    """Cells of half the side (xAR's released setting: 4 cells), subsampling stride 2; 1 for the others."""
    return {"cell": max(grid_side // 2, 1), "subsample": 2}.get(kind, 1)


@dataclass
class Entities:
    """How a G x G latent splits into the AR steps. `size`: the cell side (cell) or the stride (subsample);
    0 picks `default_entity_size`; ignored by the other kinds."""

    kind: str
    grid_side: int
    size: int = 0

    def __post_init__(self):
        if self.kind not in ENTITY_KINDS:
            raise ValueError(f"entity must be one of {', '.join(ENTITY_KINDS)}; got {self.kind!r}")
        G = self.grid_side
        if isinstance(G, bool) or not isinstance(G, int) or G < 1:
            raise ValueError(f"grid_side must be an integer >= 1, got {G!r}")
        if self.size == 0:
            self.size = default_entity_size(self.kind, G)
        if self.kind in ("cell", "subsample"):
            if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 1 or G % self.size:
                raise ValueError(f"entity_size for {self.kind!r} must be a positive divisor of the latent side {G}; "
                                 f"got {self.size!r}")
        else:
            self.size = 1
        if self.kind == "scale" and G & (G - 1):
            raise ValueError(f"entity 'scale' needs a latent side that is a power of two (scales 1, 2, 4, ...), "
                             f"got {G}")

    @property
    def scales(self) -> tuple[int, ...]:
        """``scale`` entities: 1, 2, 4, ..., G."""
        return tuple(2 ** i for i in range(self.grid_side.bit_length()) if 2 ** i <= self.grid_side)

    @cached_property
    def sizes(self) -> tuple[int, ...]:
        """Tokens of each entity, in AR order."""
        G, s = self.grid_side, self.size
        return {"token": (1,) * G * G, "cell": (s * s,) * (G // s) ** 2, "subsample": ((G // s) ** 2,) * s * s,
                "scale": tuple(k * k for k in self.scales), "image": (G * G,)}[self.kind]

    @property
    def num_entities(self) -> int:
        return len(self.sizes)

    @property
    def num_tokens(self) -> int:
        return sum(self.sizes)

    @cached_property
    def order(self) -> torch.Tensor:
        """(G^2,) raster index of each entity-ordered token, for every kind but ``scale``."""
        G, s = self.grid_side, self.size
        r = torch.arange(G)
        if self.kind == "cell":
            # (cell row, cell col, row in cell, col in cell) -> raster
            cr, cc, ir, ic = torch.meshgrid(r[: G // s], r[: G // s], r[:s], r[:s], indexing="ij")
            return ((cr * s + ir) * G + cc * s + ic).flatten()
        if self.kind == "subsample":
            # (group row i, group col j, a, b) -> raster (i + s a, j + s b)
            i, j, a, b = torch.meshgrid(r[:s], r[:s], r[: G // s], r[: G // s], indexing="ij")
            return ((i + s * a) * G + j + s * b).flatten()
        return torch.arange(G * G)

    @cached_property
    def entity_index(self) -> torch.Tensor:
        """(N,) the entity of each token of the sequence."""
        return torch.repeat_interleave(torch.arange(self.num_entities), torch.tensor(self.sizes))

    def bounds(self, k: int) -> tuple[int, int]:
        """Token slice [a, b) of entity k within the N image tokens."""
        a = sum(self.sizes[:k])
        return a, a + self.sizes[k]

    def positions(self, device=None) -> torch.Tensor:
        """(N, 2) float (row, col) of each token on the G x G latent frame."""
        G = self.grid_side
        if self.kind == "scale":
            return torch.cat([scale_positions(s, G, device) for s in self.scales])
        order = self.order.to(device)
        return torch.stack([order // G, order % G], -1).float()

    def group(self, latents_BCGG: torch.Tensor) -> torch.Tensor:
        """(B, C, G, G) -> (B, N, C) tokens in entity order."""
        G = self.grid_side
        if latents_BCGG.dim() != 4 or tuple(latents_BCGG.shape[2:]) != (G, G):
            raise ValueError(f"latents must have shape (B, C, {G}, {G}), got {tuple(latents_BCGG.shape)}")
        if self.kind == "scale":
            return torch.cat([y.flatten(2).transpose(1, 2) for y in latent_pyramid(latents_BCGG, self.scales)], 1)
        return latents_BCGG.flatten(2).transpose(1, 2)[:, self.order.to(latents_BCGG.device)]

    def ungroup(self, tokens_BNC: torch.Tensor) -> torch.Tensor:
        """(B, N, C) entity-ordered tokens -> (B, C, G, G); ``scale`` reads its finest level."""
        G, N = self.grid_side, self.num_tokens
        if tokens_BNC.dim() != 3 or tokens_BNC.shape[1] != N:
            raise ValueError(f"tokens must have shape (B, {N}, C), got {tuple(tokens_BNC.shape)}")
        B, _, C = tokens_BNC.shape
        if self.kind == "scale":
            raster = tokens_BNC[:, -G * G:]
        else:
            raster = torch.empty_like(tokens_BNC).index_copy_(1, self.order.to(tokens_BNC.device), tokens_BNC)
        return raster.transpose(1, 2).reshape(B, C, G, G)


@dataclass
class NextXLayout:
    vocab: UnifiedVocab  # image_vocab_size is 0: image tokens are continuous
    max_text_len: int
    entities: Entities
    token_dim: int  # C, the latent channels

    @property
    def num_image_tokens(self) -> int:
        return self.entities.num_tokens

    @property
    def num_entities(self) -> int:
        return self.entities.num_entities

    @property
    def boi_index(self) -> int:
        return self.max_text_len

    @property
    def image_start(self) -> int:
        return self.max_text_len + 1

    @property
    def seq_len(self) -> int:
        return self.image_start + self.num_image_tokens

    def entity_range(self, k: int) -> tuple[int, int]:
        """Sequence slice [a, b) of entity k."""
        a, b = self.entities.bounds(k)
        return self.image_start + a, self.image_start + b

    def positions(self, batch_size: int, device=None) -> torch.Tensor:
        """(B, seq_len, 2) float positions."""
        idx = torch.arange(self.image_start, device=device, dtype=torch.float32)
        image = self.image_start + self.entities.positions(device)
        return torch.cat([torch.stack([idx, idx], -1), image]).unsqueeze(0).expand(batch_size, -1, -1)

    def block_mask(self, text_valid_BL: torch.Tensor) -> torch.Tensor:
        """(B, 1, T, T) bool, True = may attend: text + <boi> causal as in next_token; an image token sees the
        valid text keys and every token of its own and earlier entities."""
        B, L1 = text_valid_BL.shape
        ent = self.entities.entity_index.to(text_valid_BL.device)
        mask = text_valid_BL.new_zeros(B, self.seq_len, self.seq_len)
        mask[:, :L1, :L1] = attention_mask(text_valid_BL)[:, 0]
        mask[:, L1:, :L1] = text_valid_BL[:, None, :]
        mask[:, L1:, L1:] = (ent[None, :] <= ent[:, None])[None]
        return mask.unsqueeze(1)


class NextXModel(ModelMixin, ConfigMixin):
    """The xAR decoder: a `Transformer` backbone (no logits head, per-token adaLN on the flow time) that reads
    text ids and noisy latent tokens and predicts each latent token's velocity; forward only. The entity kind is
    part of the saved config, so a pipeline rebuilds the same layout."""

    @register_to_config
    def __init__(self, vocab_size: int, token_dim: int, grid_side: int, entity: str = "cell", entity_size: int = 0,
                 max_seq_len: int = 256, dim: int = 256, n_layers: int = 6, n_heads: int = 8,
                 n_kv_heads: int | None = None, mlp_hidden: int | None = None):
        super().__init__()
        self.entities = Entities(entity, grid_side, entity_size)  # validates entity / entity_size / grid_side
        self.transformer = Transformer(vocab_size, dim=dim, n_layers=n_layers, n_heads=n_heads,
                                       n_kv_heads=n_kv_heads, mlp_hidden=mlp_hidden, max_seq_len=max_seq_len,
                                       rope_2d=True, cond_dim=dim, logits_head=False)
        self.in_proj = nn.Linear(token_dim, dim)
        self.time_embed = TimestepEmbedder(dim)
        self.final_ada = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.final_proj = nn.Linear(dim, token_dim)
        for p in (*self.final_ada.parameters(), *self.final_proj.parameters()):
            nn.init.zeros_(p)  # the velocity starts at 0 and the final modulation neutral, as in DiT

    def forward(self, text_tokens: torch.Tensor | None, x_BnC: torch.Tensor | None, t_Bn: torch.Tensor | None,
                positions: torch.Tensor, mask: torch.Tensor, cache: KVCache | None = None,
                start: int | None = None) -> torch.Tensor | None:
        """Velocity (B, n, C) of the noisy latent tokens x (B, n, C) at per-token times t (B, n), after the text ids
        (B, Tt) when given (text positions are conditioned at t = 0). Returns None without latent tokens
        (a prompt-only pass that fills the cache)."""
        embeds, times = [], []
        if text_tokens is not None:
            embeds.append(self.transformer.tok_emb(text_tokens))
            times.append(torch.zeros(text_tokens.shape, device=text_tokens.device))
        if x_BnC is not None:
            embeds.append(self.in_proj(x_BnC.to(self.in_proj.weight.dtype)))
            times.append(t_Bn.to(x_BnC.dtype))
        if not embeds:
            raise ValueError("forward needs text_tokens, latent tokens or both")
        t_BT = torch.cat(times, 1)
        cond_BTD = self.time_embed(t_BT.flatten()).view(*t_BT.shape, -1)
        h = self.transformer(inputs_embeds=torch.cat(embeds, 1), positions=positions, mask=mask, cache=cache,
                             start=start, cond=cond_BTD)
        if x_BnC is None:
            return None
        n = x_BnC.shape[1]
        shift, scale = self.final_ada(cond_BTD[:, -n:]).chunk(2, -1)
        return self.final_proj(modulate(h[:, -n:], shift, scale))


DEFAULT_CFG_SCHEDULE = "linear"  # xAR ramps guidance over entities
TOKENS = "latents"  # AutoencoderKL latents (C, G, G) on a square grid, grouped into entities


def make_layout(tokenizer, vocab: UnifiedVocab, max_text_len: int, model: ModelConfig | None,
                flow: FlowConfig) -> NextXLayout:
    C, G, W = tokenizer.token_shape
    if G != W:
        raise ValueError(f"next_x needs a square latent grid, got {(G, W)}")
    return NextXLayout(vocab, max_text_len, Entities(flow.entity, G, flow.entity_size), C)


def layout_from_model(decoder: NextXModel, tokenizer, vocab: UnifiedVocab, max_text_len: int) -> NextXLayout:
    C, G, _ = tokenizer.token_shape
    cfg = decoder.config
    if cfg.grid_side != G:
        raise ValueError(f"the transformer's latent side {cfg.grid_side} differs from the VAE grid {(G, G)}")
    if cfg.token_dim != C:
        raise ValueError(f"transformer.token_dim={cfg.token_dim} differs from the VAE's {C} latent channels")
    return NextXLayout(vocab, max_text_len, Entities(cfg.entity, cfg.grid_side, cfg.entity_size), cfg.token_dim)


def make_model(layout: NextXLayout, model: ModelConfig, flow: FlowConfig | None = None) -> NextXModel:
    e = layout.entities
    return NextXModel(vocab_size=layout.vocab.size, token_dim=layout.token_dim, grid_side=e.grid_side, entity=e.kind,
                      entity_size=e.size, max_seq_len=layout.seq_len, **model.backbone())


@dataclass
class NextXBatch:
    text: torch.Tensor  # (B, max_text_len + 1) text ids and <boi>
    tokens: torch.Tensor  # (B, N, C) clean latent tokens in entity order
    positions: torch.Tensor  # (B, T, 2)
    mask: torch.Tensor  # (B, 1, T, T)


def build_batch(layout: NextXLayout, text_ids, latents_BCGG: torch.Tensor, cond_drop_prob: float = 0.0,
                generator: torch.Generator | None = None, *, tokenizer=None) -> NextXBatch:
    """Training batch from caption ids and scaled VAE latents (B, C, G, G)."""
    B, dev = latents_BCGG.shape[0], latents_BCGG.device
    if len(text_ids) != B:
        raise ValueError(f"got {len(text_ids)} captions for {B} latents")
    if latents_BCGG.dim() != 4 or latents_BCGG.shape[1] != layout.token_dim:
        raise ValueError(f"latents must have {layout.token_dim} channels (B, C, G, G), got {tuple(latents_BCGG.shape)}")
    drop = torch.rand(B, generator=generator) < cond_drop_prob if cond_drop_prob > 0 else None
    text, text_valid = text_block(layout, text_ids, drop)
    return NextXBatch(text.to(dev), layout.entities.group(latents_BCGG), layout.positions(B, dev),
                      layout.block_mask(text_valid).to(dev))


def loss_fn(model: NextXModel, batch: NextXBatch, layout: NextXLayout,
            generator: torch.Generator | None = None) -> torch.Tensor:
    """Noisy Context Learning: one logit-normal time per entity and image, every entity noised (context included),
    all entities in one block-causal pass; MSE of the velocity over all latent tokens."""
    x0 = batch.tokens
    B, dev = x0.shape[0], x0.device
    t_BK = logit_normal_t(B * layout.num_entities, generator, dev).view(B, layout.num_entities)
    t_BN = t_BK[:, layout.entities.entity_index.to(dev)]
    noise = torch.randn(x0.shape, generator=generator, device=generator.device if generator else dev).to(dev)
    x_t, v_target = interpolate(x0, noise, t_BN)
    v = model(batch.text, x_t, t_BN, batch.positions, batch.mask)
    return F.mse_loss(v.float(), v_target.float())


# ---- sampling: small functions, the loop stays visible -------------------------------------------------


def prefill(model: NextXModel, text_RT, positions_RT2, key_valid_RT, cache: KVCache) -> None:
    """Run text + <boi> once, filling the cache."""
    model(text_RT, None, None, positions_RT2, attention_mask(key_valid_RT), cache=cache, start=0)


def entity_velocity(model: NextXModel, x_Rn, t_R, positions_Rn2, key_valid_RS, cache: KVCache, start: int):
    """Velocity of one entity's noisy tokens (R, n, C) at time t (R,), seeing the cache up to `start` and itself.
    Its keys go to cache slots [start, start + n) and are overwritten by the next call, so noisy states never
    stay in the context."""
    R, n, _ = x_Rn.shape
    mask = key_valid_RS[:, None, None, : start + n].expand(R, 1, n, start + n)
    return model(None, x_Rn, t_R[:, None].expand(R, n), positions_Rn2, mask, cache=cache, start=start)


@torch.no_grad()
def generate(model: NextXModel, layout: NextXLayout, text_ids: Sequence[Sequence[int]], sampling: SamplingConfig,
             generators: Sequence[torch.Generator] | None = None, *, tokenizer=None,
             callback: Callable[[int], None] | None = None):
    """Sample scaled latents (B, C, G, G) for B tokenized prompts, one entity per AR step; guidance ramps over
    entities by default (`sampling.cfg_schedule`).

    Returns latents and their `GenerationCost`: K decoder passes (one AR step per entity) and model_evals =
    prefill + K * flow evaluations + K - 1 cache writes. Entity k's noise comes from generators[b], so an image
    does not depend on its batch mates."""
    B, N, C, K = len(text_ids), layout.num_image_tokens, layout.token_dim, layout.num_entities
    generators = flow_generators(sampling, generators, B)
    guidance_scale, temperature = sampling.guidance_scale, sampling.temperature
    cfg_schedule = sampling.schedule(DEFAULT_CFG_SCHEDULE)
    steps, method = sampling.num_inference_steps, sampling.flow_sampler
    device = model.device
    use_cfg, text, valid, key_valid = prompt_block(layout, text_ids, guidance_scale, layout.seq_len, device)
    R, T0 = text.shape
    positions = layout.positions(R, device)
    cache = model.transformer.new_cache(R, layout.seq_len)
    tokens = torch.zeros(B, N, C, device=device)
    prefill(model, text, positions[:, :T0], valid, cache)
    evals = 1

    for k in range(K):
        a, b = layout.entity_range(k)
        guidance = guidance_at(guidance_scale, k, K, cfg_schedule)

        def velocity(x_Bn, t_B, a=a, b=b, guidance=guidance):
            x, t = (torch.cat([x_Bn, x_Bn]), torch.cat([t_B, t_B])) if use_cfg else (x_Bn, t_B)
            v = entity_velocity(model, x, t, positions[:, a:b], key_valid, cache, a)
            return guide(v, guidance, use_cfg)

        noise = initial_noise((b - a, C), generators, temperature, device)
        x0, flow_evals = sample_flow(velocity, noise, steps, method)
        tokens[:, a - T0: b - T0] = x0
        evals += flow_evals
        if k + 1 < K:  # the entity's AR step: its clean tokens (t = 0) become context
            x = torch.cat([x0, x0]) if use_cfg else x0
            entity_velocity(model, x, x.new_zeros(R), positions[:, a:b], key_valid, cache, a)
            evals += 1
        if callback is not None:
            callback(k)
    return layout.entities.ungroup(tokens), GenerationCost(K, model_evals=evals)
