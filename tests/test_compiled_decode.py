"""The compiled decode steps (`mmgen.models.compiled_decode`): the one-token step's function equals the model's
cached decode step in every projection form; compiled generation gives the eager loop's tokens (greedy and sampled,
with and without CFG); a compiler failure falls back to eager with a warning; bad use is refused by name. The window
step (SJD's verify pass) equals the eager verify pass, compiled too, and compiled SJD gives AR's tokens (greedy, and
sampled with shared noise), falling back to the AR loop where no width pays."""

from functools import partial

import pytest
import torch

from tiny import tiny_transformer
from mmgen.models import compiled_decode
from mmgen.models.compiled_decode import (DecodeStep, WindowStep, decode_one, decode_weights, decode_window,
                                          window_form, window_widths)
from mmgen.paradigms import next_token
from mmgen.paradigms.next_token import NextTokenBackend, NextTokenLayout, decode_step, prefill
from mmgen.sampling.logits import SamplingConfig
from mmgen.sampling.sjd import SJDConfig
from mmgen.text import UnifiedVocab

tiny = partial(tiny_transformer, 60, 64, n_kv_heads=2)  # 4 heads reading 2 kv heads (grouped queries)
LAYOUT = NextTokenLayout(UnifiedVocab(text_vocab_size=20, image_vocab_size=24), max_text_len=6, grid=(3, 3))
PROMPTS = [[3, 4], [5, 6, 7, 8, 9, 10], [11]]  # different pad lengths


def _cached_prefix(model, rows: int):
    """A cache holding a padded prompt (rows of PROMPTS) and the additive key bias a decode loop keeps."""
    text = torch.tensor([[0] * (6 - len(p)) + p + [LAYOUT.vocab.boi] for p in PROMPTS[:rows]])
    valid = text != 0
    positions = LAYOUT.positions(rows)
    cache = model.new_cache(rows, LAYOUT.seq_len)
    logits = prefill(model, text, positions[:, :7], valid, cache)
    bias = torch.full((rows, LAYOUT.seq_len), float("-inf"))
    bias[:, :7] = torch.zeros(rows, 7).masked_fill(~valid, float("-inf"))
    return cache, bias, positions, logits


@pytest.mark.parametrize("form", ["weight_outer", "rows_outer", "gemm"])
@pytest.mark.parametrize("rows", [1, 3])
@torch.no_grad()
def test_decode_one_equals_the_cached_decode_step(form, rows):
    model = tiny()
    cache_a, bias, positions, _ = _cached_prefix(model, rows)
    cache_b, _, _, _ = _cached_prefix(model, rows)
    key_valid = bias == 0
    cos, sin = model.rope_cos_sin(positions[:1])
    tokens = torch.randint(30, 54, (rows, 4), generator=torch.Generator().manual_seed(0))
    weights = decode_weights(model)
    for t in range(4):
        slot = 7 + t
        key_valid[:, slot] = True
        want = decode_step(model, tokens[:, t], positions[:, slot], key_valid, cache_a)
        got, new_kv = decode_one(weights, tokens[:, t], cos[0, slot: slot + 1], sin[0, slot: slot + 1], bias,
                                 cache_b.k, cache_b.v, n_heads=4, eps=model.norm.eps, form=form)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
        # the new keys and values are the ones the model's own step wrote
        torch.testing.assert_close(new_kv[:, 0], cache_a.k[:, :, :, slot], atol=1e-6, rtol=0)
        torch.testing.assert_close(new_kv[:, 1], cache_a.v[:, :, :, slot], atol=1e-6, rtol=0)
        if t == 3:  # the test has teeth: a step that still masks the previous token's slot gives other logits
            stale = bias.clone()
            stale[:, slot - 1] = float("-inf")
            wrong, _ = decode_one(weights, tokens[:, t], cos[0, slot: slot + 1], sin[0, slot: slot + 1], stale,
                                  cache_b.k, cache_b.v, n_heads=4, eps=model.norm.eps, form=form)
            assert (wrong - want).abs().max() > 1e-3
        cache_b.k[:, :, :, slot], cache_b.v[:, :, :, slot] = new_kv[:, 0], new_kv[:, 1]
        bias[:, slot] = 0.0


def test_projection_forms():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert compiled_decode.projection_form(1, cpu) == "weight_outer"
    assert compiled_decode.projection_form(compiled_decode.PRODUCT_MAX_ROWS, cpu) == "rows_outer"
    assert compiled_decode.projection_form(compiled_decode.PRODUCT_MAX_ROWS + 1, cpu) == "gemm"
    assert compiled_decode.projection_form(1, cuda) == "gemm"


