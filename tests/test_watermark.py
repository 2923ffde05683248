"""Watermark: distortion-freeness, detector false-positive rate, detection power, SJD composition, I/O."""

import dataclasses
import functools
import importlib.util
import itertools
import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from tiny import tiny_next_token_pipeline, tiny_text_tokenizer, tiny_transformer
from mmgen import cli
from mmgen.paradigms.next_token import NextTokenLayout, generate, generate_sjd
from mmgen.pipelines.base import generators_from_seed
from mmgen.sampling.logits import SamplingConfig
from mmgen.sampling.sjd import SJDConfig
from mmgen.watermark import (KeyedPermutations, WatermarkConfig, WatermarkProcessor, alpha_reweight,
                             cluster_by_confusion, cluster_codebook, confusion_matrix, detect_tokens,
                             detect_tokens_combined, kmeans)
from mmgen.watermark.core import binomial_sf, contexts, uniform_sum_sf
from test_sjd import N_SAMPLES, empirical, peaked_model, tv, tv_bound

CLUSTERS8 = [0, 0, 1, 1, 2, 2, 3, 3]


@pytest.mark.parametrize("alpha", [0.5, 0.3])
def test_alpha_reweight_is_the_identity_on_average_over_permutations(alpha):
    p = torch.rand(4, 5, generator=torch.Generator().manual_seed(0)).softmax(-1) ** 2
    p = p / p.sum(-1, keepdim=True)
    perms = list(itertools.permutations(range(5)))
    mean = sum(alpha_reweight(p, torch.tensor(r).expand(4, 5), alpha) for r in perms) / len(perms)
    torch.testing.assert_close(mean, p, atol=1e-6, rtol=0)
    assert (alpha_reweight(p, torch.tensor(perms[7]).expand(4, 5), alpha) - p).abs().max() > 0.05


def _average_over_keys(method, logits, n_keys=4000, keying="clusters"):
    cfg = WatermarkConfig(method=method, num_clusters=4, context=1, keying=keying, clusters=CLUSTERS8)
    prefix, lengths = torch.tensor([[5]]), torch.tensor([1])
    total = torch.zeros(8)
    for k in range(n_keys):
        total += WatermarkProcessor(cfg, f"key-{k}")(logits[None], prefix, lengths)[0].softmax(-1)
    return total / n_keys


def test_watermarked_distribution_averaged_over_keys_is_the_original():
    """Distortion-freeness of C-reweight and token-reweight, by Monte Carlo over keys (tolerance: 5 standard
    errors of a mean of n_keys values in [0, 1]); KGW, which is not distortion-free, fails the same check."""
    logits = torch.tensor([2.5, 0.3, 1.0, -1.0, 0.0, 1.5, -0.5, 0.2])
    p = logits.softmax(-1)
    tol = 5 * 0.5 / 4000 ** 0.5
    for method in ("c-reweight", "token-reweight"):
        assert (_average_over_keys(method, logits) - p).abs().max() < tol, method
    assert (_average_over_keys("c-reweight", logits, keying="position") - p).abs().max() < tol
    assert (_average_over_keys("kgw-cluster", logits) - p).abs().max() > tol


def _markov_sequences(n, length=64, vocab=64, seed=0):
    """Low-entropy token streams with long runs, like flat image regions: many repeated contexts."""
    g = torch.Generator().manual_seed(seed)
    seqs = torch.zeros(n, length, dtype=torch.long)
    seqs[:, 0] = torch.randint(vocab, (n,), generator=g)
    for t in range(1, length):
        stay = torch.rand(n, generator=g) < 0.7
        seqs[:, t] = torch.where(stay, seqs[:, t - 1], torch.randint(vocab, (n,), generator=g))
    return seqs


def test_false_positive_rate_at_or_below_nominal():
    clusters = torch.arange(64).remainder(8).tolist()
    cfg = WatermarkConfig(num_clusters=8, context=2, clusters=clusters)
    seqs = _markov_sequences(1000)
    p_values = torch.tensor([d.p_value for d in detect_tokens(seqs, cfg, "the-key")])
    for nominal in (0.01, 0.05, 0.2):
        assert (p_values < nominal).float().mean() <= nominal, nominal

    # power of the check: scoring every position (repeated contexts included) breaks the null distribution
    perms, naive = KeyedPermutations("the-key", 8), []
    for row in cfg.symbols(seqs).tolist():
        ctx = contexts(row, 2)
        green = sum(int(perms.ranks(c)[s] >= 4) for s, c in zip(row, ctx))
        naive.append(binomial_sf(green, len(row), 0.5))
    assert (torch.tensor(naive) < 0.01).float().mean() > 0.01


