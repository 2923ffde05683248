"""A frozen text encoder's caption features as the decoder's prefix (LlamaGen-T2I, Sun et al. 2024, arXiv
2406.06525: T5 features through an MLP as `cls_token_num` prefix tokens, padding masked).

`CaptionProjection` is the trained part, LlamaGen's `cap_proj` (Linear, tanh-GELU, Linear, no biases), saved as the
pipeline's `text_projection`. `caption_prefix(decoder, prefix)` puts projected features into the decoder for the
duration of a `with` block: every paradigm embeds its text block through the one `Transformer.tok_emb` of its
decoder, so a forward hook there replaces the embedding of condition id 1 + j in row b by prefix[b, j]
(`mmgen.conditioning.TextEncoderConditioning`). The pad (0) stays the pad, masked as a key by the paradigm; <null>,
the specials and image ids keep their rows. No paradigm file changes, and the decoder's weights and state dict
are those of any other kind.

Shape letters: B condition rows (the first rows of every text block), R rows of one embedding call, T its
tokens, L prefix tokens (max_text_len), E feature width, C decoder width.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn as nn
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config

from mmgen.models.llamagen import CaptionMLP
from mmgen.models.transformer import Transformer


class CaptionProjection(ModelMixin, ConfigMixin):
    """Text-encoder features (B, L, E) -> prefix embeddings (B, L, C)."""

    @register_to_config
    def __init__(self, feature_dim: int, dim: int):
        super().__init__()
        self.mlp = CaptionMLP(feature_dim, dim)
        for p in self.parameters():
            nn.init.normal_(p, std=0.02)  # the decoder's own embedding scale (`Transformer._init_weights`)

    def forward(self, features_BLE: torch.Tensor) -> torch.Tensor:
        return self.mlp(features_BLE.to(self.dtype))


def text_embedding(decoder: nn.Module) -> nn.Embedding:
    """The input embedding every paradigm's text block goes through: the `tok_emb` of the decoder's one
    `Transformer` (the decoder itself, or its trunk: Token-Shuffle, next-scale, flow and xAR models)."""
    trunks = [m for m in decoder.modules() if isinstance(m, Transformer)]
    if len(trunks) != 1:
        raise ValueError(f"{type(decoder).__name__} holds {len(trunks)} Transformer trunks; a caption prefix needs "
                         f"exactly one (its tok_emb embeds the text block)")
    return trunks[0].tok_emb


@contextmanager
def caption_prefix(decoder: nn.Module, prefix_BLC: torch.Tensor):
    """Inside the block, condition id 1 + j in row b < B of any embedding call embeds as prefix_BLC[b, j]. Text
    blocks put the condition rows first (CFG's <null> rows after them, with no condition ids), so row b of a call
    is caption b; calls without condition ids (decode steps, however many rows) pass through unchanged, and no
    host sync happens in the hook."""
    B, L, C = prefix_BLC.shape

    def hook(module, args, out_RTC):
        ids_RT = args[0]
        if ids_RT.dim() != 2:
            return out_RTC
        R = ids_RT.shape[0]
        prefix = prefix_BLC.to(out_RTC.dtype)
        prefix = prefix[:R] if R <= B else torch.cat([prefix, prefix.new_zeros(R - B, L, C)])
        slot = ids_RT - 1
        found = prefix.gather(1, slot.clamp(0, L - 1)[..., None].expand(-1, -1, C))
        return torch.where(((slot >= 0) & (slot < L))[..., None], found, out_RTC)

    handle = text_embedding(decoder).register_forward_hook(hook, prepend=True)  # before any other hook sees it
    try:
        yield
    finally:
        handle.remove()
