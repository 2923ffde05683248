"""Speculative Jacobi Decoding (Teng et al., ICLR 2025, arXiv 2410.01699) as a sampling stage for any next-token
model, behind a small backend protocol (`JacobiBackend`).

One forward pass scores a window after each sample's committed prefix: its last committed token, then drafts for
the next tokens. Causal attention gives p_j at every window position; drafts are verified left to right, the first
rejected position is corrected, and the unverified positions get new drafts from this pass's p (the Jacobi update)
while new slots are initialized. Every sample advances by its own accepted length (per-row KV offsets) and leaves
the batch when done. The loop is `jacobi_sample`; its steps are the functions above it.

Verification, all exact (the tokens are distributed as plain AR's with the same logits processors):
* SJD's acceptance (speculative sampling): draft x ~ q is accepted with probability min(1, p(x) / q(x)); a
  rejection draws from normalize(max(0, p - q)). Drafts: ``init`` random / repeat / sample_left / above;
  ``coupled``: next drafts by maximal coupling with the old ones (Speculative Coupled Decoding, arXiv 2510.24211);
  ``tree_width``: other candidates as leaves of a token tree, tried by recursive rejection sampling (SpecInfer).
* ``shared_noise``: each position's token is the exponential race of its p with that position's own noise, drawn
  once, and a draft is accepted when it equals it (the shared-noise coupling named beside SCD): the tokens are
  plain AR's for the same seeds, no q is kept and no acceptance draws are made.
* ``adaptive``: each pass's width from the samples' recent acceptance and the backend's pass cost (`PassCost`);
  widths depend only on earlier passes, so exactness holds for any schedule.
* ``lantern_delta`` (LOSSY, off by default; LANTERN, ICLR 2025): acceptance against a relaxed target that gives a
  draft its nearest codebook neighbours' mass, within total variation delta; outputs say ``lossless=False``.

Temperature 0 gives greedy Jacobi decoding: the greedy AR tokens. Backends: `paradigms.next_token.NextTokenBackend`
(mmgen's decoder, eager or through the compiled window step) and `sampling.hf_backend.CausalLMBackend` (transformers).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from mmgen.sampling.logits import RowRandom, SamplingConfig, process_logits

INITS = ("random", "repeat", "sample_left", "above")


@dataclass(frozen=True)
class SJDConfig:
    window: int = 16  # draft tokens verified per forward pass (the paper's max_num_new_tokens)
    init: str = "random"
    coupled: bool = False  # next drafts by maximal coupling with the old ones instead of fresh draws
    adaptive: bool = False  # width per pass from the samples' acceptance and the cost model (window = the most)
    # cost of a forward pass with no tokens, in units of one backend row x one window position: the CPU floor of
    # a pass (weights read, kernel launches, sampling), about 5 ms against 0.11 ms per row-token on 2 cores for
    # the default model. A GPU's floor is far higher, which makes adaptive windows wide.
    pass_overhead: float = 48.0
    lantern_delta: float | None = None  # lossy: TV budget of the relaxed acceptance (None: exact)
    lantern_k: int = 8  # codebook neighbours the relaxed acceptance may move to a draft
    tree_width: int = 0  # extra candidates per window position, scored as leaves of a token tree (0: a chain)
    tree_depth: int = 4  # the first tree_depth window positions get them
    # drafts and tokens share each position's noise: a position's token is the exponential race of its p with that
    # noise, a draft is accepted when it equals it (no q, no acceptance draws); the tokens are plain AR's
    shared_noise: bool = False

    @property
    def lossless(self) -> bool:
        """True when the samples are distributed exactly as plain AR sampling."""
        return self.lantern_delta is None

    def __post_init__(self):
        if isinstance(self.window, bool) or not isinstance(self.window, int) or not 1 <= self.window <= 1024:
            raise ValueError(f"sjd window must be an integer in [1, 1024], got {self.window!r}")
        if self.init not in INITS:
            raise ValueError(f"sjd init must be one of {', '.join(INITS)}; got {self.init!r}")
        if not isinstance(self.coupled, bool):
            raise ValueError(f"sjd coupled must be True or False, got {self.coupled!r}")
        if not isinstance(self.adaptive, bool):
            raise ValueError(f"sjd adaptive must be True or False, got {self.adaptive!r}")
        if isinstance(self.pass_overhead, bool) or not isinstance(self.pass_overhead, (int, float)) \
                or not self.pass_overhead >= 0:
            raise ValueError(f"sjd pass_overhead must be a number >= 0, got {self.pass_overhead!r}")
        if self.lantern_delta is not None and (isinstance(self.lantern_delta, bool) or not isinstance(
                self.lantern_delta, (int, float)) or not 0 < self.lantern_delta < 1):
            raise ValueError(f"sjd lantern_delta must be None (exact) or a number in (0, 1), got {self.lantern_delta!r}")
        if isinstance(self.lantern_k, bool) or not isinstance(self.lantern_k, int) or not self.lantern_k >= 1:
            raise ValueError(f"sjd lantern_k must be an integer >= 1, got {self.lantern_k!r}")
        for name, low in (("tree_width", 0), ("tree_depth", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= 64:
                raise ValueError(f"sjd {name} must be an integer in [{low}, 64], got {value!r}")
        if not isinstance(self.shared_noise, bool):
            raise ValueError(f"sjd shared_noise must be True or False, got {self.shared_noise!r}")
        clash = [name for name, on in (("coupled", self.coupled), ("tree_width", self.tree_width),
                                       ("lantern_delta", self.lantern_delta is not None)) if on]
        if self.shared_noise and clash:
            raise ValueError(f"sjd shared_noise replaces the acceptance test that {', '.join(clash)} work on; "
                             f"leave out one of them")


@dataclass
class SJDStats:
    """What a call cost. `decoder_passes` counts batched forward passes, the prompt's included (plain AR over N
    tokens needs N: the prompt pass that yields the first token, then N - 1 decode steps)."""

    tokens: int  # tokens generated per sample
    decoder_passes: int
    passes: list[int]  # verification passes each sample needed
    lossless: bool = True  # False under a lossy acceptance (lantern_delta)

    @property
    def nfe(self) -> int:
        """Older name of `decoder_passes`."""
        return self.decoder_passes

    @property
    def step_compression(self) -> float:
        """Plain AR forward passes / SJD forward passes for the same tokens."""
        return self.tokens / self.decoder_passes

    @property
    def mean_accepted_length(self) -> float:
        """Tokens committed per verification pass, averaged over samples."""
        return sum(self.tokens / p for p in self.passes) / len(self.passes)

    def as_dict(self) -> dict:
        return {"nfe": self.decoder_passes, "tokens": self.tokens, "step_compression": round(self.step_compression, 4),
                "mean_accepted_length": round(self.mean_accepted_length, 4), "lossless": self.lossless}


class JacobiBackend(Protocol):
    """A causal LM whose KV cache lets each row sit at its own length.

    The backend owns the prompt, the cache and classifier-free guidance. Token ids here are ids of the draft
    vocabulary (for images: codebook indices); the backend maps them to its own vocabulary.
    """

    num_samples: int
    vocab_size: int
    device: torch.device
    use_cfg: bool  # two backend rows per sample (conditional, unconditional): the cost model counts rows
    supports_leaves: bool  # forward takes leaves= (token trees, SJDConfig.tree_width)

    def forward(self, window_AT: torch.Tensor, n_A: torch.Tensor,
                leaves: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Logits (A, T, vocab_size), guidance applied, for the active samples.

        Row a has n_A[a] committed tokens; window_AT[a, 0] is its last committed token (ignored when
        n_A[a] == 0: the backend feeds its start token) and window_AT[a, 1:] are drafts for the tokens after
        it. Output j is the distribution of token n_A[a] + j. Keys/values of the window are written after
        the row's committed prefix, overwriting whatever a previous pass left there. The first call also
        runs the prompt (all n_A are 0), so the pass that yields the first token is the only prompt pass,
        as in plain AR decoding.

        `leaves` (tokens (A, M), depth (M,)), only where `supports_leaves`: extra candidates scored in the same
        pass; leaf m stands for the token at window position depth[m], sees the prefix and the drafts before that
        position, and its output, appended after the window's T, is the distribution of the token after it."""

    def keep(self, keep_A: torch.Tensor) -> None:
        """Drop the active samples where keep_A (bool, A) is False."""


