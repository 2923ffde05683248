"""Speculative Jacobi decoding: exactness against plain AR, greedy Jacobi, per-sample acceptance, backends.

The distribution tests enumerate every image of a tiny model (4 codes, 2x2 grid: 256 images), compute each
image's exact probability under the same logits processors by teacher forcing, and compare the empirical
distribution of many samples with it in total variation. The bound comes from the sample size n over K
outcomes: E[TV] <= 1/2 sum_x sqrt(p(x)(1 - p(x)) / n), and TV moves by at most 1/n per sample, so by
McDiarmid TV exceeds its mean by t with probability <= exp(-2 n t^2); t is taken for a 1e-6 failure rate.
"""

import itertools
import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tiny import tiny_transformer
from mmgen.models.hf_llama import to_llama
from mmgen.paradigms.next_token import NextTokenLayout, build_batch, generate, generate_sjd, image_logits
from mmgen.sampling.hf_backend import CausalLMBackend
from mmgen.sampling.logits import SamplingConfig, process_logits
from mmgen.sampling.sjd import INITS, SJDConfig, jacobi_sample
from mmgen.text import UnifiedVocab

# 10,000 samples: bound 0.069 on this model's 256 images (0.049 at 20,000), while the wrong variants of the power
# tests below sit at TV 0.11-0.62 (measured at both sizes), so they still fail by more than the McDiarmid slack
N_SAMPLES = 10000
PROMPTS = [[3, 4, 5], [6]]


def peaked_model(seed=0, image_vocab=4, grid=(2, 2), rope_2d=True):
    """A tiny random decoder with weights large enough that its conditionals are far from uniform."""
    layout = NextTokenLayout(UnifiedVocab(text_vocab_size=10, image_vocab_size=image_vocab), max_text_len=4, grid=grid,
                             rope_2d=rope_2d)
    model = tiny_transformer(layout.vocab.size, layout.seq_len, seed, n_kv_heads=2, rope_2d=rope_2d)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.35)
    return model, layout


def exact_distribution(model, layout, text, cfg: SamplingConfig) -> torch.Tensor:
    """Probability of every image (V^N, in lexicographic order) under AR sampling with `cfg`."""
    V, N = layout.vocab.image_vocab_size, layout.num_image_tokens
    images = torch.tensor(list(itertools.product(range(V), repeat=N)))
    codes = images.view(-1, *layout.grid)
    rows = [build_batch(layout, [text] * len(images), codes)]
    if cfg.guidance_scale != 1.0:
        rows.append(build_batch(layout, [[]] * len(images), codes))
    with torch.no_grad():
        logits = [model(b.tokens, positions=b.positions, mask=b.mask)[:, layout.boi_index:layout.boi_index + N]
                  for b in rows]
    logits = torch.cat(logits).flatten(0, 1)
    scores = process_logits(image_logits(layout, logits, cfg.guidance_scale), cfg).view(len(images), N, V)
    logp = scores.log_softmax(-1).gather(-1, images[..., None]).squeeze(-1).sum(-1)
    return logp.exp()


def empirical(samples: torch.Tensor, V: int) -> torch.Tensor:
    N = samples.shape[1]
    index = (samples * V ** torch.arange(N - 1, -1, -1)).sum(1)
    return torch.bincount(index, minlength=V ** N).double() / len(samples)


def tv_bound(p: torch.Tensor, n: int, delta: float = 1e-6) -> float:
    p = p.double()
    return float(0.5 * (p * (1 - p) / n).sqrt().sum()) + math.sqrt(math.log(1 / delta) / (2 * n))


def tv(p, q) -> float:
    return float(0.5 * (p.double() - q.double()).abs().sum())


CONFIGS = {
    "plain": SamplingConfig(guidance_scale=1.0),
    "cfg_topk_temp": SamplingConfig(guidance_scale=2.0, temperature=0.8, top_k=3),
}


