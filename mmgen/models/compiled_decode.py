"""A compiled one-token decode step for `Transformer` (gpt-fast's `decode_one_token` under `torch.compile`).

`decode_one` is the decoder's forward for one new token per row against a static KV cache, written so that
`torch.compile` can take it whole, with static shapes for every step of a loop:
- it reads the cache but does not write it: the new token's key and value enter attention as one extra
  column and come back to the caller, who stores them (a graph that mutated the cache would copy it back
  every step);
- attention spans the whole cache, with an additive bias row that is -inf on slots not yet written, so the
  key length does not change from step to step;
- the fused projection weights come in as arguments, built once outside the graph.

On CPU with few rows (`projection_form`), every projection is a broadcast multiply and a reduction instead of
`F.linear`: inductor turns that into vectorized loops fused with their neighbours, where BLAS's gemv on one row
reads a weight at about a sixth of memory speed on our 2-core machine, and batch-1 decode is bound by reading
the weights (30 MB a step for the default model). On CUDA the step compiles with
mode="reduce-overhead" (CUDA graphs) over `F.linear`, with the cache at a static address.

Compiled outputs equal the eager forward's up to float rounding (reductions run in another order), so
greedy tokens agree except at exact near-ties; `tests/test_compiled_decode.py` checks logits and tokens.
If compilation fails (no C++ compiler, an unsupported op), `DecodeStep` warns once and runs `decode_one`
eagerly, which gives the same values.

Shape letters: R rows, S cache slots, L layers, H heads, K kv heads, D head dim, C width, V vocabulary.
"""

from __future__ import annotations

import time
import warnings

import torch
import torch.nn.functional as F

from mmgen.models.transformer import Transformer, _fused_weight, apply_rope

# on CPU, up to this many rows take the multiply-reduce projections; above it BLAS's gemm is faster. Default
# model, 2 cores, seconds per image: 1 row 0.07 weight-outer / 0.13 rows-outer; 8 rows 0.27 rows-outer / 0.35
# gemm; 16 rows 0.44 rows-outer / 0.42 gemm
PRODUCT_MAX_ROWS = 8


def _project(x_RC: torch.Tensor, weight_OC: torch.Tensor, form: str) -> torch.Tensor:
    """x @ weight.T in the loop order that compiles best for the row count (`projection_form`)."""
    if form == "weight_outer":  # one row: each weight row is read once, contiguous
        return (weight_OC[:, None, :] * x_RC[None]).sum(-1).t()
    if form == "rows_outer":  # a few rows: one vectorized reduction per (row, output)
        return (x_RC.unsqueeze(-2) * weight_OC).sum(-1)
    return F.linear(x_RC, weight_OC)


def projection_form(rows: int, device: torch.device) -> str:
    """"weight_outer" for one row on CPU, "rows_outer" up to `PRODUCT_MAX_ROWS`, else "gemm". (With several rows
    the weight-outer form lets inductor fuse the projection's input into the reduction and recompute it per
    output, 30x slower.)"""
    if device.type != "cpu" or rows > PRODUCT_MAX_ROWS:
        return "gemm"
    return "weight_outer" if rows == 1 else "rows_outer"


def decode_weights(model: Transformer) -> tuple:
    """The tensors `decode_one` reads, per layer (attention norm, fused qkv, out, mlp norm, fused w1|w3, w2), then
    embedding, final norm and head. Cheap to call every step: fused weights are cached by `_fused_weight`."""
    layers = tuple((blk.attn_norm.weight, _fused_weight(blk.attn, "_qkv", (blk.attn.wq, blk.attn.wk, blk.attn.wv)),
                    blk.attn.wo.weight, blk.mlp_norm.weight,
                    _fused_weight(blk.mlp, "_w13", (blk.mlp.w1, blk.mlp.w3)), blk.mlp.w2.weight)
                   for blk in model.layers)
    return layers, model.tok_emb.weight, model.norm.weight, model.head.proj.weight