def window_mask(slots_RT: torch.Tensor, key_valid_RS: torch.Tensor) -> torch.Tensor:
    """(R, T, S) bool: query at cache slot slots[r, t] may see key s iff s <= that slot and the key is valid
    (prompt pads are not); every query sees itself, so no softmax row is empty (pads would write NaNs)."""
    keys = torch.arange(key_valid_RS.shape[1], device=slots_RT.device)[None, None, :]
    own = keys == slots_RT[:, :, None]
    return ((keys <= slots_RT[:, :, None]) & key_valid_RS[:, None, :]) | own


def _race(probs: torch.Tensor, noise: torch.Tensor, greedy: bool) -> torch.Tensor:
    """Sample from probs (..., V) with Exp(1) noise: argmax p / E (the same sampler as plain AR)."""
    return probs.argmax(-1) if greedy else (probs / noise).argmax(-1)


def _couple(x: torch.Tensor, q: torch.Tensor, p: torch.Tensor, u: torch.Tensor, noise: torch.Tensor,
            greedy: bool) -> torch.Tensor:
    """Maximal coupling of draft x ~ q (..., ) with p (..., V): keep x with probability min(1, p(x) / q(x)),
    else draw from normalize(max(0, p - q)). The result is distributed as p and equals x as often as possible."""
    px = p.gather(-1, x[..., None]).squeeze(-1)
    qx = q.gather(-1, x[..., None]).squeeze(-1).clamp_min(1e-30)
    resid = (p - q).clamp_min(0)
    mass = resid.sum(-1, keepdim=True)
    resid = torch.where(mass > 1e-6, resid / mass.clamp_min(1e-30), p)  # p == q: x is always kept anyway
    return torch.where(u < px / qx, x, _race(resid, noise, greedy))


def codebook_neighbours(codebook: torch.Tensor, k: int) -> torch.Tensor:
    """(V, k) ids of each code's k nearest other codes by cosine similarity, nearest first (in blocks of rows,
    so a 16k-code codebook never holds a V x V matrix)."""
    k = min(k, len(codebook) - 1)
    unit = torch.nn.functional.normalize(codebook.detach().float(), dim=-1)
    out = []
    for start in range(0, len(unit), 1024):
        sim = unit[start:start + 1024] @ unit.T
        rows = torch.arange(len(sim))
        sim[rows, rows + start] = -float("inf")
        out.append(sim.topk(k, dim=-1).indices)
    return torch.cat(out)