@pytest.mark.parametrize("keying,context,statistic", [("clusters", 2, "rank"), ("position", 0, "green"),
                                                      ("position", 1, "rank")])
def test_false_positive_rate_of_the_other_keyings_and_statistics(keying, context, statistic):
    clusters = torch.arange(64).remainder(8).tolist()
    cfg = WatermarkConfig(num_clusters=8, context=context, keying=keying, statistic=statistic, clusters=clusters)
    detections = detect_tokens(_markov_sequences(600, seed=1), cfg, "the-key")
    # position keys never repeat, so every position is scored; cluster contexts skip the repeated ones
    assert all(d.scored == 64 for d in detections) == (keying == "position")
    p_values = torch.tensor([d.p_value for d in detections])
    for nominal in (0.01, 0.05, 0.2):
        assert (p_values < nominal).float().mean() <= nominal, nominal
    assert (p_values < 0.5).float().mean() > 0.3  # p-values spread over [0, 1], not stuck at 1


def test_set_level_detection_is_calibrated_and_pools_first_occurrences():
    """`detect_tokens_combined` tests a set of images as one: contexts are scored at their first occurrence in the
    whole set, so the pooled p-value keeps its exact null even when images repeat content. Sets here hold one
    sequence twice; pooling per-image first occurrences instead (the wrong variant) double-counts it and the
    false-positive rate exceeds the nominal one."""
    from mmgen.watermark import core

    clusters = torch.arange(64).remainder(8).tolist()
    cfg = WatermarkConfig(num_clusters=8, context=2, keying="clusters", statistic="rank", clusters=clusters)
    seqs = _markov_sequences(900, seed=2)
    sets = [torch.stack([seqs[3 * i], seqs[3 * i], seqs[3 * i + 1], seqs[3 * i + 2]]) for i in range(300)]
    pooled, naive = [], []
    for i, s in enumerate(sets):
        d = detect_tokens_combined(s, cfg, f"key-{i}")
        singles = detect_tokens(s[1:], cfg, f"key-{i}")
        assert d.scored <= sum(x.scored for x in singles)  # the duplicate adds nothing
        pooled.append(d.p_value)
        perms = core.KeyedPermutations(f"key-{i}", 8)
        ranks = [r for row in cfg.symbols(s).tolist() for r in core._scored_ranks(row, cfg, perms, set())]
        naive.append(core._detection(ranks, cfg).p_value)
    pooled, naive = torch.tensor(pooled), torch.tensor(naive)
    for nominal in (0.01, 0.05, 0.1):
        bound = nominal + 3 * math.sqrt(nominal * (1 - nominal) / len(sets))  # 3 binomial sds over 300 sets
        assert (pooled < nominal).float().mean() <= bound, nominal
        if nominal < 0.1:
            assert (naive < nominal).float().mean() > bound, nominal  # the wrong variant fails the same check
    assert (pooled < 0.5).float().mean() > 0.3


def test_set_level_detection_flags_a_watermarked_set():
    """Four watermarked images pooled into one test: flagged at 1% under their key, not under another. A context
    counts once per set, so the pooled test scores fewer positions than the images together (K = 8, h = 2)."""
    model, layout = high_entropy_model()
    clusters = kmeans(model.tok_emb.weight[-64:].detach(), 8).tolist()
    cfg = WatermarkConfig(num_clusters=8, context=2, clusters=clusters, alpha=0.2)
    gens = [torch.Generator().manual_seed(100 + i) for i in range(4)]
    codes, _ = generate(model, layout, [[3, 4]] * 4, SamplingConfig(), gens, processor=WatermarkProcessor(cfg, "k1"))
    singles = detect_tokens(codes.flatten(1), cfg, "k1")
    pooled = detect_tokens_combined(codes.flatten(1), cfg, "k1")
    assert max(d.scored for d in singles) < pooled.scored < sum(d.scored for d in singles)
    assert pooled.p_value < 0.01
    assert detect_tokens_combined(codes.flatten(1), cfg, "k2").p_value > 0.01


