"""Distortion-free watermarking of AR image token streams: C-reweight and the baselines.

The problem (Wu et al., "A Watermark for Auto-Regressive Image Generation Models", arXiv 2506.11371): an
image is generated as tokens, decoded to pixels, and re-encoded at detection time; the re-encoded tokens
differ from the generated ones, which breaks token-level text watermarks. C-reweight clusters the codebook
(k-means on the code vectors, the space the quantizer assigns in) and watermarks the *cluster* distribution,
so a re-encoded token that lands in the same cluster still carries the signal.

At step t, with prefix x_<t and secret key:

1. context = clusters of the previous h tokens (-1 before the start); if that context already occurred at an
   earlier position of the sequence, the step is left unwatermarked (a reused key would correlate the
   steps and bias the sequence; the detector skips the same positions, which keeps its p-value exact);
2. a keyed permutation pi of the K clusters, from a PRF of (key, context);
3. cluster marginals P_C(k) = sum of P(v) over v in cluster k, reweighted in pi order with DiPmark's
   alpha-reweight (alpha = 0.5 is the gamma-reweight of Hu et al.): with F the cumulative mass in pi order,
   F'(i) = max(F(i) - alpha, 0) + max(F(i) - (1 - alpha), 0). Averaged over pi this is the identity, so the
   watermark is distortion-free for a uniformly random key;
4. P'(v) = P'_C(c(v)) P(v) / P_C(c(v)): mass is spread back inside each cluster in proportion.

Detection needs the tokenizer and the key only (no decoder pass): re-encode, map to clusters, and count the
scored positions whose cluster sits in the last (1 - gamma) share of pi ("green"). Under H0 (no watermark),
distinct contexts give independent permutations, so the green count is Binomial(n, g) with g the green share;
the p-value is its exact upper tail.

Baselines in the same code: `token-reweight` (the same reweight with every token its own cluster) and KGW
(Kirchenbauer et al. 2023; +delta on a keyed green list of gamma |V| items; distorting) at token and cluster
level.

The PRF is blake2b of (key, context) seeding splitmix64, so permutations are the same on every platform and
library version: a watermark can be detected years later.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

METHODS = ("c-reweight", "token-reweight", "kgw-token", "kgw-cluster")
_MASK64 = (1 << 64) - 1


@dataclass
class WatermarkConfig:
    method: str = "c-reweight"
    num_clusters: int = 16
    context: int = 2  # h: previous tokens whose clusters key the permutation
    alpha: float = 0.5  # DiPmark alpha-reweight (0.5 = gamma-reweight)
    gamma: float = 0.5  # detection: green = last (1 - gamma) share of the permutation; KGW green-list share
    delta: float = 2.0  # KGW logit bias
    clusters: list[int] = field(default_factory=list)  # token -> cluster table (saved with the model)

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"watermark method must be one of {', '.join(METHODS)}; got {self.method!r}")
        if not isinstance(self.context, int) or self.context < 0:
            raise ValueError(f"watermark context must be an integer >= 0, got {self.context!r}")
        if not 0 <= self.alpha <= 0.5:
            raise ValueError(f"watermark alpha must be in [0, 0.5], got {self.alpha}")
        if not 0 < self.gamma < 1:
            raise ValueError(f"watermark gamma must be in (0, 1), got {self.gamma}")

    @property
    def cluster_level(self) -> bool:
        return self.method in ("c-reweight", "kgw-cluster")

    @property
    def num_symbols(self) -> int:
        """Size of the alphabet the permutation runs over (clusters, or the whole vocabulary)."""
        return self.num_clusters if self.cluster_level else len(self.clusters)

    def symbols(self, tokens: torch.Tensor) -> torch.Tensor:
        """Tokens -> the symbols watermarked (cluster ids, or the tokens themselves)."""
        if not self.cluster_level:
            return tokens
        return torch.as_tensor(self.clusters, device=tokens.device)[tokens]

    def save(self, path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        with os.fdopen(fd, "w") as f:
            json.dump(asdict(self), f)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path) -> WatermarkConfig:
        with open(path) as f:
            data = json.load(f)
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"{path}: unknown watermark config keys {sorted(unknown)}")
        return cls(**data)


def kmeans(x_ND: torch.Tensor, k: int, iters: int = 50, seed: int = 0) -> torch.Tensor:
    """Lloyd's k-means with k-means++ seeding; returns labels (N,). Deterministic for a seed."""
    if not 1 <= k <= len(x_ND):
        raise ValueError(f"num_clusters must be in [1, {len(x_ND)}] (codebook size), got {k}")
    g = torch.Generator().manual_seed(seed)
    x = x_ND.float().cpu()
    centers = [x[torch.randint(len(x), (1,), generator=g)].squeeze(0)]
    for _ in range(1, k):
        d = torch.cdist(x, torch.stack(centers)).min(1).values.pow(2)
        centers.append(x[torch.multinomial(d / d.sum(), 1, generator=g)].squeeze(0))
    c = torch.stack(centers)
    labels = torch.cdist(x, c).argmin(1)
    for _ in range(iters):
        for j in range(k):
            members = x[labels == j]
            if len(members):
                c[j] = members.mean(0)
        new = torch.cdist(x, c).argmin(1)
        if torch.equal(new, labels):
            break
        labels = new
    return labels


