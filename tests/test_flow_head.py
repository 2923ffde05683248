"""Flow matching (mmgen.sampling.flow), the per-token FlowHead (mmgen.models.heads) and the MAR-style raster
paradigm on continuous tokens (mmgen.paradigms.flow_head)."""

import math

import pytest
import torch

from mmgen.models.heads import FlowHead, TimestepEmbedder
from mmgen.paradigms.flow_head import (RasterFlowLayout, RasterFlowModel, build_batch, decode_step, generate,
                                       loss_fn, prefill)
from mmgen.sampling.flow import (cfg_velocity, initial_noise, interpolate, logit_normal_t,
                                 sample_flow)
from mmgen.sampling.config import SamplingConfig
from mmgen.sampling.logits import guidance_at
from mmgen.text import UnifiedVocab

torch.set_num_threads(1)

# ---- flow-matching helpers ---------------------------------------------------------------------------


def test_interpolate_end_points_and_broadcast():
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 4, 2, 2, generator=g), torch.randn(3, 4, 2, 2, generator=g)
    t = torch.tensor([0.0, 1.0, 0.25])
    x_t, v = interpolate(x0, noise, t)
    assert torch.equal(x_t[0], x0[0]) and torch.equal(x_t[1], noise[1])
    torch.testing.assert_close(x_t[2], 0.75 * x0[2] + 0.25 * noise[2])
    torch.testing.assert_close(v, noise - x0)


def test_logit_normal_t():
    t1 = logit_normal_t(20000, torch.Generator().manual_seed(0))
    t2 = logit_normal_t(20000, torch.Generator().manual_seed(0))
    assert t1.shape == (20000,) and torch.equal(t1, t2)
    assert 0 < t1.min() and t1.max() < 1
    assert abs(t1.median().item() - 0.5) < 0.02
    shifted = logit_normal_t(20000, torch.Generator().manual_seed(1), mean=1.0)
    assert abs((shifted > 0.5).float().mean().item() - 0.8413) < 0.01  # P(N(1, 1) > 0) = Phi(1)


def test_sample_flow_exact_on_point_mass_field():
    # the rectified flow to a point mass a has v(x, t) = (x - a) / t, linear in x; both samplers follow it exactly
    a = torch.tensor([[1.5, -2.0], [0.3, 0.7]])
    noise = torch.randn(2, 2, generator=torch.Generator().manual_seed(0))
    for method in ("euler", "heun"):
        x0, _ = sample_flow(lambda x, t: (x - a) / t[:, None], noise, 5, method)
        torch.testing.assert_close(x0, a, atol=1e-6, rtol=0)


def test_sample_flow_matches_closed_form_steps():
    # dx/dt = x from t = 1 to 0: Euler multiplies by (1 - h) per step; Heun by (1 - h + h^2 / 2), last step Euler
    K, h, x1 = 4, 0.25, torch.ones(3, 1)
    seen = []

    def velocity(x, t):
        seen.append(t.clone())
        return x

    euler, nfe = sample_flow(velocity, x1, K, "euler")
    assert nfe == K and [s[0].item() for s in seen] == [1.0, 0.75, 0.5, 0.25]
    assert all(s.shape == (3,) for s in seen)
    torch.testing.assert_close(euler, x1 * (1 - h) ** K)
    heun, nfe = sample_flow(velocity, x1, K, "heun")
    assert nfe == 2 * K - 1
    torch.testing.assert_close(heun, x1 * (1 - h + h * h / 2) ** (K - 1) * (1 - h))
    assert abs(heun[0, 0].item() - math.exp(-1)) < abs(euler[0, 0].item() - math.exp(-1))


@pytest.mark.parametrize("steps", [1, 2, 7])
def test_nfe_counts(steps):
    calls = []

    def velocity(x, t):
        calls.append(1)
        return torch.zeros_like(x)

    assert sample_flow(velocity, torch.zeros(2, 3), steps, "euler")[1] == steps == len(calls)
    calls.clear()
    assert sample_flow(velocity, torch.zeros(2, 3), steps, "heun")[1] == 2 * steps - 1 == len(calls)


def test_sample_flow_rejects_bad_args():
    with pytest.raises(ValueError, match="steps"):
        sample_flow(lambda x, t: x, torch.zeros(1, 2), 0)
    with pytest.raises(ValueError, match=r"euler.*heun"):
        sample_flow(lambda x, t: x, torch.zeros(1, 2), 3, "rk4")