def test_bench_set_detection_counts_marked_and_unmarked_sets():
    """The bench's set-level rows (`mmgen bench --suite watermark --watermark-set-sizes`): consecutive sets of
    `size` images, a partial last set left out, sizes above the image count skipped; a weak watermark that half
    the single images show is found in every set of 5 pooled, and no unmarked set is flagged."""
    from mmgen.bench.watermark import detection_row

    model, layout = high_entropy_model()
    cfg = WatermarkConfig(num_clusters=8, context=2, method="kgw-cluster", delta=1.0,
                          clusters=kmeans(model.tok_emb.weight[-64:].detach(), 8).tolist())
    marked, _ = generate(model, layout, [[3, 4]] * 24, SamplingConfig(), generators_from_seed(0, 24),
                         processor=WatermarkProcessor(cfg, "k1"))
    plain, _ = generate(model, layout, [[3, 4]] * 24, SamplingConfig(), generators_from_seed(50, 24))
    marked, plain = marked.flatten(1), plain.flatten(1)
    row = detection_row(marked, plain, marked, cfg, "k1", 0.01, set_sizes=(5, 30))
    assert set(row["sets"]) == {"5"} and row["tpr"] <= 0.75 and row["fpr"] == 0.0, row
    assert row["sets"]["5"] == {"sets": 4, "tpr": 1.0, "unmarked_sets": 4, "fpr": 0.0}


def test_rank_sum_tail_is_exact():
    """uniform_sum_sf against enumeration of all outcomes (n = 3 ranks of K = 5)."""
    sums = [sum(r) for r in itertools.product(range(5), repeat=3)]
    for s in range(-1, 14):
        assert uniform_sum_sf(s, 3, 5) == pytest.approx(sum(x >= s for x in sums) / len(sums), abs=1e-15)
    assert uniform_sum_sf(0, 0, 16) == 1.0


def test_rank_sum_tail_of_pooled_sets_matches_the_exact_count():
    """Above EXACT_RANK_TAIL_MAX_N terms (pooled sets) the tail comes from the FFT of the distribution: within 1e-13
    of the exact big-integer count from the centre to far tails, and floored at FFT_TAIL_FLOOR beyond (never
    below the true tail by more than the error, so p-values stay valid). Summing from s + 1 misses by ~1e-4."""
    from mmgen.watermark import core

    n, k = core.EXACT_RANK_TAIL_MAX_N + 44, 16
    exact = functools.partial(core.uniform_sum_sf, n=n, k=k)
    mean, sd = n * (k - 1) / 2, math.sqrt(n * (k * k - 1) / 12)
    for z in (-3, 0, 1, 2.33, 4, 6):
        s = int(mean + z * sd)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(core, "EXACT_RANK_TAIL_MAX_N", 10 ** 6)
            want = exact(s)
        got = exact(s)
        assert got == pytest.approx(want, abs=1e-13) and got >= core.FFT_TAIL_FLOOR, (z, got, want)
    assert exact(int(mean + 9 * sd)) == core.FFT_TAIL_FLOOR


def test_confusion_clustering_puts_always_confused_codes_together():
    """Codes 0 and 7 sit in two far-apart groups (k-means splits them) but are always read back as
    each other: confusion clustering joins them unless the mass cap forbids the move."""
    codebook = torch.cat([torch.linspace(0, 1, 4), torch.linspace(10, 11, 4)])[:, None] * torch.tensor([[1.0, 0.5]])
    codes = torch.arange(8).repeat(10)
    recoded = codes.clone()
    recoded[codes == 0], recoded[codes == 7] = 7, 0
    confusion = confusion_matrix(codes, recoded, 8)
    assert confusion[0, 7] == confusion[7, 0] == 10 and confusion[0, 0] == 0 and confusion[3, 3] == 10
    plain = kmeans(codebook, 2).tolist()
    assert plain[0] != plain[7] and len(set(plain[:4])) == len(set(plain[4:])) == 1
    joined = cluster_by_confusion(confusion, codebook, 2)
    assert joined[0] == joined[7] and joined[1:4] == plain[1:4] and joined[4:7] == plain[4:7]
    assert cluster_by_confusion(confusion, codebook, 2, mass_cap=1.0) == plain  # 5/8 of the mass > 1/2
    with pytest.raises(ValueError, match="confusion must be"):
        cluster_by_confusion(confusion[:4], codebook, 2)
    with pytest.raises(ValueError, match="mass_cap"):
        cluster_by_confusion(confusion, codebook, 2, mass_cap=0.5)


