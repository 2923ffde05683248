"""Distortion-free watermarking of AR image token streams: C-reweight and the baselines.

The problem (Wu et al., "A Watermark for Auto-Regressive Image Generation Models", arXiv 2506.11371): an
image is generated as tokens, decoded to pixels, and re-encoded at detection time; the re-encoded tokens
differ from the generated ones, which breaks token-level text watermarks. C-reweight clusters the codebook
and watermarks the *cluster* distribution, so a re-encoded token that lands in the same cluster still carries
the signal. Two ways to build the table (`clustering`): k-means on the code vectors (the space the quantizer
assigns in), or `cluster_by_confusion` on the measured decode -> encode confusion of codes
(`scripts/watermark_channel.py`).

At step t, with prefix x_<t and secret key:

1. context = clusters of the previous h tokens (-1 before the start); if that context already occurred at an
   earlier position of the sequence, the step is left unwatermarked (a reused key would correlate the
   steps and bias the sequence; the detector skips the same positions, which keeps its p-value exact).
   `keying="position"` puts the position index in front of the context (h = 0 allowed): keys never repeat,
   every step is watermarked, but the same key reuses each position's permutation across images;
2. a keyed permutation pi of the K clusters, from a PRF of (key, context);
3. cluster marginals P_C(k) = sum of P(v) over v in cluster k, reweighted in pi order with DiPmark's
   alpha-reweight (alpha = 0.5 is the gamma-reweight of Hu et al.): with F the cumulative mass in pi order,
   F'(i) = max(F(i) - alpha, 0) + max(F(i) - (1 - alpha), 0). Averaged over pi this is the identity, so the
   watermark is distortion-free for a uniformly random key;
4. P'(v) = P'_C(c(v)) P(v) / P_C(c(v)): mass is spread back inside each cluster in proportion.

Detection needs the tokenizer and the key only (no decoder pass): re-encode, map to clusters, and look up the
rank of each scored position's cluster in its pi. `statistic="rank"` sums the ranks; `"green"` counts the
clusters in the last (1 - gamma) share of pi. Under H0 (no watermark), distinct contexts give independent
permutations, so the ranks are iid uniform: the rank sum has an exact null (a sum of discrete uniforms) and the
green count is Binomial(n, g) with g the green share; the p-value is the exact upper tail of either.

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
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import torch
import torch.nn.functional as F

from mmgen.atomic import write_text_atomic

METHODS = ("c-reweight", "token-reweight", "kgw-token", "kgw-cluster")
CLUSTERINGS = ("kmeans", "confusion")
KEYINGS = ("clusters", "position")
STATISTICS = ("green", "rank")
_MASK64 = (1 << 64) - 1


@dataclass
class WatermarkConfig:
    method: str = "c-reweight"
    num_clusters: int = 16
    context: int = 2  # h: previous tokens whose clusters key the permutation
    alpha: float = 0.5  # DiPmark alpha-reweight (0.5 = gamma-reweight)
    gamma: float = 0.5  # detection: green = last (1 - gamma) share of the permutation; KGW green-list share
    delta: float = 2.0  # KGW logit bias
    keying: str = "clusters"  # permutation keyed by the previous h symbols, or by (position, previous h)
    statistic: str = "rank"  # detection: sum of permutation ranks, or count of green symbols
    clustering: str = "kmeans"  # how `clusters` was built: k-means on the codebook, or the retokenization channel
    clusters: list[int] = field(default_factory=list)  # token -> cluster table (saved with the model)
    # directory (relative to the pipeline) of the encoder detection reads images with: the tokenizer's encoder
    # tuned for reverse-cycle consistency (scripts/train_rcc.py); None: the tokenizer's own encoder
    encoder: str | None = None

    def __post_init__(self):
        for name, value, accepted in (("method", self.method, METHODS), ("keying", self.keying, KEYINGS),
                                      ("statistic", self.statistic, STATISTICS),
                                      ("clustering", self.clustering, CLUSTERINGS)):
            if value not in accepted:
                raise ValueError(f"watermark {name} must be one of {', '.join(accepted)}; got {value!r}")
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

    def variant(self, method: str | None = None, delta: float | None = None) -> WatermarkConfig:
        """This config with another method (KGW methods detect with the green count, the reweights with the
        rank sum unless this config already is that method) and/or KGW strength `delta`; cluster table, key
        context and keying stay. None keeps what is set."""
        if method is None and delta is None:
            return self
        changes = {}
        if method is not None and method != self.method:
            if method not in METHODS:
                raise ValueError(f"watermark method must be one of {', '.join(METHODS)}; got {method!r}")
            changes.update(method=method, statistic="green" if method.startswith("kgw") else "rank")
        if delta is not None:
            if not (isinstance(delta, (int, float)) and 0 < delta <= 20):
                raise ValueError(f"watermark delta must be a number in (0, 20], got {delta!r}")
            if not (method or self.method).startswith("kgw"):
                raise ValueError(f"watermark delta sets the strength of the KGW methods (kgw-token, kgw-cluster); "
                                 f"method {method or self.method!r} is distortion-free and has none")
            changes["delta"] = float(delta)
        return replace(self, **changes)

    def save(self, path) -> None:
        write_text_atomic(path, json.dumps(asdict(self)))

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


def confusion_matrix(codes: torch.Tensor, recoded: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Counts (V, V) of code i generated -> code j read back after decode -> encode, from aligned token
    tensors of any (equal) shape."""
    if codes.shape != recoded.shape:
        raise ValueError(f"codes {tuple(codes.shape)} and recoded {tuple(recoded.shape)} must have one shape")
    flat = codes.reshape(-1).long().cpu() * vocab_size + recoded.reshape(-1).long().cpu()
    return torch.bincount(flat, minlength=vocab_size * vocab_size).view(vocab_size, vocab_size).float()


