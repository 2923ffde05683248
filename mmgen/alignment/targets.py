"""Alignment targets (REPA / ARRA): a frozen encoder's features of the training images, global and resampled onto
the decoder's token grid, computed per batch or once for the whole data set and cached as safetensors."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm

from mmgen.alignment.losses import resample_patches
from mmgen.atomic import save_file_atomic


def alignment_targets(encoder, dataset, idx, grid, want_patches: bool, device):
    """Target features of dataset images `idx`: global (B, D) and patches on the token grid (B, h*w, Dp)."""
    imgs = torch.stack([dataset[int(i)]["image"] for i in idx]).to(device)
    g, patches = encoder(imgs)
    patches = resample_patches(patches, encoder.patch_grid, grid) if want_patches else None
    return g, patches


def cached_alignment_targets(encoder, dataset, grid, want_patches, cache_file: Path, key: str, device,
                             batch_size: int = 256):
    """Target features for the whole dataset, computed once (fp16) and cached as safetensors."""
    if cache_file.is_file():
        cached = load_file(cache_file)
        if bytes(cached["key"].tolist()).decode() == key:
            return cached["global"], cached.get("patches")
    gs, ps = [], []
    for i in tqdm(range(0, len(dataset), batch_size), desc="alignment targets"):
        g, p = alignment_targets(encoder, dataset, range(i, min(i + batch_size, len(dataset))), grid,
                                 want_patches, device)
        gs.append(g.half().cpu())
        if p is not None:
            ps.append(p.half().cpu())
    out = {"global": torch.cat(gs), "key": torch.tensor(list(key.encode()), dtype=torch.uint8)}
    if ps:
        out["patches"] = torch.cat(ps)
    save_file_atomic(out, cache_file)
    return out["global"], out.get("patches")