def high_entropy_model():
    from mmgen.text import UnifiedVocab
    layout = NextTokenLayout(UnifiedVocab(text_vocab_size=10, image_vocab_size=64), max_text_len=4, grid=(8, 8))
    return tiny_transformer(layout.vocab.size, layout.seq_len), layout


@pytest.mark.parametrize("method,keying,statistic", [("c-reweight", "clusters", "green"),
                                                     ("token-reweight", "clusters", "green"),
                                                     ("kgw-token", "clusters", "green"),
                                                     ("kgw-cluster", "clusters", "green"),
                                                     ("c-reweight", "position", "rank")])
def test_watermark_is_detected_in_generated_tokens(method, keying, statistic):
    model, layout = high_entropy_model()
    clusters = kmeans(model.tok_emb.weight[-64:].detach(), 8).tolist()
    cfg = WatermarkConfig(method=method, num_clusters=8, context=2 if keying == "clusters" else 0, keying=keying,
                          statistic=statistic, clusters=clusters)
    gens = [torch.Generator().manual_seed(i) for i in range(40)]
    codes, _ = generate(model, layout, [[3, 4]] * 40, SamplingConfig(), gens, processor=WatermarkProcessor(cfg, "k1"))
    hits = [d.p_value < 0.01 for d in detect_tokens(codes.flatten(1), cfg, "k1")]
    wrong_key = [d.p_value < 0.01 for d in detect_tokens(codes.flatten(1), cfg, "k2")]
    assert sum(hits) >= 36 and sum(wrong_key) <= 2


def _slow_step(cfg, perms, logits_V, ctx, keyed):
    """One row's watermark step written out: the rank of every symbol under ctx's permutation, then C-reweight
    (cluster marginals reweighted, spread back in proportion) or KGW-token (+delta on the green tokens)."""
    if not keyed:
        return logits_V.float()
    ranks, p = perms.ranks(ctx), logits_V.float().softmax(-1)
    if cfg.method == "c-reweight":
        clusters = torch.tensor(cfg.clusters)
        pc = torch.zeros(cfg.num_clusters).index_add(0, clusters, p)
        qc = alpha_reweight(pc[None], ranks[None], cfg.alpha)[0]
        q = p * torch.where(pc > 0, qc / pc, 0.0)[clusters]
        return (q / q.sum()).log()
    green = ranks >= math.ceil(cfg.gamma * cfg.num_symbols)
    return logits_V.float().log_softmax(-1) + cfg.delta * green.float()


def _slow_processor(cfg, key, logits_NV, prefix_NL, lengths_N, key_repeats=False):
    """The processor row by row on the host, contexts as tuples (`contexts`). key_repeats: a wrong variant that keys
    a context again where it repeats."""
    perms = KeyedPermutations(key, cfg.num_symbols)
    out = []
    for lg, row, n in zip(logits_NV, cfg.symbols(prefix_NL).tolist(), lengths_N.tolist()):
        ctxs = contexts(row[:n], cfg.context, cfg.keying)
        out.append(_slow_step(cfg, perms, lg, ctxs[-1], key_repeats or ctxs[-1] not in ctxs[:-1]))
    return torch.stack(out)


@pytest.mark.parametrize("method,keying,h,dense", [("c-reweight", "clusters", 2, True),
                                                   ("kgw-token", "clusters", 1, False),
                                                   ("c-reweight", "position", 1, True)])
