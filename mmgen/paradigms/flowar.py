"""FlowAR: scale-wise autoregression with per-scale flow matching (Ren et al., 2024, arXiv 2412.15205).

A continuous latent X (B, C, G, G) from a VAE is viewed as a pyramid of scales s_1 < ... < s_K = G, each
twice the previous one; the coarse levels are plain area downsamplings, Y_k = area(X -> s_k), Y_K = X.
An AR transformer predicts one condition vector z_k per token of scale k, block-causally over scales, and a
small flow-matching transformer shared by all scales turns noise into Y_k given z_k. Its Spatial-adaLN takes
shift/scale/gate per token position from (z_k at that position + time embedding), so the condition varies
over the image, unlike DiT's one vector per sample.

AR sequence, one unified vocabulary (`mmgen.text`), text exactly as in `next_token`::

    [PAD ... PAD] [text ids] <boi> [inputs of scale 2] ... [inputs of scale K]
    |---------- max_text_len ---------|

<boi>'s output conditions scale 1 (broadcast over its s_1 x s_1 positions); the inputs of scale k >= 2 are
the previous scale brought to s_k (FlowAR: bicubic Y_{k-1} -> G x G, then area -> s_k), projected to the
model width, and their outputs are z_k. Scale-k queries see the text, <boi> and every input of scales <= k.

Positions: text index i -> (i, i); token (r, c) of scale s -> (o + (r + 0.5) G / s - 0.5, same for c) with o
the index after <boi>, so every scale sits on the same continuous G x G image frame for the 2-D RoPE.

Shape letters: B batch, R rows (B, or 2B with classifier-free guidance), C latent channels, G finest side,
K number of scales, n tokens of one scale (s^2), T sequence length, D AR width, W flow width.
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

from mmgen.models.heads import TimestepEmbedder, modulate
from mmgen.models.transformer import Block, KVCache, Transformer, rope_angles
from mmgen.paradigms.protocol import FlowConfig, GenerationCost, ModelConfig
from mmgen.paradigms.sequence import attention_mask, guided_text_block, latent_pyramid, scale_positions, text_block
from mmgen.sampling.flow import initial_noise, interpolate, logit_normal_t, sample_flow
from mmgen.sampling.logits import SamplingConfig, guidance_at, guide
from mmgen.text import UnifiedVocab


def check_scales(scales: Sequence[int], grid_side: int | None = None) -> tuple[int, ...]:
    """Validate a scale schedule (positive ints, each twice the previous, the last = grid side) as a tuple."""
    scales = tuple(scales)
    if (not scales or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in scales)
            or any(b != 2 * a for a, b in zip(scales, scales[1:]))):
        raise ValueError(f"scales must be positive ints, each twice the previous one, e.g. (1, 2, 4, 8); "
                         f"got {scales!r}")
    if grid_side is not None and scales[-1] != grid_side:
        raise ValueError(f"the last scale must equal the latent grid side {grid_side}; got scales {scales!r}")
    return scales


def next_scale_input(y_BCss: torch.Tensor, side: int, grid_side: int) -> torch.Tensor:
    """Scale k-1 brought to scale k as AR input tokens (B, side^2, C): bicubic up to the full grid, then area
    down to `side`, as FlowAR does (smoother than a direct 2x upsampling)."""
    full = F.interpolate(y_BCss, size=(grid_side, grid_side), mode="bicubic", align_corners=False)
    return F.interpolate(full, size=(side, side), mode="area").flatten(2).transpose(1, 2)


def to_tokens(y_BCss: torch.Tensor) -> torch.Tensor:
    return y_BCss.flatten(2).transpose(1, 2)  # (B, n, C), raster order


def from_tokens(x_BnC: torch.Tensor, side: int) -> torch.Tensor:
    return x_BnC.transpose(1, 2).reshape(x_BnC.shape[0], x_BnC.shape[2], side, side)


@dataclass
class FlowARLayout:
    vocab: UnifiedVocab  # image_vocab_size may be 0: image tokens are continuous
    max_text_len: int
    scales: tuple[int, ...] = (1, 2, 4, 8)
    token_dim: int = 4  # latent channels C

    def __post_init__(self):
        self.scales = check_scales(self.scales)

    @property
    def grid_side(self) -> int:
        return self.scales[-1]

    @property
    def num_image_tokens(self) -> int:
        return sum(s * s for s in self.scales)

    @property
    def boi_index(self) -> int:
        return self.max_text_len

    @property
    def seq_len(self) -> int:
        # scale 1 has no input tokens: <boi> stands for it
        return self.max_text_len + 1 + self.num_image_tokens - self.scales[0] ** 2

    def scale_range(self, k: int) -> tuple[int, int]:
        """Sequence slice whose outputs condition scale k (0-based): <boi> for k = 0, else scale k's inputs."""
        if k == 0:
            return self.boi_index, self.boi_index + 1
        start = self.boi_index + 1 + sum(s * s for s in self.scales[1:k])
        return start, start + self.scales[k] ** 2

    def positions(self, batch_size: int, device=None) -> torch.Tensor:
        """(B, seq_len, 2) float positions of the full sequence."""
        idx = torch.arange(self.boi_index + 1, device=device, dtype=torch.float32)
        o = self.boi_index + 1
        parts = [torch.stack([idx, idx], -1)]
        parts += [o + scale_positions(s, self.grid_side, device) for s in self.scales[1:]]
        return torch.cat(parts).unsqueeze(0).expand(batch_size, -1, -1)

    def block_mask(self, text_valid_BL: torch.Tensor) -> torch.Tensor:
        """(B, 1, T, T) bool, True = may attend. Text + <boi> as in next_token (causal, pads masked as keys, a
        query always sees itself); inputs of scale k see every valid key up to the end of scale k."""
        B, L1, T = *text_valid_BL.shape, self.seq_len
        key_valid = torch.cat([text_valid_BL, text_valid_BL.new_ones(B, T - L1)], 1)
        mask = text_valid_BL.new_zeros(B, T, T)
        mask[:, :L1, :L1] = attention_mask(text_valid_BL)[:, 0]
        for k in range(1, len(self.scales)):
            a, b = self.scale_range(k)
            mask[:, a:b, :b] = key_valid[:, None, :b]  # full inside scale k, causal across scales
        return mask.unsqueeze(1)