@pytest.mark.parametrize("config", list(CONFIGS))
def test_sjd_samples_the_ar_distribution(config):
    cfg = CONFIGS[config]
    model, layout = peaked_model()
    V = layout.vocab.image_vocab_size
    target = exact_distribution(model, layout, PROMPTS[0], cfg)
    assert target.sum().item() == pytest.approx(1.0, abs=1e-4)
    assert target.max() < 0.5 and (target > 1e-3).sum() > 20  # a distribution worth testing
    bound = tv_bound(target, N_SAMPLES)

    torch.manual_seed(1)
    ar, _ = generate(model, layout, [PROMPTS[0]] * N_SAMPLES, cfg)
    assert tv(empirical(ar.flatten(1), V), target) < bound
    for init, window in [("random", 4), ("repeat", 3), ("sample_left", 4), ("above", 2)]:
        torch.manual_seed(2)
        codes, stats = generate_sjd(model, layout, [PROMPTS[0]] * N_SAMPLES, cfg, SJDConfig(window, init))
        distance = tv(empirical(codes.flatten(1), V), target)
        assert distance < bound, f"init={init}: TV {distance:.4f} >= bound {bound:.4f}"
        assert stats.nfe < layout.num_image_tokens + 1


def test_distribution_check_has_power():
    """The same bound rejects samples from a slightly different sampler (temperature 0.8 instead of 1)."""
    model, layout = peaked_model()
    target = exact_distribution(model, layout, PROMPTS[0], SamplingConfig())
    torch.manual_seed(3)
    codes, _ = generate_sjd(model, layout, [PROMPTS[0]] * N_SAMPLES, SamplingConfig(temperature=0.8), SJDConfig(4))
    assert tv(empirical(codes.flatten(1), 4), target) > tv_bound(target, N_SAMPLES)


@pytest.mark.parametrize("init", INITS)
@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_greedy_jacobi_equals_greedy_ar(init, guidance):
    model, layout = peaked_model(seed=4, image_vocab=16, grid=(4, 5))
    prompts = [[3, 4, 5], [6], [7, 8]]
    cfg = SamplingConfig(guidance_scale=guidance, temperature=0, top_k=8)
    ar, nfe_ar = generate(model, layout, prompts, cfg)
    gens = [torch.Generator().manual_seed(i) for i in range(3)]
    sjd, stats = generate_sjd(model, layout, prompts, cfg, SJDConfig(6, init), gens)
    assert torch.equal(sjd, ar)
    assert nfe_ar.decoder_passes == 20 and stats.nfe <= 20 and len(stats.passes) == 3


def test_window_one_is_plain_ar_cost():
    model, layout = peaked_model(seed=5, image_vocab=16, grid=(3, 3))
    _, stats = generate_sjd(model, layout, PROMPTS, SamplingConfig(guidance_scale=2.0), SJDConfig(window=1))
    assert stats.nfe == 9 and stats.passes == [9, 9]
    assert stats.step_compression == 1.0 and stats.mean_accepted_length == 1.0


def test_each_sample_advances_by_its_own_acceptance():
    """Samples finish after different numbers of passes, and a sample's tokens and pass count do not depend
    on which other samples share its batch (one generator per image)."""
    model, layout = peaked_model(seed=6, image_vocab=16, grid=(4, 4))
    cfg = SamplingConfig(guidance_scale=2.0)
    prompts = [[3, 4], [5], [6, 7, 8], [9]]
    gens = lambda seeds: [torch.Generator().manual_seed(s) for s in seeds]  # noqa: E731
    batch, stats = generate_sjd(model, layout, prompts, cfg, SJDConfig(8, "above"), gens([10, 11, 12, 13]))
    assert len(set(stats.passes)) > 1
    assert stats.nfe == max(stats.passes)
    for i in (0, 2):
        alone, s = generate_sjd(model, layout, [prompts[i]], cfg, SJDConfig(8, "above"), gens([10 + i]))
        assert torch.equal(alone[0], batch[i]) and s.passes[0] == stats.passes[i]