@pytest.mark.parametrize("guidance", [1.0, 3.0])  # one row (weight_outer); CFG doubles two prompts to four rows
def test_compiled_generate_gives_the_eager_tokens(guidance):
    model = tiny().eval()
    prompts = PROMPTS[:1] if guidance == 1.0 else PROMPTS[:2]
    for temperature in (0.0, 1.0):
        sampling = SamplingConfig(guidance_scale=guidance, temperature=temperature)
        gens = lambda: [torch.Generator().manual_seed(5 + i) for i in range(len(prompts))]  # noqa: E731
        eager, _ = next_token.generate(model, LAYOUT, prompts, sampling, gens())
        compiled, cost = next_token.generate(model, LAYOUT, prompts, sampling, gens(), compile=True)
        assert torch.equal(compiled, eager) and cost.decoder_passes == 9
    step = model.__dict__["_compiled_decode_step"]
    assert step.compiled  # it really compiled, no silent fallback


def test_compiler_failure_falls_back_to_eager(monkeypatch):
    def broken(fn, **kw):
        def raise_(*a, **k):
            raise RuntimeError("no C++ compiler")
        return raise_
    monkeypatch.setattr(torch, "compile", broken)
    model = tiny().eval()
    sampling = SamplingConfig(guidance_scale=1.0, temperature=0.0)
    eager, _ = next_token.generate(model, LAYOUT, PROMPTS[:1], sampling)
    with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler"):
        fallback, _ = next_token.generate(model, LAYOUT, PROMPTS[:1], sampling, compile=True)
    assert torch.equal(fallback, eager) and model.__dict__["_compiled_decode_step"].compiled is False


def test_refuses_conditioned_decoders_and_compiled_trees(tiny_pipe_dir):
    for step in (lambda m: DecodeStep(m, compile=False), lambda m: WindowStep(m, 4, compile=False)):
        with pytest.raises(ValueError, match="logits head"):
            step(tiny_transformer(60, 64, cond_dim=8))
    from mmgen.pipelines import load_pipeline

    pipe = load_pipeline(tiny_pipe_dir)
    with pytest.raises(ValueError, match="compile_decode .*token trees"):
        pipe("a red circle", sampler="sjd", sjd_tree_width=2, compile_decode=True)


# ---- the compiled verify pass of speculative decoding ------------------------------------------------------------


def test_window_widths_and_forms():
    cpu = torch.device("cpu")
    assert window_widths(16) == (1, 2, 4, 8, 16) and window_widths(6) == (1, 2, 4, 6) and window_widths(1) == (1,)
    assert window_widths(16, "cuda") == (16,)  # a GPU pass costs about the same at any width: one graph
    assert [window_form(r, cpu) for r in (1, 2, 3, 32)] == ["weight_outer", "rows_outer", "gemm", "gemm"]


@torch.no_grad()
def test_window_step_equals_the_eager_verify_pass():
    """Pass after pass, rows at their own lengths, windows of every width (padded up to a compiled width), with
    guidance: the window step's logits are the eager backend's, and it writes the cache the eager pass writes."""
    model = tiny().eval()
    eager = NextTokenBackend(model, LAYOUT, PROMPTS, 3.0, 6)
    windowed = NextTokenBackend(model, LAYOUT, PROMPTS, 3.0, 6)
    windowed.window_step = WindowStep(model, 6, compile=False)
    g = torch.Generator().manual_seed(0)
    n = torch.zeros(3, dtype=torch.long)
    for T in (6, 3, 5, 1, 2):
        window = torch.randint(0, 24, (3, T), generator=g)
        want, got = eager.forward(window, n), windowed.forward(window, n)
        torch.testing.assert_close(got, want, atol=2e-5, rtol=0)
        n = (n + torch.randint(1, T + 1, (3,), generator=g)).clamp_max(8)
    assert (eager.cache.k - windowed.cache.k)[:, :, :, : eager.prefix + 9].abs().max() < 1e-5
    stale = windowed.key_valid.clone()
    stale[:, eager.prefix + int(n[0]) - 1] = False  # the test has teeth: one committed key hidden changes the logits
    windowed.key_valid = stale
    assert (windowed.forward(window, n) - eager.forward(window, n)).abs().max() > 1e-3


