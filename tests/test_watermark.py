"""Watermark: distortion-freeness, detector false-positive rate, detection power, SJD composition, I/O."""

import itertools
import json
import subprocess
import sys

import pytest
import torch
from PIL import Image

from mmgen import cli
from mmgen.paradigms.next_token import NextTokenLayout, generate, generate_sjd
from mmgen.sampling.logits import SamplingConfig
from mmgen.sampling.sjd import SJDConfig
from mmgen.watermark import (WatermarkConfig, WatermarkProcessor, alpha_reweight, cluster_codebook, detect_tokens,
                             kmeans)
from mmgen.watermark.core import binomial_sf, contexts
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


def _average_over_keys(method, logits, n_keys=4000):
    cfg = WatermarkConfig(method=method, num_clusters=4, context=1, clusters=CLUSTERS8)
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
    from mmgen.watermark import KeyedPermutations
    perms, naive = KeyedPermutations("the-key", 8), []
    for row in cfg.symbols(seqs).tolist():
        ctx = contexts(row, 2)
        green = sum(int(perms.ranks(c)[s] >= 4) for s, c in zip(row, ctx))
        naive.append(binomial_sf(green, len(row), 0.5))
    assert (torch.tensor(naive) < 0.01).float().mean() > 0.01


def high_entropy_model():
    torch.manual_seed(0)
    from mmgen.models.transformer import Transformer
    from mmgen.text import UnifiedVocab
    layout = NextTokenLayout(UnifiedVocab(text_vocab_size=10, image_vocab_size=64), max_text_len=4, grid=(8, 8))
    model = Transformer(vocab_size=layout.vocab.size, dim=32, n_layers=2, n_heads=4, max_seq_len=layout.seq_len)
    return model.eval(), layout


@pytest.mark.parametrize("method", ["c-reweight", "token-reweight", "kgw-token", "kgw-cluster"])
def test_watermark_is_detected_in_generated_tokens(method):
    model, layout = high_entropy_model()
    clusters = kmeans(model.tok_emb.weight[-64:].detach(), 8).tolist()
    cfg = WatermarkConfig(method=method, num_clusters=8, context=2, clusters=clusters)
    gens = [torch.Generator().manual_seed(i) for i in range(40)]
    codes, _ = generate(model, layout, [[3, 4]] * 40, SamplingConfig(), gens, processor=WatermarkProcessor(cfg, "k1"))
    hits = [d.p_value < 0.01 for d in detect_tokens(codes.flatten(1), cfg, "k1")]
    wrong_key = [d.p_value < 0.01 for d in detect_tokens(codes.flatten(1), cfg, "k2")]
    assert sum(hits) >= 36 and sum(wrong_key) <= 2


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
    with pytest.raises(ValueError, match="method must be one of c-reweight"):
        WatermarkConfig(method="stamp")
    (tmp_path / "bad.json").write_text(json.dumps({"method": "c-reweight", "strength": 3}))
    with pytest.raises(ValueError, match="unknown watermark config keys"):
        WatermarkConfig.load(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="key"):
        WatermarkProcessor(cfg, "")


def test_pipeline_and_cli_watermark(tmp_path, capsys):
    """Pipeline save/load keeps the cluster table; the CLI detects, reports p-values, rejects bad input."""
    from test_pipeline_cli import CAPTIONS  # noqa: F401  (same tiny components)
    from mmgen.models.transformer import Transformer
    from mmgen.pipelines import NextTokenPipeline, load_pipeline
    from mmgen.text import UnifiedVocab, train_text_tokenizer
    from tokenizers_vis.vqgan import VQGAN

    torch.manual_seed(0)
    vq = VQGAN(base_channels=8, channel_mult=(1, 2), num_res_blocks=1, embed_dim=8, num_codes=32, code_dim=4,
               image_size=16)
    tok = train_text_tokenizer(["a red circle"])
    tr = Transformer(vocab_size=UnifiedVocab(len(tok), vq.vocab_size).size, dim=32, n_layers=2, n_heads=4,
                     max_seq_len=96)
    pipe = NextTokenPipeline(transformer=tr.eval(), vq_model=vq.eval(), tokenizer=tok, max_text_len=8)
    pipe.watermark = WatermarkConfig(num_clusters=4, context=1,
                                     clusters=cluster_codebook(vq.quantizer.codebook, 4))
    pipe.save_pretrained(tmp_path / "m")
    again = load_pipeline(tmp_path / "m")
    assert again.watermark == pipe.watermark
    again.set_progress_bar_config(disable=True)
    out = again(prompt="a red circle", num_images_per_prompt=2, watermark_key="k",
                generator=torch.Generator().manual_seed(0))
    for i, im in enumerate(out.images):
        im.save(tmp_path / f"w{i}.png")
    proc = subprocess.run([sys.executable, "-m", "mmgen.cli", "watermark", "detect", str(tmp_path / "w0.png"),
                           str(tmp_path / "w1.png"), "--key", "k", "--model", str(tmp_path / "m"), "--json"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["method"] == "c-reweight" and len(result["images"]) == 2
    assert all(0 <= r["p_value"] <= 1 and isinstance(r["watermarked"], bool) for r in result["images"])
    (tmp_path / "notes.txt").write_text("not an image")
    for args, needle in ((["--key", "k", str(tmp_path / "notes.txt")], "not a readable image"),
                         ([str(tmp_path / "w0.png")], "--key"),
                         (["--key", "k", "--fpr", "1.5", str(tmp_path / "w0.png")], "--fpr")):
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["watermark", "detect", *args, "--model", str(tmp_path / "m")])
        assert exit_info.value.code == 2 and needle in capsys.readouterr().err
    Image.new("L", (40, 30)).save(tmp_path / "gray.png")  # other mode and size: converted and resized
    assert len(again.detect_watermark([Image.open(tmp_path / "gray.png")], "k")) == 1