def test_config_validation_names_the_argument():
    with pytest.raises(ValueError, match="window"):
        SJDConfig(window=0)
    with pytest.raises(ValueError, match="init must be one of random, repeat, sample_left, above"):
        SJDConfig(init="diagonal")
    with pytest.raises(ValueError, match="adaptive must be True or False"):
        SJDConfig(adaptive=1)
    with pytest.raises(ValueError, match="pass_overhead must be a number >= 0"):
        SJDConfig(pass_overhead=-1)
    with pytest.raises(ValueError, match=r"lantern_delta must be None \(exact\) or a number in \(0, 1\)"):
        SJDConfig(lantern_delta=1.0)
    with pytest.raises(ValueError, match="lantern_k must be an integer >= 1"):
        SJDConfig(lantern_delta=0.1, lantern_k=0)
    with pytest.raises(ValueError, match=r"tree_width must be an integer in \[0, 64\]"):
        SJDConfig(tree_width=-1)
    with pytest.raises(ValueError, match=r"tree_depth must be an integer in \[1, 64\]"):
        SJDConfig(tree_depth=0)
    assert SJDConfig().lossless and not SJDConfig(lantern_delta=0.1).lossless


# ---- transformers backend ---------------------------------------------------------------------------------


def tiny_llama(seed=0, vocab=40):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.3)
    return model


@pytest.mark.parametrize("init", INITS)
def test_llama_greedy_jacobi_equals_generate(init):
    model = tiny_llama()
    ids = torch.tensor([[5, 6, 7, 8], [0, 0, 11, 12]])  # left-padded, as generate() expects
    with torch.no_grad():
        ref = model.generate(ids, attention_mask=(ids != 0).long(), max_new_tokens=12, min_new_tokens=12,
                             do_sample=False, suppress_tokens=list(range(16)), pad_token_id=0)[:, 4:] - 16
    backend = CausalLMBackend(model, [[5, 6, 7, 8], [11, 12]], vocab_offset=16, vocab_size=24, num_tokens=12,
                              window=5)
    tokens, stats = jacobi_sample(backend, 12, SamplingConfig(temperature=0), SJDConfig(5, init), grid_width=4)
    assert torch.equal(tokens, ref) and stats.nfe <= 12


def test_llama_backend_samples_the_ar_distribution_with_cfg():
    """Same exactness check through the transformers backend: 3 tokens over 6 codes, CFG and top-p."""
    model = tiny_llama(seed=1, vocab=24)
    V, N, offset = 6, 3, 18
    cfg = SamplingConfig(guidance_scale=1.5, top_p=0.9)
    cond, uncond = [2, 3, 4], [5]
    seqs = torch.tensor(list(itertools.product(range(V), repeat=N)))
    with torch.no_grad():
        def scores(prompt):
            ids = torch.cat([torch.tensor(prompt).expand(len(seqs), -1), seqs[:, :-1] + offset], 1)
            return model(ids).logits[:, len(prompt) - 1:, offset:offset + V]
        logits = torch.cat([scores(cond), scores(uncond)]).flatten(0, 1)
    from mmgen.sampling.logits import cfg_combine
    c, u = logits.chunk(2)
    logp = process_logits(cfg_combine(c, u, cfg.guidance_scale), cfg).view(len(seqs), N, V).log_softmax(-1)
    target = logp.gather(-1, seqs[..., None]).squeeze(-1).sum(-1).exp()
    backend = CausalLMBackend(model, [cond] * N_SAMPLES, offset, V, N, window=3, guidance_scale=1.5,
                              uncond_prompts=[uncond] * N_SAMPLES)
    torch.manual_seed(7)
    tokens, _ = jacobi_sample(backend, N, cfg, SJDConfig(3, "random"))
    assert tv(empirical(tokens, V), target) < tv_bound(target, N_SAMPLES)


@pytest.mark.parametrize("rope_2d", [False, True])
def test_to_llama_gives_the_same_logits_and_greedy_tokens(rope_2d):
    model, layout = peaked_model(seed=8, image_vocab=16, grid=(3, 4), rope_2d=rope_2d)
    text = [3, 4, 5, 6]  # fills max_text_len: no padding, so positions coincide exactly
    codes = torch.randint(0, 16, (1, 3, 4), generator=torch.Generator().manual_seed(0))
    batch = build_batch(layout, [text], codes)
    hf = to_llama(model, grid_width=4)
    if rope_2d:
        hf.model.rotary_emb.prefix_len = layout.boi_index + 1
    with torch.no_grad():
        ours = model(batch.tokens, positions=batch.positions, mask=batch.mask)
        theirs = hf(batch.tokens).logits
    torch.testing.assert_close(theirs, ours, atol=2e-5, rtol=1e-5)

    cfg = SamplingConfig(guidance_scale=1.0, temperature=0)
    ar, _ = generate(model, layout, [text], cfg)
    prompt = torch.tensor([text + [layout.vocab.boi]])
    off = layout.vocab.image_offset
    with torch.no_grad():
        out = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12, min_new_tokens=12,
                          do_sample=False, suppress_tokens=[i for i in range(layout.vocab.size) if not off <= i < off + 16],
                          pad_token_id=0)
    assert torch.equal(out[0, prompt.shape[1]:] - off, ar.flatten())