def scale_condition(layout: FlowARLayout, hidden_RTD: torch.Tensor, k: int, offset: int = 0) -> torch.Tensor:
    """z_k (R, s_k^2, D) from AR hidden states whose first row sits at sequence index `offset`."""
    a, b = layout.scale_range(k)
    z = hidden_RTD[:, a - offset: b - offset]
    return z.expand(-1, layout.scales[k] ** 2, -1) if k == 0 else z


class SpatialAdaLNFlowNet(nn.Module):
    """The flow module: a small full-attention transformer over the s x s tokens of one scale whose adaLN
    condition is per token, c = Linear(z at that position) + t_emb (FlowAR's Spatial-adaLN, the Block_v1
    variant of its small models). Predicts the velocity; the zero-initialised output starts at v = 0."""

    def __init__(self, token_dim: int, cond_dim: int, width: int, depth: int, n_heads: int, grid_side: int,
                 rope_theta: float = 10000.0):
        super().__init__()
        self.grid_side, self.rope_theta, self.head_dim = grid_side, rope_theta, width // n_heads
        self.input_proj = nn.Linear(token_dim, width)
        self.time_embed = TimestepEmbedder(width)
        self.cond_proj = nn.Linear(cond_dim, width)
        hidden = 32 * math.ceil(width * 8 / 3 / 32)
        self.blocks = nn.ModuleList(Block(width, n_heads, n_heads, hidden, 1e-5, cond_dim=width) for _ in range(depth))
        self.final_norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.final_ada = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))
        self.final_proj = nn.Linear(width, token_dim)
        for name, p in self.named_parameters():
            # adaLN starts neutral (the blocks are plain transformer blocks) and the output starts at v = 0
            if ".ada." in name or name.startswith(("final_ada", "final_proj")):
                nn.init.zeros_(p)

    def forward(self, x_NnC: torch.Tensor, t_N: torch.Tensor, z_NnD: torch.Tensor, side: int) -> torch.Tensor:
        n = x_NnC.shape[1]
        cond = self.cond_proj(z_NnD) + self.time_embed(t_N)[:, None]  # (N, n, W): one condition per position
        h = self.input_proj(x_NnC)
        pos = scale_positions(side, self.grid_side, x_NnC.device)[None]
        angles = rope_angles(pos, self.head_dim, self.rope_theta, two_d=True)
        angles = torch.cat([angles, angles], -1)
        cos, sin = angles.cos().to(h.dtype), angles.sin().to(h.dtype)
        full = torch.ones(1, 1, n, n, dtype=torch.bool, device=h.device)  # all tokens of a scale see each other
        for i, block in enumerate(self.blocks):
            h = block(h, cos, sin, full, None, i, 0, cond)
        shift, scale = self.final_ada(cond).chunk(2, -1)
        return self.final_proj(modulate(self.final_norm(h), shift, scale))