def test_guidance_at_and_cfg_velocity():
    assert guidance_at(3.0, 2, 5, "constant") == 3.0
    assert [guidance_at(3.0, k, 5, "linear") for k in range(5)] == [1.0, 1.5, 2.0, 2.5, 3.0]
    assert guidance_at(4.0, 0, 1, "linear") == 4.0
    with pytest.raises(ValueError, match=r"constant.*linear"):
        guidance_at(3.0, 0, 4, "cosine")
    with pytest.raises(ValueError, match="K"):
        guidance_at(3.0, 4, 4, "linear")
    c, u = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0])
    assert torch.equal(cfg_velocity(c, u, 3.0), torch.tensor([4.0, -2.0]))


def test_initial_noise_per_row_generators():
    gens = [torch.Generator().manual_seed(s) for s in (5, 6)]
    noise = initial_noise((3, 2), gens, temperature=0.5)
    assert noise.shape == (2, 3, 2)
    torch.testing.assert_close(noise[1], 0.5 * torch.randn(3, 2, generator=torch.Generator().manual_seed(6)))
    alone = initial_noise((3, 2), [torch.Generator().manual_seed(6)], temperature=0.5)
    assert torch.equal(alone[0], noise[1])


# ---- FlowHead on a 2-D toy mixture -------------------------------------------------------------------

MODES = torch.tensor([[-2.0, -2.0], [-2.0, 2.0], [2.0, -2.0], [2.0, 2.0]])
MODE_STD = 0.25
SUBSETS = ([0, 3], [1, 2])  # condition c picks an equal mixture of MODES[SUBSETS[c]]
SW_BOUND = 0.15  # two independent 2000-sample draws of the target are ~0.06 apart
NEAR_BOUND = 0.9  # share of samples within 4 std of an allowed mode


def toy_batch(n, generator):
    c = torch.randint(2, (n,), generator=generator)
    pick = torch.randint(2, (n,), generator=generator)
    modes = torch.tensor(SUBSETS)[c, pick]
    x = MODES[modes] + MODE_STD * torch.randn(n, 2, generator=generator)
    return x, torch.nn.functional.one_hot(c, 2).float()


def sliced_wasserstein(x, y, n_proj=64, seed=0):
    dirs = torch.randn(n_proj, 2, generator=torch.Generator().manual_seed(seed))
    dirs = dirs / dirs.norm(dim=1, keepdim=True)
    px, py = (x @ dirs.T).sort(0).values, (y @ dirs.T).sort(0).values
    return (px - py).abs().mean().item()


def toy_report(head, c, n=2000, method="euler", steps=50):
    """Samples for condition c: SW distance to fresh target samples, mass per allowed mode, share near them."""
    g = torch.Generator().manual_seed(100 + c)
    cond = torch.nn.functional.one_hot(torch.full((n,), c), 2).float()
    with torch.no_grad():
        x, nfe = sample_flow(lambda x, t: head(x, t, cond), torch.randn(n, 2, generator=g), steps, method)
    modes = torch.tensor(SUBSETS[c])
    target = MODES[modes[torch.randint(2, (n,), generator=g)]] + MODE_STD * torch.randn(n, 2, generator=g)
    dist = torch.cdist(x, MODES[modes])  # (n, 2)
    near = dist.min(1).values < 4 * MODE_STD
    mass = [((dist.argmin(1) == j) & near).float().mean().item() for j in range(2)]
    return sliced_wasserstein(x, target), mass, near.float().mean().item(), nfe


@pytest.fixture(scope="module")
def trained_toy_head():
    torch.manual_seed(0)
    head = FlowHead(token_dim=2, cond_dim=2, width=64, depth=3)
    opt = torch.optim.Adam(head.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 1000)
    g = torch.Generator().manual_seed(0)
    for _ in range(1000):
        x0, cond = toy_batch(256, g)
        t = logit_normal_t(256, g)
        x_t, v = interpolate(x0, torch.randn(256, 2, generator=g), t)
        loss = (head(x_t, t, cond) - v).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return head


@pytest.mark.parametrize("c", [0, 1])
def test_flow_head_learns_conditional_mixture(trained_toy_head, c):
    sw, mass, near, nfe = toy_report(trained_toy_head, c)
    assert nfe == 50
    assert sw < SW_BOUND, sw
    assert near > NEAR_BOUND and all(abs(m - near / 2) < 0.06 for m in mass), (near, mass)
    # Heun with fewer steps reaches the same distribution
    sw_heun, _, near_heun, nfe_heun = toy_report(trained_toy_head, c, method="heun", steps=10)
    assert nfe_heun == 19 and sw_heun < SW_BOUND and near_heun > NEAR_BOUND, (sw_heun, near_heun)


