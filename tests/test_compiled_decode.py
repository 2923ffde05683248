"""The compiled one-token decode step (`mmgen.models.compiled_decode`): its function equals the model's cached
decode step in every projection form; compiled generation gives the eager loop's tokens (greedy and sampled, with
and without CFG); a compiler failure falls back to eager with a warning; bad use is refused by name."""

from functools import partial

import pytest
import torch

from conftest import tiny_transformer
from mmgen.models import compiled_decode
from mmgen.models.compiled_decode import DecodeStep, decode_one, decode_weights
from mmgen.paradigms import next_token
from mmgen.paradigms.next_token import NextTokenLayout, decode_step, prefill
from mmgen.sampling.logits import SamplingConfig
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


def test_refuses_conditioned_decoders_and_sjd(tiny_pipe_dir):
    with pytest.raises(ValueError, match="logits head"):
        DecodeStep(tiny_transformer(60, 64, cond_dim=8), compile=False)
    from mmgen.pipelines import load_pipeline

    pipe = load_pipeline(tiny_pipe_dir)
    with pytest.raises(ValueError, match="compile_decode .*sampler='sjd'"):
        pipe("a red circle", sampler="sjd", compile_decode=True)


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