def test_vectorised_processor_equals_the_slow_reference(method, keying, h, dense, monkeypatch):
    """The processor (every row and position at once, on the logits' device) against `_slow_processor` on streams
    with repeated contexts, along a prefix (rows shared as under SJD) and in a decoding order (`keyed_by`); both rank
    tables (all ids at once, or filled as ids appear). The wrong variant, keying repeats, fails the same check."""
    from mmgen.paradigms.next_neighbor import NARLayout, watermark_key_order
    from mmgen.text import UnifiedVocab
    from mmgen.watermark import core

    if not dense:
        monkeypatch.setattr(core, "DENSE_CONTEXTS", 0)
    cfg = WatermarkConfig(method=method, num_clusters=4, context=h, keying=keying,
                          clusters=torch.arange(32).remainder(4).tolist())
    g = torch.Generator().manual_seed(0)
    prefix, logits = _markov_sequences(6, length=16, vocab=32, seed=3), torch.randn(10, 32, generator=g) * 2
    rows, lengths = torch.randint(6, (10,), generator=g), torch.randint(0, 18, (10,), generator=g)
    proc = WatermarkProcessor(cfg, "k")
    got = proc(logits, prefix, lengths, rows)
    torch.testing.assert_close(got, _slow_processor(cfg, "k", logits, prefix[rows], lengths), rtol=1e-5, atol=1e-5)
    if keying == "clusters":
        wrong = _slow_processor(cfg, "k", logits, prefix[rows], lengths, key_repeats=True)
        assert not torch.allclose(got, wrong, rtol=1e-5, atol=1e-5)

    layout = NARLayout(UnifiedVocab(text_vocab_size=10, image_vocab_size=32), max_text_len=4, grid=(4, 4))
    order, perms = watermark_key_order(layout), KeyedPermutations("k", cfg.num_symbols)
    positions = torch.randint(16, (10,), generator=g)
    got = proc.keyed_by(order, logits, prefix, rows, positions)
    expected = []
    for lg, b, p in zip(logits, rows.tolist(), positions.tolist()):
        syms = cfg.symbols(prefix[b]).tolist()
        ctx = order.context(syms, p, h, keying)
        earlier = [order.context(syms, q, h, keying) for q in order.order[: order.rank[p]]]
        expected.append(_slow_step(cfg, perms, lg, ctx, ctx not in earlier))
    torch.testing.assert_close(got, torch.stack(expected), rtol=1e-5, atol=1e-5)


def test_sjd_with_watermark_samples_the_watermarked_distribution():
    """The watermark is a function of the prefix, so SJD (drafts in the prefix) still samples exactly the
    watermarked AR distribution; and greedy SJD equals greedy AR under the watermark."""
    model, layout = peaked_model()
    cfg = WatermarkConfig(num_clusters=2, context=1, clusters=[0, 0, 1, 1])
    proc = WatermarkProcessor(cfg, "key")
    V, N = 4, 4
    images = torch.tensor(list(itertools.product(range(V), repeat=N)))
    from mmgen.paradigms.next_token import build_batch, image_logits
    batch = build_batch(layout, [[3, 4, 5]] * len(images), images.view(-1, 2, 2))
    with torch.no_grad():
        logits = model(batch.tokens, positions=batch.positions, mask=batch.mask)[:, layout.boi_index:][:, :N]
    logits = image_logits(layout, logits.flatten(0, 1), 1.0)
    lengths = torch.arange(N).repeat(len(images))
    logp = proc(logits, images.repeat_interleave(N, 0), lengths).log_softmax(-1).view(len(images), N, V)
    target = logp.gather(-1, images[..., None]).squeeze(-1).sum(-1).exp()
    assert tv(target, empirical(images, V) * 0 + 1 / 256) > 0.05  # a non-trivial target

    torch.manual_seed(0)
    codes, _ = generate_sjd(model, layout, [[3, 4, 5]] * N_SAMPLES, SamplingConfig(), SJDConfig(4, "repeat"),
                            processor=proc)
    assert tv(empirical(codes.flatten(1), V), target) < tv_bound(target, N_SAMPLES)

    model, layout = high_entropy_model()
    cfg = WatermarkConfig(num_clusters=8, context=2, clusters=torch.arange(64).remainder(8).tolist())
    greedy = SamplingConfig(guidance_scale=2.0, temperature=0)
    ar, _ = generate(model, layout, [[3, 4], [5]], greedy, processor=WatermarkProcessor(cfg, "k"))
    sjd, _ = generate_sjd(model, layout, [[3, 4], [5]], greedy, SJDConfig(8, "above"),
                          [torch.Generator().manual_seed(i) for i in range(2)], processor=WatermarkProcessor(cfg, "k"))
    assert torch.equal(ar, sjd)


