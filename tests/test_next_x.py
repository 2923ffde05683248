"""xAR next-X prediction: entity grouping for every kind, the block-causal mask, Noisy Context Learning, KV-cached
sampling with one AR step per entity, save/load."""

import pytest
import torch

from mmgen.paradigms.next_x import (ENTITY_KINDS, Entities, NextXLayout, NextXModel, build_batch, generate,
                                    loss_fn)
from mmgen.sampling.config import SamplingConfig
from mmgen.sampling.flow import initial_noise
from mmgen.text import UnifiedVocab

torch.set_num_threads(1)  # the machine's cores are shared; more threads only add contention for tiny models

VOCAB = UnifiedVocab(text_vocab_size=20, image_vocab_size=0)
C = 4
PROMPTS = [[3, 4], [5, 6, 7, 8, 9, 10], [11]]  # different pad lengths


def layout(kind="cell", G=4, size=0):
    return NextXLayout(VOCAB, max_text_len=6, entities=Entities(kind, G, size), token_dim=C)


def tiny(kind="cell", G=4, size=0, seed=0):
    torch.manual_seed(seed)
    model = NextXModel(vocab_size=VOCAB.size, token_dim=C, grid_side=G, entity=kind, entity_size=size,
                       max_seq_len=128, dim=32, n_layers=2, n_heads=4).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # the zero-initialised adaLN and output layers get random weights, as after training
        for p in model.parameters():
            if not p.any():
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return model


