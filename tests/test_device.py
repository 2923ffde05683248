"""The decoding hot paths on the device named by MMGEN_TEST_DEVICE (default: the first GPU; skipped without one),
as `scripts/gpu_check.sh` runs them: the compiled AR step (CUDA graphs on a GPU) and the compiled SJD window step
give the eager loop's greedy tokens, SJD's greedy tokens are AR's, a seed gives the same images twice, and a
bf16 training step learns. `MMGEN_TEST_DEVICE=cpu` runs the same tests on the CPU (the script's dry mode)."""

import os

import pytest
import torch

from tiny import tiny_transformer
from mmgen.paradigms.next_token import NextTokenLayout, build_batch, generate, generate_sjd, loss_fn
from mmgen.sampling.logits import SamplingConfig
from mmgen.sampling.sjd import SJDConfig
from mmgen.text import UnifiedVocab

DEVICE = os.environ.get("MMGEN_TEST_DEVICE") or ("cuda" if torch.cuda.is_available() else None)
pytestmark = pytest.mark.skipif(DEVICE is None, reason="no GPU (MMGEN_TEST_DEVICE=cpu runs these on the CPU)")

LAYOUT = NextTokenLayout(UnifiedVocab(text_vocab_size=20, image_vocab_size=24), max_text_len=6, grid=(3, 4))
PROMPTS = [[3, 4], [5, 6, 7, 8, 9, 10], [11]]


def _model(seed=0):
    model = tiny_transformer(LAYOUT.vocab.size, LAYOUT.seq_len, seed, n_kv_heads=2)
    with torch.no_grad():  # far from uniform conditionals, so greedy tokens are not near-ties
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.35)
    return model.to(DEVICE)


def _gens(n, seed=5):
    return [torch.Generator().manual_seed(seed + i) for i in range(n)]


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_compiled_ar_step_gives_the_eager_tokens(guidance):
    model = _model()
    sampling = SamplingConfig(guidance_scale=guidance, temperature=0)
    eager, _ = generate(model, LAYOUT, PROMPTS, sampling)
    compiled, cost = generate(model, LAYOUT, PROMPTS, sampling, compile=True)
    assert eager.device.type == torch.device(DEVICE).type
    assert torch.equal(compiled, eager) and cost.decoder_passes == LAYOUT.num_image_tokens


@pytest.mark.parametrize("adaptive", [False, True])
def test_compiled_sjd_gives_the_greedy_ar_tokens(adaptive):
    model = _model(1)
    sampling = SamplingConfig(guidance_scale=3.0, temperature=0)
    ar, _ = generate(model, LAYOUT, PROMPTS, sampling)
    sjd, stats = generate_sjd(model, LAYOUT, PROMPTS, sampling, SJDConfig(4, "above", True, adaptive=adaptive),
                              compile=True)
    assert torch.equal(sjd, ar) and stats.decoder_passes <= LAYOUT.num_image_tokens


def test_a_seed_gives_the_same_samples_twice():
    """Per-image CPU generators drive the device's sampling: the same seeds give the same tokens, AR and SJD."""
    model = _model(2)
    sampling = SamplingConfig(guidance_scale=3.0)
    for run in (lambda: generate(model, LAYOUT, PROMPTS, sampling, _gens(3)),
                lambda: generate_sjd(model, LAYOUT, PROMPTS, sampling, SJDConfig(4, coupled=True), _gens(3))):
        first, second = run()[0], run()[0]
        assert torch.equal(first, second)
    other, _ = generate(model, LAYOUT, PROMPTS, sampling, _gens(3, seed=9))
    assert not torch.equal(other, generate(model, LAYOUT, PROMPTS, sampling, _gens(3))[0])


def test_a_bf16_training_step_learns():
    """Under bf16 autocast the loss is finite and falls over a few AdamW steps on one batch (gpu_check measures
    this step's throughput)."""
    model = _model(3).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    codes = torch.randint(0, 24, (4, 3, 4), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    batch = build_batch(LAYOUT, PROMPTS + [[12]], codes)
    losses = []
    for _ in range(6):
        with torch.autocast(torch.device(DEVICE).type, dtype=torch.bfloat16):
            loss = loss_fn(model, batch, LAYOUT)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0] - 0.1, losses