def test_config_round_trip_and_validation(tmp_path):
    cfg = WatermarkConfig(num_clusters=4, context=1, clusters=cluster_codebook(torch.randn(32, 8), 4))
    cfg.save(tmp_path / "watermark.json")
    assert WatermarkConfig.load(tmp_path / "watermark.json") == cfg
    assert sorted(set(cfg.clusters)) == [0, 1, 2, 3]
    codebook = torch.randn(32, 8, generator=torch.Generator().manual_seed(0))
    confusion = confusion_matrix(torch.arange(32).repeat(4), torch.arange(32).repeat(4).roll(1), 32)
    channel = WatermarkConfig(num_clusters=4, clustering="confusion", keying="position", statistic="rank",
                              clusters=cluster_by_confusion(confusion, codebook, 4))
    channel.save(tmp_path / "channel.json")
    assert WatermarkConfig.load(tmp_path / "channel.json") == channel
    assert channel.clusters != cluster_codebook(codebook, 4)  # the channel moved codes
    with pytest.raises(ValueError, match="method must be one of c-reweight"):
        WatermarkConfig(method="stamp")
    for name, bad in (("keying", "time"), ("statistic", "mean"), ("clustering", "spectral")):
        with pytest.raises(ValueError, match=f"watermark {name} must be one of"):
            WatermarkConfig(**{name: bad})
    (tmp_path / "bad.json").write_text(json.dumps({"method": "c-reweight", "strength": 3}))
    with pytest.raises(ValueError, match="unknown watermark config keys"):
        WatermarkConfig.load(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="key"):
        WatermarkProcessor(cfg, "")


# ---- a saved watermarked pipeline: save/load, the CLI, the retokenization channel ----------------------------


@pytest.fixture(scope="module")
def watermarked(tmp_path_factory):
    """The expensive part, once per module: a tiny next-token pipeline with a cluster table, saved to `dir / "m"`
    and reloaded (`pipe`, `again`), and two images generated with key "k" (`dir / "w0.png"`, `dir / "w1.png"`)."""
    from mmgen.data.shapes import all_caption_words
    from mmgen.pipelines import load_pipeline

    tmp_path = tmp_path_factory.mktemp("watermarked")
    tok = tiny_text_tokenizer(["a red circle", " ".join(all_caption_words())])  # channel.py samples shapes prompts
    pipe = tiny_next_token_pipeline(tok, max_seq_len=96, max_text_len=16)
    pipe.watermark = WatermarkConfig(num_clusters=4, context=1,
                                     clusters=cluster_codebook(pipe.vq_model.quantizer.codebook, 4))
    pipe.save_pretrained(tmp_path / "m")
    again = load_pipeline(tmp_path / "m")
    again.set_progress_bar_config(disable=True)
    out = again(prompt="a red circle", num_images_per_prompt=2, watermark_key="k",
                generator=torch.Generator().manual_seed(0))
    for i, im in enumerate(out.images):
        im.save(tmp_path / f"w{i}.png")
    return SimpleNamespace(dir=tmp_path, pipe=pipe, again=again)