def cluster_codebook(codebook_VD: torch.Tensor, num_clusters: int, seed: int = 0) -> list[int]:
    return kmeans(codebook_VD, num_clusters, seed=seed).tolist()


# ---- keyed pseudo-random permutations -------------------------------------------------------------------


def _seed(key: str, context: tuple[int, ...]) -> int:
    h = hashlib.blake2b(digest_size=8, key=key.encode()[:64])
    h.update(json.dumps(context).encode())
    return int.from_bytes(h.digest(), "little")


def _splitmix64(seed: int, n: int) -> np.ndarray:
    x = (np.uint64(seed) + np.arange(1, n + 1, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15))
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


class KeyedPermutations:
    """rank[s] of every symbol s under the permutation keyed by (key, context); cached."""

    def __init__(self, key: str, num_symbols: int):
        if not isinstance(key, str) or not key:
            raise ValueError("watermark key must be a non-empty string")
        self.key, self.n, self._cache = key, num_symbols, {}

    def ranks(self, context: tuple[int, ...]) -> torch.Tensor:
        r = self._cache.get(context)
        if r is None:
            order = np.argsort(_splitmix64(_seed(self.key, context), self.n), kind="stable")
            r = torch.empty(self.n, dtype=torch.long)
            r[torch.from_numpy(order.astype(np.int64))] = torch.arange(self.n)
            self._cache[context] = r
        return r


def contexts(symbols: list[int], h: int) -> list[tuple[int, ...]]:
    """Context of every position: the previous h symbols, -1 before the start."""
    padded = [-1] * h + list(symbols)
    return [tuple(padded[i:i + h]) for i in range(len(symbols) + 1)]


def first_occurrence(ctxs: list[tuple[int, ...]]) -> list[bool]:
    seen, first = set(), []
    for c in ctxs:
        first.append(c not in seen)
        seen.add(c)
    return first


# ---- reweighting ------------------------------------------------------------------------------------------


def alpha_reweight(p_BK: torch.Tensor, ranks_BK: torch.Tensor, alpha: float) -> torch.Tensor:
    """DiPmark alpha-reweight of distributions p (B, K) with symbol s at permuted position ranks[s]."""
    order = ranks_BK.argsort(-1)  # order[i] = symbol at position i
    p_sorted = p_BK.gather(-1, order)
    F = p_sorted.cumsum(-1).clamp_max(1.0)
    Fw = (F - alpha).clamp_min(0) + (F - (1 - alpha)).clamp_min(0)
    q_sorted = torch.diff(Fw, dim=-1, prepend=torch.zeros_like(Fw[..., :1])).clamp_min(0)
    return torch.zeros_like(p_BK).scatter(-1, order, q_sorted)


