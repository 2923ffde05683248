"""Next-block prediction (mmgen.paradigms.next_block), rows as blocks, against slow references written here: the
block mask (bidirectional inside a row, causal across rows, the query row before row 0), greedy generation
against a full recompute one row at a time (wrong variants of the reference must fail: a raster mask, rows
predicting the next raster token), exact pass counts, a falling loss, save / reload, the CLI, refusals, and the
watermark keyed by the token above. Tiny models: width 32, 2 layers, 4x4 (or 3x4) grids."""

import json
import math
from functools import partial
from types import SimpleNamespace

import pytest
import torch

from tiny import BACKBONE, CAPTIONS, tiny_code_paradigm, tiny_pipeline, tiny_text_tokenizer, tiny_vqgan
from mmgen import cli
from mmgen.bench.paradigms import bench_paradigms, standin_models
from mmgen.paradigms import next_block as nb
from mmgen.paradigms.protocol import ModelConfig
from mmgen.paradigms.sequence import text_block
from mmgen.pipelines import NextTokenPipeline, load_pipeline, paradigm_name, save_pipeline
from mmgen.pipelines.base import generators_from_seed
from mmgen.sampling.config import SamplingConfig
from mmgen.text import UnifiedVocab
from mmgen.watermark import WatermarkConfig, WatermarkProcessor, detect_tokens, kmeans
from test_next_neighbor import markov_grids

torch.set_num_threads(1)
TEXT_IDS = [[3, 4], [5]]
VARIANTS = ["right", "raster_mask", "next_raster_token"]  # "right" is the paradigm; the rest are wrong


tiny_parts = partial(tiny_code_paradigm, nb)  # layout and a 2-layer NextBlockTransformer


# ---- the slow reference -------------------------------------------------------------------------------------


def reference_mask(layout, valid_BL, variant="right"):
    """Pair by pair over [text, query row, image rows 0..h-2]: text causal over valid keys; a query or image slot
    sees the text and every slot of its own or an earlier row (the query row is row -1); "raster_mask" (wrong):
    every earlier slot only."""
    T0, (h, w) = layout.max_text_len + 1, layout.grid
    L = valid_BL.shape[1]

    def sees(q, k):
        if k < T0 or variant == "raster_mask":
            return k <= q
        return q >= T0 and (k - T0) // w <= (q - T0) // w

    rule = torch.tensor([[sees(q, k) for k in range(L)] for q in range(L)])
    return ((rule[None] & valid_BL[:, None, :]) | torch.eye(L, dtype=torch.bool)).unsqueeze(1)


