"""Guidance, logits processors, per-row randomness and the sampler: exact CFG/top-k/top-p math, sampled frequencies
match the target."""

import math

import pytest
import torch

from mmgen.sampling.logits import (RowRandom, SamplingConfig, guide, process_logits, sample, top_k_filter,
                                   top_p_filter)


def test_guide_math_and_its_rule_at_scale_one():
    """u + w (c - u) over rows [cond; uncond]; w = 1 gives the conditional rows bit for bit, which the formula does
    not (u = 1e8 swallows c = 0.1); without use_cfg the rows come back as they are."""
    c, u = torch.tensor([[2.0, 0.0, 0.1]]), torch.tensor([[1.0, 1.0, 1e8]])
    rows = torch.cat([c, u])
    assert torch.equal(guide(rows, 3.0)[:, :2], torch.tensor([[4.0, -2.0]]))
    assert torch.equal(guide(rows, 0.0), u)
    assert torch.equal(guide(rows, 1.0), c) and not torch.equal(u + 1.0 * (c - u), c)
    assert guide(rows, 3.0, use_cfg=False) is rows
    # a tensor scale holds the rule elementwise (LlamaGen's cfg_interval: w = 1 after a token index)
    w = torch.tensor([[1.0, 3.0, 1.0]])
    assert torch.equal(guide(rows, w), torch.tensor([[2.0, -2.0, 0.1]]))
    with pytest.raises(ValueError, match="even number"):
        guide(rows[:1], 3.0)


def test_guide_var_form_is_vars_arithmetic():
    """form="var" is VAR's (1 + t) c - t u with t = w - 1, bit for bit, and the same guidance as u + w (c - u)."""
    g = torch.Generator().manual_seed(0)
    c, u = torch.randn(4, 50, generator=g), torch.randn(4, 50, generator=g)
    for t in (0.0, 0.75, 1.5, 2.5 * 2 / 9):
        assert torch.equal(guide(torch.cat([c, u]), 1 + t, form="var"), (1 + t) * c - t * u), t
        torch.testing.assert_close(guide(torch.cat([c, u]), 1 + t, form="var"), guide(torch.cat([c, u]), 1 + t))
    with pytest.raises(ValueError, match="form"):
        guide(torch.cat([c, u]), 2.0, form="cosine")


def test_top_k_keeps_exactly_k():
    logits = torch.tensor([[0.1, 3.0, 2.0, -1.0, 2.5]])
    out = top_k_filter(logits, 2)
    assert torch.isfinite(out).tolist() == [[False, True, False, False, True]]
    assert torch.equal(top_k_filter(logits, 10), logits)


def test_top_p_keeps_smallest_set_reaching_p():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()
    keep = lambda p: torch.isfinite(top_p_filter(logits, p)).tolist()[0]
    assert keep(0.5) == [True, False, False, False]
    assert keep(0.51) == [True, True, False, False]
    assert keep(0.8) == [True, True, False, False]
    assert keep(0.81) == [True, True, True, False]
    assert keep(1.0) == [True, True, True, True]
    assert keep(0.01) == [True, False, False, False]  # the top token always survives


def test_temperature_then_filters():
    logits = torch.tensor([[1.0, 2.0, 3.0]])
    out = process_logits(logits, SamplingConfig(temperature=0.5, top_k=2))
    torch.testing.assert_close(out, torch.tensor([[-math.inf, 4.0, 6.0]]))


def test_sampled_frequencies_match_target():
    """Exponential-race sampling with per-row generators draws from softmax(logits): chi-square test."""
    target = torch.tensor([0.5, 0.25, 0.15, 0.1])
    n = 4000
    logits = target.log().expand(n, -1)
    gens = [torch.Generator().manual_seed(i) for i in range(n)]
    counts = torch.bincount(sample(logits, gens), minlength=4).float()
    chi2 = ((counts - n * target) ** 2 / (n * target)).sum().item()
    assert chi2 < 16.27  # chi-square, 3 dof, p = 0.001


def test_per_row_generators_are_independent_of_batching():
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(0))
    full = sample(logits, [torch.Generator().manual_seed(10 + i) for i in range(6)])
    parts = [sample(logits[i:i + 1], [torch.Generator().manual_seed(10 + i)]) for i in range(6)]
    assert torch.equal(full, torch.cat(parts))


def test_filtered_tokens_are_never_sampled():
    logits = torch.zeros(2000, 10)
    out = process_logits(logits + torch.arange(10.0), SamplingConfig(top_k=3))
    s = sample(out, None)
    assert set(s.unique().tolist()) == {7, 8, 9}
    assert torch.equal(sample(out, None, greedy=True), torch.full((2000,), 9))


@pytest.mark.parametrize("kwargs, name", [
    (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"), (dict(top_k=0), "top_k"),
    (dict(guidance_scale=-1.0), "guidance_scale"), (dict(guidance_scale=float("nan")), "guidance_scale"),
    (dict(temperature=-0.1), "temperature"),
])
def test_invalid_arguments_name_themselves(kwargs, name):
    with pytest.raises(ValueError, match=name):
        SamplingConfig(**kwargs)


def test_race_noise_steps_equal_step_by_step_draws():
    """Noise drawn ahead in blocks is the stream `sample` draws step by step: same tokens, same generator state."""
    steps, V = 7, 13
    logits = torch.randn(steps, 3, V, generator=torch.Generator().manual_seed(0))
    gens = [torch.Generator().manual_seed(s) for s in (1, 2, 3)]
    step_by_step = torch.stack([sample(logits[i], gens) for i in range(steps)])
    gens2 = [torch.Generator().manual_seed(s) for s in (1, 2, 3)]
    noise = RowRandom(gens2, 3, "cpu").race_noise_steps(steps, V, block_elems=2 * 3 * V)  # blocks of 2, the last of 1
    ahead = torch.stack([sample(logits[i], None, noise_BV=next(noise)) for i in range(steps)])
    assert torch.equal(step_by_step, ahead)
    assert all(torch.equal(a.get_state(), b.get_state()) for a, b in zip(gens, gens2))
    assert next(noise, None) is None  # exactly `steps` steps


def test_row_random_draws_each_row_from_its_own_generator():
    """A row's draws come from its generator alone, whichever rows are drawn with it: the same values as the row
    drawn by itself (uniforms as torch.rand, Exp(1) as -log(1 - U), race noise as exponential_)."""
    seeds = (4, 5, 6)
    rng = RowRandom([torch.Generator().manual_seed(s) for s in seeds], 3, "cpu")
    rows = torch.tensor([2, 0])
    u, e, r = rng.uniform(rows, 5), rng.exponential(rows, 2, 3), rng.race_noise(rows, 4)
    for k, s in enumerate((6, 4)):
        g = torch.Generator().manual_seed(s)
        assert torch.equal(u[k], torch.rand(5, generator=g))
        assert torch.equal(e[k], -torch.log1p(-torch.rand(2, 3, generator=g)))
        assert torch.equal(r[k], torch.empty(4).exponential_(generator=g))
    untouched = torch.Generator().manual_seed(5)
    assert torch.equal(rng.generators[1].get_state(), untouched.get_state())  # row 1 was not drawn for
    with pytest.raises(ValueError, match="one generator per row"):
        RowRandom(rng.generators, 4, "cpu")