def _relaxed(p: torch.Tensor, x: torch.Tensor, neighbours: torch.Tensor, delta: float):
    """LANTERN's relaxed target for drafts x (...,) under p (..., V): x's nearest neighbours, nearest first, whose
    summed probability stays <= delta give their mass to x. Returns (moved mass (...,), neighbour ids (..., k),
    which of them moved (..., k))."""
    nb = neighbours[x]
    cum = p.gather(-1, nb).cumsum(-1)
    moves = cum <= delta  # a prefix: cum never decreases
    return torch.where(moves, cum, torch.zeros_like(cum)).amax(-1), nb, moves


# adaptive widths: a sample at width t commits about 1 + slope * ln(t) tokens per pass in steady state (fits the
# default model's mean accepted lengths 1.29 / 1.49 / 1.65 / 2.0 / 2.2 at t = 2 / 3 / 4 / 6 / 8 within 0.1,
# and underestimates wider windows); each sample's slope is a decayed average of what its passes showed
SLOPE_PRIOR, SLOPE_DECAY, WARMUP_PASSES = 0.45, 0.7, 2
# shared-noise verification commits more at every width (default model, batch 1, 1.35 / 1.80 / 2.34 / 2.72 tokens per
# pass at t = 2 / 4 / 8 / 16)
SHARED_SLOPE_PRIOR = 0.6


def slope_prior(sjd: SJDConfig) -> float:
    return SHARED_SLOPE_PRIOR if sjd.shared_noise else SLOPE_PRIOR


@dataclass(frozen=True)
class PassCost:
    """What adaptive widths weigh a pass by. `table`: the cost of one pass at each width a backend runs (a compiled
    pass: a fixed set, a narrower window padded up to the next), in any unit; without it a pass of width t over R
    rows costs `floor` + R * t in units of one row-token. `step`: plain AR's decode step in the table's unit (None:
    no AR step to fall back to). `all_rows`: finished samples keep their rows in every pass (static shapes)."""

    floor: float = 0.0
    table: tuple[tuple[int, float], ...] | None = None  # (width, cost) pairs, widest last
    step: float | None = None
    all_rows: bool = False

    def padded(self, t: int) -> int:
        """The width a window of width t runs at."""
        return t if self.table is None else next((w for w, _ in self.table if w >= t), self.table[-1][0])


def choose_width(slope_A: torch.Tensor, remaining_A: torch.Tensor, max_width: int, rows: int,
                 pass_overhead: float, leaves: tuple[int, int] = (0, 4), table=None) -> int:
    """The window width in [1, max_width] with the most expected committed tokens per unit of pass cost: sample
    a is expected to commit min(remaining_a, 1 + slope_a ln t) tokens at width t, and a pass over `rows` backend
    rows costs pass_overhead + rows * t, plus the leaves of a token tree (`leaves` = (width, depth): width more
    positions for each of the first depth ones), or what `table` ((width, cost) pairs) says the padded width
    costs."""
    L = int(min(max_width, int(remaining_A.max())))
    t = torch.arange(1, L + 1, dtype=torch.float64)
    if table is None:
        cost = pass_overhead + rows * (t + leaves[0] * t.clamp_max(leaves[1]))
    else:
        cost = torch.tensor([next((c for w, c in table if w >= i), table[-1][1]) for i in range(1, L + 1)],
                            dtype=torch.float64)
    expected = (1 + slope_A.double()[:, None] * t.log()).minimum(remaining_A.double()[:, None])
    return int((expected.sum(0) / cost).argmax()) + 1


def _carry_unscored(drafts: torch.Tensor, q: torch.Tensor, src: torch.Tensor, carry: torch.Tensor):
    """Drafts (A, L) and their q (A, L, V) moved to their new window slots: slot j holds old slot src[a, j] where
    `carry` is True (drafts a narrow pass did not score, still distributed as their q), zeros elsewhere."""
    src = src.clamp_max(drafts.shape[1] - 1)
    new_drafts = drafts.gather(1, src).masked_fill(~carry, 0)
    new_q = q.gather(1, src[..., None].expand(-1, -1, q.shape[-1])) * carry[..., None]
    return new_drafts, new_q


def _recursive_rejection(resid: torch.Tensor, candidates: torch.Tensor, u: torch.Tensor, open_: torch.Tensor):
    """Try distinct deterministic candidates (A, c) one after another against the residual r (A, V) where `open_`:
    candidate i is accepted with probability r(y_i), else removed from r and r renormalized. Returns the index of
    the accepted candidate (-1: none) and the final r, from which a row with none accepted draws its token; the
    token is then distributed exactly as the incoming r."""
    chosen = torch.full(open_.shape, -1, dtype=torch.long, device=resid.device)
    for i in range(candidates.shape[1]):
        y = candidates[:, i:i + 1]
        take = open_ & (u[:, i] < resid.gather(-1, y).squeeze(-1))
        chosen = torch.where(take, i, chosen)
        open_ = open_ & ~take
        rest = resid.scatter(-1, y, 0.0)
        mass = rest.sum(-1, keepdim=True)
        resid = torch.where(open_[:, None] & (mass > 1e-12), rest / mass.clamp_min(1e-30), resid)
    return chosen, resid