def reference_positions(layout):
    """Text (i, i); query column c one row above the image, (o - 1, o + c); image (r, c) at (o + r, o + c)."""
    T0, (h, w) = layout.max_text_len + 1, layout.grid
    pos = [(i, i) for i in range(T0)] + [(T0 - 1, T0 + c) for c in range(w)]
    pos += [(T0 + t // w, T0 + t % w) for t in range(h * w - w)]
    return torch.tensor(pos)[None]


def reference_forward(model, layout, text_ids, codes_BN, variant="right"):
    """Logits (B, N, V) of every image token from the whole teacher-forced sequence, no cache: token (r, c) is read
    at the slot of (r - 1, c) (the query row's column c for r = 0); "next_raster_token" (wrong): at the slot just
    before it."""
    T0, w = layout.max_text_len + 1, layout.grid[1]
    text, valid = text_block(layout, text_ids)
    rows = layout.vocab.image_to_unified(codes_BN[:, :-w])
    valid = torch.cat([valid, torch.ones(len(text), w + rows.shape[1], dtype=torch.bool)], 1)
    with torch.no_grad():
        logits = model(text, rows, positions=reference_positions(layout), mask=reference_mask(layout, valid, variant))
    N = codes_BN.shape[1]
    slots = [T0 + t for t in range(N)] if variant != "next_raster_token" else [T0 + w + t - 1 for t in range(N)]
    return logits[:, [min(s, logits.shape[1] - 1) for s in slots]]


def reference_generate(model, layout, text_ids, scale, schedule="constant", variant="right"):
    """Greedy decoding by full recompute, one row at a time (undecoded tokens hold 0)."""
    h, w = layout.grid
    B = len(text_ids)
    codes = torch.zeros(B, h * w, dtype=torch.long)
    rows = list(text_ids) + ([[]] * B if scale != 1 else [])
    for r in range(h):
        logits = reference_forward(model, layout, rows, torch.cat([codes] * (len(rows) // B)), variant)
        if scale != 1:
            weight = scale if schedule == "constant" else 1 + (scale - 1) * r / (h - 1)
            cond, uncond = logits.chunk(2)
            logits = uncond + weight * (cond - uncond)
        codes[:, r * w: (r + 1) * w] = logits[:, r * w: (r + 1) * w].argmax(-1)
    return codes.view(B, h, w)


# ---- mask, targets, generation ------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_block_mask_and_targets_match_the_reference(variant):
    """The paradigm's teacher-forced logits and loss against the reference; the wrong variants differ."""
    layout, model = tiny_parts(grid=(3, 4))
    codes = torch.randint(16, (2, 12), generator=torch.Generator().manual_seed(1))
    batch = nb.build_batch(layout, TEXT_IDS, codes.view(2, 3, 4))
    assert batch.mask.shape[-1] == layout.seq_len == 5 + 12  # text block, query row, rows 0 and 1
    if variant == "right":
        valid = torch.cat([batch.text != layout.vocab.pad, torch.ones(2, 12, dtype=torch.bool)], 1)
        assert torch.equal(batch.mask, reference_mask(layout, valid))
        assert torch.equal(batch.positions[:1], reference_positions(layout))
    with torch.no_grad():
        ours = model(batch.text, batch.rows, positions=batch.positions, mask=batch.mask)[:, layout.max_text_len + 1:]
        loss = nb.loss_fn(model, batch, layout)
    ref = reference_forward(model, layout, TEXT_IDS, codes, variant)
    assert torch.allclose(ours, ref, atol=1e-5, rtol=0) == (variant == "right"), (ours - ref).abs().max()
    if variant == "right":
        ce = torch.nn.functional.cross_entropy(ref.flatten(0, 1), codes.flatten())
        assert loss.item() == pytest.approx(ce.item(), abs=1e-5)


@pytest.mark.parametrize("variant", VARIANTS)
def test_greedy_generation_equals_full_recompute_one_row_at_a_time(variant):
    layout, model = tiny_parts(wild=True)
    for schedule in ("constant", "linear"):
        sampling = SamplingConfig(guidance_scale=2.0, temperature=0, cfg_schedule=schedule)
        codes, cost = nb.generate(model, layout, TEXT_IDS, sampling)
        ref = reference_generate(model, layout, TEXT_IDS, 2.0, schedule, variant)
        assert torch.equal(codes, ref) == (variant == "right"), (schedule, codes, ref)
        assert cost.decoder_passes == 4
        if variant != "right":
            break


@pytest.mark.parametrize("grid", [(4, 4), (3, 4)])
def test_decoder_passes_are_counted_exactly(grid):
    """h passes: the prompt pass (text block + query row, gives row 0), then one per row but the last."""
    layout, model = tiny_parts(grid=grid)
    fed = []
    hook = model.register_forward_pre_hook(
        lambda m, args: fed.append(sum(a.shape[1] for a in args[:2] if a is not None)))
    _, cost = nb.generate(model, layout, TEXT_IDS, SamplingConfig(guidance_scale=1.5), generators_from_seed(0, 2))
    hook.remove()
    h, w = grid
    assert cost.decoder_passes == len(fed) == h
    assert fed == [layout.max_text_len + 1] + [w] * (h - 1)  # the query row rides with the text block


def test_each_image_draws_from_its_own_generator():
    layout, model = tiny_parts(wild=True)
    sampling = SamplingConfig(guidance_scale=2.0)
    both, _ = nb.generate(model, layout, TEXT_IDS, sampling, generators_from_seed(7, 2))
    alone, _ = nb.generate(model, layout, TEXT_IDS[1:], sampling, generators_from_seed(8, 1))
    assert torch.equal(both[1], alone[0]) and not torch.equal(both[0], both[1])


def test_training_loss_falls():
    layout, model = tiny_parts()
    model.train()
    codes = torch.randint(16, (8, 4, 4), generator=torch.Generator().manual_seed(0))
    text_ids = [[1 + i] for i in range(8)]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(20):
        loss = nb.loss_fn(model, nb.build_batch(layout, text_ids, codes), layout)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(math.log(16), abs=0.1)
    assert losses[-1] < 0.5 * losses[0], losses
    assert model.block_queries.grad is not None and model.block_queries.grad.abs().sum() > 0


# ---- pipeline, CLI, refusals ------------------------------------------------------------------------------------


def tiny_next_block_pipeline(tok, seed=0) -> NextTokenPipeline:
    """16 px, 4x4 codes of 32 (tiny_vqgan), text up to 8 tokens, a 2-layer NextBlockTransformer."""
    vq = tiny_vqgan(channel_mult=(1, 2, 2), seed=seed)
    vocab = UnifiedVocab(len(tok), vq.vocab_size)
    tr = nb.NextBlockTransformer(vocab.size, vq.vocab_size, 4, max_seq_len=8 + 1 + 16, **BACKBONE)
    return NextTokenPipeline(transformer=tr.eval(), vq_model=vq.eval(), tokenizer=tok, max_text_len=8)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    pipe = tiny_next_block_pipeline(tiny_text_tokenizer())
    return pipe, save_pipeline(pipe, tmp_path_factory.mktemp("next_block") / "model")


def test_pipeline_saves_and_reloads_bit_identical(saved):
    pipe, directory = saved
    again = load_pipeline(directory)
    assert paradigm_name(again) == "next_block" and again.layout == pipe.layout
    assert torch.equal(again.transformer.block_queries, pipe.transformer.block_queries)
    outs = []
    for p in (pipe, again):
        p.set_progress_bar_config(disable=True)
        outs.append(p(prompt=["a red circle", "two green stars"], guidance_scale=2.0,
                      generator=generators_from_seed(3, 2)))
    a, b = outs
    assert a.decoder_passes == b.decoder_passes == 4 and a.step_compression == pytest.approx(4.0)
    assert torch.equal(a.tokens, b.tokens) and all(x.tobytes() == y.tobytes() for x, y in zip(a.images, b.images))


def test_cli_generates_from_the_saved_directory(saved, tmp_path, capsys):
    _, directory = saved
    out = tmp_path / "img.png"
    assert cli.main(["generate", "a red circle", "--model", str(directory), "--out", str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["pipeline"] == "NextTokenPipeline" and result["nfe_per_image"] == 4 and out.is_file()


def test_bad_input_is_refused_by_name(saved):
    pipe, _ = saved
    one_d = SimpleNamespace(kind="codes", token_shape=(1, 8), vocab_size=16)  # SEED's causal 1-D codes: one block
    with pytest.raises(ValueError, match=r"next_block needs a 2-D token grid with h >= 2 and w >= 2 .*got \(1, 8\)"):
        nb.make_layout(one_d, UnifiedVocab(4, 16), 2, ModelConfig(**BACKBONE))
    latents = SimpleNamespace(kind="latents", token_shape=(4, 4, 4), vocab_size=0)
    with pytest.raises(ValueError, match=r"next_block needs a tokenizer of kind 'codes' .*got kind 'latents'"):
        nb.make_layout(latents, UnifiedVocab(4, 0), 2, ModelConfig(**BACKBONE))
    with pytest.raises(ValueError, match=r"sampler must be 'ar' for this model; got 'sjd': next_block models"):
        pipe(prompt="a red circle", sampler="sjd")
    wide = SimpleNamespace(kind="codes", token_shape=(4, 8), vocab_size=32)
    with pytest.raises(ValueError, match=r"block_size 4\) does not fit the tokenizer \(32 codes, rows of 8"):
        nb.layout_from_model(pipe.transformer, wide, pipe.vocab, 8)


def test_bench_paradigms_times_untrained_stand_ins_of_both_paradigms(tmp_path):
    """`mmgen bench --suite paradigms` times NAR and next-block on stand-ins over the baseline's parts until their zoo
    models ship: exact passes (h + w - 1 = 7 and h = 4 on 4x4 codes, against 16) and seconds per image at batch 1
    and 8."""
    base = save_pipeline(tiny_pipeline("next_token", tiny_text_tokenizer(CAPTIONS, shapes_words=True)),
                         tmp_path / "base")
    models = standin_models(["next_neighbor", "next_block"], base=base)
    assert [paradigm_name(load_pipeline(d)) for d in models.values()] == ["next_neighbor", "next_block"]
    rows = bench_paradigms(models, baseline=base, batch_sizes=(1, 8), repeats=1, progress=False)["models"]
    assert {k: r["nfe_per_image"] for k, r in rows.items()} == {"baseline": 16, "next_neighbor-untrained": 7,
                                                               "next_block-untrained": 4}
    for row in rows.values():
        for b in (1, 8):
            lat = row["latency"][f"batch_{b}"]
            assert lat["seconds_per_image"] == pytest.approx(lat["seconds_per_call"] / b, abs=1e-4)


def test_watermark_keyed_by_the_token_above_is_detected_and_calibrated():
    layout = nb.NextBlockLayout(UnifiedVocab(10, 64), 4, (8, 8))
    torch.manual_seed(0)
    model = nb.make_model(layout, ModelConfig(**BACKBONE)).eval()
    order = nb.watermark_key_order(layout)
    assert order.parents[:10] == (-1,) * 8 + (0, 1) and order.order == tuple(range(64))
    cfg = WatermarkConfig(num_clusters=8, context=2,
                          clusters=kmeans(model.transformer.tok_emb.weight[-64:].detach(), 8).tolist())
    codes, _ = nb.generate(model, layout, [[3, 4]] * 24, SamplingConfig(), generators_from_seed(0, 24),
                           processor=WatermarkProcessor(cfg, "k1"))
    hits = [d.p_value < 0.01 for d in detect_tokens(codes.flatten(1), cfg, "k1", order)]
    wrong_key = [d.p_value < 0.01 for d in detect_tokens(codes.flatten(1), cfg, "k2", order)]
    assert sum(hits) >= 20 and sum(wrong_key) <= 1, (sum(hits), sum(wrong_key))
    small = nb.watermark_key_order(nb.NextBlockLayout(UnifiedVocab(10, 64), 4, (6, 6)))
    grids = markov_grids(300, side=6)  # unwatermarked; each under its own key
    p_values = torch.tensor([detect_tokens(grids[i: i + 1], cfg, f"key-{i}", small)[0].p_value for i in range(300)])
    for nominal in (0.01, 0.05, 0.2):
        assert (p_values < nominal).float().mean() <= nominal, nominal
    assert (p_values < 0.5).float().mean() > 0.3