class WatermarkProcessor:
    """Logits processor: (log-probs (N, V), prefixes) -> watermarked log-probs (N, V).

    A function of the prefix only, so it composes with CFG, temperature, top-k/top-p (applied before it, on
    the final sampling distribution) and with speculative Jacobi decoding (which then samples exactly the
    watermarked distribution)."""

    def __init__(self, config: WatermarkConfig, key: str):
        if not config.clusters:
            raise ValueError("watermark config has no cluster table; build one with cluster_codebook")
        self.config = config
        self.clusters = torch.as_tensor(config.clusters)
        self.perms = KeyedPermutations(key, config.num_symbols)

    def __call__(self, logits_NV: torch.Tensor, prefix_NL: torch.Tensor, lengths_N: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        probs = logits_NV.float().softmax(-1)
        N, V = probs.shape
        ranks, active = torch.zeros(N, cfg.num_symbols, dtype=torch.long), torch.zeros(N, dtype=torch.bool)
        prefix_sym = cfg.symbols(prefix_NL.cpu())
        for i in range(N):
            syms = prefix_sym[i, : int(lengths_N[i])].tolist()
            ctxs = contexts(syms, cfg.context)
            if ctxs[-1] in ctxs[:-1]:
                continue  # this context keyed an earlier step: leave the step unwatermarked
            ranks[i], active[i] = self.perms.ranks(ctxs[-1]), True
        if not bool(active.any()):
            return logits_NV
        ranks = ranks.to(probs.device)
        if cfg.method in ("c-reweight", "token-reweight"):
            if cfg.cluster_level:
                idx = self.clusters.to(probs.device).expand(N, V)
                pc = torch.zeros(N, cfg.num_clusters, device=probs.device).scatter_add(-1, idx, probs)
                qc = alpha_reweight(pc, ranks, cfg.alpha)
                scale = torch.where(pc > 0, qc / pc.clamp_min(1e-30), torch.zeros_like(pc))
                new = probs * scale.gather(-1, idx)
            else:
                new = alpha_reweight(probs, ranks, cfg.alpha)
            new = new / new.sum(-1, keepdim=True).clamp_min(1e-30)
            out = torch.where(new > 0, new.clamp_min(1e-38).log(), torch.full_like(new, float("-inf")))
        else:  # KGW: +delta on the green symbols (ranks in the last (1 - gamma) share)
            green = ranks >= math.ceil(cfg.gamma * cfg.num_symbols)
            if cfg.cluster_level:
                green = green.gather(-1, self.clusters.to(probs.device).expand(N, V))
            out = logits_NV.float().log_softmax(-1) + cfg.delta * green.float()
        return torch.where(active[:, None].to(out.device), out, logits_NV.float())


# ---- detection --------------------------------------------------------------------------------------------


def binomial_sf(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p), exact (log-space sum)."""
    if k <= 0:
        return 1.0
    if k > n:
        return 0.0
    terms = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * math.log(p)
             + (n - i) * math.log1p(-p) for i in range(k, n + 1)]
    m = max(terms)
    return min(1.0, math.exp(m) * sum(math.exp(t - m) for t in terms))


@dataclass
class Detection:
    green: int  # scored positions whose symbol is green
    scored: int  # positions with a first-occurrence context
    green_share: float  # g: probability of green under H0
    p_value: float

    @property
    def score(self) -> float:
        """z-score of the green count under H0."""
        g, n = self.green_share, max(self.scored, 1)
        return (self.green - g * n) / math.sqrt(n * g * (1 - g))

    def as_dict(self, fpr: float | None = None) -> dict:
        d = {"green": self.green, "scored": self.scored, "score": round(self.score, 4), "p_value": self.p_value}
        if fpr is not None:
            d["watermarked"] = self.p_value < fpr
        return d


def detect_tokens(tokens: torch.Tensor, config: WatermarkConfig, key: str) -> list[Detection]:
    """Detections for token sequences (B, N) (raster order), from the key and the cluster table only."""
    perms = KeyedPermutations(key, config.num_symbols)
    threshold = math.ceil(config.gamma * config.num_symbols)
    g = (config.num_symbols - threshold) / config.num_symbols
    out = []
    for row in config.symbols(tokens.reshape(len(tokens), -1).cpu()).tolist():
        ctxs = contexts(row, config.context)
        first = first_occurrence(ctxs[:-1])
        green = scored = 0
        for sym, ctx, f in zip(row, ctxs, first):
            if f:
                scored += 1
                green += int(perms.ranks(ctx)[sym] >= threshold)
        out.append(Detection(green, scored, g, binomial_sf(green, scored, g)))
    return out
