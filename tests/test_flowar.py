"""FlowAR paradigm: latent pyramid, block-causal AR over scales, KV-cached sampling, Spatial-adaLN flow module,
training, save/load."""

import pytest
import torch
import torch.nn.functional as F

from mmgen.paradigms.sequence import latent_pyramid
from mmgen.paradigms.flowar import (FlowARLayout, FlowARModel, build_batch, check_scales, generate,
                                    loss_fn, next_scale_input, scale_condition)
from mmgen.sampling.config import SamplingConfig
from mmgen.text import UnifiedVocab

torch.set_num_threads(1)  # the machine's cores are shared; more threads only add contention for tiny models

VOCAB = UnifiedVocab(text_vocab_size=20, image_vocab_size=0)
C = 4
PROMPTS = [[3, 4], [5, 6, 7, 8, 9, 10], [11]]  # different pad lengths


def tiny(scales=(1, 2, 4, 8), **kw):
    torch.manual_seed(0)
    cfg = dict(vocab_size=VOCAB.size, token_dim=C, scales=scales, max_seq_len=128, dim=32, n_layers=2, n_heads=4,
               flow_width=32, flow_depth=2, flow_heads=2)
    cfg.update(kw)
    return FlowARModel(**cfg).eval()


def layout(scales=(1, 2, 4, 8)):
    return FlowARLayout(VOCAB, max_text_len=6, scales=scales, token_dim=C)