def cluster_by_confusion(confusion_VV: torch.Tensor, codebook_VD: torch.Tensor, num_clusters: int,
                         mass_cap: float = 2.0, seed: int = 0, sweeps: int = 20) -> list[int]:
    """Cluster the codebook so that codes the retokenization channel confuses share a cluster.

    Starts from k-means on the code vectors (codes never observed in `confusion` stay there: the quantizer
    assigns by distance, so neighbours are the likeliest confusions), then moves codes one at a time, heaviest
    first, to the cluster holding most of their symmetrised confusion mass, as long as that cluster's share
    of the generated mass stays below mass_cap / K. The cap keeps clusters balanced: a cluster that holds most
    of the probability leaves the reweighting nothing to move. Each move raises the within-cluster confusion,
    so the sweeps end."""
    V = len(codebook_VD)
    if confusion_VV.shape != (V, V):
        raise ValueError(f"confusion must be ({V}, {V}) for a codebook of {V} codes, got {tuple(confusion_VV.shape)}")
    if mass_cap < 1:
        raise ValueError(f"mass_cap must be >= 1 (times the balanced share 1/K), got {mass_cap}")
    labels = kmeans(codebook_VD, num_clusters, seed=seed)
    C = confusion_VV.double().cpu()
    S = C + C.T
    mass = C.sum(1) / C.sum().clamp_min(1)
    cap = mass_cap / num_clusters
    for _ in range(sweeps):
        moved = False
        cluster_mass = torch.zeros(num_clusters, dtype=torch.double).scatter_add(0, labels, mass)
        for i in mass.argsort(descending=True, stable=True).tolist():
            gain = torch.zeros(num_clusters, dtype=torch.double).scatter_add(0, labels, S[i])
            own = int(labels[i])
            gain[own] -= S[i, i]  # confusion with itself counts wherever i goes
            full = cluster_mass + mass[i] > cap
            full[own] = False
            gain[full] = -1.0
            best = int(gain.argmax())
            if best != own and gain[best] > gain[own]:
                labels[i] = best
                cluster_mass[own] -= mass[i]
                cluster_mass[best] += mass[i]
                moved = True
        if not moved:
            break
    return labels.tolist()


# ---- keyed pseudo-random permutations -------------------------------------------------------------------


def _seed(key: str, context: tuple[int, ...]) -> int:
    h = hashlib.blake2b(digest_size=8, key=key.encode()[:64])
    h.update(json.dumps(context).encode())
    return int.from_bytes(h.digest(), "little")


