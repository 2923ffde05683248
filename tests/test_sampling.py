"""Logits processors and the sampler: exact CFG/top-k/top-p math, sampled frequencies match the target."""

import math

import pytest
import torch

from mmgen.sampling.logits import SamplingConfig, cfg_combine, process_logits, sample, top_k_filter, top_p_filter


def test_cfg_combine_math():
    c, u = torch.tensor([[2.0, 0.0, -1.0]]), torch.tensor([[1.0, 1.0, 1.0]])
    torch.testing.assert_close(cfg_combine(c, u, 3.0), torch.tensor([[4.0, -2.0, -5.0]]))
    torch.testing.assert_close(cfg_combine(c, u, 1.0), c)
    torch.testing.assert_close(cfg_combine(c, u, 0.0), u)


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


def test_row_noise_equals_step_by_step_draws():
    """Noise drawn ahead in blocks is the stream `sample` draws step by step: same tokens, same generator state."""
    from mmgen.sampling.logits import RowNoise

    steps, V = 7, 13
    logits = torch.randn(steps, 3, V, generator=torch.Generator().manual_seed(0))
    gens = [torch.Generator().manual_seed(s) for s in (1, 2, 3)]
    step_by_step = torch.stack([sample(logits[i], gens) for i in range(steps)])
    gens2 = [torch.Generator().manual_seed(s) for s in (1, 2, 3)]
    noise = RowNoise(gens2, steps, V, "cpu", block_elems=2 * 3 * V)  # blocks of 2 steps, the last one of 1
    ahead = torch.stack([sample(logits[i], None, noise_BV=noise.next()) for i in range(steps)])
    assert torch.equal(step_by_step, ahead)
    assert all(torch.equal(a.get_state(), b.get_state()) for a, b in zip(gens, gens2))
    with pytest.raises(ValueError, match="RowNoise"):
        noise.next()