def decode_one(weights: tuple, tokens_R: torch.Tensor, cos_1D: torch.Tensor, sin_1D: torch.Tensor,
               key_bias_RS: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor, *, n_heads: int,
               eps: float, form: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (R, V) of one new token per row, and its keys/values (L, 2, R, K, D) for the caller to store.

    cos_1D/sin_1D: the new token's rotary table (1, D); key_bias_RS: 0 where a row may attend a cache slot,
    -inf elsewhere (unwritten slots included); cache_k/cache_v: `KVCache.k`/`.v`, (L, R, K, S, D)."""
    layers, emb, norm_w, head_w = weights
    R, K, D = tokens_R.shape[0], cache_k.shape[2], cache_k.shape[4]
    H, C = n_heads, emb.shape[1]
    group = H // K
    scale = D ** -0.5
    x = F.embedding(tokens_R, emb)  # (R, C)
    bias = key_bias_RS[:, None, None, :]  # (R, 1, 1, S)
    new_kv = []
    for i, (attn_norm, qkv_w, wo, mlp_norm, w13, w2) in enumerate(layers):
        qkv = _project(F.rms_norm(x, (C,), attn_norm, eps), qkv_w, form).view(R, H + 2 * K, 1, D)
        qk = apply_rope(qkv[:, : H + K], cos_1D[None], sin_1D[None])[:, :, 0]  # (R, H + K, D)
        q = qk[:, :H].reshape(R, K, group, D)  # query heads grouped by the kv head they read
        k, v = qk[:, H:], qkv[:, H + K:, 0]  # (R, K, D)
        # softmax over [cache slots, the new key] without concatenating the cache
        old = torch.einsum("rkgd,rksd->rkgs", q, cache_k[i]) * scale + bias
        new = torch.einsum("rkgd,rkd->rkg", q, k).unsqueeze(-1) * scale
        top = torch.maximum(old.amax(-1, keepdim=True), new)
        p_old, p_new = (old - top).exp(), (new - top).exp()
        y = (torch.einsum("rkgs,rksd->rkgd", p_old, cache_v[i]) + p_new * v[:, :, None]) / (
            p_old.sum(-1, keepdim=True) + p_new)
        x = x + _project(y.reshape(R, H * D), wo, form)
        gate, up = _project(F.rms_norm(x, (C,), mlp_norm, eps), w13, form).chunk(2, dim=-1)
        x = x + _project(F.silu(gate) * up, w2, form)
        new_kv.append(torch.stack([k, v]))
    return _project(F.rms_norm(x, (C,), norm_w, eps), head_w, form), torch.stack(new_kv)


class _CompiledStep:
    """What the one-token and the window step share: the model's fused weights (the head cut to `head_rows`), the
    eager function compiled once per model, the cache pinned at a static address on CUDA, and the fallback to the
    same function eagerly (with a warning) if compilation fails."""

    RECOMPILE_LIMIT: int | None = None  # dynamo's per-function graph limit, if the step needs more than its default
    KIND = "decode"

    def __init__(self, model: Transformer, eager, compile: bool):
        if model.head is None or any(blk.ada is not None for blk in model.layers):
            raise ValueError(f"the compiled {self.KIND} step needs a Transformer with a logits head and no adaLN "
                             "conditioning (a next-token decoder)")
        self.model, self.eager = model, eager
        self.eps, self.n_heads = model.norm.eps, model.layers[0].attn.n_heads
        self.fn, self.compiled = eager, compile
        self.cuda = model.device.type == "cuda"
        if compile:
            self.fn = torch.compile(eager, fullgraph=True, dynamic=False,
                                    mode="reduce-overhead" if self.cuda else None)

    def _pin(self, cache) -> None:
        if self.compiled and self.cuda and not getattr(cache, "static_address", False):
            _static_on_cuda((cache.k, cache.v))
            cache.static_address = True

    def _run(self, *args, form, head_rows):
        weights = decode_weights(self.model)
        if head_rows is not None:  # only the logits the caller samples from (the image ids): fewer weights read
            weights = (*weights[:3], weights[3][head_rows[0]: head_rows[0] + head_rows[1]])
        if self.RECOMPILE_LIMIT is None:  # the one-token step: no context to enter on the hot path
            return self.fn(weights, *args, n_heads=self.n_heads, eps=self.eps, form=form)
        with torch._dynamo.config.patch(recompile_limit=self.RECOMPILE_LIMIT):
            return self.fn(weights, *args, n_heads=self.n_heads, eps=self.eps, form=form)

    def _call(self, *args, form, head_rows):
        """`_run`, falling back for good to the eager function if the compiled one raises."""
        try:
            return self._run(*args, form=form, head_rows=head_rows)
        except Exception as err:  # noqa: BLE001 - any compiler failure falls back to the same function, eager
            if not self.compiled:
                raise
            warnings.warn(f"torch.compile of the {self.KIND} step failed ({type(err).__name__}: {err}); decoding "
                          f"eagerly", RuntimeWarning, stacklevel=3)
            self.fn, self.compiled = self.eager, False
            return self._run(*args, form=form, head_rows=head_rows)


class DecodeStep(_CompiledStep):
    """`decode_one` for one model, compiled on first use per (rows, cache length), eager if compilation fails.

    `step(tokens_R, cos_1D, sin_1D, key_bias_RS, cache)` returns logits (R, V) and stores the new keys and values
    in `cache` at slot `cache.length`, then advances it; the caller sets the new slot's bias to 0 after."""

    def __init__(self, model: Transformer, compile: bool = True):
        super().__init__(model, decode_one, compile)

    def __call__(self, tokens_R, cos_1D, sin_1D, key_bias_RS, cache, head_rows: tuple[int, int] | None = None
                 ) -> torch.Tensor:
        """`head_rows=(start, n)`: return only logits start .. start + n - 1, (R, n)."""
        self._pin(cache)
        logits, new_kv = self._call(tokens_R, cos_1D, sin_1D, key_bias_RS, cache.k, cache.v,
                                    form=projection_form(tokens_R.shape[0], tokens_R.device), head_rows=head_rows)
        slot = cache.length
        cache.k[:, :, :, slot] = new_kv[:, 0]
        cache.v[:, :, :, slot] = new_kv[:, 1]
        cache.length = slot + 1
        return logits


def decode_window(weights: tuple, tokens_RT: torch.Tensor, cos_RTD: torch.Tensor, sin_RTD: torch.Tensor,
                  start_R: torch.Tensor, key_valid_RS: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor, *,
                  n_heads: int, eps: float, form: str) -> tuple[torch.Tensor, torch.Tensor]:
    """`decode_one` for a window of T new tokens per row, each row written from its own cache slot (speculative
    decoding's verify pass): logits (R, T, V) and the window's keys/values (L, 2, R, K, T, D) for the caller to store.

    Row r's queries see the cache slots before start_R[r] that key_valid_RS allows, then the window causally; the
    slot masks are built here from those two tensors, so every pass of a loop has the same shapes."""
    layers, emb, norm_w, head_w = weights
    R, T = tokens_RT.shape
    K, S, D = cache_k.shape[2], cache_k.shape[3], cache_k.shape[4]
    H, C = n_heads, emb.shape[1]
    group = H // K
    scale = D ** -0.5
    seen = (torch.arange(S, device=start_R.device)[None] < start_R[:, None]) & key_valid_RS
    old_bias = torch.zeros(R, S, device=emb.device).masked_fill(~seen, float("-inf"))[:, None, None, None]
    causal = torch.full((T, T), float("-inf"), device=emb.device).triu(1)
    x = F.embedding(tokens_RT, emb).view(R * T, C)
    new_kv = []
    for i, (attn_norm, qkv_w, wo, mlp_norm, w13, w2) in enumerate(layers):
        qkv = _project(F.rms_norm(x, (C,), attn_norm, eps), qkv_w, form).view(R, T, H + 2 * K, D).transpose(1, 2)
        qk = apply_rope(qkv[:, : H + K], cos_RTD, sin_RTD)  # (R, H + K, T, D)
        q = qk[:, :H].reshape(R, K, group, T, D)
        k, v = qk[:, H:], qkv[:, H + K:]  # (R, K, T, D)
        # softmax over [cache slots, window keys] without concatenating the cache
        old = torch.einsum("rkgtd,rksd->rkgts", q, cache_k[i]) * scale + old_bias
        new = torch.einsum("rkgtd,rkud->rkgtu", q, k) * scale + causal
        top = torch.maximum(old.amax(-1, keepdim=True), new.amax(-1, keepdim=True))
        p_old, p_new = (old - top).exp(), (new - top).exp()
        y = (torch.einsum("rkgts,rksd->rkgtd", p_old, cache_v[i]) + torch.einsum("rkgtu,rkud->rkgtd", p_new, v)) / (
            p_old.sum(-1, keepdim=True) + p_new.sum(-1, keepdim=True))
        x = x + _project(y.reshape(R, H, T, D).transpose(1, 2).reshape(R * T, H * D), wo, form)
        gate, up = _project(F.rms_norm(x, (C,), mlp_norm, eps), w13, form).chunk(2, dim=-1)
        x = x + _project(F.silu(gate) * up, w2, form)
        new_kv.append(torch.stack([k, v]))
    return _project(F.rms_norm(x, (C,), norm_w, eps), head_w, form).view(R, T, -1), torch.stack(new_kv)


# adaptive SJD's fixed cost model, for SJD's acceptance (shared noise measures its own, `measure_pass_costs`): a
# compiled verify pass with no tokens and a compiled AR step with none, in units of what a pass grows by per row x
# window position. CPU: the default model on one thread, 18.5 ms + 1.41 ms per row-token for the window step and
# 12.2 ms for the AR step at 2 rows (docs/results/sjd.md); a GPU's pass is nearly flat in its width, so its floor is
# far above one row-token
WINDOW_PASS_COST = {"cpu": (13.0, 7.0), "cuda": (400.0, 380.0)}


def window_form(rows: int, device: torch.device) -> str:
    """`projection_form` for a window's rows: the multiply-reduce forms only up to 2 rows. In the window's graph
    they lose to gemm from 4 rows on (default model, one thread, ms per pass at 2 / 4 / 8 / 16 rows: rows-outer
    15.9 / 26.9 / 47.4 / 82.0, gemm 16.0 / 24.1 / 29.7 / 41.0)."""
    return projection_form(rows, device) if rows <= 2 else "gemm"


def window_widths(window: int, device_type: str = "cpu") -> tuple[int, ...]:
    """The widths a `WindowStep` compiles for windows of at most `window`: on a CPU, where a pass costs in proportion
    to its width, the powers of two below `window` and `window` itself; on a GPU, where a narrow pass costs about
    what a wide one does, `window` alone (one graph per batch). A narrower window is padded up to the next width:
    its extra outputs are dropped, its extra keys land past every row's window, where a later pass writes before
    any query can see them."""
    if device_type != "cpu":
        return (window,)
    return tuple(w for w in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512) if w < window) + (window,)