@pytest.mark.parametrize("perturb", [False, True])
def test_untrained_flow_head_fails_the_same_bound(perturb):
    torch.manual_seed(0)
    head = FlowHead(token_dim=2, cond_dim=2, width=64, depth=3)
    if perturb:  # zero-init output returns the noise itself; a random output layer bends it somewhere else
        with torch.no_grad():
            head.final_proj.weight.normal_(std=0.1)
    sw, _, near, _ = toy_report(head, 0)
    assert sw > SW_BOUND and near < NEAR_BOUND, (sw, near)


def test_flow_head_starts_at_zero_and_validates():
    head = FlowHead(3, 5, width=16, depth=2)
    out = head(torch.randn(4, 3), torch.rand(4), torch.randn(4, 5))
    assert out.shape == (4, 3) and torch.equal(out, torch.zeros(4, 3))
    assert TimestepEmbedder(16)(torch.rand(7)).shape == (7, 16)
    with pytest.raises(ValueError, match="depth"):
        FlowHead(3, 5, depth=0)


# ---- the raster paradigm -----------------------------------------------------------------------------


def tiny_setup(seed=0):
    layout = RasterFlowLayout(UnifiedVocab(text_vocab_size=10, image_vocab_size=0), max_text_len=4, grid=(2, 3),
                              token_dim=4)
    torch.manual_seed(seed)
    model = RasterFlowModel(layout.vocab.size, layout.token_dim, layout.seq_len, dim=32, n_layers=2, n_heads=4,
                            head_width=32, head_depth=2)
    return layout, model


TEXT = [[2, 3, 4], [5], [6, 7, 8, 9]]


def randomize_head(model, seed=1):
    # the zero-initialised head ignores its inputs; give it weights so outputs depend on the backbone state
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.head.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g))


def test_layout_positions_match_next_token():
    layout, _ = tiny_setup()
    assert layout.num_image_tokens == 6 and layout.boi_index == 4 and layout.seq_len == 11
    pos = layout.positions(2)
    assert pos.shape == (2, 11, 2)
    assert pos[0, 4].tolist() == [4, 4] and pos[0, 5].tolist() == [5, 5] and pos[0, 10].tolist() == [6, 7]


def test_build_batch_teacher_forcing_and_errors():
    layout, _ = tiny_setup()
    latents = torch.randn(3, 4, 2, 3, generator=torch.Generator().manual_seed(0))
    batch = build_batch(layout, TEXT, latents)
    tokens = latents.flatten(2).transpose(1, 2)  # (B, n, D) raster
    assert batch.text.shape == (3, 5) and batch.text[1].tolist() == [0, 0, 0, 5, layout.vocab.boi]
    assert torch.equal(batch.targets, tokens) and torch.equal(batch.image_inputs, tokens[:, :-1])
    assert batch.positions.shape == (3, 10, 2) and batch.mask.shape == (3, 1, 10, 10)
    assert not batch.mask[1, 0, 5, 0] and batch.mask[1, 0, 5, 3] and not batch.mask[1, 0, 3, 4]
    dropped = build_batch(layout, TEXT, latents, cond_drop_prob=1.0)
    assert (dropped.text[:, 3] == layout.vocab.null).all()
    with pytest.raises(ValueError, match=r"\(B, 4, 2, 3\)"):
        build_batch(layout, TEXT, torch.randn(3, 4, 3, 2))
    with pytest.raises(ValueError, match="captions"):
        build_batch(layout, TEXT[:2], latents)


def test_kv_cache_matches_full_forward():
    layout, model = tiny_setup()
    latents = torch.randn(3, 4, 2, 3, generator=torch.Generator().manual_seed(0))
    batch = build_batch(layout, TEXT, latents)
    with torch.no_grad():
        full = model(batch.text, batch.image_inputs, batch.positions, batch.mask)  # (B, L, C)
        T0, n = batch.text.shape[1], layout.num_image_tokens
        cache = model.transformer.new_cache(3, T0 + n - 1)
        key_valid = batch.mask[:, 0, -1, :].clone()  # the last row sees every valid key
        steps = [prefill(model, batch.text, batch.positions[:, :T0], key_valid[:, :T0], cache)]
        for i in range(n - 1):
            steps.append(decode_step(model, batch.image_inputs[:, i], batch.positions[:, T0 + i], key_valid, cache))
    torch.testing.assert_close(torch.stack(steps, 1), full[:, T0 - 1:], atol=1e-5, rtol=0)