@pytest.mark.parametrize("config", list(CONFIGS))
def test_coupled_drafts_sample_the_ar_distribution(config):
    """Maximally coupled drafts (old draft kept with probability min(1, p/q), else a residual draw) keep SJD
    exact for every initialization, with guidance, temperature and top-k."""
    cfg = CONFIGS[config]
    model, layout = peaked_model()
    V = layout.vocab.image_vocab_size
    target = exact_distribution(model, layout, PROMPTS[0], cfg)
    bound = tv_bound(target, N_SAMPLES)
    for init, window in [("random", 4), ("repeat", 3), ("sample_left", 4), ("above", 2)]:
        torch.manual_seed(5)
        codes, stats = generate_sjd(model, layout, [PROMPTS[0]] * N_SAMPLES, cfg, SJDConfig(window, init, True))
        distance = tv(empirical(codes.flatten(1), V), target)
        assert distance < bound, f"init={init}: TV {distance:.4f} >= bound {bound:.4f}"
        assert stats.decoder_passes < layout.num_image_tokens + 1


def test_a_wrong_coupling_is_caught(monkeypatch):
    """Keeping an old draft whenever the new distribution allows it (no min(1, p/q) acceptance) makes the drafts
    no longer distributed as the q they are verified against; the enumeration test sees the bias."""
    import mmgen.sampling.sjd as sjd_module

    def keep_whenever_possible(x, q, p, u, noise, greedy):
        px = p.gather(-1, x[..., None]).squeeze(-1)
        return torch.where(px > 0, x, sjd_module._race(p, noise, greedy))

    monkeypatch.setattr(sjd_module, "_couple", keep_whenever_possible)
    model, layout = peaked_model()
    target = exact_distribution(model, layout, PROMPTS[0], SamplingConfig())
    torch.manual_seed(5)
    codes, _ = generate_sjd(model, layout, [PROMPTS[0]] * N_SAMPLES, SamplingConfig(), SJDConfig(4, "repeat", True))
    assert tv(empirical(codes.flatten(1), 4), target) > tv_bound(target, N_SAMPLES)


def test_coupled_greedy_equals_greedy_ar():
    model, layout = peaked_model(seed=4, image_vocab=16, grid=(4, 5))
    cfg = SamplingConfig(guidance_scale=3.0, temperature=0)
    ar, _ = generate(model, layout, [[3, 4, 5], [6]], cfg)
    sjd, _ = generate_sjd(model, layout, [[3, 4, 5], [6]], cfg, SJDConfig(6, "random", True))
    assert torch.equal(sjd, ar)


def _spy_widths(monkeypatch):
    import mmgen.sampling.sjd as sjd_module

    widths, choose = [], sjd_module.choose_width

    def spy(*args):
        widths.append(choose(*args))
        return widths[-1]

    monkeypatch.setattr(sjd_module, "choose_width", spy)
    return widths


@pytest.mark.parametrize("config", list(CONFIGS))
def test_adaptive_widths_sample_the_ar_distribution(config, monkeypatch):
    """Widths chosen per pass from the samples' earlier acceptance (and drafts a narrow pass did not score carried
    to the next one with their q) keep SJD exact. The overhead is set so the chosen width varies in this batch."""
    widths = _spy_widths(monkeypatch)
    cfg = CONFIGS[config]
    model, layout = peaked_model()
    target = exact_distribution(model, layout, PROMPTS[0], cfg)
    bound = tv_bound(target, N_SAMPLES)
    for init, coupled in [("random", False), ("sample_left", True)]:
        widths.clear()
        torch.manual_seed(6)
        sjd = SJDConfig(4, init, coupled, adaptive=True, pass_overhead=4.0 * N_SAMPLES * (2 if cfg.guidance_scale != 1 else 1))
        codes, stats = generate_sjd(model, layout, [PROMPTS[0]] * N_SAMPLES, cfg, sjd)
        distance = tv(empirical(codes.flatten(1), 4), target)
        assert distance < bound, f"init={init}: TV {distance:.4f} >= bound {bound:.4f}"
        assert len(set(widths)) > 1 and 1 < max(widths) < 4, widths