def _static_on_cuda(tensors) -> None:
    """CUDA graphs read these where they live instead of copying them into the graph's inputs at every replay."""
    for t in tensors:
        if t.is_cuda:
            torch._dynamo.mark_static_address(t)


class WindowStep(_CompiledStep):
    """`decode_window` for one model, compiled on first use per (rows, width, cache length) at the widths
    `window_widths` gives (or `widths`), eager if compilation fails: the AR step's machinery (`DecodeStep`) for the
    verify passes of speculative decoding. `step(tokens_RT, cos_RTD, sin_RTD, start_R, key_valid_RS, cache)`
    returns logits (R, T, V) and stores the window's keys and values in `cache` at slots start_R[r] + t."""

    KIND = "window"
    # each (rows, width, projection form) is one graph; dynamo's default of 8 per function would send later shapes
    # back to eager
    RECOMPILE_LIMIT = 64

    def __init__(self, model: Transformer, window: int, compile: bool = True, widths: tuple[int, ...] | None = None):
        super().__init__(model, decode_window, compile)
        self.widths = tuple(sorted(widths or window_widths(window, model.device.type)))

    def __call__(self, tokens_RT, cos_RTD, sin_RTD, start_R, key_valid_RS, cache,
                 head_rows: tuple[int, int] | None = None) -> torch.Tensor:
        R, T = tokens_RT.shape
        width = next(w for w in self.widths if w >= T)
        if width > T:  # pad to a compiled width by repeating the last column
            pad = lambda x: torch.cat([x, x[:, -1:].expand(-1, width - T, *x.shape[2:])], 1)  # noqa: E731
            tokens_RT, cos_RTD, sin_RTD = pad(tokens_RT), pad(cos_RTD), pad(sin_RTD)
        self._pin(cache)
        logits, new_kv = self._call(tokens_RT, cos_RTD, sin_RTD, start_R, key_valid_RS, cache.k, cache.v,
                                    form=window_form(R * width, tokens_RT.device), head_rows=head_rows)
        L, _, _, K, _, D = new_kv.shape
        slots = (start_R[:, None] + torch.arange(width, device=start_R.device))[None, :, None, :, None]
        slots = slots.expand(L, R, K, width, D)
        cache.k.scatter_(3, slots, new_kv[:, 0])
        cache.v.scatter_(3, slots, new_kv[:, 1])
        return logits[:, :T]