def test_loss_falls_on_tiny_overfit():
    layout, model = tiny_setup()
    latents = torch.randn(3, 4, 2, 3, generator=torch.Generator().manual_seed(0))
    batch = build_batch(layout, TEXT, latents)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(200):
        loss = loss_fn(model, batch, layout, flow_batch_mul=8, generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.1 * first, (first, last)
    with pytest.raises(ValueError, match="flow_batch_mul"):
        loss_fn(model, batch, layout, flow_batch_mul=0)


def count_backbone_passes(model):
    calls = []
    handle = model.transformer.register_forward_hook(lambda *a: calls.append(1))
    return calls, handle


@pytest.mark.parametrize("method, guidance, schedule", [("euler", 1.0, "constant"), ("heun", 3.0, "linear")])
def test_generate_shapes_passes_and_batch_independence(method, guidance, schedule):
    layout, model = tiny_setup()
    randomize_head(model)
    calls, handle = count_backbone_passes(model)
    ticks = []
    gens = [torch.Generator().manual_seed(s) for s in (11, 12, 13)]
    latents, nfe = generate(model, layout, TEXT, SamplingConfig(guidance_scale=guidance, num_inference_steps=3, flow_sampler=method, cfg_schedule=schedule), generators=gens, callback=ticks.append)
    handle.remove()
    assert latents.shape == (3, 4, 2, 3) and nfe.decoder_passes == 6 == len(calls) and ticks == list(range(6))
    assert torch.isfinite(latents).all()
    alone, _ = generate(model, layout, TEXT[1:2], SamplingConfig(guidance_scale=guidance, num_inference_steps=3, flow_sampler=method, cfg_schedule=schedule), generators=[torch.Generator().manual_seed(12)])
    # equal up to float32 batched-matmul rounding, which guidance 3 amplifies a little
    torch.testing.assert_close(alone[0], latents[1], atol=1e-5, rtol=1e-5)
    other, _ = generate(model, layout, TEXT[1:2], SamplingConfig(guidance_scale=guidance, num_inference_steps=3, flow_sampler=method, cfg_schedule=schedule), generators=[torch.Generator().manual_seed(99)])
    assert not torch.allclose(other[0], latents[1], atol=1e-3)


def test_generate_reproduces_overfit_latents():
    layout, model = tiny_setup()
    latents = torch.randn(2, 4, 2, 3, generator=torch.Generator().manual_seed(0))
    batch = build_batch(layout, TEXT[:2], latents)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(400):
        loss = loss_fn(model, batch, layout, flow_batch_mul=16, generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    gens = [torch.Generator().manual_seed(s) for s in (1, 2)]
    sampled, _ = generate(model, layout, TEXT[:2], SamplingConfig(guidance_scale=1.0, num_inference_steps=20), generators=gens)
    err = (sampled - latents).pow(2).mean().item()
    swapped = (sampled - latents.flip(0)).pow(2).mean().item()
    assert err < 0.1 and swapped > 1.0, (err, swapped)


def test_generate_rejects_bad_args():
    layout, model = tiny_setup()
    with pytest.raises(ValueError, match="flow_sampler"):
        generate(model, layout, TEXT, SamplingConfig(guidance_scale=3.0, flow_sampler="rk4"))
    with pytest.raises(ValueError, match="cfg_schedule"):
        generate(model, layout, TEXT, SamplingConfig(guidance_scale=3.0, cfg_schedule="cosine"))
    with pytest.raises(ValueError, match="generator"):
        generate(model, layout, TEXT, SamplingConfig(guidance_scale=3.0), generators=[torch.Generator()])
    with pytest.raises(ValueError, match="steps"):
        generate(model, layout, TEXT, SamplingConfig(guidance_scale=3.0, num_inference_steps=0))


def test_save_load_round_trip(tmp_path):
    layout, model = tiny_setup()
    randomize_head(model)
    model.save_pretrained(tmp_path)
    again = RasterFlowModel.from_pretrained(tmp_path)
    assert again.config.head_depth == 2 and again.config.token_dim == 4
    a, _ = generate(model, layout, TEXT, SamplingConfig(guidance_scale=3.0, num_inference_steps=4), generators=[torch.Generator().manual_seed(s) for s in range(3)])
    b, _ = generate(again, layout, TEXT, SamplingConfig(guidance_scale=3.0, num_inference_steps=4), generators=[torch.Generator().manual_seed(s) for s in range(3)])
    assert torch.equal(a, b)
