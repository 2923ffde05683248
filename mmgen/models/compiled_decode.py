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


class DecodeStep:
    """`decode_one` for one model, compiled on first use per (rows, cache length), eager if compilation fails.

    `step(tokens_R, cos_1D, sin_1D, key_bias_RS, cache)` returns logits (R, V) and stores the new keys and values
    in `cache` at slot `cache.length`, then advances it; the caller sets the new slot's bias to 0 after."""

    def __init__(self, model: Transformer, compile: bool = True):
        if model.head is None or any(blk.ada is not None for blk in model.layers):
            raise ValueError("the compiled decode step needs a Transformer with a logits head and no adaLN "
                             "conditioning (a next-token decoder)")
        self.model = model
        self.eps = model.norm.eps
        self.n_heads = model.layers[0].attn.n_heads
        self.fn = decode_one
        self.compiled = compile
        self.cuda = model.device.type == "cuda"
        if compile:
            self.fn = torch.compile(decode_one, fullgraph=True, dynamic=False,
                                    mode="reduce-overhead" if self.cuda else None)

    def _run(self, *args, form, head_rows):
        weights = decode_weights(self.model)
        if head_rows is not None:  # only the logits the caller samples from (the image ids): fewer weights read
            weights = (*weights[:3], weights[3][head_rows[0]: head_rows[0] + head_rows[1]])
        return self.fn(weights, *args, n_heads=self.n_heads, eps=self.eps, form=form)

    def __call__(self, tokens_R, cos_1D, sin_1D, key_bias_RS, cache, head_rows: tuple[int, int] | None = None
                 ) -> torch.Tensor:
        """`head_rows=(start, n)`: return only logits start .. start + n - 1, (R, n)."""
        form = projection_form(tokens_R.shape[0], tokens_R.device)
        if self.compiled and self.cuda and not getattr(cache, "static_address", False):
            # CUDA graphs then read the cache where it lives instead of copying it into the graph's inputs
            torch._dynamo.mark_static_address(cache.k)
            torch._dynamo.mark_static_address(cache.v)
            cache.static_address = True
        args = (tokens_R, cos_1D, sin_1D, key_bias_RS, cache.k, cache.v)
        try:
            logits, new_kv = self._run(*args, form=form, head_rows=head_rows)
        except Exception as err:  # noqa: BLE001 - any compiler failure falls back to the same function, eager
            if not self.compiled:
                raise
            warnings.warn(f"torch.compile of the decode step failed ({type(err).__name__}: {err}); decoding "
                          f"eagerly", RuntimeWarning, stacklevel=2)
            self.fn, self.compiled = decode_one, False
            logits, new_kv = self._run(*args, form=form, head_rows=head_rows)
        slot = cache.length
        cache.k[:, :, :, slot] = new_kv[:, 0]
        cache.v[:, :, :, slot] = new_kv[:, 1]
        cache.length = slot + 1
        return logits


def compiled_decode_step(model: Transformer) -> DecodeStep:
    """The model's `DecodeStep`, made once and kept on the model so later calls reuse its compiled graphs."""
    step = model.__dict__.get("_compiled_decode_step")
    if step is None:
        step = model.__dict__["_compiled_decode_step"] = DecodeStep(model)
    return step
