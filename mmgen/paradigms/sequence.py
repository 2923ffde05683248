"""Sequence pieces every paradigm shares: the left-padded text block with its unconditional (<null>) rows for
classifier-free guidance, the causal mask over valid keys, and the latent-grid helpers of the scale-wise
continuous paradigms (FlowAR, xAR). A layout here is any paradigm layout with `vocab` and `max_text_len`."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100  # targets that carry no loss (text positions)


def text_block(layout, text_ids: Sequence[Sequence[int]], drop: torch.Tensor | None = None):
    """Left-padded text + <boi>: tokens (B, max_text_len + 1) and key validity (B, max_text_len + 1)."""
    B, L, v = len(text_ids), layout.max_text_len, layout.vocab
    tokens = torch.full((B, L + 1), v.pad, dtype=torch.long)
    for b, ids in enumerate(text_ids):
        if len(ids) > L:
            raise ValueError(f"text of {len(ids)} tokens exceeds max_text_len={L}")
        ids = [v.null] if (drop is not None and bool(drop[b])) or len(ids) == 0 else list(ids)
        tokens[b, L - len(ids):L] = torch.tensor(ids, dtype=torch.long)
    tokens[:, L] = v.boi
    return tokens, tokens != v.pad


def guided_text_block(layout, text_ids: Sequence[Sequence[int]], use_cfg: bool, device=None):
    """The text block for sampling: the prompts' rows, then as many unconditional (<null>) rows when
    classifier-free guidance is on. Tokens (R, T0) and key validity (R, T0) on `device`."""
    text, valid = text_block(layout, text_ids)
    if use_cfg:
        null, null_valid = text_block(layout, [[]] * len(text_ids))
        text, valid = torch.cat([text, null]), torch.cat([valid, null_valid])
    return text.to(device), valid.to(device)


def attention_mask(key_valid_BS: torch.Tensor, T: int | None = None) -> torch.Tensor:
    """Causal mask (B, 1, T, S) over valid keys for the last T queries; a query always sees itself so padded
    rows never softmax over nothing (which would put NaNs into the cache)."""
    B, S = key_valid_BS.shape
    T = S if T is None else T
    causal = torch.ones(T, S, dtype=torch.bool, device=key_valid_BS.device).tril(diagonal=S - T)
    eye = torch.zeros(T, S, dtype=torch.bool, device=key_valid_BS.device)
    eye[:, S - T:] = torch.eye(T, dtype=torch.bool, device=key_valid_BS.device)
    return ((causal & key_valid_BS[:, None, :]) | eye).unsqueeze(1)


def scale_positions(side: int, grid_side: int, device=None) -> torch.Tensor:
    """(side^2, 2) float (row, col) centres of a side x side grid on the G x G frame, raster order."""
    coords = (torch.arange(side, device=device, dtype=torch.float32) + 0.5) * (grid_side / side) - 0.5
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")
    return torch.stack([rows.flatten(), cols.flatten()], -1)


def latent_pyramid(latents_BCGG: torch.Tensor, scales: Sequence[int]) -> list[torch.Tensor]:
    """Targets Y_k (B, C, s_k, s_k): area downsamplings of X, the finest being X itself (FlowAR)."""
    return [latents_BCGG if s == latents_BCGG.shape[-1] else F.interpolate(latents_BCGG, size=(s, s), mode="area")
            for s in scales]
