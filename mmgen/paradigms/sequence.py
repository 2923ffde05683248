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


def prompt_block(layout, text_ids: Sequence[Sequence[int]], guidance_scale: float, slots: int, device=None,
                 generators=None):
    """Where every sampler starts: (use_cfg, text (R, T0), its validity (R, T0), key validity (R, slots) with the
    prompt's pads closed and every later slot open). Guidance is on unless the scale is 1; `generators`, where
    given, must be one per image."""
    if generators is not None and len(generators) != len(text_ids):
        raise ValueError(f"need one generator per image: {len(text_ids)} conditions, {len(generators)} generators")
    use_cfg = guidance_scale != 1.0
    text, valid = guided_text_block(layout, text_ids, use_cfg, device)
    key_valid = torch.ones(len(text), slots, dtype=torch.bool, device=text.device)
    key_valid[:, :text.shape[1]] = valid
    return use_cfg, text, valid, key_valid


def grid_batch(layout, text_ids, image_codes_BHW: torch.Tensor, cond_drop_prob: float = 0.0,
               generator: torch.Generator | None = None):
    """A training batch's checked start for paradigms over the token grid: codes (B, h * w), the text block and its
    validity on the codes' device, conditions dropped to <null> with probability `cond_drop_prob`."""
    B = image_codes_BHW.shape[0]
    if tuple(image_codes_BHW.shape[1:]) != tuple(layout.grid):
        raise ValueError(f"image codes have grid {tuple(image_codes_BHW.shape[1:])}, the model expects {layout.grid}")
    if len(text_ids) != B:
        raise ValueError(f"got {len(text_ids)} conditions for {B} images")
    drop = torch.rand(B, generator=generator) < cond_drop_prob if cond_drop_prob > 0 else None
    text, text_valid = (t.to(image_codes_BHW.device) for t in text_block(layout, text_ids, drop))
    return image_codes_BHW.reshape(B, -1).long(), text, text_valid


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