@torch.no_grad()
def test_compiled_window_step_equals_its_eager_function():
    model = tiny().eval()
    cache = model.new_cache(4, LAYOUT.seq_len + 2)
    cache.k.normal_(generator=torch.Generator().manual_seed(0))
    cache.v.normal_(generator=torch.Generator().manual_seed(1))
    tokens, start = torch.randint(30, 54, (4, 2)), torch.tensor([7, 9, 7, 12])
    cos, sin = (t[0] for t in model.rope_cos_sin(LAYOUT.positions(1)[:, 7:9]))
    args = (tokens, cos.expand(4, -1, -1), sin.expand(4, -1, -1), start, torch.ones(4, LAYOUT.seq_len + 2,
                                                                                     dtype=torch.bool))
    want, want_kv = decode_window(decode_weights(model), *args, cache.k, cache.v, n_heads=4, eps=model.norm.eps,
                                  form="gemm")
    step = WindowStep(model, 2)
    got = step(*args, cache)
    assert step.compiled  # it really compiled, no silent fallback
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    slots = start[:, None] + torch.arange(2)
    torch.testing.assert_close(cache.k[:, torch.arange(4)[:, None], :, slots], want_kv[:, 0].permute(1, 3, 0, 2, 4))


@pytest.mark.parametrize("adaptive", [False, True])
def test_compiled_sjd_gives_ar_tokens(adaptive, monkeypatch):
    """Through the window step (eager here: its graph's values are checked above), with finished rows parked in the
    batch: greedy SJD gives greedy AR's tokens, and shared-noise SJD gives sampled AR's tokens for the same seeds."""
    monkeypatch.setitem(compiled_decode.WINDOW_PASS_COST, "cpu", (1.0, 1e6))  # speculation always pays
    model = tiny().eval()
    model.__dict__["_compiled_window_steps"] = {6: WindowStep(model, 6, compile=False)}
    model.__dict__["_compiled_decode_step"] = DecodeStep(model, compile=False)
    gens = lambda: [torch.Generator().manual_seed(5 + i) for i in range(3)]  # noqa: E731
    for sampling, sjd in ((SamplingConfig(3.0, temperature=0), SJDConfig(6, "above", True, adaptive=adaptive)),
                          (SamplingConfig(3.0, top_k=12), SJDConfig(6, adaptive=adaptive, shared_noise=True))):
        ar, _ = next_token.generate(model, LAYOUT, PROMPTS, sampling, gens())
        codes, stats = next_token.generate_sjd(model, LAYOUT, PROMPTS, sampling, sjd, gens(), compile=True)
        assert torch.equal(codes, ar) and stats.decoder_passes <= LAYOUT.num_image_tokens


def test_adaptive_compiled_sjd_falls_back_to_ar_where_no_width_pays(monkeypatch):
    """A cost model in which no width beats the AR step sends the batch to the compiled AR loop: AR's passes."""
    model = tiny().eval()
    model.__dict__["_compiled_decode_step"] = DecodeStep(model, compile=False)
    never = model.__dict__["_compiled_window_steps"] = {6: WindowStep(model, 6, compile=False)}
    never[6].fn = lambda *a, **k: pytest.fail("a window pass ran")
    monkeypatch.setitem(compiled_decode.WINDOW_PASS_COST, "cpu", (1e6, 0.0))
    codes, stats = next_token.generate_sjd(model, LAYOUT, PROMPTS, SamplingConfig(3.0, temperature=0),
                                           SJDConfig(6, adaptive=True), compile=True)
    ar, _ = next_token.generate(model, LAYOUT, PROMPTS, SamplingConfig(3.0, temperature=0))
    assert torch.equal(codes, ar) and stats.decoder_passes == LAYOUT.num_image_tokens


@torch.no_grad()
def test_head_rows_returns_the_image_slice_of_the_logits():
    model = tiny().eval()
    full_cache, bias, positions, _ = _cached_prefix(model, 3)
    part_cache, _, _, _ = _cached_prefix(model, 3)
    cos, sin = model.rope_cos_sin(positions[:1])
    step = DecodeStep(model, compile=False)
    tokens, slot = torch.tensor([30, 41, 53]), slice(7, 8)
    full = step(tokens, cos[0, slot], sin[0, slot], bias, full_cache)
    part = step(tokens, cos[0, slot], sin[0, slot], bias, part_cache, head_rows=(LAYOUT.vocab.image_offset, 24))
    assert full.shape == (3, model.config.vocab_size) and part.shape == (3, 24)
    off = LAYOUT.vocab.image_offset
    torch.testing.assert_close(part, full[:, off: off + 24], atol=1e-6, rtol=0)
    assert not torch.allclose(part, full[:, off - 1: off + 23])  # an off-by-one slice would not pass
    assert torch.equal(part_cache.k, full_cache.k) and part_cache.length == full_cache.length == 8
