"""The Token-Shuffle decoder (Ma et al., 2025, "Token-Shuffle: Towards High-Resolution Image Generation with
Autoregressive Models", arXiv 2504.17789): the LLaMA-style `Transformer` with token-shuffle before it and
token-unshuffle after it, so one decoder position carries an s x s window of image tokens.

Visual codes live in a low-dimensional codebook but enter the decoder as wide embeddings, so neighbouring
tokens are redundant. Token-shuffle merges every s x s window of token features along the channels into one
token before the transformer (s^2 fewer positions); token-unshuffle splits each output back into s^2 tokens.

Window order, used by every function and module here and by `mmgen.paradigms.token_shuffle`: windows in raster
order over the (H/s, W/s) window grid; the s*s tokens inside a window in raster order too, so token (dy, dx) of
window (i, j) is grid cell (i*s + dy, j*s + dx), takes slot k = dy*s + dx and fills channels [k*C, (k+1)*C) of
the merged token (`shuffle`, `unshuffle` and their id versions).

Layers, following the paper's description: `ShuffleMerge` maps each token d -> d/s^2 with a linear layer,
concatenates the window (width d again) and refines it with residual MLP blocks; `ShuffleSplit` is the reverse
after the transformer: residual MLP blocks, then s^2 parts of width d/s^2, each expanded back to d by a shared
linear layer. The paper puts residual MLP blocks around both operations without giving their number
(`num_blocks`, 2 by default here).

Inputs of `TokenShuffleTransformer`: text and special tokens embed through the backbone's table as usual; an
image window (K = s^2 codes, slot order above) embeds each code through the same table (image ids of the unified
vocabulary) and `ShuffleMerge` folds the K embeddings into one input token. Outputs: the backbone's normed
hidden state at each position goes through `ShuffleSplit` into K token features, and slot k is classified
over the image vocabulary by its own `LogitsHead` (K heads, not one shared head: the slots sit at fixed
offsets inside the window, and a head per slot lets each specialise; the paper does not say which it uses).

The model only computes; the layout, loss and sampling loop are in `mmgen.paradigms.token_shuffle`.

Letters: B batch, H W token grid, T positions, N = (H/s)(W/s) windows, K = s^2 tokens per window, C channels
(the model width), V image vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config

from mmgen.models.heads import LogitsHead
from mmgen.models.transformer import KVCache, RMSNorm, Transformer


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


class TokenShuffleTransformer(ModelMixin, ConfigMixin):
    """Decoder over the unified vocabulary whose image positions are s x s windows. Forward only."""

    _no_split_modules = ["Block", "ResidualMLP"]  # FSDP units: the trunk's blocks and Token-Shuffle's own

    @register_to_config
    def __init__(
        self,
        vocab_size: int,
        image_vocab_size: int,
        shuffle_window: int = 2,
        shuffle_mlp_blocks: int = 2,
        dim: int = 256,
        n_layers: int = 6,
        n_heads: int = 8,
        n_kv_heads: int | None = None,
        mlp_hidden: int | None = None,
        max_seq_len: int = 512,
        rope_theta: float = 10000.0,
        rope_2d: bool = True,
        norm_eps: float = 1e-5,
    ):
        super().__init__()
        if isinstance(image_vocab_size, bool) or not isinstance(image_vocab_size, int) \
                or not 1 <= image_vocab_size < vocab_size:
            raise ValueError(f"image_vocab_size must be an integer in [1, vocab_size={vocab_size}) (image ids are "
                             f"the last ones of the unified vocabulary), got {image_vocab_size!r}")
        self.transformer = Transformer(vocab_size, dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads,
                                       mlp_hidden=mlp_hidden, max_seq_len=max_seq_len, rope_theta=rope_theta,
                                       rope_2d=rope_2d, norm_eps=norm_eps, logits_head=False)
        self.merge = ShuffleMerge(dim, shuffle_window, shuffle_mlp_blocks)
        self.split = ShuffleSplit(dim, shuffle_window, shuffle_mlp_blocks)
        self.norm = RMSNorm(dim, norm_eps)
        self.heads = nn.ModuleList(LogitsHead(dim, image_vocab_size) for _ in range(shuffle_window ** 2))
        for head in self.heads:
            nn.init.normal_(head.proj.weight, std=0.02)

    @property
    def tokens_per_step(self) -> int:
        return self.config.shuffle_window ** 2

    @property
    def image_offset(self) -> int:
        return self.config.vocab_size - self.config.image_vocab_size

    def new_cache(self, batch_size: int, max_len: int | None = None) -> KVCache:
        return self.transformer.new_cache(batch_size, max_len)

    def embed_windows(self, windows_BNK: torch.Tensor) -> torch.Tensor:
        """Image codes (B, N, K), in [0, image_vocab_size) -> merged input tokens (B, N, C)."""
        if windows_BNK.shape[-1] != self.tokens_per_step:
            raise ValueError(f"windows must hold s^2 = {self.tokens_per_step} codes each, got shape "
                             f"{tuple(windows_BNK.shape)}")
        return self.merge(self.transformer.tok_emb(windows_BNK + self.image_offset))

    def forward(
        self,
        text_tokens: torch.Tensor | None,
        windows: torch.Tensor | None,
        positions: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        start: int | None = None,
        logits_to_keep: int | None = None,
    ) -> torch.Tensor:
        """Image logits (B, T', K, V) for text tokens (B, T0) followed by image windows (B, N, K) (either part may
        be None; T = T0 + N). Only the last `logits_to_keep` positions get logits (all when None), so the text
        block pays for no heads. positions, mask, cache, start: as in `Transformer.forward`."""
        parts = []
        if text_tokens is not None:
            parts.append(self.transformer.tok_emb(text_tokens))
        if windows is not None:
            parts.append(self.embed_windows(windows))
        if not parts:
            raise ValueError("give text_tokens, windows or both")
        x_BTC = torch.cat(parts, 1) if len(parts) > 1 else parts[0]
        h_BTC = self.transformer(inputs_embeds=x_BTC, positions=positions, mask=mask, cache=cache, start=start)
        if logits_to_keep is not None:
            if isinstance(logits_to_keep, bool) or not isinstance(logits_to_keep, int) \
                    or not 1 <= logits_to_keep <= h_BTC.shape[1]:
                raise ValueError(f"logits_to_keep must be an integer in [1, {h_BTC.shape[1]}], got {logits_to_keep!r}")
            h_BTC = h_BTC[:, -logits_to_keep:]
        e_BTKC = self.norm(self.split(h_BTC))
        return torch.stack([head(e_BTKC[:, :, k]) for k, head in enumerate(self.heads)], 2)