def gens(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


KINDS_AND_SIZES = [("token", 0), ("cell", 0), ("cell", 1), ("cell", 2), ("cell", 4), ("subsample", 0),
                   ("subsample", 4), ("scale", 0), ("image", 0)]


@pytest.mark.parametrize("G", [2, 4, 8])
@pytest.mark.parametrize("kind, size", KINDS_AND_SIZES)
def test_group_then_ungroup_is_the_identity(kind, size, G):
    if size > G or (size and G % size):
        pytest.skip("entity size must divide the grid")
    e = Entities(kind, G, size)
    x = torch.randn(2, 3, G, G, generator=torch.Generator().manual_seed(G))
    tokens = e.group(x)
    assert tokens.shape == (2, e.num_tokens, 3) and sum(e.sizes) == e.num_tokens == len(e.entity_index)
    assert torch.equal(e.ungroup(tokens), x)
    assert e.positions().shape == (e.num_tokens, 2)
    if kind != "scale":  # a permutation of the raster positions
        assert sorted(e.order.tolist()) == list(range(G * G)) and e.num_tokens == G * G


def test_entity_orders_on_a_4x4_grid():
    raster = torch.arange(16).view(1, 1, 4, 4).float()
    order = {kind: Entities(kind, 4, size).group(raster)[0, :, 0].long().tolist()
             for kind, size in (("token", 0), ("cell", 2), ("subsample", 2), ("image", 0))}
    assert order["token"] == order["image"] == list(range(16))
    assert order["cell"] == [0, 1, 4, 5, 2, 3, 6, 7, 8, 9, 12, 13, 10, 11, 14, 15]  # 2x2 neighbours
    assert order["subsample"] == [0, 2, 8, 10, 1, 3, 9, 11, 4, 6, 12, 14, 5, 7, 13, 15]  # stride-2 groups
    assert Entities("cell", 4, 2).sizes == (4,) * 4 and Entities("subsample", 4, 2).sizes == (4,) * 4
    assert Entities("token", 4).sizes == (1,) * 16 and Entities("image", 4).sizes == (16,)
    # scale: 1x1, 2x2, 4x4 area means, the last level is the latent itself
    sc = Entities("scale", 4)
    assert sc.sizes == (1, 4, 16)
    tok = sc.group(raster)[0, :, 0]
    assert tok[0] == 7.5 and tok[1:5].tolist() == [2.5, 4.5, 10.5, 12.5] and tok[5:].tolist() == list(range(16))
    # positions: subsample entity (0, 0) covers rows/cols 0 and 2; scale tokens sit at their cell centres
    assert Entities("subsample", 4, 2).positions()[:4].tolist() == [[0, 0], [0, 2], [2, 0], [2, 2]]
    assert sc.positions()[:5].tolist() == [[1.5, 1.5], [0.5, 0.5], [0.5, 2.5], [2.5, 0.5], [2.5, 2.5]]


def test_bad_entities_raise():
    with pytest.raises(ValueError, match="entity must be one of token, cell, subsample, scale, image"):
        Entities("patch", 4)
    with pytest.raises(ValueError, match="entity_size for 'cell' must be a positive divisor of the latent side 4"):
        Entities("cell", 4, 3)
    with pytest.raises(ValueError, match="entity_size for 'subsample'"):
        Entities("subsample", 4, -1)
    with pytest.raises(ValueError, match="entity 'scale' needs a latent side that is a power of two"):
        Entities("scale", 6)  # not a power of two
    with pytest.raises(ValueError, match=r"latents must have shape \(B, C, 4, 4\)"):
        Entities("cell", 4).group(torch.zeros(1, 4, 8, 8))
    with pytest.raises(ValueError, match="entity must be one of"):
        NextXModel(vocab_size=VOCAB.size, token_dim=C, grid_side=4, entity="pixel")


@pytest.mark.parametrize("kind", ENTITY_KINDS)
def test_block_mask_is_bidirectional_inside_and_causal_across_entities(kind):
    lay = layout(kind)
    batch = build_batch(lay, PROMPTS, torch.randn(3, C, 4, 4))
    mask = batch.mask[:, 0]
    L1, ent = lay.image_start, lay.entities.entity_index
    for b, ids in enumerate(PROMPTS):
        valid_text = torch.zeros(L1, dtype=torch.bool)
        valid_text[L1 - 1 - len(ids):] = True  # the prompt and <boi>; pads are never keys
        for i in range(lay.num_image_tokens):
            expect = torch.cat([valid_text, ent <= ent[i]])
            assert torch.equal(mask[b, L1 + i], expect)
        assert not mask[b, :L1, L1:].any()  # text never sees the image


@pytest.mark.parametrize("kind", ["cell", "subsample", "scale", "token"])
def test_later_entities_never_change_earlier_velocities(kind):
    model, lay = tiny(kind), layout(kind)
    batch = build_batch(lay, PROMPTS, torch.randn(3, C, 4, 4, generator=torch.Generator().manual_seed(1)))
    t = torch.rand(3, lay.num_image_tokens, generator=torch.Generator().manual_seed(2))
    x = batch.tokens
    v = model(batch.text, x, t, batch.positions, batch.mask)
    k = 1
    a, b = lay.entities.bounds(k)
    x2, t2 = x.clone(), t.clone()
    x2[:, a:] += 1.0  # change entity k and everything after it
    t2[:, a:] = 0.5
    v2 = model(batch.text, x2, t2, batch.positions, batch.mask)
    torch.testing.assert_close(v2[:, :a], v[:, :a], rtol=0, atol=1e-6)  # earlier entities are untouched
    assert not torch.allclose(v2[:, a:b], v[:, a:b])
    if b - a > 1:  # inside an entity the attention is bidirectional: the last token moves the first one
        x3 = x.clone()
        x3[:, b - 1] += 1.0
        v3 = model(batch.text, x3, t, batch.positions, batch.mask)
        assert not torch.allclose(v3[:, a], v[:, a])


@pytest.mark.parametrize("kind", ["cell", "scale", "token"])
@pytest.mark.parametrize("guidance", [1.0, 2.5])
def test_generate_one_euler_step_matches_the_teacher_forced_forward(kind, guidance):
    """With one Euler step each entity is noise - v(noise, t=1) given the clean earlier entities (t=0): rebuild
    that with full uncached forwards and compare, which checks the cache, masks, positions and CFG."""
    model, lay = tiny(kind), layout(kind)
    seeds = [5, 6, 7]
    latents, cost = generate(model, lay, PROMPTS, SamplingConfig(guidance_scale=guidance, num_inference_steps=1,
                                                                 cfg_schedule="constant"), generators=gens(seeds))
    steps, evals = cost.decoder_passes, cost.model_evals
    K = lay.num_entities
    assert steps == K and evals == 1 + K + (K - 1)
    tokens = lay.entities.group(latents) if kind != "scale" else None
    g = gens(seeds)
    rows = PROMPTS + ([[]] * 3 if guidance != 1.0 else [])
    batch = build_batch(lay, rows, torch.zeros(len(rows), C, 4, 4))
    ctx = torch.zeros(len(rows), lay.num_image_tokens, C)
    for k in range(K):
        a, b = lay.entities.bounds(k)
        noise = initial_noise((b - a, C), g, device="cpu")
        x = ctx.clone()
        x[:, a:b] = torch.cat([noise] * (len(rows) // 3))
        t = torch.zeros(len(rows), lay.num_image_tokens)
        t[:, a:b] = 1.0
        v = model(batch.text, x, t, batch.positions, batch.mask)[:, a:b]
        v = v[3:] + guidance * (v[:3] - v[3:]) if guidance != 1.0 else v
        x0 = noise - v
        ctx[:, a:b] = torch.cat([x0] * (len(rows) // 3))
        if tokens is not None:
            torch.testing.assert_close(tokens[:, a:b], x0, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(latents, lay.entities.ungroup(ctx[:3]), rtol=1e-4, atol=1e-5)


def test_ar_steps_and_evaluations_per_entity_kind():
    for kind, K in (("token", 16), ("cell", 4), ("subsample", 4), ("scale", 3), ("image", 1)):
        lay = layout(kind)
        latents, cost = generate(tiny(kind), lay, PROMPTS[:1], SamplingConfig(guidance_scale=3.0, num_inference_steps=3),
                                 generators=gens([0]))
        steps, evals = cost.decoder_passes, cost.model_evals
        assert latents.shape == (1, C, 4, 4) and steps == lay.num_entities == K
        assert evals == 1 + 3 * K + (K - 1)
        _, heun = generate(tiny(kind), lay, PROMPTS[:1],
                           SamplingConfig(guidance_scale=3.0, num_inference_steps=3, flow_sampler="heun"),
                           generators=gens([0]))
        assert heun.model_evals == 1 + 5 * K + (K - 1)


def test_per_image_generators_make_results_independent_of_batch():
    model, lay = tiny(), layout()
    alone = generate(model, lay, PROMPTS[1:2], SamplingConfig(guidance_scale=3.0, num_inference_steps=2), generators=gens([11]))[0]
    batch = generate(model, lay, PROMPTS, SamplingConfig(guidance_scale=3.0, num_inference_steps=2), generators=gens([10, 11, 12]))[0]
    torch.testing.assert_close(batch[1:2], alone, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(batch[0], batch[1])


def test_noisy_context_learning_draws_one_time_per_entity(monkeypatch):
    """Every entity (context included) is noised with its own time; the loss is the velocity MSE."""
    model, lay = tiny(), layout()
    batch = build_batch(lay, PROMPTS, torch.randn(3, C, 4, 4))
    seen = {}
    forward = NextXModel.forward

    def spy(self, text, x, t, *a, **k):
        seen["x"], seen["t"] = x, t
        return forward(self, text, x, t, *a, **k)

    monkeypatch.setattr(NextXModel, "forward", spy)
    loss = loss_fn(model, batch, lay, generator=torch.Generator().manual_seed(0))
    t, ent = seen["t"], lay.entities.entity_index
    for k in range(lay.num_entities):
        block = t[:, ent == k]
        assert torch.equal(block, block[:, :1].expand_as(block))  # one time per entity and image
    assert len(torch.unique(t[0])) == lay.num_entities and ((t > 0) & (t < 1)).all()
    assert not torch.allclose(seen["x"], batch.tokens)  # no clean teacher forcing anywhere
    assert loss.ndim == 0 and loss > 0


@pytest.mark.parametrize("kind", ["cell", "token"])
def test_loss_falls_on_small_overfit_run(kind):
    torch.manual_seed(0)
    lay = layout(kind)
    model = NextXModel(vocab_size=VOCAB.size, token_dim=C, grid_side=4, entity=kind, max_seq_len=64, dim=32,
                       n_layers=2, n_heads=4).train()
    data = torch.randn(4, C, 4, 4, generator=torch.Generator().manual_seed(3)).clamp(-1.5, 1.5)
    text = [[3], [4], [5], [6]]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(150):
        loss = loss_fn(model, build_batch(lay, text, data), lay, generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.6 * first, (first, last)
    # the memorised latents come back: sampling a prompt lands nearer its own latent than the others'
    model.eval()
    out = generate(model, lay, text, SamplingConfig(guidance_scale=1.0, num_inference_steps=20, temperature=0.0), generators=gens(range(4)))[0]
    dist = torch.cdist(out.flatten(1), data.flatten(1))
    assert torch.equal(dist.argmin(1), torch.arange(4)), dist


def test_save_load_round_trip_is_bit_identical(tmp_path):
    model, lay = tiny("subsample"), layout("subsample")
    model.save_pretrained(tmp_path)
    again = NextXModel.from_pretrained(tmp_path).eval()
    assert again.config.entity == "subsample" and again.entities.sizes == model.entities.sizes
    a = generate(model, lay, PROMPTS, SamplingConfig(guidance_scale=3.0, num_inference_steps=2), generators=gens([1, 2, 3]))[0]
    b = generate(again, lay, PROMPTS, SamplingConfig(guidance_scale=3.0, num_inference_steps=2), generators=gens([1, 2, 3]))[0]
    assert torch.equal(a, b)


def test_bad_sampling_arguments_raise():
    model, lay = tiny(), layout()
    for kw, needle in ((dict(num_inference_steps=0), "steps"), (dict(flow_sampler="rk4"), "flow_sampler"),
                       (dict(cfg_schedule="cos"), "cfg_schedule"), (dict(temperature=-1.0), "temperature")):
        with pytest.raises(ValueError, match=needle):
            generate(model, lay, PROMPTS, SamplingConfig(**kw))
    with pytest.raises(ValueError, match="one generator per prompt"):
        generate(model, lay, PROMPTS, SamplingConfig(), generators=gens([1]))
    with pytest.raises(ValueError, match="channels"):
        build_batch(lay, PROMPTS, torch.zeros(3, 3, 4, 4))