def compiled_decode_step(model: Transformer) -> DecodeStep:
    """The model's `DecodeStep`, made once and kept on the model so later calls reuse its compiled graphs."""
    step = model.__dict__.get("_compiled_decode_step")
    if step is None:
        step = model.__dict__["_compiled_decode_step"] = DecodeStep(model)
    return step


def compiled_window_step(model: Transformer, window: int) -> WindowStep:
    """The model's `WindowStep` for windows of at most `window`, made once per window and kept on the model."""
    steps = model.__dict__.setdefault("_compiled_window_steps", {})
    if window not in steps:
        steps[window] = WindowStep(model, window)
    return steps[window]


@torch.no_grad()
def measure_pass_costs(model: Transformer, rows: int, window: int, capacity: int, ar_capacity: int,
                       head_rows: tuple[int, int] | None = None, repeats: int = 5):
    """Seconds of one compiled verify pass over `rows` rows at each width the model's window step runs (its
    `capacity`-slot cache), and of one compiled AR decode step over the same rows (its `ar_capacity`-slot cache):
    the fastest of `repeats` after an untimed call (the compile), which on a shared machine is the least disturbed.
    Measured once per shape, kept on the model. Returns (((width, seconds), ...), AR step seconds)."""
    key = (rows, window, capacity, ar_capacity, head_rows)
    measured = model.__dict__.setdefault("_measured_pass_costs", {})
    if key in measured:
        return measured[key]
    device = model.device
    cos, sin = (t[0] for t in model.rope_cos_sin(torch.arange(capacity, device=device)[None]))

    def seconds(call) -> float:
        times = []
        for r in range(repeats + 1):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            call()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        return min(times[1:])

    step, cache = compiled_window_step(model, window), model.new_cache(rows, capacity)
    start = torch.full((rows,), capacity - window, device=device)
    key_valid = torch.ones(rows, capacity, dtype=torch.bool, device=device)
    token = torch.full((rows,), (head_rows or (0,))[0], device=device)
    table = []
    for w in step.widths:  # the inputs as a sampling call makes them (contiguous), so its graphs are the ones timed
        slots = start[:, None] + torch.arange(w, device=device)
        window = token[:, None].repeat(1, w)
        table.append((w, seconds(lambda: step(window, cos[slots], sin[slots], start, key_valid, cache,
                                              head_rows=head_rows))))
    ar, ar_cache = compiled_decode_step(model), model.new_cache(rows, ar_capacity)
    bias = torch.zeros(rows, ar_capacity, device=device)
    slot = ar_capacity // 2

    def ar_step():
        ar_cache.length = slot
        ar(token, cos[slot: slot + 1], sin[slot: slot + 1], bias, ar_cache, head_rows=head_rows)

    measured[key] = tuple(table), seconds(ar_step)
    return measured[key]