def test_a_wrong_carry_of_unscored_drafts_is_caught(monkeypatch):
    """Carrying unscored drafts with the q of the neighbouring slot (off by one) breaks exactness: the enumeration
    test sees it, so it would see a wrong adaptive window."""
    import mmgen.sampling.sjd as sjd_module

    carry = sjd_module._carry_unscored

    def off_by_one(drafts, q, src, mask):
        new_drafts, new_q = carry(drafts, q, src, mask)
        return new_drafts, carry(drafts, q, (src + 1).clamp_max(drafts.shape[1] - 1), mask)[1]

    monkeypatch.setattr(sjd_module, "_carry_unscored", off_by_one)
    widths = _spy_widths(monkeypatch)
    model, layout = peaked_model()
    target = exact_distribution(model, layout, PROMPTS[0], SamplingConfig())
    torch.manual_seed(6)
    sjd = SJDConfig(4, "sample_left", adaptive=True, pass_overhead=4.0 * N_SAMPLES)
    codes, _ = generate_sjd(model, layout, [PROMPTS[0]] * N_SAMPLES, SamplingConfig(), sjd)
    assert len(set(widths)) > 1
    assert tv(empirical(codes.flatten(1), 4), target) > tv_bound(target, N_SAMPLES)


@pytest.mark.parametrize("init", ["random", "above"])
def test_adaptive_greedy_equals_greedy_ar(init):
    model, layout = peaked_model(seed=4, image_vocab=16, grid=(4, 5))
    prompts = [[3, 4, 5], [6], [7, 8]]
    cfg = SamplingConfig(guidance_scale=3.0, temperature=0)
    ar, _ = generate(model, layout, prompts, cfg)
    sjd, stats = generate_sjd(model, layout, prompts, cfg, SJDConfig(6, init, adaptive=True, pass_overhead=4.0))
    assert torch.equal(sjd, ar) and stats.lossless


def test_choose_width_follows_the_cost_model():
    """One sample pays for a wide window on a pass with a high floor; many rows make the same width too dear, and
    a sample near the image's end never gets more width than it has tokens left."""
    from mmgen.sampling.sjd import choose_width

    one, many = torch.tensor([0.6]), torch.full((16,), 0.6)
    rem = torch.tensor([64])
    assert choose_width(one, rem, 16, 2, 48.0) > 4
    assert choose_width(many, rem.expand(16), 16, 32, 48.0) <= 2
    assert choose_width(torch.zeros(16), rem.expand(16), 16, 32, 48.0) == 1  # no acceptance: plain AR
    assert choose_width(one, torch.tensor([3]), 16, 2, 1e6) == 3


def test_lantern_is_lossy_within_its_budget_and_labelled():
    """LANTERN's relaxed acceptance moves probability between codebook neighbours: the enumeration test sees the
    samples leave the exact distribution (it is lossy), by less than the per-token budget delta allows
    (TV <= N * delta); a tiny delta moves nothing. Outputs carry lossless = False."""
    from mmgen.sampling.sjd import codebook_neighbours

    model, layout = peaked_model()
    target = exact_distribution(model, layout, PROMPTS[0], SamplingConfig())
    bound = tv_bound(target, N_SAMPLES)
    codebook = torch.randn(4, 8, generator=torch.Generator().manual_seed(0))
    neighbours = codebook_neighbours(codebook, 3)
    assert neighbours.shape == (4, 3) and not (neighbours == torch.arange(4)[:, None]).any()
    results = {}
    for delta in (1e-4, 0.3):
        torch.manual_seed(7)
        codes, stats = generate_sjd(model, layout, [PROMPTS[0]] * N_SAMPLES, SamplingConfig(),
                                    SJDConfig(4, "random", lantern_delta=delta, lantern_k=3), neighbours=neighbours)
        results[delta] = tv(empirical(codes.flatten(1), 4), target)
        assert stats.lossless is False and stats.as_dict()["lossless"] is False
    assert results[1e-4] < bound
    assert bound < results[0.3] < layout.num_image_tokens * 0.3
    with pytest.raises(ValueError, match="neighbour"):
        generate_sjd(model, layout, [PROMPTS[0]], SamplingConfig(), SJDConfig(4, lantern_delta=0.1))


