"""Token-Shuffle (mmgen.models.shuffle, mmgen.paradigms.token_shuffle): window order and
round trips, s^2 codes per pass, KV-cached sampling against the teacher-forced forward (with CFG schedules),
per-image seeds and the sampled distribution, overfitting, save/load, the pipeline and CLI, the bench suite."""

import json

import pytest
import torch

from tiny import tiny_next_token_pipeline, tiny_text_tokenizer, tiny_vqgan
from mmgen import bench, cli
from mmgen.models.shuffle import TokenShuffleTransformer
from mmgen.paradigms import token_shuffle as ts
from mmgen.pipelines import NextTokenPipeline, load_pipeline
from mmgen.pipelines.base import generators_from_seed
from mmgen.sampling.logits import SamplingConfig, cfg_combine, guidance_at
from mmgen.models.shuffle import ShuffleMerge, ShuffleSplit, shuffle, shuffle_ids, unshuffle, unshuffle_ids
from mmgen.text import UnifiedVocab
from mmgen.watermark import KeyOrder, WatermarkConfig, WatermarkProcessor, detect_tokens, kmeans

V = 16
VOCAB = UnifiedVocab(text_vocab_size=10, image_vocab_size=V)
TEXT = [[1, 2, 3], [4], [5, 6, 7, 8]]  # different lengths: left padding differs per row


def layout_for(s, grid=(4, 4), max_text_len=4):
    return ts.TokenShuffleLayout.for_tokens(VOCAB, max_text_len, grid, s)


def tiny_model(s, seed=0, sharp=False, **kw):
    torch.manual_seed(seed)
    cfg = dict(dim=32, n_layers=2, n_heads=4, max_seq_len=32)
    cfg.update(kw)
    model = TokenShuffleTransformer(VOCAB.size, V, shuffle_window=s, **cfg).eval()
    if sharp:  # a fresh model attends almost uniformly; larger q, k make its outputs depend on positions
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith(("wq.weight", "wk.weight")):
                    p.mul_(30)
    return model


# ---- shuffle / unshuffle -----------------------------------------------------------------------------


def test_window_order_on_arange_grid():
    ids = torch.arange(24).view(1, 4, 6)
    win = shuffle_ids(ids, 2)
    assert win.shape == (1, 6, 4)
    assert win[0].tolist() == [[0, 1, 6, 7], [2, 3, 8, 9], [4, 5, 10, 11],
                               [12, 13, 18, 19], [14, 15, 20, 21], [16, 17, 22, 23]]
    # features: slot k = dy * s + dx fills channels [k C, (k + 1) C)
    x = torch.arange(4 * 4 * 2).view(1, 4, 4, 2)
    merged = shuffle(x, 2)
    assert merged.shape == (1, 4, 8)
    assert merged[0, 1].tolist() == [4, 5, 6, 7, 12, 13, 14, 15]  # cells (0,2) (0,3) (1,2) (1,3)
    assert shuffle_ids(ids, 1)[0, :, 0].tolist() == list(range(24))


@pytest.mark.parametrize("s", [1, 2, 3, 6])
def test_round_trip(s):
    x = torch.randn(2, 6, 12, 5)
    assert torch.equal(unshuffle(shuffle(x, s), s, (6, 12)), x)
    ids = torch.randint(0, 100, (3, 6, 12))
    assert torch.equal(unshuffle_ids(shuffle_ids(ids, s), s, (6, 12)), ids)


def test_shuffle_errors():
    with pytest.raises(ValueError, match="token grid 4x6 is not divisible by the shuffle window s=4"):
        shuffle(torch.zeros(1, 4, 6, 2), 4)
    with pytest.raises(ValueError, match="integer >= 1"):
        shuffle_ids(torch.zeros(1, 4, 4, dtype=torch.long), 0)
    with pytest.raises(ValueError, match="expected"):
        unshuffle(torch.zeros(1, 5, 8), 2, (4, 4))
    with pytest.raises(ValueError, match="dim \\(30\\) must be divisible by window\\^2 \\(4\\)"):
        ShuffleMerge(30, 2)
    with pytest.raises(ValueError, match="dim"):
        TokenShuffleTransformer(VOCAB.size, V, shuffle_window=4, dim=40, n_layers=1, n_heads=4)
    with pytest.raises(ValueError, match="image_vocab_size"):
        TokenShuffleTransformer(VOCAB.size, VOCAB.size, dim=32, n_layers=1, n_heads=4)
    with pytest.raises(ValueError, match="not divisible"):
        ts.TokenShuffleLayout.for_tokens(VOCAB, 4, (4, 6), 4)


