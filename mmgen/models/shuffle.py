"""The Token-Shuffle decoder (Ma et al., 2025, "Token-Shuffle: Towards High-Resolution Image Generation with
Autoregressive Models", arXiv 2504.17789): the LLaMA-style `Transformer` with token-shuffle before it and
token-unshuffle after it, so one decoder position carries an s x s window of image tokens.

Inputs: text and special tokens embed through the backbone's table as usual; an image window (K = s^2 codes,
slot order of `tokenizers_vis.shuffle`) embeds each code through the same table (image ids of the unified
vocabulary) and `ShuffleMerge` folds the K embeddings into one input token. Outputs: the backbone's normed
hidden state at each position goes through `ShuffleSplit` into K token features, and slot k is classified
over the image vocabulary by its own `LogitsHead` (K heads, not one shared head: the slots sit at fixed
offsets inside the window, and a head per slot lets each specialise; the paper does not say which it uses).

The model only computes; the layout, loss and sampling loop are in `mmgen.paradigms.token_shuffle`.

Letters: B batch, T positions, K = s^2 tokens per window, C model width, V image vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config

from mmgen.models.heads import LogitsHead
from mmgen.models.transformer import KVCache, RMSNorm, Transformer
from tokenizers_vis.shuffle import ShuffleMerge, ShuffleSplit


class TokenShuffleTransformer(ModelMixin, ConfigMixin):
    """Decoder over the unified vocabulary whose image positions are s x s windows. Forward only."""

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