@pytest.mark.parametrize("config", list(CONFIGS))
def test_token_tree_samples_the_ar_distribution(config):
    """Leaves (other candidates at the first window positions, tried by recursive rejection sampling where the
    chain's draft is rejected, an accepted leaf's output drawn as the next draft) keep SJD exact."""
    cfg = CONFIGS[config]
    model, layout = peaked_model()
    target = exact_distribution(model, layout, PROMPTS[0], cfg)
    bound = tv_bound(target, N_SAMPLES)
    for init, width, depth, coupled in [("random", 2, 2, False), ("sample_left", 1, 4, True)]:
        torch.manual_seed(8)
        sjd = SJDConfig(4, init, coupled, tree_width=width, tree_depth=depth)
        codes, stats = generate_sjd(model, layout, [PROMPTS[0]] * N_SAMPLES, cfg, sjd)
        distance = tv(empirical(codes.flatten(1), 4), target)
        assert distance < bound, f"init={init}: TV {distance:.4f} >= bound {bound:.4f}"
        assert stats.lossless and stats.decoder_passes <= layout.num_image_tokens


def test_a_wrong_tree_acceptance_is_caught(monkeypatch):
    """Trying a leaf against the residual without removing the leaves already rejected (a common slip in
    multi-draft verification) over-samples the candidates; the enumeration test sees it."""
    import mmgen.sampling.sjd as sjd_module

    def no_removal(resid, candidates, u, open_):
        chosen = torch.full(open_.shape, -1, dtype=torch.long)
        for i in range(candidates.shape[1]):
            take = open_ & (u[:, i] < resid.gather(-1, candidates[:, i:i + 1]).squeeze(-1))
            chosen, open_ = torch.where(take, i, chosen), open_ & ~take
        return chosen, resid

    monkeypatch.setattr(sjd_module, "_recursive_rejection", no_removal)
    model, layout = peaked_model()
    target = exact_distribution(model, layout, PROMPTS[0], SamplingConfig())
    torch.manual_seed(8)
    codes, _ = generate_sjd(model, layout, [PROMPTS[0]] * N_SAMPLES, SamplingConfig(),
                            SJDConfig(4, "random", tree_width=2, tree_depth=2))
    assert tv(empirical(codes.flatten(1), 4), target) > tv_bound(target, N_SAMPLES)