def _splitmix64(seeds: np.ndarray, n: int) -> np.ndarray:
    """(M, n) splitmix64 outputs 1..n of each of the M seeds."""
    x = (seeds.astype(np.uint64)[:, None] + np.arange(1, n + 1, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15))
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
            r = self._cache[context] = self.permutations([context])[1][0]
        return r

    def permutations(self, contexts: list[tuple]) -> tuple[torch.Tensor, torch.Tensor]:
        """The permutations of M contexts at once, uncached: order (M, n), the symbol at each permuted position, and
        ranks (M, n), each symbol's position (the values of `ranks`)."""
        seeds = np.array([_seed(self.key, c) for c in contexts], dtype=np.uint64)
        order = np.argsort(_splitmix64(seeds, self.n), axis=1, kind="stable").astype(np.int64, copy=False)
        return torch.from_numpy(order), torch.from_numpy(np.argsort(order, axis=1))  # ranks: order's inverse


def contexts(symbols: list[int], h: int, keying: str = "clusters") -> list[tuple]:
    """Context of every position: the previous h symbols (-1 before the start), led by the position index
    under keying "position". Position keys never repeat inside a sequence, so every step is watermarked and
    scored, and with h = 0 a position's key does not depend on its neighbours being re-encoded correctly."""
    padded = [-1] * h + list(symbols)
    ctxs = [tuple(padded[i:i + h]) for i in range(len(symbols) + 1)]
    if keying == "position":
        ctxs = [("position", i, *c) for i, c in enumerate(ctxs)]
    return ctxs


@dataclass(frozen=True)
class KeyOrder:
    """Where each position of a token grid takes its key from, for paradigms that decode a grid out of raster
    order (next-neighbour, next-block), so that every context is decoded before the token it keys.
    `parents[i]`: the raster index of the position whose symbol ends position i's context (then that position's
    parent, and so on, h symbols; -1 ends the chain and the rest is -1, as before the start of a raster
    sequence). `order`: the raster indices in decoding order; a context keys only its first position in this
    order, at generation (`WatermarkProcessor.keyed_by`) and at detection (`detect_tokens(..., order=)`) alike, so
    the scored contexts stay distinct and the p-value exact. `KeyOrder.raster(n)` gives the raster contexts of
    `contexts` (each position keyed by the h tokens before it)."""

    parents: tuple[int, ...]
    order: tuple[int, ...]

    def __post_init__(self):
        n = len(self.parents)
        if sorted(self.order) != list(range(n)):
            raise ValueError(f"KeyOrder.order must hold each of the {n} positions once")
        rank = self.rank
        if any(not -1 <= q < n or (q >= 0 and rank[q] >= rank[p]) for p, q in enumerate(self.parents)):
            raise ValueError("KeyOrder.parents must be -1 or positions decoded before their children")

    @classmethod
    def raster(cls, n: int) -> KeyOrder:
        return cls(tuple(range(-1, n - 1)), tuple(range(n)))

    @property
    def rank(self) -> list[int]:
        """rank[i]: where raster position i comes in `order`."""
        rank = [0] * len(self.order)
        for k, i in enumerate(self.order):
            rank[i] = k
        return rank

    def context(self, symbols: list[int], i: int, h: int, keying: str = "clusters") -> tuple:
        """The context of raster position i of one image's symbols (raster order)."""
        chain, q = [], self.parents[i]
        while q >= 0 and len(chain) < h:
            chain.append(symbols[q])
            q = self.parents[q]
        ctx = tuple([-1] * (h - len(chain)) + chain[::-1])
        return ("position", i, *ctx) if keying == "position" else ctx


# ---- reweighting ------------------------------------------------------------------------------------------


def alpha_reweight(p_BK: torch.Tensor, ranks_BK: torch.Tensor, alpha: float,
                   order_BK: torch.Tensor | None = None) -> torch.Tensor:
    """DiPmark alpha-reweight of distributions p (B, K) with symbol s at permuted position ranks[s] (`order_BK`: the
    symbol at each position, ranks' inverse, where the caller has it)."""
    order = ranks_BK.argsort(-1) if order_BK is None else order_BK  # order[i] = symbol at position i
    p_sorted = p_BK.gather(-1, order)
    cdf = p_sorted.cumsum(-1).clamp_max(1.0)
    cdf_w = (cdf - alpha).clamp_min(0) + (cdf - (1 - alpha)).clamp_min(0)
    q_sorted = torch.diff(cdf_w, dim=-1, prepend=torch.zeros_like(cdf_w[..., :1])).clamp_min(0)
    return q_sorted.gather(-1, ranks_BK)  # symbol s's mass sits at its position ranks[s]


# a key context space of at most this many ids gets its whole rank table (from a processor's second call: a first call
# looks up its own ids only), so no later step makes a host round trip (the default C-reweight, K = 16 clusters and
# h = 2, has 17^2 = 289 ids); a larger one is filled as ids appear
DENSE_CONTEXTS = 4096