class FlowARModel(ModelMixin, ConfigMixin):
    """AR backbone over [text, <boi>, scale inputs] + the shared Spatial-adaLN flow module; forward only."""

    @register_to_config
    def __init__(
        self,
        vocab_size: int,
        token_dim: int,
        scales: tuple[int, ...] = (1, 2, 4, 8),
        max_seq_len: int = 256,
        dim: int = 256,
        n_layers: int = 6,
        n_heads: int = 8,
        n_kv_heads: int | None = None,
        mlp_hidden: int | None = None,
        flow_width: int = 128,
        flow_depth: int = 2,
        flow_heads: int = 4,
    ):
        super().__init__()
        scales = check_scales(scales)
        # JSON turns the tuple into a list; store the tuple so a reloaded config equals the original
        self.register_to_config(scales=scales)
        for name, v in dict(token_dim=token_dim, flow_width=flow_width, flow_depth=flow_depth,
                            flow_heads=flow_heads).items():
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if flow_width % flow_heads or (flow_width // flow_heads) % 4:
            raise ValueError(f"flow_width ({flow_width}) / flow_heads ({flow_heads}) must be a multiple of 4 "
                             f"(2-D RoPE)")
        self.backbone = Transformer(vocab_size, dim, n_layers, n_heads, n_kv_heads, mlp_hidden, max_seq_len,
                                    logits_head=False)
        self.in_proj = nn.Linear(token_dim, dim)
        # one embedding per scale that has input tokens (scales 2..K), so the model knows which scale it predicts
        self.level_emb = nn.Embedding(len(scales) - 1, dim) if len(scales) > 1 else None
        self.flow = SpatialAdaLNFlowNet(token_dim, dim, flow_width, flow_depth, flow_heads, grid_side=scales[-1])
        nn.init.normal_(self.in_proj.weight, std=0.02)
        nn.init.zeros_(self.in_proj.bias)
        if self.level_emb is not None:
            nn.init.normal_(self.level_emb.weight, std=0.02)

    def new_cache(self, batch_size: int, max_len: int | None = None) -> KVCache:
        return self.backbone.new_cache(batch_size, max_len)

    def forward_ar(self, text_tokens: torch.Tensor | None, scale_inputs: torch.Tensor | None,
                   positions: torch.Tensor, mask: torch.Tensor, cache: KVCache | None = None,
                   start: int | None = None, levels: torch.Tensor | None = None) -> torch.Tensor:
        """Normed AR hidden states (B, T, D) for [text tokens (B, Lt)] + [scale inputs (B, N, C)].

        levels: (N,) scale index (1..K-1, 0-based) of each input token; default: the inputs of every scale
        2..K in order (the full teacher-forced sequence). positions, mask, cache, start: as `Transformer`."""
        parts = []
        if text_tokens is not None:
            parts.append(self.backbone.tok_emb(text_tokens))
        if scale_inputs is not None:
            if levels is None:
                scales = self.config.scales
                counts = torch.tensor([s * s for s in scales[1:]], device=scale_inputs.device)
                levels = torch.repeat_interleave(torch.arange(1, len(scales), device=scale_inputs.device), counts)
            if levels.shape[0] != scale_inputs.shape[1]:
                raise ValueError(f"levels has {levels.shape[0]} entries for {scale_inputs.shape[1]} scale inputs")
            x = self.in_proj(scale_inputs.to(self.in_proj.weight.dtype))
            parts.append(x + self.level_emb(levels - 1))
        if not parts:
            raise ValueError("forward_ar needs text_tokens, scale_inputs or both")
        return self.backbone(inputs_embeds=torch.cat(parts, 1), positions=positions, mask=mask, cache=cache,
                             start=start)

    def velocity(self, x_t: torch.Tensor, t: torch.Tensor, z: torch.Tensor, grid_side: int) -> torch.Tensor:
        """Velocity (N, n, C) of the noisy tokens x_t (N, n, C) of a grid_side x grid_side scale at times t (N,),
        given the AR conditions z (N, n, D), one per position."""
        if x_t.shape[1] != grid_side ** 2 or z.shape[:2] != x_t.shape[:2]:
            raise ValueError(f"x_t {tuple(x_t.shape)} and z {tuple(z.shape)} must both hold {grid_side}^2 tokens "
                             f"per row")
        dtype = self.flow.input_proj.weight.dtype
        return self.flow(x_t.to(dtype), t, z.to(dtype), grid_side).to(x_t.dtype)


# ---- training -------------------------------------------------------------------------------------------


DEFAULT_CFG_SCHEDULE = "linear"  # FlowAR ramps guidance over scales
TOKENS = "latents"  # AutoencoderKL latents (C, G, G), generated as a pyramid of scales


def make_layout(tokenizer, vocab: UnifiedVocab, max_text_len: int, model: ModelConfig | None,
                flow: FlowConfig) -> FlowARLayout:
    C, G, _ = tokenizer.token_shape
    scales = tuple(flow.scales) if flow.scales else tuple(2 ** i for i in range(G.bit_length()) if 2 ** i <= G)
    return FlowARLayout(vocab, max_text_len, scales, C)


def layout_from_model(decoder: FlowARModel, tokenizer, vocab: UnifiedVocab, max_text_len: int) -> FlowARLayout:
    C, G, _ = tokenizer.token_shape
    scales = tuple(decoder.config.scales)
    if scales[-1] != G:
        raise ValueError(f"the transformer's finest scale {scales[-1]} differs from the VAE grid {(G, G)}")
    if decoder.config.token_dim != C:
        raise ValueError(f"transformer.token_dim={decoder.config.token_dim} differs from the VAE's {C} latent channels")
    return FlowARLayout(vocab, max_text_len, scales, C)


def make_model(layout: FlowARLayout, model: ModelConfig, flow: FlowConfig) -> FlowARModel:
    return FlowARModel(vocab_size=layout.vocab.size, token_dim=layout.token_dim, scales=list(layout.scales),
                       max_seq_len=layout.seq_len, flow_width=flow.flow_width, flow_depth=flow.flow_depth,
                       flow_heads=flow.flow_heads, **model.backbone())


@dataclass
class FlowARBatch:
    text: torch.Tensor  # (B, max_text_len + 1) ids, <boi> last
    inputs: torch.Tensor | None  # (B, T - max_text_len - 1, C) upsampled previous-scale latents for scales 2..K
    targets: list[torch.Tensor]  # Y_k (B, C, s_k, s_k) for k = 1..K
    positions: torch.Tensor  # (B, T, 2) float
    mask: torch.Tensor  # (B, 1, T, T)


def scale_inputs(layout: FlowARLayout, pyramid: Sequence[torch.Tensor]) -> torch.Tensor | None:
    """AR inputs (B, T - max_text_len - 1, C) of scales 2..K from the scales before them."""
    if len(layout.scales) == 1:
        return None  # a single scale is conditioned by <boi> alone
    G = layout.grid_side
    return torch.cat([next_scale_input(y, s, G) for y, s in zip(pyramid[:-1], layout.scales[1:])], 1)


def build_batch(layout: FlowARLayout, text_ids: Sequence[Sequence[int]], latents: torch.Tensor,
                cond_drop_prob: float = 0.0, generator: torch.Generator | None = None, *, tokenizer=None) -> FlowARBatch:
    """Teacher-forced training batch from caption ids and VAE latents (B, C, G, G)."""
    B = latents.shape[0]
    if latents.dim() != 4 or latents.shape[1] != layout.token_dim or latents.shape[2:] != (layout.grid_side,) * 2:
        raise ValueError(f"latents must be (B, {layout.token_dim}, {layout.grid_side}, {layout.grid_side}) for "
                         f"scales {layout.scales}, got {tuple(latents.shape)}")
    if len(text_ids) != B:
        raise ValueError(f"got {len(text_ids)} captions for {B} latents")
    drop = torch.rand(B, generator=generator) < cond_drop_prob if cond_drop_prob > 0 else None
    text, text_valid = text_block(layout, text_ids, drop)
    pyramid = latent_pyramid(latents, layout.scales)
    dev = latents.device
    return FlowARBatch(text.to(dev), scale_inputs(layout, pyramid), pyramid, layout.positions(B, dev),
                       layout.block_mask(text_valid.to(dev)))


def loss_fn(model: FlowARModel, batch: FlowARBatch, layout: FlowARLayout,
            generator: torch.Generator | None = None) -> torch.Tensor:
    """Flow-matching loss summed over scales with FlowAR's weights s_k^2 / s_K^2, normalised by their sum."""
    hidden = model.forward_ar(batch.text, batch.inputs, batch.positions, batch.mask)
    G = layout.grid_side
    total, weight_sum = 0.0, 0.0
    for k, s in enumerate(layout.scales):
        y = to_tokens(batch.targets[k]).float()  # (B, n, C)
        B = y.shape[0]
        # FlowAR draws t ~ U(0, 1); we use the logit-normal of xAR / SD3, which spends more steps mid-path
        t = logit_normal_t(B, generator=generator, device=y.device)
        gen_dev = generator.device if generator is not None else y.device
        noise = torch.randn(y.shape, generator=generator, device=gen_dev).to(y.device)
        x_t, v_target = interpolate(y, noise, t)
        v = model.velocity(x_t, t, scale_condition(layout, hidden, k), s)
        w = s * s / (G * G)
        total = total + w * F.mse_loss(v.float(), v_target)
        weight_sum += w
    return total / weight_sum


# ---- sampling: one AR pass per scale, then the flow ODE; the loop stays visible --------------------------


def flow_velocity_fn(model: FlowARModel, z_RnD: torch.Tensor, side: int, guidance: float, use_cfg: bool):
    """velocity_fn(x (B, n, C), t (B,)) for `sample_flow`; with CFG the rows of z are [cond; uncond]."""
    def fn(x, t):
        if not use_cfg:
            return model.velocity(x, t, z_RnD, side)
        return guide(model.velocity(torch.cat([x, x]), torch.cat([t, t]), z_RnD, side), guidance)
    return fn


@torch.no_grad()
def generate(model: FlowARModel, layout: FlowARLayout, text_ids: Sequence[Sequence[int]], sampling: SamplingConfig,
             generators: Sequence[torch.Generator] | None = None, *, tokenizer=None,
             callback: Callable[[int], None] | None = None):
    """Sample latents (B, C, G, G) for B tokenized prompts. Returns latents and their `GenerationCost` (K decoder
    passes, one per scale).

    CFG ramps over scales (`sampling.cfg_schedule`, default linear as in FlowAR: from 1 at the first scale to
    `guidance_scale` at the last); `temperature` scales the initial noise; `callback(k)` runs after scale k."""
    if tuple(model.config.scales) != layout.scales or model.config.token_dim != layout.token_dim:
        raise ValueError(f"layout scales {layout.scales} / token_dim {layout.token_dim} do not match the model's "
                         f"{tuple(model.config.scales)} / {model.config.token_dim}")
    if not isinstance(sampling, SamplingConfig):
        raise ValueError(f"sampling must be a SamplingConfig, got {type(sampling).__name__}")
    guidance_scale, temperature = sampling.guidance_scale, sampling.temperature
    cfg_schedule = sampling.schedule(DEFAULT_CFG_SCHEDULE)
    steps, method = sampling.num_inference_steps, sampling.flow_sampler
    B = len(text_ids)
    if generators is not None and len(generators) != B:
        raise ValueError(f"generators must hold one generator per prompt ({B}), got {len(generators)}")
    use_cfg = guidance_scale != 1.0
    device = model.device
    text, valid = guided_text_block(layout, text_ids, use_cfg, device)
    R, K, G, C = text.shape[0], len(layout.scales), layout.grid_side, layout.token_dim
    positions, mask = layout.positions(R, device), layout.block_mask(valid)
    cache = model.new_cache(R, layout.seq_len)

    y = None
    for k, s in enumerate(layout.scales):
        a, b = (0, layout.boi_index + 1) if k == 0 else layout.scale_range(k)
        if k == 0:  # prompt + <boi>
            hidden = model.forward_ar(text, None, positions[:, a:b], mask[:, :, a:b, :b], cache=cache, start=a)
        else:
            inputs = next_scale_input(y, s, G)
            inputs = torch.cat([inputs, inputs]) if use_cfg else inputs
            levels = torch.full((s * s,), k, dtype=torch.long, device=device)
            hidden = model.forward_ar(None, inputs, positions[:, a:b], mask[:, :, a:b, :b], cache=cache, start=a,
                                      levels=levels)
        z = scale_condition(layout, hidden, k, offset=a)
        if generators is None:
            noise = temperature * torch.randn(B, s * s, C, device=device)
        else:
            noise = initial_noise((s * s, C), generators, temperature, device)
        guidance = guidance_at(guidance_scale, k, K, cfg_schedule)
        x0, _ = sample_flow(flow_velocity_fn(model, z, s, guidance, use_cfg), noise, steps, method)
        y = from_tokens(x0, s)
        if callback is not None:
            callback(k)
    return y, GenerationCost(K)