def test_token_tree_greedy_equals_greedy_ar_and_its_leaves_see_the_right_prefix():
    """Greedy tree decoding gives the greedy AR tokens; a leaf's output is the model's distribution after the
    prefix, the drafts before its position and the leaf itself (checked against a plain window)."""
    from mmgen.paradigms.next_token import NextTokenBackend

    model, layout = peaked_model(seed=4, image_vocab=16, grid=(4, 5))
    prompts = [[3, 4, 5], [6], [7, 8]]
    cfg = SamplingConfig(guidance_scale=3.0, temperature=0)
    ar, _ = generate(model, layout, prompts, cfg)
    sjd, _ = generate_sjd(model, layout, prompts, cfg, SJDConfig(6, "random", tree_width=3, tree_depth=3))
    assert torch.equal(sjd, ar)
    window = torch.tensor([[0, 5, 7, 2], [0, 1, 1, 9], [0, 3, 4, 4]])
    n = torch.zeros(3, dtype=torch.long)
    leaves = torch.tensor([[8, 11], [2, 0], [15, 6]]), torch.tensor([1, 2])
    tree = NextTokenBackend(model, layout, prompts, 3.0, 4, leaves=2).forward(window, n, leaves)
    assert tree.shape == (3, 6, 16)
    for m, depth in enumerate(leaves[1].tolist()):
        chain = window.clone()[:, : depth + 2]
        chain[:, depth + 1] = leaves[0][:, m]
        plain = NextTokenBackend(model, layout, prompts, 3.0, 4).forward(chain, n)
        torch.testing.assert_close(tree[:, 4 + m], plain[:, -1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tree[:, :4], NextTokenBackend(model, layout, prompts, 3.0, 4).forward(window, n),
                               atol=1e-5, rtol=1e-5)


# ---- shared noise: verification by the position's own race ------------------------------------------------------


def _gens(n, seed=10):
    return [torch.Generator().manual_seed(seed + i) for i in range(n)]


@pytest.mark.parametrize("init", INITS)
def test_shared_noise_samples_the_ar_tokens(init, monkeypatch):
    """With each position's noise shared by drafts and verification, SJD commits exactly the tokens plain AR samples
    for the same per-image seeds (guidance, temperature, top-k), whatever the width schedule: fixed windows, adaptive
    widths, and widths drawn at random every pass."""
    import mmgen.sampling.sjd as sjd_module

    model, layout = peaked_model(seed=4, image_vocab=16, grid=(4, 5))
    prompts = [[3, 4, 5], [6], [7, 8]]
    cfg = SamplingConfig(guidance_scale=2.0, temperature=0.8, top_k=8)
    ar, _ = generate(model, layout, prompts, cfg, _gens(3))
    for adaptive in (False, True):
        sjd, stats = generate_sjd(model, layout, prompts, cfg, SJDConfig(6, init, adaptive=adaptive, pass_overhead=4.0,
                                                                           shared_noise=True), _gens(3))
        assert torch.equal(sjd, ar) and stats.lossless and stats.decoder_passes <= 20
    widths = torch.Generator().manual_seed(0)
    monkeypatch.setattr(sjd_module, "choose_width",
                        lambda *a, **k: int(torch.randint(1, 7, (1,), generator=widths)))
    sjd, _ = generate_sjd(model, layout, prompts, cfg, SJDConfig(6, init, adaptive=True, shared_noise=True), _gens(3))
    assert torch.equal(sjd, ar)


def test_shared_noise_samples_the_ar_distribution_without_generators():
    """From the global generator (no per-image seeds) the noise comes in another order than AR's; the samples are
    still distributed exactly as AR's (the enumeration check)."""
    cfg = CONFIGS["cfg_topk_temp"]
    model, layout = peaked_model()
    target = exact_distribution(model, layout, PROMPTS[0], cfg)
    torch.manual_seed(2)
    codes, stats = generate_sjd(model, layout, [PROMPTS[0]] * N_SAMPLES, cfg, SJDConfig(4, shared_noise=True))
    assert tv(empirical(codes.flatten(1), 4), target) < tv_bound(target, N_SAMPLES)
    assert stats.mean_accepted_length > 1.2  # drafts are accepted: fewer passes than tokens


def test_a_wrong_noise_position_is_caught(monkeypatch):
    """Racing each window position with its neighbour's noise (an off-by-one in the noise table) no longer gives AR's
    tokens: the token-equality check has teeth."""
    import mmgen.sampling.sjd as sjd_module

    window_noise = sjd_module._window_noise
    monkeypatch.setattr(sjd_module, "_window_noise", lambda state, n, T: window_noise(state, n + 1, T))
    model, layout = peaked_model(seed=4, image_vocab=16, grid=(4, 5))
    cfg = SamplingConfig(guidance_scale=2.0)
    ar, _ = generate(model, layout, [[3, 4, 5], [6]], cfg, _gens(2))
    sjd, _ = generate_sjd(model, layout, [[3, 4, 5], [6]], cfg, SJDConfig(6, shared_noise=True), _gens(2))
    assert not torch.equal(sjd, ar)


def test_shared_noise_refuses_what_needs_the_acceptance_test():
    for kw in (dict(coupled=True), dict(tree_width=2), dict(lantern_delta=0.1)):
        with pytest.raises(ValueError, match=f"shared_noise replaces the acceptance test that {next(iter(kw))}"):
            SJDConfig(shared_noise=True, **kw)
    with pytest.raises(ValueError, match="shared_noise must be True or False"):
        SJDConfig(shared_noise=1)