class _RankTable:
    """The permutation of every context id, as order (S,) and ranks (S,), on one device: every id of a small space at
    once, else the ids met so far, added with one host round trip per call that meets new ones (the keyed PRF,
    blake2b, runs on the host)."""

    def __init__(self, perms: KeyedPermutations, context_of, size: int, device, dense: bool):
        self.perms, self.context_of, self.size, self.device, self.dense = perms, context_of, size, device, dense
        self.slot, self.order, self.ranks = {}, None, None
        if self.dense:
            self.order, self.ranks = (t.to(device) for t in perms.permutations([context_of(i) for i in range(size)]))

    def __call__(self, ids_N: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(order (N, S), ranks (N, S)) of the contexts ids_N."""
        if self.dense:
            return self.order[ids_N], self.ranks[ids_N]
        ids = ids_N.tolist()
        new = [i for i in dict.fromkeys(ids) if i not in self.slot]
        if new:
            start, end = len(self.slot), len(self.slot) + len(new)
            self.slot.update((i, start + k) for k, i in enumerate(new))
            order, ranks = (t.to(self.device) for t in self.perms.permutations([self.context_of(i) for i in new]))
            if not start:
                self.order, self.ranks = order, ranks
            else:
                if end > len(self.order):  # grow by doubling: a long run copies its rows at most twice over
                    grow = lambda t: torch.cat([t[:start], t.new_empty(2 * end - start, t.shape[1])])  # noqa: E731
                    self.order, self.ranks = grow(self.order), grow(self.ranks)
                self.order[start:end], self.ranks[start:end] = order, ranks
        slots = torch.tensor([self.slot[i] for i in ids], device=self.device)
        return self.order[slots], self.ranks[slots]


class WatermarkProcessor:
    """Logits processor: (log-probs (N, V), prefixes) -> watermarked log-probs (N, V), on the logits' device.

    A function of the prefix only, so it composes with CFG, temperature, top-k/top-p (applied before it, on
    the final sampling distribution) and with speculative Jacobi decoding (which then samples exactly the
    watermarked distribution).

    Vectorised over rows and positions: a position's key context is one integer id, its h previous symbols as
    base-(S + 1) digits (S symbols; the -1 before the start is digit 0), led by the position itself under
    keying="position". A few tensor ops give the ids of every position of every row (each from the h symbols
    before it, no tuples), a step is keyed iff its id does not occur at an earlier position of its row, and its
    permutation (order and ranks) comes from a `_RankTable` on the device. Where the ids are few (the default
    C-reweight) no step leaves the device; token-level methods (S = the vocabulary) look new ids up on the host once
    per step. The same tokens as the per-row form (tests/test_watermark.py holds a slow reference)."""

    def __init__(self, config: WatermarkConfig, key: str):
        if not config.clusters:
            raise ValueError("watermark config has no cluster table; build one with cluster_codebook")
        self.config = config
        self.clusters = torch.as_tensor(config.clusters)
        self.perms = KeyedPermutations(key, config.num_symbols)
        self.base = config.num_symbols + 1
        # a context's symbols are its id's base-(S + 1) digits, oldest first; digit = symbol + 1
        self.weights = torch.tensor([self.base ** j for j in range(config.context - 1, -1, -1)], dtype=torch.long)
        self._on, self._tables, self._order = {}, {}, None

    def __call__(self, logits_NV: torch.Tensor, prefix_BL: torch.Tensor, lengths_N: torch.Tensor,
                 rows_N: torch.Tensor | None = None) -> torch.Tensor:
        """Row n of `logits_NV` is the distribution of the token after prefix_BL[rows_N[n], :lengths_N[n]] (rows_N
        None: prefix row n; a length past the prefix's end reads the whole row). `rows_N` lets the positions of a
        speculative window share their sequence's prefix row instead of a copy each."""
        device = logits_NV.device
        prefix = prefix_BL.to(device)
        size = self._space(prefix.shape[1] + 1)
        at = lengths_N.to(device).clamp_max(prefix.shape[1])
        ids = self._raster_ids(self._digits(prefix))  # (B, L + 1): the context of every position
        if rows_N is not None:
            ids = ids[rows_N.to(device)]
        return self._step(logits_NV, ids, at, size)

    def keyed_by(self, order: KeyOrder, logits_NV: torch.Tensor, codes_BL: torch.Tensor, rows_N: torch.Tensor,
                 positions_N: torch.Tensor) -> torch.Tensor:
        """Watermarked log-probs for tokens decoded out of raster order: row n of `logits_NV` is the distribution
        of raster position positions_N[n] of image rows_N[n]; `codes_BL` (B, h*w) holds every position decoded so
        far (the rest may hold anything). The key comes from `order`'s context; a context that an earlier
        position of `order` already keyed leaves the step unwatermarked, as `__call__` does along a prefix."""
        device = logits_NV.device
        chain, decoding, rank = self._order_tables(order, device)
        size = self._space(len(order.order))
        digits = self._digits(codes_BL.to(device))
        ids = self._ids(torch.where(chain >= 0, digits[:, chain.clamp_min(0)], 0))  # (B, n), raster positions
        ids = ids[rows_N.to(device)][:, decoding]  # (N, n), in decoding order
        at = rank[positions_N.to(device)]  # each position's place in that order
        return self._step(logits_NV, ids, at, size)

    def _step(self, logits_NV: torch.Tensor, ids_NP: torch.Tensor, at_N: torch.Tensor, size: int) -> torch.Tensor:
        """Row n's step keys by the context id at position at_N[n] of ids_NP[n], where that id occurs first: a
        context seen at an earlier position leaves the step unwatermarked (argmax returns the first maximum).
        Position keys never repeat."""
        cur = ids_NP.gather(1, at_N[:, None])
        if self.config.keying == "position":
            fresh = torch.ones(len(ids_NP), dtype=torch.bool, device=ids_NP.device)
        else:
            fresh = (ids_NP == cur).to(torch.uint8).argmax(1) == at_N
        return self._reweight(logits_NV, *self._table(size, logits_NV.device)(cur[:, 0]), fresh)

    # ---- context ids -------------------------------------------------------------------------------------------

    def _constants(self, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The cluster table, its digits (cluster + 1) and the digits' weights on `device`, moved there once."""
        on = self._on.get(device)
        if on is None:
            clusters = self.clusters.to(device)
            on = self._on[device] = (clusters, clusters + 1, self.weights.to(device))
        return on

    def _digits(self, tokens: torch.Tensor) -> torch.Tensor:
        """Each token's digit in a context id: its symbol + 1 (0 stands for the -1 before the start)."""
        return self._constants(tokens.device)[1][tokens] if self.config.cluster_level else tokens + 1

    def _raster_ids(self, digits_BL: torch.Tensor) -> torch.Tensor:
        """Context ids (B, L + 1) of positions 0 .. L of raster sequences: position t's context is symbols
        t - h .. t - 1."""
        h, (B, L) = self.config.context, digits_BL.shape
        padded = F.pad(digits_BL, (h, 0))  # (B, L + h): digit 0 before the start
        return self._ids(padded.unfold(1, h, 1) if h else padded.new_empty(B, L + 1, 0))

    def _ids(self, digits_BPh: torch.Tensor) -> torch.Tensor:
        """Context ids (B, P) of positions whose h context digits are digits_BPh[b, t] (oldest first): base-(S + 1)
        numbers, led by the position under keying="position"."""
        device = digits_BPh.device
        ids = (digits_BPh * self._constants(device)[2]).sum(-1)
        if self.config.keying == "position":
            ids = ids + torch.arange(digits_BPh.shape[1], device=device) * self.base ** self.config.context
        return ids

    def _context_of(self, cid: int) -> tuple:
        """The context tuple of an id, as `contexts` and `KeyOrder.context` write it (the PRF hashes the tuple)."""
        digits = []
        for _ in range(self.config.context):
            cid, d = divmod(cid, self.base)
            digits.append(d - 1)
        ctx = tuple(digits[::-1])
        return ("position", cid, *ctx) if self.config.keying == "position" else ctx

    def _space(self, positions: int) -> int:
        """How many context ids `positions` positions can have (ids are int64 tensor entries)."""
        size = self.base ** self.config.context * (positions if self.config.keying == "position" else 1)
        if size >= 1 << 62:
            raise ValueError(f"watermark context h={self.config.context} over {self.config.num_symbols} symbols "
                             f"gives {size} key contexts, too many to index; use a shorter context")
        return size

    def _table(self, size: int, device) -> _RankTable:
        table = self._tables.get(device)
        dense = table is not None and size <= DENSE_CONTEXTS
        if table is None or (dense and not (table.dense and table.size >= size)):
            table = self._tables[device] = _RankTable(self.perms, self._context_of, size, device, dense)
        return table

    def _order_tables(self, order: KeyOrder, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """For `order`, kept for the last one: chain (n, h), the raster indices whose symbols make up each position's
        context (oldest first, -1 before the start); the decoding order (n,); each position's rank in it (n,)."""
        if self._order is None or self._order[0] is not order or self._order[1] != device:
            h, chains = self.config.context, []
            for i in range(len(order.parents)):
                chain, q = [], order.parents[i]
                while q >= 0 and len(chain) < h:
                    chain.append(q)
                    q = order.parents[q]
                chains.append([-1] * (h - len(chain)) + chain[::-1])
            tables = (torch.tensor(chains, dtype=torch.long, device=device).view(len(chains), h),
                      torch.tensor(order.order, device=device), torch.tensor(order.rank, device=device))
            self._order = (order, device, tables)
        return self._order[2]

    # ---- reweighting -------------------------------------------------------------------------------------------

    def _reweight(self, logits_NV: torch.Tensor, order: torch.Tensor, ranks: torch.Tensor,
                  active: torch.Tensor) -> torch.Tensor:
        """The method's reweighting of the rows marked `active` under their permutations (order and ranks, (N, K));
        the other rows pass through (as float)."""
        cfg = self.config
        probs = logits_NV.float().softmax(-1)
        N, V = probs.shape
        if cfg.method in ("c-reweight", "token-reweight"):
            if cfg.cluster_level:
                idx = self._constants(probs.device)[0].expand(N, V)
                pc = torch.zeros(N, cfg.num_clusters, device=probs.device).scatter_add(-1, idx, probs)
                qc = alpha_reweight(pc, ranks, cfg.alpha, order)
                scale = torch.where(pc > 0, qc / pc.clamp_min(1e-30), torch.zeros_like(pc))
                new = probs * scale.gather(-1, idx)
            else:
                new = alpha_reweight(probs, ranks, cfg.alpha, order)
            new = new / new.sum(-1, keepdim=True).clamp_min(1e-30)
            # log(0) = -inf; the zeros become 1 before the log, as the log of a subnormal (1e-38) is slow on CPUs
            kept = new > 0
            out = torch.where(kept, new.clamp_min(1e-38), 1.0).log().masked_fill(~kept, float("-inf"))
        else:  # KGW: +delta on the green symbols (ranks in the last (1 - gamma) share)
            green = ranks >= math.ceil(cfg.gamma * cfg.num_symbols)
            if cfg.cluster_level:
                green = green.gather(-1, self._constants(probs.device)[0].expand(N, V))
            out = logits_NV.float().log_softmax(-1) + cfg.delta * green.float()
        return torch.where(active[:, None], out, logits_NV.float())


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


EXACT_RANK_TAIL_MAX_N = 256  # above: the FFT tail (pooled sets of many images), exact big integers get slow
FFT_TAIL_FLOOR = 1e-12  # the FFT tail's absolute error is about 1e-14; smaller tails are reported as this bound


def uniform_sum_sf(s: int, n: int, k: int) -> float:
    """P(X_1 + ... + X_n >= s) for X_i iid uniform on {0, ..., k-1}.

    Up to `EXACT_RANK_TAIL_MAX_N` terms (one image of up to 256 tokens), exact: counts the ways with the
    inclusion-exclusion formula for bounded compositions, in Python integers (no rounding), then divides by k^n
    (by symmetry the upper tail at s is the lower tail at n(k-1) - s). Its cost grows with n^2 digits (about 1 s
    at n = 2048), so for more terms (pooled sets of images) the tail is summed from the distribution computed as
    the n-th power of one uniform's Fourier transform, within 1e-13 of the exact value, and floored at
    `FFT_TAIL_FLOOR`: a tail smaller than that is reported as that bound, still a valid (conservative) p-value."""
    top = n * (k - 1)
    if s <= 0:
        return 1.0
    if s > top:
        return 0.0
    if n > EXACT_RANK_TAIL_MAX_N:
        size = 1 << top.bit_length()  # >= top + 1: no wrap-around
        pmf = np.fft.irfft(np.fft.rfft(np.full(k, 1.0 / k), size) ** n, size)[: top + 1]
        return float(min(1.0, max(FFT_TAIL_FLOOR, pmf[s:].sum())))
    m = top - s  # P(sum >= s) = P(sum <= m)
    ways = sum((-1) ** j * math.comb(n, j) * math.comb(m - j * k + n, n) for j in range(min(n, m // k) + 1))
    return min(1.0, ways / k ** n)


@dataclass
class Detection:
    kind: str  # "green" (count of green symbols) or "rank" (sum of permutation ranks)
    statistic: int  # its value over the scored positions
    scored: int  # positions with a first-occurrence context
    null_mean: float  # per scored position, under H0
    null_std: float
    p_value: float

    @property
    def score(self) -> float:
        """z-score of the statistic under H0."""
        n = max(self.scored, 1)
        return (self.statistic - self.null_mean * n) / (self.null_std * math.sqrt(n))

    def as_dict(self, fpr: float | None = None) -> dict:
        d = {"green" if self.kind == "green" else "rank_sum": self.statistic, "scored": self.scored,
             "score": round(self.score, 4), "p_value": self.p_value}
        if fpr is not None:
            d["watermarked"] = self.p_value < fpr
        return d


def detect_tokens(tokens: torch.Tensor, config: WatermarkConfig, key: str,
                  order: KeyOrder | None = None) -> list[Detection]:
    """Detections for token sequences (B, N) (raster order), from the key and the cluster table only. `order`:
    the positions' contexts and scoring order of a paradigm that decodes out of raster order (None: raster).

    Under H0 the symbols do not depend on the key and every scored position has its own permutation, so the
    rank of the observed symbol is uniform on {0, ..., K-1}, independently across positions: the green count
    (rank >= ceil(gamma K)) is Binomial(n, g) and the rank sum is a sum of n discrete uniforms. Both p-values
    are exact tails. The rank sum also credits a symbol that the reweight pushed high but not past the green
    threshold (alpha-reweight moves mass towards the end of pi, not only into the green half)."""
    perms = KeyedPermutations(key, config.num_symbols)
    return [_detection(_scored_ranks(row, config, perms, set(), order), config)
            for row in config.symbols(tokens.reshape(len(tokens), -1).cpu()).tolist()]


def detect_tokens_combined(tokens: torch.Tensor, config: WatermarkConfig, key: str,
                           order: KeyOrder | None = None) -> Detection:
    """One detection for a set of token sequences (B, N) made with one key: every image's scored ranks pooled
    into one statistic. A context is scored at its first occurrence in the whole set (images in order, raster
    order inside each), since the same context in two images shares its permutation (shapes scenes share their
    backgrounds); distinct contexts keep the ranks independent and uniform under H0, so the p-value is the same
    exact tail as for one image, over all the set's scored positions."""
    perms, seen = KeyedPermutations(key, config.num_symbols), set()
    ranks = [r for row in config.symbols(tokens.reshape(len(tokens), -1).cpu()).tolist()
             for r in _scored_ranks(row, config, perms, seen, order)]
    return _detection(ranks, config)


def _scored_ranks(row: list[int], config: WatermarkConfig, perms: KeyedPermutations, seen: set,
                  order: KeyOrder | None = None) -> list[int]:
    """Ranks of the symbols whose context is not in `seen` yet (their first occurrence, in raster order or in
    `order`); adds those contexts."""
    if order is None:
        pairs = zip(row, contexts(row, config.context, config.keying))
    elif len(order.order) != len(row):
        raise ValueError(f"the key order covers {len(order.order)} positions; the tokens have {len(row)} per image")
    else:
        pairs = ((row[p], order.context(row, p, config.context, config.keying)) for p in order.order)
    ranks = []
    for sym, ctx in pairs:
        if ctx not in seen:
            seen.add(ctx)
            ranks.append(int(perms.ranks(ctx)[sym]))
    return ranks


def _detection(ranks: list[int], config: WatermarkConfig) -> Detection:
    K, n = config.num_symbols, len(ranks)
    if config.statistic == "rank":
        total = sum(ranks)
        null_std = math.sqrt((K * K - 1) / 12)  # of one uniform rank on {0, ..., K-1}
        return Detection("rank", total, n, (K - 1) / 2, null_std, uniform_sum_sf(total, n, K))
    threshold = math.ceil(config.gamma * K)
    g = (K - threshold) / K
    green = sum(r >= threshold for r in ranks)
    return Detection("green", green, n, g, math.sqrt(g * (1 - g)), binomial_sf(green, n, g))