def _one_hot(tokens: torch.Tensor, V: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(tokens, V).float()


def _fill_drafts(drafts, q, first_new, n, out, left_dist, u, sjd: SJDConfig, grid_width: int | None, greedy):
    """Initialize window slots j >= first_new[a] (token index n[a] + j) in place, left to right: ``random`` uniform
    over the vocabulary (the paper's default), ``repeat`` the left neighbour, ``above`` the token one image row up
    (the vertical prior), ``sample_left`` a draw from the left neighbour's distribution (then the draft's q). A copied
    or uniform draft is deterministic, q one-hot at it: its acceptance is p(x), its residual p without x."""
    A, L, V = q.shape
    if sjd.init == "random":  # no slot depends on another: all at once
        new = torch.arange(L, device=drafts.device)[None] >= first_new[:, None]
        tok = (u * V).long().clamp_max(V - 1)
        drafts.copy_(torch.where(new, tok, drafts))
        q.copy_(torch.where(new[..., None], _one_hot(tok, V), q))
        return
    rows = torch.arange(A, device=drafts.device)
    for j in range(int(first_new.min()), L):
        new = j >= first_new
        random_tok = (u[:, j] * V).long().clamp_max(V - 1)
        if j > 0:
            left = drafts[:, j - 1]
        else:  # the last committed token, or a random one before the first token
            left = torch.where(n > 0, out[rows, (n - 1).clamp_min(0)], random_tok)
        if sjd.init == "random":
            tok, dist = random_tok, None
        elif sjd.init == "repeat":
            tok, dist = left, None
        elif sjd.init == "above":
            tok, dist = left, None  # the first image row has nothing above: repeat the left neighbour
            if grid_width is not None:
                if j >= grid_width:  # the token above is a draft in this window
                    tok = drafts[:, j - grid_width]
                else:
                    up = n + j - grid_width
                    tok = torch.where(up >= 0, out[rows, up.clamp_min(0)], left)
        else:  # sample_left: a draw from the left neighbour's distribution, which is then the draft's q
            dist = left_dist if left_dist is not None else torch.full((A, V), 1.0 / V, device=q.device)
            cdf = dist.cumsum(-1)
            tok = torch.searchsorted(cdf, (u[:, j] * cdf[:, -1]).unsqueeze(-1), right=True).squeeze(-1)
            tok = tok.clamp_max(V - 1)
            if greedy:
                tok = dist.argmax(-1)
        drafts[new, j] = tok[new]
        q[new, j] = (_one_hot(tok, V) if dist is None else dist)[new]


# ---- the sampler: small named steps, the loop stays visible ---------------------------------------------------


@dataclass
class JacobiState:
    """What the sampler carries from pass to pass. `drafts` and `q` hold the active samples' rows, in the order of
    `active`; the rest is indexed by sample."""

    out: torch.Tensor  # (B, N) committed tokens
    n: torch.Tensor  # (B,) tokens committed per sample
    passes: torch.Tensor  # (B,) verification passes per sample (CPU)
    slope: torch.Tensor  # (B,) adaptive widths: a sample commits about 1 + slope ln t tokens per pass (CPU)
    active: torch.Tensor  # (A,) samples still running (CPU)
    drafts: torch.Tensor  # (A, L) draft tokens of the window slots after the last committed token
    q: torch.Tensor | None  # (A, L, V) the distribution each draft was drawn from (None: shared noise)
    noise: torch.Tensor | None = None  # (B, N, V) each position's Exp(1) noise (shared noise)
    prior: float = SLOPE_PRIOR  # what a pass that shows nothing pulls the slopes back to
    decoder_passes: int = 0


@dataclass
class Draws:
    """One pass's randomness, drawn as a fixed amount per sample whatever happens in the pass (so a sample's
    stream never depends on its batch mates, with fixed windows)."""

    accept: torch.Tensor  # (A, T) uniforms of the acceptance tests
    fresh: torch.Tensor  # (A, T, V) Exp(1) noise of the Jacobi refresh
    resid: torch.Tensor  # (A, V) Exp(1) noise of the residual draw at a rejection
    init: torch.Tensor  # (A, L) uniforms of the new slots' initialization
    couple: torch.Tensor | None  # (A, T) uniforms of the coupling (coupled drafts)
    leaf: torch.Tensor | None  # (A, c) uniforms of the leaves' recursive rejection (token trees)
    leaf_noise: torch.Tensor | None  # (A, V) Exp(1) noise of the draft after an accepted leaf


@dataclass
class Verdict:
    """What verification decided for each active sample."""

    tokens: torch.Tensor  # (A, T) the window's drafts with the correction written at the first rejection
    accepted: torch.Tensor  # (A,) tokens committed this pass (accepted drafts + the correction)
    by_leaf: torch.Tensor | None = None  # (A,) the correction is an accepted leaf (token trees)
    after_leaf: torch.Tensor | None = None  # (A, V) that leaf's output: the next token's distribution


def check_call(backend: JacobiBackend, sjd: SJDConfig, processor, neighbours):
    """Refuse what the backend or the configuration cannot do; returns the neighbour table LANTERN reads."""
    if sjd.tree_width:
        if not backend.supports_leaves:
            raise ValueError(f"sjd tree_width > 0 needs a backend that scores leaves; {type(backend).__name__} "
                             f"does not")
        if sjd.tree_width >= backend.vocab_size:
            raise ValueError(f"sjd tree_width must be below the vocabulary size {backend.vocab_size}, got "
                             f"{sjd.tree_width}")
        if processor is not None:
            raise ValueError("sjd tree_width > 0 does not take a processor (e.g. a watermark) yet: the leaves' "
                             "prefixes are not passed to it; use tree_width=0")
    if sjd.lossless:
        return None
    if neighbours is None:
        raise ValueError("sjd lantern_delta needs the codebook neighbour table (neighbours=)")
    return neighbours[:, : sjd.lantern_k].to(backend.device)


def start_state(B: int, N: int, sjd: SJDConfig, V: int, device, noise: torch.Tensor | None = None) -> JacobiState:
    L = sjd.window
    return JacobiState(out=torch.zeros(B, N, dtype=torch.long, device=device),
                       n=torch.zeros(B, dtype=torch.long, device=device), passes=torch.zeros(B, dtype=torch.long),
                       slope=torch.full((B,), slope_prior(sjd), dtype=torch.float64), active=torch.arange(B),
                       drafts=torch.zeros(B, L, dtype=torch.long, device=device),
                       q=None if noise is not None else torch.zeros(B, L, V, device=device), noise=noise,
                       prior=slope_prior(sjd))


def position_noise(generators: Sequence[torch.Generator] | None, B: int, N: int, V: int, device) -> torch.Tensor:
    """(B, N, V) Exp(1) noise, sample b's position i from generators[b] as plain AR's exponential race draws it
    (torch's `exponential_`, N steps in one call), so shared-noise decoding commits AR's tokens."""
    return RowRandom(generators, B, device).race_noise(None, N, V)


def pass_width(state: JacobiState, n_A: torch.Tensor, N: int, sjd: SJDConfig, rows: int, cost: PassCost) -> int:
    """This pass's window width: the configured window (up to the image's end), or the cost model's choice for a
    pass over `rows` backend rows."""
    if sjd.adaptive:
        return choose_width(state.slope[state.active], (N - n_A).cpu(), sjd.window, rows, cost.floor,
                            (sjd.tree_width, sjd.tree_depth), cost.table)
    return int(min(sjd.window, int((N - n_A).max())))


def speculation_pays(cost: PassCost, sjd: SJDConfig, samples: int, rows: int, tokens: int) -> bool:
    """Whether a batch's first adaptive pass, at the prior acceptance, is expected to commit more tokens per unit
    of cost than plain AR's decode step (always True where there is no AR step to fall back to)."""
    if cost.step is None:
        return True
    prior = slope_prior(sjd)
    slope, remaining = torch.full((samples,), prior), torch.full((samples,), tokens)
    t = choose_width(slope, remaining, sjd.window, rows, cost.floor, (0, 4), cost.table)
    pass_cost = dict(cost.table)[cost.padded(t)] if cost.table else cost.floor + rows * t
    return (1 + prior * math.log(t)) / pass_cost > 1 / cost.step


def propose(state: JacobiState, n_A: torch.Tensor, T: int, sjd: SJDConfig):
    """The window each active sample sends through the model: its last committed token, then T - 1 drafts; with a
    token tree also the leaves, the most likely other tokens of each draft's q at the first tree_depth positions
    (returned as (candidates (A, D, c), depth (D * c,)), else None)."""
    last = state.out[state.active.to(state.out.device), (n_A - 1).clamp_min(0)]
    window = torch.cat([last[:, None], state.drafts[:, : T - 1]], 1)
    if not sjd.tree_width:
        return window, None
    D = min(sjd.tree_depth, T)
    q_other = state.q[:, :D].scatter(-1, state.drafts[:, :D, None], -1.0)
    candidates = q_other.topk(sjd.tree_width, dim=-1).indices  # distinct, never the draft
    depth = torch.arange(D, device=window.device).repeat_interleave(sjd.tree_width)
    return window, (candidates, depth)


def _distribution(logits: torch.Tensor, greedy: bool) -> torch.Tensor:
    return _one_hot(logits.argmax(-1), logits.shape[-1]) if greedy else logits.softmax(-1)


def score(backend: JacobiBackend, window: torch.Tensor, n_A: torch.Tensor, leaves, state: JacobiState,
          sampling: SamplingConfig, processor: Callable | None, greedy: bool):
    """One decoder pass: the sampling distribution p (A, T, V) at every window position after the processors,
    and with leaves the distribution after each leaf (A, D, c, V)."""
    A, T = window.shape
    V = backend.vocab_size
    if leaves is None:
        logits, leaf_p = backend.forward(window, n_A), None
    else:
        candidates, depth = leaves
        logits = backend.forward(window, n_A, leaves=(candidates.reshape(A, -1), depth))
        leaf_logits, logits = logits[:, T:], logits[:, :T]
        leaf_logits = process_logits(leaf_logits.reshape(-1, V).float(), sampling)
        leaf_p = _distribution(leaf_logits, greedy).view(*candidates.shape, V)
    logits = process_logits(logits.reshape(A * T, V).float(), sampling)
    if processor is not None:  # each position's prefix: the committed tokens, then the drafts before it
        N = state.out.shape[1]
        steps = torch.arange(T, device=window.device)
        seq = state.out[state.active.to(state.out.device)].clone()
        seq.scatter_(1, (n_A[:, None] + steps[None, : T - 1]).clamp_max(N - 1), state.drafts[:, : T - 1])
        logits = processor(logits, seq.repeat_interleave(T, 0), (n_A[:, None] + steps[None]).flatten())
    return _distribution(logits.view(A, T, V), greedy), leaf_p


def draw(rng: RowRandom, active: torch.Tensor, T: int, V: int, sjd: SJDConfig) -> Draws:
    """This pass's randomness, in a fixed order. Adaptive widths already tie a sample's draws to its batch (the
    widths depend on it), so they draw only the refresh noise this pass uses; fixed windows draw the same amounts
    every pass."""
    L, c = sjd.window, sjd.tree_width
    shapes = [(L,), (T if sjd.adaptive else L, V), (V,), (L,)] + [(L,)] * sjd.coupled + [(c,), (V,)] * bool(c)
    u = rng.uniforms(active, *shapes)
    exp = lambda x: -torch.log1p(-x)  # noqa: E731 - Exp(1) noise of the races
    return Draws(accept=u[0][:, :T], fresh=exp(u[1][:, :T]), resid=exp(u[2]), init=u[3],
                 couple=u[4][:, :T] if sjd.coupled else None, leaf=u[-2] if c else None,
                 leaf_noise=exp(u[-1]) if c else None)


def verify(p: torch.Tensor, q: torch.Tensor, x: torch.Tensor, remaining: torch.Tensor, draws: Draws,
           sjd: SJDConfig, neighbours: torch.Tensor | None, leaves, leaf_p, greedy: bool) -> Verdict:
    """Speculative sampling over the window, left to right: draft x_j ~ q_j is accepted with probability
    min(1, p_j(x_j) / q_j(x_j)); the first rejected position gets a token from normalize(max(0, p - q)) (with a
    tree: its leaves first, by recursive rejection). Positions past the image's end (`remaining`) are never
    accepted. p, q: (A, T, V); x: (A, T) the drafts of tokens n .. n + T - 1 (p's positions)."""
    A, T, _ = p.shape
    rows = torch.arange(A, device=p.device)
    m = remaining.clamp_max(T)  # positions inside the image
    px = p.gather(-1, x[..., None]).squeeze(-1)
    relaxed = None
    if not sjd.lossless:  # LANTERN: x also takes its near neighbours' mass
        relaxed = _relaxed(p, x, neighbours, sjd.lantern_delta)
        px = px + relaxed[0]
    qx = q.gather(-1, x[..., None]).squeeze(-1).clamp_min(1e-30)
    accept = (draws.accept < px / qx) & (torch.arange(T, device=p.device)[None] < m[:, None])
    k = accept.long().cumprod(1).sum(1)  # leading accepted drafts
    rejected = k < m
    kk = k.clamp_max(T - 1)
    resid = _residual(p[rows, kk], q[rows, kk], x[rows, kk], None if relaxed is None else
                      tuple(t[rows, kk] for t in relaxed))
    verdict = Verdict(tokens=x.clone(), accepted=k + rejected.long())
    if leaves is None:
        y = _race(resid, draws.resid, greedy)
    else:  # the rejected draft's leaves, one after another against the running residual
        candidates = leaves[0]
        kd = kk.clamp_max(candidates.shape[1] - 1)
        chosen, resid = _recursive_rejection(resid, candidates[rows, kd], draws.leaf,
                                             rejected & (kk < candidates.shape[1]))
        verdict.by_leaf = chosen >= 0
        y = torch.where(verdict.by_leaf, candidates[rows, kd, chosen.clamp_min(0)], _race(resid, draws.resid, greedy))
        verdict.after_leaf = leaf_p[rows, kd, chosen.clamp_min(0)]
    verdict.tokens[rows, kk] = torch.where(rejected, y, verdict.tokens[rows, kk])
    return verdict


def _residual(p_k: torch.Tensor, q_k: torch.Tensor, x_k: torch.Tensor, relaxed) -> torch.Tensor:
    """normalize(max(0, p - q)) at the first rejected position (A, V); under LANTERN, of the relaxed target."""
    if relaxed is not None:
        moved, nb, moves = relaxed
        p_k = p_k.scatter(-1, nb, p_k.gather(-1, nb) * ~moves)
        p_k = p_k.scatter_add(-1, x_k[:, None], moved[:, None])
    resid = (p_k - q_k).clamp_min(0)
    mass = resid.sum(-1, keepdim=True)
    return torch.where(mass > 1e-6, resid / mass.clamp_min(1e-30), p_k)  # mass 0 only up to rounding


def update_slopes(state: JacobiState, accepted: torch.Tensor, remaining: torch.Tensor, T: int) -> None:
    """Adaptive widths: fold this pass's evidence into each sample's slope. A one-token pass tells nothing (its
    draft was never refined), nor do the first passes of a call (every draft starts cold): the estimate drifts
    back to the prior, so a run of rejections never pins a sample to width 1; a pass that ran into the image's
    end shows less than its width allowed."""
    active = state.active
    if T > 1 and state.decoder_passes > WARMUP_PASSES:
        seen = (accepted - 1).cpu().double() / math.log(T)
    else:
        seen = torch.full((len(active),), state.prior).double()
    full = remaining.cpu() > T
    state.slope[active] = torch.where(full, SLOPE_DECAY * state.slope[active] + (1 - SLOPE_DECAY) * seen,
                                      state.slope[active])


def commit(state: JacobiState, n_A: torch.Tensor, verdict: Verdict) -> None:
    """Write each sample's accepted tokens after its committed prefix."""
    A, T = verdict.tokens.shape
    steps = torch.arange(T, device=n_A.device)
    keep = steps[None] < verdict.accepted[:, None]
    rows = state.active.to(n_A.device)[:, None].expand(A, T)[keep]
    state.out[rows, (n_A[:, None] + steps[None])[keep]] = verdict.tokens[keep]
    state.n[state.active.to(n_A.device)] = n_A + verdict.accepted
    state.passes[state.active] += 1


def refresh(state: JacobiState, p: torch.Tensor, verdict: Verdict, draws: Draws, sjd: SJDConfig,
            grid_width: int | None, greedy: bool) -> None:
    """The next pass's drafts, shifted by what was committed. Unverified positions get drafts distributed as this
    pass's p (the Jacobi update: fresh draws, or the old drafts maximally coupled to them); drafts a narrower pass
    did not score keep their q; an accepted leaf hands over its output as the next draft's q; new slots are
    initialized."""
    A, T, _ = p.shape
    L = sjd.window
    x, q = state.drafts[:, :T], state.q
    fresh = _couple(x, q[:, :T], p, draws.couple, draws.fresh, greedy) if sjd.coupled else _race(p, draws.fresh,
                                                                                                 greedy)
    src = torch.arange(L, device=p.device)[None] + verdict.accepted[:, None]  # old window slot of new slot j
    from_pass, from_old = src < T, (src >= T) & (src < L)
    src_c = src.clamp_max(T - 1)
    drafts, q = _carry_unscored(state.drafts, q, src, from_old)
    drafts = torch.where(from_pass, fresh.gather(1, src_c), drafts)
    q = torch.where(from_pass[..., None], p.gather(1, src_c[..., None].expand(-1, -1, p.shape[-1])), q)
    if verdict.by_leaf is not None:  # a leaf's output is exactly the next token's distribution
        drafts[:, 0] = torch.where(verdict.by_leaf, _race(verdict.after_leaf, draws.leaf_noise, greedy), drafts[:, 0])
        q[:, 0] = torch.where(verdict.by_leaf[:, None], verdict.after_leaf, q[:, 0])
    active = state.active.to(p.device)
    _fill_drafts(drafts, q, L - verdict.accepted, state.n[active], state.out[active], p[:, T - 1], draws.init, sjd,
                 grid_width, greedy)
    state.drafts, state.q = drafts, q


def drop_finished(state: JacobiState, backend: JacobiBackend, N: int) -> None:
    """Samples with all N tokens leave the batch (and the backend's rows)."""
    running = state.n[state.active.to(state.n.device)] < N
    if not bool(running.all()):
        backend.keep(running)
        state.active, state.drafts = state.active[running.cpu()], state.drafts[running]
        state.q = None if state.q is None else state.q[running]


# ---- shared noise: a position's token is the race of its p with that position's own noise --------------------------
# Plain AR samples token i as argmax p_i / E_i with E_i ~ Exp(1) drawn for position i. Give every window position its
# own E_i, fixed for the whole call: the pass's race at position j is then exactly AR's token there once the drafts
# before j are right, whatever they were drawn from. A draft is accepted when it equals that race, the first position
# where it does not commits the race's token, and the tokens are AR's for the same noise (Jacobi decoding of the
# race, the shared-noise coupling named beside Speculative Coupled Decoding). Drafts need no q and no draws.


def _window_noise(state: JacobiState, n_A: torch.Tensor, T: int) -> torch.Tensor:
    """(A, T, V) the noise of the positions n_A .. n_A + T - 1 (the last one again past the image's end)."""
    positions = (n_A[:, None] + torch.arange(T, device=n_A.device)).clamp_max(state.noise.shape[1] - 1)
    return state.noise[state.active.to(n_A.device)[:, None], positions]


def verify_shared(p: torch.Tensor, x: torch.Tensor, remaining: torch.Tensor, noise: torch.Tensor,
                  greedy: bool) -> Verdict:
    """Shared-noise verification: the race y_j of p_j with its position's noise (A, T) is the token, drafts x_j equal
    to it are accepted left to right, the first position where x_j != y_j commits y_j."""
    T = p.shape[1]
    y = _race(p, noise, greedy)
    m = remaining.clamp_max(T)  # positions inside the image
    k = ((x == y) & (torch.arange(T, device=p.device)[None] < m[:, None])).long().cumprod(1).sum(1)
    return Verdict(tokens=y, accepted=k + (k < m).long())


def refresh_shared(state: JacobiState, p: torch.Tensor, verdict: Verdict, sjd: SJDConfig, grid_width: int | None,
                   greedy: bool) -> None:
    """The next drafts: this pass's races after the committed tokens (the Jacobi update), drafts a narrower pass did
    not score as they were, new slots from the initialization (`_fill_shared`)."""
    T, L = p.shape[1], sjd.window
    src = torch.arange(L, device=p.device)[None] + verdict.accepted[:, None]  # old window slot of new slot j
    drafts = torch.where(src < T, verdict.tokens.gather(1, src.clamp_max(T - 1)),
                         state.drafts.gather(1, src.clamp_max(L - 1)))
    _fill_shared(state, drafts, L - verdict.accepted, p[:, T - 1], sjd, grid_width, greedy)
    state.drafts = drafts


def _fill_shared(state: JacobiState, drafts: torch.Tensor, first_new: torch.Tensor, left_dist: torch.Tensor | None,
                 sjd: SJDConfig, grid_width: int | None, greedy: bool) -> None:
    """Initialize window slots j >= first_new[a] in place, from each slot's own noise E: ``random`` argmin E (a
    uniform token), ``sample_left`` the race of the left neighbour's distribution with E, ``repeat`` / ``above``
    the token to the left / above. Any draft keeps the tokens exact; these are cheap guesses."""
    active = state.active.to(drafts.device)
    n, out, N, L = state.n[active], state.out[active], state.out.shape[1], drafts.shape[1]
    rows = torch.arange(len(active), device=drafts.device)
    for j in range(int(first_new.min()), L):
        new = j >= first_new
        noise = state.noise[active, (n + j).clamp_max(N - 1)]  # (A, V)
        left = drafts[:, j - 1] if j > 0 else torch.where(n > 0, out[rows, (n - 1).clamp_min(0)], noise.argmin(-1))
        if sjd.init == "random":
            tok = noise.argmin(-1)
        elif sjd.init == "sample_left":
            tok = noise.argmin(-1) if left_dist is None else _race(left_dist, noise, greedy)
        elif sjd.init == "above" and grid_width is not None:
            up = n + j - grid_width
            tok = drafts[:, j - grid_width] if j >= grid_width else torch.where(up >= 0, out[rows, up.clamp_min(0)],
                                                                                  left)
        else:  # repeat, or above without a grid
            tok = left
        drafts[:, j] = torch.where(new, tok, drafts[:, j])


@torch.no_grad()
def jacobi_sample(
    backend: JacobiBackend,
    num_tokens: int,
    sampling: SamplingConfig,
    sjd: SJDConfig = SJDConfig(),
    generators: Sequence[torch.Generator] | None = None,
    grid_width: int | None = None,
    callback: Callable[[int], None] | None = None,
    processor: Callable | None = None,
    neighbours: torch.Tensor | None = None,
    cost: PassCost | None = None,
) -> tuple[torch.Tensor, SJDStats]:
    """Sample (num_samples, num_tokens) tokens with speculative Jacobi decoding.

    `grid_width` is the image width in tokens (needed by the ``above`` initialization). `callback(n)` is
    called after each pass with the number of tokens every sample has committed. `processor(logits, prefix,
    lengths)` is the same extra stage plain AR takes (e.g. a watermark); it sees each window position's
    prefix (committed tokens, then the drafts before it), so SJD samples the processed distribution.
    `neighbours` (V, k): each code's nearest codebook neighbours (`codebook_neighbours`), needed by the lossy
    ``lantern_delta`` acceptance only. `cost`: the backend's pass cost for adaptive widths (default: floor
    `sjd.pass_overhead`, any width)."""
    neighbours = check_call(backend, sjd, processor, neighbours)
    cost = cost or PassCost(sjd.pass_overhead)
    B, V, N, L = backend.num_samples, backend.vocab_size, num_tokens, sjd.window
    rng = RowRandom(generators, B, backend.device)
    greedy = sampling.temperature == 0
    noise = position_noise(generators, B, N, V, backend.device) if sjd.shared_noise else None
    state = start_state(B, N, sjd, V, backend.device, noise)
    if sjd.shared_noise:
        _fill_shared(state, state.drafts, torch.zeros_like(state.n), None, sjd, grid_width, greedy)
    else:
        _fill_drafts(state.drafts, state.q, torch.zeros_like(state.n), state.n, state.out, None,
                     rng.uniform(state.active, L), sjd, grid_width, greedy)
    rows_per_sample = 2 if backend.use_cfg else 1
    while len(state.active):
        n_A = state.n[state.active.to(state.n.device)]
        T = pass_width(state, n_A, N, sjd, rows_per_sample * (B if cost.all_rows else len(n_A)), cost)
        window, leaves = propose(state, n_A, T, sjd)
        p, leaf_p = score(backend, window, n_A, leaves, state, sampling, processor, greedy)
        state.decoder_passes += 1
        if sjd.shared_noise:
            verdict = verify_shared(p, state.drafts[:, :T], N - n_A, _window_noise(state, n_A, T), greedy)
        else:
            draws = draw(rng, state.active, T, V, sjd)
            verdict = verify(p, state.q[:, :T], state.drafts[:, :T], N - n_A, draws, sjd, neighbours, leaves,
                             leaf_p, greedy)
        if sjd.adaptive:
            update_slopes(state, verdict.accepted, N - n_A, T)
        commit(state, n_A, verdict)
        if sjd.shared_noise:
            refresh_shared(state, p, verdict, sjd, grid_width, greedy)
        else:
            refresh(state, p, verdict, draws, sjd, grid_width, greedy)
        drop_finished(state, backend, N)
        if callback is not None:
            callback(int(state.n.min()))
    return state.out, SJDStats(tokens=N, decoder_passes=state.decoder_passes, passes=state.passes.tolist(),
                               lossless=sjd.lossless)