def randomize(model, seed=0):
    """Give the zero-initialised adaLN and output layers random weights, as after training."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return model


def gens(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def test_pyramid_inputs_and_layout_shapes():
    lay = layout()
    assert lay.num_image_tokens == 1 + 4 + 16 + 64
    assert lay.seq_len == 6 + 1 + 4 + 16 + 64
    x = torch.randn(3, C, 8, 8, generator=torch.Generator().manual_seed(0))
    pyr = latent_pyramid(x, lay.scales)
    assert [tuple(y.shape) for y in pyr] == [(3, C, s, s) for s in (1, 2, 4, 8)]
    assert pyr[-1] is x
    torch.testing.assert_close(pyr[0][..., 0, 0], x.mean((2, 3)))  # area = block means
    torch.testing.assert_close(pyr[1][:, :, 0, 1], x[:, :, :4, 4:].mean((2, 3)))
    # next-scale input: bicubic to the full grid, then area down; a constant map stays constant
    const = torch.full((1, C, 2, 2), 0.7)
    torch.testing.assert_close(next_scale_input(const, 4, 8), torch.full((1, 16, C), 0.7))

    batch = build_batch(lay, PROMPTS, x)
    assert batch.text.shape == (3, 7) and (batch.text[:, -1] == VOCAB.boi).all()
    assert batch.inputs.shape == (3, 4 + 16 + 64, C)
    assert batch.positions.shape == (3, lay.seq_len, 2) and batch.mask.shape == (3, 1, lay.seq_len, lay.seq_len)
    # scale-2 inputs are scale 1 brought to 2x2; a 1x1 map upsamples to a constant
    torch.testing.assert_close(batch.inputs[:, :4], pyr[0][:, :, 0, 0][:, None].expand(3, 4, C))
    # positions: text (i, i); scale 2 tokens at the centres of their 4x4 blocks on the 8x8 frame, after <boi>
    assert batch.positions[0, 3].tolist() == [3.0, 3.0]
    assert batch.positions[0, 7:11].tolist() == [[8.5, 8.5], [8.5, 12.5], [12.5, 8.5], [12.5, 12.5]]
    # mask: pads hidden as keys, scale-k queries see all of scales <= k and nothing after
    m = batch.mask[2, 0]  # prompt of length 1: 5 pads
    a2, b2 = lay.scale_range(2)
    assert not m[a2:b2, :5].any() and m[a2:b2, 5:b2].all() and not m[a2:b2, b2:].any()
    assert m[6, 5:7].all() and not m[5, 6]  # text causal
    assert m[0, 0] and not m[0, 1:].any()  # a pad query sees only itself


def test_block_causality_of_hidden_states_and_velocity():
    lay, model = layout(), randomize(tiny())
    x = torch.randn(2, C, 8, 8, generator=torch.Generator().manual_seed(1))
    batch = build_batch(lay, PROMPTS[:2], x)
    k = 2  # change the inputs of scale 3 (4x4) and everything after them
    a, _ = lay.scale_range(k)
    changed = batch.inputs.clone()
    changed[:, a - lay.boi_index - 1:] += torch.randn(changed[:, a - lay.boi_index - 1:].shape)
    with torch.no_grad():
        h1 = model.forward_ar(batch.text, batch.inputs, batch.positions, batch.mask)
        h2 = model.forward_ar(batch.text, changed, batch.positions, batch.mask)
        assert torch.equal(h1[:, :a], h2[:, :a])
        assert (h1[:, a:] - h2[:, a:]).abs().amax() > 1e-3
        t = torch.full((2,), 0.4)
        for j in range(k):  # earlier scales' velocity predictions are untouched
            s = lay.scales[j]
            xt = torch.randn(2, s * s, C, generator=torch.Generator().manual_seed(j))
            v1 = model.velocity(xt, t, scale_condition(lay, h1, j), s)
            v2 = model.velocity(xt, t, scale_condition(lay, h2, j), s)
            assert torch.equal(v1, v2)


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_generate_kv_cache_matches_teacher_forced_forward(guidance):
    lay, model = layout(), randomize(tiny())
    passes, hiddens, inputs = [], [], []
    forward_ar = model.forward_ar

    def recording(text_tokens, scale_inputs, *args, **kw):
        passes.append(scale_inputs is None)
        out = forward_ar(text_tokens, scale_inputs, *args, **kw)
        hiddens.append(out)
        if scale_inputs is not None:
            inputs.append(scale_inputs)
        return out

    model.forward_ar = recording
    scales_seen = []
    y, nfe = generate(model, lay, PROMPTS, SamplingConfig(guidance_scale=guidance, num_inference_steps=3), generators=gens([1, 2, 3]), callback=scales_seen.append)
    del model.forward_ar
    K = len(lay.scales)
    assert y.shape == (3, C, 8, 8) and nfe.decoder_passes == K and len(passes) == K and scales_seen == list(range(K))
    assert passes[0] and not any(passes[1:])  # pass 1: prompt + <boi>; then one pass per scale of inputs
    assert [h.shape[1] for h in hiddens] == [7, 4, 16, 64]

    # the full teacher-forced forward over the same (generated) inputs gives the same hidden states
    batch = build_batch(lay, PROMPTS, torch.zeros(3, C, 8, 8))
    R = hiddens[0].shape[0]
    assert R == (6 if guidance != 1.0 else 3)
    text = batch.text
    if guidance != 1.0:
        null = build_batch(lay, [[]] * 3, torch.zeros(3, C, 8, 8))
        text, mask = torch.cat([text, null.text]), torch.cat([batch.mask, null.mask])
    else:
        mask = batch.mask
    with torch.no_grad():
        full = model.forward_ar(text, torch.cat(inputs, 1), lay.positions(R), mask)
    torch.testing.assert_close(torch.cat(hiddens, 1), full, atol=1e-5, rtol=0)
    # scale 2's inputs are the generated 1x1 scale brought up: constant over positions, equal for cond/uncond
    torch.testing.assert_close(inputs[0], inputs[0][:, :1].expand_as(inputs[0]), atol=1e-6, rtol=0)
    assert inputs[0].abs().amax() > 0.1
    if guidance != 1.0:
        assert torch.equal(inputs[1][:3], inputs[1][3:])


def test_per_image_generators_make_results_independent_of_batch():
    lay, model = layout(), randomize(tiny())
    both, _ = generate(model, lay, PROMPTS[:2], SamplingConfig(guidance_scale=2.0, num_inference_steps=4), generators=gens([7, 8]))
    alone, _ = generate(model, lay, PROMPTS[1:2], SamplingConfig(guidance_scale=2.0, num_inference_steps=4), generators=gens([8]))
    again, _ = generate(model, lay, PROMPTS[:2], SamplingConfig(guidance_scale=2.0, num_inference_steps=4), generators=gens([7, 8]))
    torch.testing.assert_close(both[1:], alone, atol=1e-5, rtol=0)
    assert torch.equal(both, again)
    other, _ = generate(model, lay, PROMPTS[1:2], SamplingConfig(guidance_scale=2.0, num_inference_steps=4), generators=gens([9]))
    assert (other - alone).abs().amax() > 0.1
    cold, _ = generate(model, lay, PROMPTS[1:2], SamplingConfig(guidance_scale=2.0, num_inference_steps=4, temperature=0.0), generators=gens([8]))
    assert (cold - alone).abs().amax() > 0.1  # temperature scales the starting noise


def test_spatial_adaln_is_per_position_and_output_starts_at_zero():
    model = tiny()
    x = torch.randn(2, 16, C, generator=torch.Generator().manual_seed(0))
    z = torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0.3, 0.8])
    with torch.no_grad():
        assert torch.equal(model.velocity(x, t, z, 4), torch.zeros_like(x))  # zero-initialised output
        randomize(model)
        v = model.velocity(x, t, z, 4)
        z2 = z.clone()
        z2[:, 5] += 3.0
        dv = (model.velocity(x, t, z2, 4) - v).abs().sum(-1)  # (2, 16)
    others = torch.cat([dv[:, :5], dv[:, 6:]], 1)
    assert (dv[:, 5] > 3 * others.amax(1)).all()
    assert (others.amax(1) > 0).all()  # attention still carries it elsewhere, less
    with pytest.raises(ValueError, match="x_t"):
        model.velocity(x, t, z, 3)


def test_loss_falls_on_small_overfit_run():
    torch.manual_seed(0)
    lay, model = layout(), tiny().train()
    rows = torch.linspace(-1, 1, 8)
    a = torch.stack([rows[:, None].expand(8, 8), rows[None, :].expand(8, 8), -rows[:, None].expand(8, 8),
                     torch.ones(8, 8)])
    latents = torch.stack([a, -a])
    prompts = [[3, 4], [5]]

    def eval_loss():
        with torch.no_grad():
            g = torch.Generator().manual_seed(123)
            return sum(loss_fn(model, build_batch(lay, prompts * 4, latents.repeat(4, 1, 1, 1)), lay, g)
                       for _ in range(4)).item() / 4

    before = eval_loss()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(40):
        batch = build_batch(lay, prompts * 2, latents.repeat(2, 1, 1, 1), cond_drop_prob=0.1, generator=g)
        loss = loss_fn(model, batch, lay, g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = eval_loss()
    assert after < 0.3 * before, (before, after)
    # sampling follows the prompt: each prompt's image lands near its own training latent, far from the other
    y, _ = generate(model.eval(), lay, prompts, SamplingConfig(guidance_scale=2.0, num_inference_steps=10), generators=gens([1, 2]))
    own = (y - latents).pow(2).mean((1, 2, 3))
    swapped = (y - latents.flip(0)).pow(2).mean((1, 2, 3))
    assert (own < 0.5).all() and (swapped > 3 * own).all(), (own, swapped)


def test_scale_weights_follow_flowar():
    """With v = 0 (the zero-initialised output) the loss is sum_k w_k |noise - Y_k|^2 / sum_k w_k, w_k = s_k^2 / G^2."""
    lay, model = layout(), tiny()
    x = torch.randn(2, C, 8, 8, generator=torch.Generator().manual_seed(0))
    batch = build_batch(lay, PROMPTS[:2], x)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    with torch.no_grad():
        loss = loss_fn(model, batch, lay, g1)
    expected, wsum = 0.0, 0.0
    for k, s in enumerate(lay.scales):
        torch.randn(2, generator=g2)  # the times, drawn first
        y = batch.targets[k].flatten(2).transpose(1, 2)
        noise = torch.randn(y.shape, generator=g2)
        expected += s * s / 64 * F.mse_loss(noise - y, torch.zeros_like(y))
        wsum += s * s / 64
    torch.testing.assert_close(loss, expected / wsum)


def test_save_load_round_trip_is_bit_identical(tmp_path):
    lay, model = layout(), randomize(tiny())
    model.save_pretrained(tmp_path)
    loaded = FlowARModel.from_pretrained(tmp_path).eval()
    assert loaded.config.scales == (1, 2, 4, 8)
    y1, _ = generate(model, lay, PROMPTS, SamplingConfig(guidance_scale=3.0, num_inference_steps=3, flow_sampler="heun"), generators=gens([1, 2, 3]))
    y2, _ = generate(loaded, lay, PROMPTS, SamplingConfig(guidance_scale=3.0, num_inference_steps=3, flow_sampler="heun"), generators=gens([1, 2, 3]))
    assert torch.equal(y1, y2)


def test_bad_arguments_raise():
    for bad in [(), (1, 3, 8), (2, 1), (1, 2, 4, 4), (0, 0), (1.0, 2.0)]:
        with pytest.raises(ValueError, match="scales"):
            check_scales(bad)
        with pytest.raises(ValueError, match="scales"):
            FlowARLayout(VOCAB, 6, bad, C)
    with pytest.raises(ValueError, match="scales"):
        tiny(scales=(1, 3, 9))
    with pytest.raises(ValueError, match="grid side"):
        check_scales((1, 2, 4), grid_side=8)
    assert check_scales([2, 4, 8], grid_side=8) == (2, 4, 8)
    lay, model = layout(), tiny()
    with pytest.raises(ValueError, match="latents"):
        build_batch(lay, PROMPTS[:2], torch.zeros(2, C, 16, 16))
    with pytest.raises(ValueError, match="latents"):
        build_batch(lay, PROMPTS[:2], torch.zeros(2, C + 1, 8, 8))
    with pytest.raises(ValueError, match="scales"):
        generate(model, layout((2, 4, 8)), PROMPTS, SamplingConfig(guidance_scale=3.0, num_inference_steps=2))
    with pytest.raises(ValueError, match="flow_sampler"):
        generate(model, lay, PROMPTS, SamplingConfig(guidance_scale=3.0, num_inference_steps=2, flow_sampler="rk4"))
    with pytest.raises(ValueError, match="cfg_schedule"):
        generate(model, lay, PROMPTS, SamplingConfig(guidance_scale=3.0, num_inference_steps=2, cfg_schedule="cosine"))
    with pytest.raises(ValueError, match="generators"):
        generate(model, lay, PROMPTS, SamplingConfig(guidance_scale=3.0, num_inference_steps=2), generators=gens([1]))
    with pytest.raises(ValueError, match="flow_width"):
        tiny(flow_width=30, flow_heads=4)


def test_other_scale_schedules_run():
    lay, model = layout((2, 4, 8)), randomize(tiny(scales=(2, 4, 8)))
    assert lay.seq_len == 7 + 16 + 64
    y, nfe = generate(model, lay, PROMPTS[:1], SamplingConfig(guidance_scale=3.0, num_inference_steps=2), generators=gens([0]))
    assert y.shape == (1, C, 8, 8) and nfe.decoder_passes == 3
    batch = build_batch(lay, PROMPTS[:1], torch.randn(1, C, 8, 8))
    assert loss_fn(model, batch, lay).isfinite()
