"""Token-Shuffle merge / unmerge (Ma et al., 2025, "Token-Shuffle: Towards High-Resolution Image Generation with
Autoregressive Models", arXiv 2504.17789).

Visual codes live in a low-dimensional codebook but enter the decoder as wide embeddings, so neighbouring
tokens are redundant. Token-shuffle merges every s x s window of token features along the channels into one
token before the transformer (s^2 fewer positions); token-unshuffle splits each output back into s^2 tokens.

Order, used by every function and module here: windows in raster order over the (H/s, W/s) window grid; the
s*s tokens inside a window in raster order too, so token (dy, dx) of window (i, j) is grid cell
(i*s + dy, j*s + dx), takes slot k = dy*s + dx and fills channels [k*C, (k+1)*C) of the merged token.

Modules, following the paper's description: `ShuffleMerge` maps each token d -> d/s^2 with a linear layer,
concatenates the window (width d again) and refines it with residual MLP blocks; `ShuffleSplit` is the reverse
after the transformer: residual MLP blocks, then s^2 parts of width d/s^2, each expanded back to d by a shared
linear layer. The paper puts residual MLP blocks around both operations without giving their number
(`num_blocks`, 2 by default here).

Letters: B batch, H W token grid, C channels, N = (H/s)(W/s) windows, K = s^2 tokens per window.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def check_window(grid: tuple[int, int], s: int) -> None:
    """ValueError unless s is an integer >= 1 that divides both sides of the token grid (H, W)."""
    if isinstance(s, bool) or not isinstance(s, int) or s < 1:
        raise ValueError(f"shuffle window s must be an integer >= 1, got {s!r}")
    H, W = grid
    if H % s or W % s:
        raise ValueError(f"token grid {H}x{W} is not divisible by the shuffle window s={s}")


def shuffle(x_BHWC: torch.Tensor, s: int) -> torch.Tensor:
    """(B, H, W, C) -> (B, N, K*C): each s x s window merged along the channels, windows in raster order."""
    B, H, W, C = x_BHWC.shape
    check_window((H, W), s)
    x = x_BHWC.reshape(B, H // s, s, W // s, s, C).permute(0, 1, 3, 2, 4, 5)  # (B, H/s, W/s, dy, dx, C)
    return x.reshape(B, (H // s) * (W // s), s * s * C)


def unshuffle(x_BND: torch.Tensor, s: int, grid: tuple[int, int]) -> torch.Tensor:
    """The inverse of `shuffle`: (B, N, K*C) -> (B, H, W, C) for the token grid (H, W)."""
    check_window(grid, s)
    H, W = grid
    B, N, D = x_BND.shape
    if N != (H // s) * (W // s) or D % (s * s):
        raise ValueError(f"expected (B, {(H // s) * (W // s)}, a multiple of {s * s}) for grid {H}x{W} and "
                         f"s={s}, got {tuple(x_BND.shape)}")
    x = x_BND.reshape(B, H // s, W // s, s, s, D // (s * s)).permute(0, 1, 3, 2, 4, 5)  # (B, H/s, dy, W/s, dx, C)
    return x.reshape(B, H, W, D // (s * s))


def shuffle_ids(ids_BHW: torch.Tensor, s: int) -> torch.Tensor:
    """Token ids (B, H, W) -> (B, N, K): the ids of each window in slot order."""
    return shuffle(ids_BHW.unsqueeze(-1), s)


def unshuffle_ids(ids_BNK: torch.Tensor, s: int, grid: tuple[int, int]) -> torch.Tensor:
    """The inverse of `shuffle_ids`: (B, N, K) -> (B, H, W)."""
    return unshuffle(ids_BNK, s, grid).squeeze(-1)


class ResidualMLP(nn.Module):
    """x + W2 SiLU(W1 LayerNorm(x)), output layer zero-initialised so a fresh block is the identity."""

    def __init__(self, dim: int, hidden: int | None = None):
        super().__init__()
        hidden = hidden or 4 * dim
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, x):
        return x + self.fc2(F.silu(self.fc1(self.norm(x))))


def _check_dims(dim: int, window: int, num_blocks: int) -> int:
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be an integer >= 1, got {window!r}")
    if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks < 0:
        raise ValueError(f"num_blocks must be an integer >= 0, got {num_blocks!r}")
    if dim % (window * window):
        raise ValueError(f"dim ({dim}) must be divisible by window^2 ({window * window})")
    return window * window


class ShuffleMerge(nn.Module):
    """Token-shuffle: the K token features of each window (B, N, K, C) -> one merged token (B, N, C)."""

    def __init__(self, dim: int, window: int = 2, num_blocks: int = 2):
        super().__init__()
        self.K = _check_dims(dim, window, num_blocks)
        self.compress = nn.Linear(dim, dim // self.K)
        self.blocks = nn.Sequential(*(ResidualMLP(dim) for _ in range(num_blocks)))

    def forward(self, x_BNKC: torch.Tensor) -> torch.Tensor:
        B, N, K, C = x_BNKC.shape
        if K != self.K:
            raise ValueError(f"expected {self.K} tokens per window, got {K}")
        return self.blocks(self.compress(x_BNKC).reshape(B, N, C))  # slot k -> channels [k C/K, (k+1) C/K)


class ShuffleSplit(nn.Module):
    """Token-unshuffle: each output position (B, N, C) -> the features of its K tokens (B, N, K, C)."""

    def __init__(self, dim: int, window: int = 2, num_blocks: int = 2):
        super().__init__()
        self.K = _check_dims(dim, window, num_blocks)
        self.blocks = nn.Sequential(*(ResidualMLP(dim) for _ in range(num_blocks)))
        self.expand = nn.Linear(dim // self.K, dim)

    def forward(self, h_BNC: torch.Tensor) -> torch.Tensor:
        B, N, C = h_BNC.shape
        return self.expand(self.blocks(h_BNC).reshape(B, N, self.K, C // self.K))