def _channel():
    """scripts/watermark_channel.py, the command that measures the retokenization channel of a saved model."""
    spec = importlib.util.spec_from_file_location(
        "watermark_channel", Path(__file__).resolve().parents[1] / "scripts" / "watermark_channel.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _model_copy(watermarked, tmp_path):
    """A private copy of the saved model, for commands that rewrite it."""
    return Path(shutil.copytree(watermarked.dir / "m", tmp_path / "m"))


def test_pipeline_save_load_keeps_the_cluster_table(watermarked):
    assert watermarked.again.watermark == watermarked.pipe.watermark


def test_cli_detect_reports_p_values(watermarked, capsys):
    tmp_path = watermarked.dir
    assert cli.main(["watermark", "detect", str(tmp_path / "w0.png"), str(tmp_path / "w1.png"), "--key", "k",
                     "--model", str(tmp_path / "m"), "--json", "--combine"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["method"] == "c-reweight" and len(result["images"]) == 2
    assert all(0 <= r["p_value"] <= 1 and isinstance(r["watermarked"], bool) for r in result["images"])
    combined = result["combined"]  # one pooled test for the two images
    assert combined["images"] == 2 and 0 <= combined["p_value"] <= 1 and isinstance(combined["watermarked"], bool)
    assert max(r["scored"] for r in result["images"]) <= combined["scored"] <= sum(r["scored"] for r in result["images"])


@pytest.mark.parametrize("args, needle", [(["--key", "k", "{tmp}/notes.txt"], "not a readable image"),
                                          (["{dir}/w0.png"], "--key"),
                                          (["--key", "k", "--fpr", "1.5", "{dir}/w0.png"], "--fpr")],
                         ids=["not-an-image", "no-key", "bad-fpr"])
def test_cli_detect_rejects_bad_input(watermarked, tmp_path, capsys, args, needle):
    (tmp_path / "notes.txt").write_text("not an image")
    args = [a.format(tmp=tmp_path, dir=watermarked.dir) for a in args]
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["watermark", "detect", *args, "--model", str(watermarked.dir / "m")])
    assert exit_info.value.code == 2 and needle in capsys.readouterr().err


def test_detect_converts_other_modes_and_sizes(watermarked, tmp_path):
    Image.new("L", (40, 30)).save(tmp_path / "gray.png")  # other mode and size: converted and resized
    assert len(watermarked.again.detect_watermark([Image.open(tmp_path / "gray.png")], "k")) == 1


def test_retokenization_confusion_counts(watermarked):
    """The retokenization channel of this pipeline: one count per image token, whatever the batch size."""
    retokenization_confusion = _channel().retokenization_confusion
    again = watermarked.again
    counts = retokenization_confusion(again, n_real=3, n_generated=2, batch_size=2, progress=False)
    assert counts.shape == (32, 32) and counts.sum() == 5 * again.layout.num_image_tokens
    assert torch.equal(counts, retokenization_confusion(again, n_real=3, n_generated=2, progress=False))
    with pytest.raises(ValueError, match="n_real and n_generated"):
        retokenization_confusion(again, n_real=0, n_generated=0)


def test_channel_command_writes_confusion_clusters(watermarked, tmp_path):
    """The channel command writes the confusion-clustered table into the model (a copy here)."""
    from mmgen.pipelines import load_pipeline
    channel_main = _channel().main
    model = _model_copy(watermarked, tmp_path)
    channel_main([str(model), "--clusters", "4", "--real", "3", "--generated", "2"])
    saved = load_pipeline(model).watermark
    assert saved.clustering == "confusion" and saved.num_clusters == 4 and len(saved.clusters) == 32


def test_channel_command_rejects_too_many_clusters(watermarked, tmp_path, capsys):
    channel_main = _channel().main
    with pytest.raises(SystemExit):
        channel_main([str(_model_copy(watermarked, tmp_path)), "--clusters", "33"])
    assert "--clusters must be in [1, 32]" in capsys.readouterr().err


def test_distorting_option_is_chosen_per_call_and_detected_with_its_method(watermarked, tmp_path, capsys):
    """`watermark_method="kgw-cluster"` + delta biases the tokens towards the green clusters of the key: the
    token-level test with that method finds it, the saved (c-reweight) config is not changed, and the CLI takes
    the same choice (--watermark-method/--watermark-delta, detect --method)."""
    pipe = watermarked.again
    cfg = pipe.watermark_config("kgw-cluster", 8.0)
    assert (cfg.method, cfg.statistic, cfg.delta, cfg.clusters) == ("kgw-cluster", "green", 8.0, pipe.watermark.clusters)
    assert pipe.watermark.method == "c-reweight"
    saved = pipe.watermark
    try:  # position keys score all 64 positions (the saved context of 1 of 4 clusters scores at most 5)
        pipe.watermark = dataclasses.replace(saved, keying="position", context=0)
        cfg = pipe.watermark_config("kgw-cluster", 8.0)
        out = pipe(prompt=["a red circle"] * 16, watermark_key="k", watermark_method="kgw-cluster",
                   watermark_delta=8.0, generator=torch.Generator().manual_seed(1))
        plain = pipe(prompt=["a red circle"] * 16, watermark_key="k", generator=torch.Generator().manual_seed(1))
        pipe.watermark = cfg  # the same method saved as the model's own: the same tokens
        same = pipe(prompt=["a red circle"] * 16, watermark_key="k", generator=torch.Generator().manual_seed(1))
    finally:
        pipe.watermark = saved
    found = detect_tokens(out.tokens.flatten(1), cfg, "k")
    wrong_key = [d.p_value < 0.01 for d in detect_tokens(out.tokens.flatten(1), cfg, "other")]
    assert sum(d.p_value < 0.01 for d in found) >= 14 and sum(wrong_key) <= 2
    assert torch.equal(out.tokens, same.tokens) and not torch.equal(out.tokens, plain.tokens)
    with pytest.raises(ValueError, match="delta sets the strength of the KGW methods"):
        pipe.watermark_config(delta=2.0)  # c-reweight has no strength
    with pytest.raises(ValueError, match="need a watermark_key"):
        pipe(prompt="a red circle", watermark_method="kgw-cluster")
    with pytest.raises(ValueError, match="method must be one of"):
        pipe.watermark_config("stamp")
    model = str(watermarked.dir / "m")
    cli.main(["generate", "a red circle", "--model", model, "--out", str(tmp_path / "k.png"), "--watermark-key", "k",
              "--watermark-method", "kgw-cluster", "--watermark-delta", "8"])
    capsys.readouterr()
    assert cli.main(["watermark", "detect", str(tmp_path / "k.png"), "--key", "k", "--model", model, "--method",
                     "kgw-cluster", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["method"] == "kgw-cluster" and "green" in result["images"][0]


def test_cli_detect_reads_jpeg_and_webp(watermarked, tmp_path):
    """Published images are rarely PNGs: the detector takes any 8-bit image PIL reads."""
    paths = []
    for fmt in ("JPEG", "WEBP"):
        path = tmp_path / f"w0.{fmt.lower()}"
        Image.open(watermarked.dir / "w0.png").convert("RGB").save(path, fmt, quality=75)
        paths.append(str(path))
    assert cli.main(["watermark", "detect", *paths, "--key", "k", "--model", str(watermarked.dir / "m"),
                     "--json"]) == 0


def test_attack_suite_and_clean_fpr_report(watermarked):
    """The bench's watermark suite on the tiny model: every method x attack (flip included) with rates in range,
    the KGW strength override recorded, the clean-image FPR under several keys, and the watermark's cost against
    plain sampling (AR and SJD), part of it timed inside the processor."""
    from mmgen.bench.watermark import ATTACKS, attack_suite, clean_fpr, overhead

    pipe = watermarked.again
    report = attack_suite(pipe, n_images=4, batch_size=4, delta=5.0, progress=False, overhead_repeats=0,
                          set_sizes=(2, 8))
    assert report["kgw_delta"] == {"kgw-token": 5.0, "kgw-cluster": 5.0} and "flip" in ATTACKS
    for rows in report["methods"].values():
        assert set(rows) == {"tokens", *ATTACKS}
        assert all(set(r["sets"]) == {"2"} and r["sets"]["2"]["sets"] == 2 for r in rows.values())
        assert all(0 <= r["tpr"] <= 1 and 0 <= r["fpr"] <= 1 and 0 <= r["token_match"] <= 1 for r in rows.values())
        assert rows["tokens"]["token_match"] == 1.0
    fpr = clean_fpr(pipe, n_images=6, keys=3, batch_size=6, progress=False)
    assert fpr["images"] == 6 and set(fpr["methods"]) == set(report["methods"])
    assert all(0 <= m["fpr_mean"] <= m["fpr_max"] <= 1 for m in fpr["methods"].values())
    cost = overhead(pipe, batch_sizes=(2,), repeats=1, sjd_window=4, progress=False)
    assert {k for k in cost if k.startswith("batch_")} == {"batch_2/ar", "batch_2/sjd"}
    for row in (cost["batch_2/ar"], cost["batch_2/sjd"]):
        assert set(row["methods"]) == set(report["methods"]) and row["plain_seconds"] > 0
        assert all(0 < m["processor_share"] < 1 for m in row["methods"].values())