def test_merge_and_split_follow_the_slot_order():
    torch.manual_seed(0)
    s, C = 2, 8
    merge = ShuffleMerge(C, s, num_blocks=1)
    x = torch.randn(2, 4, 6, C)
    grouped = shuffle(x, s).unflatten(-1, (s * s, C))  # (B, N, K, C) in slot order
    torch.testing.assert_close(merge(grouped), merge.blocks(shuffle(merge.compress(x), s)))
    split = ShuffleSplit(C, s, num_blocks=0)
    h = torch.randn(2, 3, C)
    out = split(h)
    assert out.shape == (2, 3, 4, C)
    for k in range(4):  # slot k comes from channels [k C/K, (k+1) C/K) only
        torch.testing.assert_close(out[:, :, k], split.expand(h[..., 2 * k: 2 * k + 2]))


# ---- paradigm ----------------------------------------------------------------------------------------


def test_layout_and_batch():
    lay = layout_for(2)
    assert lay.grid == (2, 2) and lay.token_grid == (4, 4) and lay.tokens_per_step == 4
    assert lay.num_image_tokens == 4 and lay.seq_len == 5 + 3
    pos = lay.positions(1)[0]
    assert pos.tolist() == [[i, i] for i in range(5)] + [[5, 5], [5, 6], [6, 5]]
    codes = torch.arange(16).view(1, 4, 4).repeat(3, 1, 1)
    batch = ts.build_batch(lay, TEXT, codes)
    assert batch.targets[0].tolist() == [[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13], [10, 11, 14, 15]]
    assert torch.equal(batch.windows, batch.targets[:, :3]) and batch.mask.shape == (3, 1, 8, 8)
    assert batch.text[1].tolist() == [0, 0, 0, 4, VOCAB.boi]
    with pytest.raises(ValueError, match="grid"):
        ts.build_batch(lay, TEXT, torch.zeros(3, 8, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="does not fit the layout"):
        ts.loss_fn(tiny_model(4), batch, lay)


@pytest.mark.parametrize("s, passes", [(1, 16), (2, 4), (4, 1)])
def test_s2_codes_per_pass(s, passes):
    model, lay = tiny_model(s), layout_for(s)
    calls = []
    model.register_forward_hook(lambda m, args, out: calls.append(out.shape))
    ticks = []
    codes, nfe = ts.generate(model, lay, TEXT, SamplingConfig(guidance_scale=2.0), generators_from_seed(0, 3),
                             callback=ticks.append)
    assert codes.shape == (3, 4, 4) and nfe.decoder_passes == passes == len(calls) == 16 // (s * s)
    assert ticks == list(range(passes))
    assert all(shape[1:] == (1, s * s, V) for shape in calls)  # every pass: 2*3 rows, one window of s^2 logits
    assert all(shape[0] == 6 for shape in calls)


def test_decode_steps_equal_full_forward():
    model, lay = tiny_model(2, sharp=True), layout_for(2)
    batch = ts.build_batch(lay, TEXT, torch.randint(0, V, (3, 4, 4), generator=torch.Generator().manual_seed(5)))
    T0, valid = lay.boi_index + 1, torch.ones(3, lay.seq_len, dtype=torch.bool)
    valid[:, :T0] = batch.text != VOCAB.pad
    with torch.no_grad():
        full = model(batch.text, batch.windows, batch.positions, batch.mask, logits_to_keep=4)
        cache = model.new_cache(3, lay.seq_len)
        steps = [ts.prefill(model, batch.text, batch.positions[:, :T0], valid[:, :T0], cache)]
        for j in range(3):
            steps.append(ts.decode_step(model, batch.windows[:, j], batch.positions[:, T0 + j], valid, cache))
    torch.testing.assert_close(torch.stack(steps, 1), full, atol=1e-5, rtol=0)
    shifted = batch.positions.clone()
    shifted[:, T0:] += 1  # positions matter: a wrong position changes the logits
    with torch.no_grad():
        assert not torch.allclose(model(batch.text, batch.windows, shifted, batch.mask, logits_to_keep=4), full,
                                  atol=1e-3)


@pytest.mark.parametrize("guidance, schedule", [(1.0, "constant"), (3.0, "constant"), (3.0, "linear")])
def test_cached_greedy_generation_equals_teacher_forced(guidance, schedule):
    """KV-cached sampling takes the greedy path of the teacher-forced forward, CFG and its schedule included."""
    s, model, lay = 2, tiny_model(2, sharp=True), layout_for(2)
    codes, _ = ts.generate(model, lay, TEXT, SamplingConfig(guidance, temperature=0, cfg_schedule=schedule))
    with torch.no_grad():
        cond = ts.build_batch(lay, TEXT, codes)
        null = ts.build_batch(lay, [[]] * 3, codes)
        lc = model(cond.text, cond.windows, cond.positions, cond.mask, logits_to_keep=4)
        lu = model(null.text, null.windows, null.positions, null.mask, logits_to_keep=4)
    weights = torch.tensor([guidance_at(guidance, j, 4, schedule) for j in range(4)])[None, :, None, None]
    expected = unshuffle_ids(cfg_combine(lc, lu, weights).argmax(-1), s, (4, 4))
    assert torch.equal(codes, expected)
    if schedule == "linear":  # the ramp starts unguided: window 0 is the conditional argmax
        assert torch.equal(shuffle_ids(codes, 2)[:, 0], lc[:, 0].argmax(-1))


def test_per_image_seed_and_sampled_distribution():
    model, lay = tiny_model(2, seed=1), layout_for(2, grid=(2, 2))  # one window: one pass per image
    cfg = SamplingConfig(guidance_scale=1.0)
    pair, _ = ts.generate(tiny_model(2, seed=1), layout_for(2), TEXT[:2], cfg, generators_from_seed(7, 2))
    alone, _ = ts.generate(tiny_model(2, seed=1), layout_for(2), TEXT[1:2], cfg, [generators_from_seed(7, 2)[1]])
    assert torch.equal(pair[1], alone[0])  # image 1 does not depend on its batch mate
    n = 3000
    codes, _ = ts.generate(model, lay, [TEXT[0]] * n, cfg, generators_from_seed(0, n))
    with torch.no_grad():
        batch = ts.build_batch(lay, TEXT[:1], torch.zeros(1, 2, 2, dtype=torch.long))
        probs = model(batch.text, None, batch.positions, batch.mask, logits_to_keep=1)[0, 0].softmax(-1)  # (K, V)
    for k in range(4):
        freq = torch.bincount(codes.flatten(1)[:, k], minlength=V).float() / n
        assert 0.5 * (freq - probs[k]).abs().sum() < 0.06  # TV; E[TV] ~ 0.03 here


def test_overfit_then_regenerate_memorised_codes():
    s, lay = 2, layout_for(2)
    model = tiny_model(s).train()
    g = torch.Generator().manual_seed(3)
    codes = torch.randint(0, V, (3, 4, 4), generator=g)
    batch = ts.build_batch(lay, TEXT, codes)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    losses = []
    for _ in range(150):
        loss = ts.loss_fn(model, batch, lay)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > 2.0 and losses[-1] < 0.05 * losses[0]
    out, nfe = ts.generate(model.eval(), lay, TEXT, SamplingConfig(guidance_scale=1.0, temperature=0))
    assert nfe.decoder_passes == 4 and torch.equal(out, codes)


def test_model_save_load_bit_identical(tmp_path):
    model, lay = tiny_model(2, shuffle_mlp_blocks=1, n_kv_heads=2), layout_for(2)
    with torch.no_grad():  # zero-initialised residual outputs would hide a wrong reload
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    model.save_pretrained(tmp_path)
    again = TokenShuffleTransformer.from_pretrained(tmp_path).eval()
    assert again.config.shuffle_window == 2 and again.config.shuffle_mlp_blocks == 1
    sd, sd2 = model.state_dict(), again.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    batch = ts.build_batch(lay, TEXT, torch.randint(0, V, (3, 4, 4)))
    with torch.no_grad():
        assert torch.equal(model(batch.text, batch.windows, batch.positions, batch.mask),
                           again(batch.text, batch.windows, batch.positions, batch.mask))
    cfg = SamplingConfig(guidance_scale=2.5)
    a, _ = ts.generate(model, lay, TEXT, cfg, generators_from_seed(4, 3))
    b, _ = ts.generate(again, lay, TEXT, cfg, generators_from_seed(4, 3))
    assert torch.equal(a, b)


# ---- pipeline, CLI, bench ------------------------------------------------------------------------------

CAPTIONS = ["a red circle", "two green stars"]


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    """Tiny saved pipelines on one 16x16 VQGAN (8x8 codes): Token-Shuffle s = 2 and plain next-token."""
    tok = tiny_text_tokenizer(CAPTIONS, shapes_words=True)
    vq = tiny_vqgan()  # both decoders are drawn after it, the Token-Shuffle one first
    out = {}
    shuffled = tiny_next_token_pipeline(tok, vq, max_seq_len=48, max_text_len=16, shuffle_window=2)
    plain = tiny_next_token_pipeline(tok, vq, max_seq_len=96, max_text_len=16)
    for name, pipe in (("shuffle", shuffled), ("plain", plain)):
        d = tmp_path_factory.mktemp(name)
        pipe.save_pretrained(d)
        out[name] = d
    return out


def test_pipeline_generates_and_reloads_identically(pipes):
    pipe = load_pipeline(pipes["shuffle"])
    assert isinstance(pipe.transformer, TokenShuffleTransformer) and pipe.layout.grid == (4, 4)
    pipe.set_progress_bar_config(disable=True)
    kw = dict(prompt=CAPTIONS, num_images_per_prompt=2, guidance_scale=3.0, generator=generators_from_seed(3, 4))
    out = pipe(**kw)
    assert len(out.images) == 4 and out.images[0].size == (16, 16)
    assert out.tokens.shape == (4, 8, 8) and out.nfe == 16 and out.step_compression == 4
    again = load_pipeline(pipes["shuffle"])
    again.set_progress_bar_config(disable=True)
    out2 = again(**{**kw, "generator": generators_from_seed(3, 4)})
    assert torch.equal(out.tokens, out2.tokens)
    assert all(a.tobytes() == b.tobytes() for a, b in zip(out.images, out2.images))
    assert not torch.equal(out.tokens[0], out.tokens[1])  # different seeds, different images
    greedy = dict(prompt=CAPTIONS, guidance_scale=4.0, temperature=0, output_type="pt")
    const, ramp = pipe(**greedy), pipe(**greedy, cfg_schedule="linear")
    assert ramp.nfe == 16 and not torch.equal(const.tokens, ramp.tokens)


@pytest.mark.parametrize("kind, kwargs, needle", [
    ("shuffle", dict(sampler="sjd"), "sampler='sjd' is not available for Token-Shuffle models"),
    ("shuffle", dict(cfg_schedule="cosine"), "cfg_schedule must be one of constant, linear"),
    ("plain", dict(sampler="sjd", cfg_schedule="linear"), "not available with sampler='sjd'"),
])
def test_pipeline_rejects(pipes, kind, kwargs, needle):
    pipe = load_pipeline(pipes[kind])
    with pytest.raises(ValueError, match=needle):
        pipe(prompt="a red circle", **kwargs)


def test_plain_next_token_cfg_ramp(pipes):
    """s = 1 takes the same schedule: the ramp's first token is guided with w = 1 (the conditional logits alone),
    later tokens with growing w, so the greedy image differs from constant guidance."""
    pipe = load_pipeline(pipes["plain"])
    pipe.set_progress_bar_config(disable=True)
    greedy = dict(prompt=CAPTIONS, temperature=0, output_type="pt")
    ramp = pipe(**greedy, guidance_scale=4.0, cfg_schedule="linear")
    const = pipe(**greedy, guidance_scale=4.0)
    unguided = pipe(**greedy, guidance_scale=1.0)
    assert ramp.nfe == const.nfe == 64
    assert torch.equal(ramp.tokens[:, 0, 0], unguided.tokens[:, 0, 0])
    assert not torch.equal(ramp.tokens, const.tokens) and not torch.equal(ramp.tokens, unguided.tokens)


def test_pipeline_rejects_image_vocab_mismatch(pipes):
    pipe = load_pipeline(pipes["shuffle"])
    tr = TokenShuffleTransformer(pipe.vocab.size, V, 2, dim=32, n_layers=1, n_heads=4)
    with pytest.raises(ValueError, match="image_vocab_size=16 differs from the tokenizer's 32 codes"):
        NextTokenPipeline(transformer=tr, vq_model=pipe.vq_model, tokenizer=pipe.tokenizer, max_text_len=16)


def test_cli_generate_with_cfg_schedule(pipes, tmp_path, capsys):
    out = tmp_path / "img.png"
    assert cli.main(["generate", "a red circle", "--model", str(pipes["shuffle"]), "--out", str(out),
                     "--cfg-schedule", "linear", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["nfe_per_image"] == 16 and result["step_compression"] == 4.0 and out.is_file()
    with pytest.raises(SystemExit) as e:
        cli.main(["generate", "a red circle", "--model", str(pipes["shuffle"]), "--out", str(tmp_path / "x.png"),
                  "--sampler", "sjd"])
    assert e.value.code == 2 and "not available for Token-Shuffle" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def reciprocal(ratio: float, speedup: float) -> bool:
    """Two figures of one timing, each rounded to 3 decimals: their product is 1 within what rounding allows
    (|e| <= 5e-4 on each), however small the ratio."""
    return abs(ratio * speedup - 1) <= 5e-4 * (ratio + speedup) + 1e-6


def test_bench_shuffle_suite(pipes):
    r = bench.bench_shuffle(windows=(4, 2), grid=4, dim=32, n_layers=1, n_heads=4, image_vocab_size=V, train_batch=2,
                            batch_sizes=(1, 2), repeats=1, progress=False, models={"s2": pipes["shuffle"]},
                            baseline=pipes["plain"], eval_per_category=1)
    rows = r["windows"]
    assert list(rows) == ["s1", "s4", "s2"] and r["codes_per_image"] == 16
    s1 = rows["s1"]
    assert s1["tokens_per_image"] == s1["nfe_per_image"] == 16
    assert s1["token_ratio"] == s1["nfe_ratio"] == s1["train_step_ratio"] == s1["train_speedup"] == 1.0
    assert all(lat["latency_ratio"] == lat["speedup"] == 1.0 for lat in s1["latency"].values())
    for s in (2, 4):
        row = rows[f"s{s}"]
        assert row["tokens_per_image"] == row["nfe_per_image"] == 16 // s ** 2
        assert row["token_ratio"] == row["nfe_ratio"] == pytest.approx(1 / s ** 2, abs=1e-4)
        assert reciprocal(row["train_step_ratio"], row["train_speedup"])
        lat = row["latency"]["batch_2"]
        assert reciprocal(lat["latency_ratio"], lat["speedup"])
    trained = r["trained"]["models"]
    assert trained["baseline"]["shuffle_window"] == 1 and trained["s2"]["shuffle_window"] == 2
    assert trained["s2"]["nfe_per_image"] == 16 and trained["baseline"]["nfe_per_image"] == 64
    assert trained["s2"]["accuracy"]["n"] == 4


def test_bench_cli_shuffle_suite(capsys):
    assert cli.main(["bench", "--suite", "shuffle", "--shuffle-grid", "4", "--batch-sizes", "1", "--repeats", "1",
                     "--json"]) == 0
    report = json.loads(capsys.readouterr().out)["shuffle"]
    assert set(report["windows"]) == {"s1", "s2", "s4"} and report["windows"]["s4"]["nfe_per_image"] == 1
    with pytest.raises(SystemExit) as e:
        cli.main(["bench", "--suite", "shuffle", "--shuffle-grid", "6", "--json"])
    assert e.value.code == 2 and "not divisible by the shuffle window s=4" in capsys.readouterr().err


def test_trunk_starts_from_a_next_token_decoder():
    """`init_backbone_from` (train_generator): a Token-Shuffle decoder's trunk takes a next-token decoder's
    layers and embeddings by name; its merge/split and heads keep their own initialisation."""
    from tiny import tiny_transformer
    from mmgen.training.checkpoint import init_backbone

    source = tiny_transformer(40, 32, seed=1)
    target = TokenShuffleTransformer(vocab_size=40, image_vocab_size=16, shuffle_window=2, dim=32, n_layers=2,
                                     n_heads=4, max_seq_len=32)
    heads_before = {k: v.clone() for k, v in target.state_dict().items() if not k.startswith("transformer.")}
    copied, fresh = init_backbone(target, source.state_dict())
    assert "layers.1.mlp.w2.weight" in copied and "tok_emb.weight" in copied
    assert fresh == []  # the trunk has no logits head of its own: every tensor of it came from the source
    for name in copied:
        assert torch.equal(target.transformer.state_dict()[name], source.state_dict()[name])
    for k, v in target.state_dict().items():
        if k in heads_before:
            assert torch.equal(v, heads_before[k])
    # and from another Token-Shuffle decoder, whose trunk sits under its `transformer.` prefix
    other = TokenShuffleTransformer(vocab_size=40, image_vocab_size=16, shuffle_window=2, dim=32, n_layers=2,
                                    n_heads=4, max_seq_len=32)
    assert init_backbone(other, target.state_dict())[0] == copied
    assert torch.equal(other.transformer.tok_emb.weight, source.tok_emb.weight)
    # a trunk of another width shares nothing: refused by name rather than trained from scratch unnoticed
    with pytest.raises(ValueError, match="init_backbone_from"):
        init_backbone(TokenShuffleTransformer(vocab_size=40, image_vocab_size=16, dim=48, n_layers=2, n_heads=4,
                                              max_seq_len=32), source.state_dict())


# ---- watermark ------------------------------------------------------------------------------------------------


def test_watermark_key_order_reads_tokens_of_earlier_passes():
    """Token (r, c) is keyed by the same slot of the window to its left (of the window above in the first window
    column): a token sampled at an earlier pass, never one of its own window."""
    lay = layout_for(2, grid=(4, 6))
    order, slots = ts.watermark_key_order(lay), ts.slot_positions(lay)
    assert torch.equal(slots, shuffle_ids(torch.arange(24).view(1, 4, 6), 2)[0])
    assert order.order == tuple(slots.flatten().tolist())
    assert order.parents[:8] == (-1, -1, 0, 1, 2, 3, -1, -1) and order.parents[12:14] == (0, 1)
    window = {int(t): j for j, row in enumerate(slots) for t in row}
    assert all(p < 0 or window[p] < window[t] for t, p in enumerate(order.parents))


def _shuffle_watermark_hits(order_fn, monkeypatch):
    """Hits at p < 0.01 (right key, wrong key) over 24 images sampled with a strong KGW watermark keyed by
    `order_fn`, detected with the paradigm's own order."""
    lay = layout_for(2, grid=(8, 8), max_text_len=4)
    model = tiny_model(2, max_seq_len=24)  # near-uniform: high entropy
    cfg = WatermarkConfig(num_clusters=8, context=2, method="kgw-cluster", delta=4.0,
                          clusters=kmeans(model.transformer.tok_emb.weight[-V:].detach(), 8).tolist())
    order = ts.watermark_key_order(lay)
    monkeypatch.setattr(ts, "watermark_key_order", order_fn)
    codes, _ = ts.generate(model, lay, [[3, 4]] * 24, SamplingConfig(), generators_from_seed(0, 24),
                           processor=WatermarkProcessor(cfg, "k1"))
    right = sum(d.p_value < 0.01 for d in detect_tokens(codes.flatten(1), cfg, "k1", order))
    wrong = sum(d.p_value < 0.01 for d in detect_tokens(codes.flatten(1), cfg, "k2", order))
    return right, wrong


def test_watermark_keyed_by_earlier_windows_is_detected(monkeypatch):
    """Generation reweights each window's s^2 distributions under the order's keys; detection with the same order
    flags the images under their key and not under another. Power: keying generation by the left neighbour (in
    a window's right column a token of the same pass, not sampled yet) loses the watermark."""
    right, wrong = _shuffle_watermark_hits(ts.watermark_key_order, monkeypatch)
    assert right >= 20 and wrong <= 1, (right, wrong)
    good = ts.watermark_key_order
    left = lambda lay: KeyOrder(tuple(t - 1 if t % 8 else -1 for t in range(64)), good(lay).order)  # noqa: E731
    assert _shuffle_watermark_hits(left, monkeypatch)[0] <= 2


def test_pipeline_watermark_is_detected_by_the_bench_with_the_key_order(pipes):
    """A Token-Shuffle pipeline takes `watermark_key`; the bench's attack suite detects with the pipeline's key order
    (on raster contexts the same tokens would read as unmarked)."""
    from mmgen.bench.watermark import attack_suite
    from mmgen.watermark import cluster_codebook

    pipe = load_pipeline(pipes["shuffle"])
    pipe.set_progress_bar_config(disable=True)
    assert pipe.watermark_key_order() == ts.watermark_key_order(pipe.layout)
    cfg = WatermarkConfig(num_clusters=8, context=2, method="kgw-cluster", delta=4.0,
                          clusters=cluster_codebook(pipe.vq_model.quantizer.codebook, 8))
    report = attack_suite(pipe, n_images=8, batch_size=8, configs={"kgw-cluster": cfg}, progress=False,
                          overhead_repeats=0)
    tokens_row = report["methods"]["kgw-cluster"]["tokens"]
    assert tokens_row["tpr"] >= 0.75 and tokens_row["fpr"] <= 0.125 and tokens_row["auc"] >= 0.95, tokens_row
