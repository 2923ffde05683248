"""PCA-ordered 1-D tokenizer (tokenizers_vis/pca.py): ids and the protocol, causality of the encoder, nested
dropout at the decoder, a tiny training whose explained variance rises with the prefix, the explained-variance
measure on a case with a known answer, save/load, the training script (resume) and the prefix script."""

import json
import shutil
from pathlib import Path

import pytest
import torch

import tokenizers_vis.pca as pca
from tiny import load_script, tiny_pca_tokenizer, tiny_transformer
from mmgen.config import load_config
from mmgen.eval.tokenizer_metrics import explained_variance, prefix_explained_variance
from mmgen.pipelines import NextTokenPipeline, load_pipeline
from mmgen.text import UnifiedVocab, train_text_tokenizer
from tokenizers_vis.pca import PCATokenizer
from tokenizers_vis.protocol import as_visual_tokenizer, load_tokenizer_component
from tokenizers_vis.seed import random_prefix_lengths

ROOT = Path(__file__).resolve().parents[1]
K = 8  # tokens per image in the tiny model (tiny.PCA_TINY)


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(0)
    return torch.rand(6, 3, 32, 32, generator=g) * 2 - 1


def test_ids_decode_and_protocol(images):
    m = tiny_pca_tokenizer().eval()
    assert as_visual_tokenizer(m) is m and m.kind == "codes" and m.token_shape == (1, K) and m.vocab_size == 16
    ids = m.encode(images)
    assert ids.shape == (6, 1, K) and ids.dtype == torch.long and 0 <= int(ids.min()) and int(ids.max()) < 16
    out = m.decode(ids)
    assert out.shape == (6, 3, 32, 32) and out.abs().max() <= 1
    # deterministic by default, the same for (B, K) ids, and each image's decode independent of its batch
    assert torch.equal(m.decode(ids), out) and torch.equal(m.decode(ids[:, 0]), out)
    assert torch.allclose(m.decode(ids[2:3]), out[2:3], atol=1e-5)
    assert torch.equal(m.decode_tokens(ids), out) and torch.equal(m.encode_tokens(images), ids)
    # a generator draws other noise: another sample from the same tokens
    other = m.decode(ids, generator=torch.Generator().manual_seed(1))
    assert not torch.allclose(other, out)
    assert not torch.allclose(m.decode(ids, num_steps=2), out)


def test_later_queries_never_change_earlier_tokens(images):
    """Query i attends to patches and queries <= i, and patches never attend to queries: moving the learned
    queries j >= 4 moves tokens 4.., never tokens 0..3. With a full (non-causal) mask the same check fails."""
    m = tiny_pca_tokenizer(encoder_layers=2).eval()

    def moved():
        with torch.no_grad():
            before = m.token_features(images).clone()
            saved = m.encoder.queries.data.clone()
            m.encoder.queries.data[4:] += torch.randn_like(m.encoder.queries.data[4:])
            after = m.token_features(images)
            m.encoder.queries.data.copy_(saved)
        return (after - before).abs().amax(dim=(0, 1, 2))  # (K,) largest change per token

    change = moved()
    assert change[:4].max() < 1e-6 and change[4:].min() > 1e-3, change
    full = lambda P, K, device=None: torch.ones(1, 1, P + K, P + K, dtype=torch.bool, device=device)  # noqa: E731
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pca, "encoder_mask", full)
        assert moved()[:4].max() > 1e-3  # the check has power


def test_prefix_decoding_reads_only_the_prefix_and_uses_the_null_token(images):
    m = tiny_pca_tokenizer().eval()
    ids = m.encode(images)
    other = (ids + 5) % 16
    for k in (1, 3, K - 1):
        mixed = torch.cat([ids[..., :k], other[..., k:]], -1)
        assert torch.equal(m.decode_prefix(mixed, k), m.decode_prefix(ids, k))
        assert torch.equal(m.decode_prefix(ids[..., :k], k), m.decode_prefix(ids, k))  # later ids need not exist
    assert not torch.allclose(m.decode_prefix(other, K), m.decode_prefix(ids, K))
    # the dropped tokens are the learned null token: moving it moves prefixes, never the full decode
    z = m.quantizer.lookup(ids).squeeze(2).transpose(1, 2)
    cond = m.condition(z, torch.tensor([1, 2, 3, 8, 8, 8]))
    assert torch.equal(cond[0, 1:], m.null_token.expand(K - 1, -1)) and torch.equal(cond[0, :1], z[0, :1])
    assert torch.equal(cond[3:], z[3:])
    full, prefix = m.decode(ids), m.decode_prefix(ids, 3)
    with torch.no_grad():
        m.null_token.add_(1.0)
    assert torch.equal(m.decode(ids), full) and not torch.allclose(m.decode_prefix(ids, 3), prefix)


def test_explained_variance_on_a_known_case():
    """Reconstructions mean + a (x - mean) explain 1 - (1 - a)^2 of the variance; a tokenizer whose prefix k gives
    a = k / K has EV(k) = 1 - (1 - k / K)^2 and gains EV(k) - EV(k - 1) = (2K - 2k + 1) / K^2, falling."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(10, 3, 4, 4, generator=g)
    mean = x.mean(0, keepdim=True)
    assert explained_variance(x, x) == pytest.approx(1.0)
    assert explained_variance(x, mean.expand_as(x)) == pytest.approx(0.0, abs=1e-12)
    assert explained_variance(x, mean + 0.5 * (x - mean)) == pytest.approx(0.75)

    class Blend:
        num_tokens, training = 4, False

        def eval(self):
            return self

        def train(self, mode=True):
            return self

        def encode(self, imgs):  # the id is the image's index in x
            return torch.stack([torch.nonzero((x == im).flatten(1).all(1))[0] for im in imgs])[:, None]

        def decode_prefix(self, ids, k):
            return mean + k / 4 * (x[ids[:, 0, 0]] - mean)

    r = prefix_explained_variance(Blend(), x, batch_size=3)
    assert r["explained_variance"] == pytest.approx({k: 1 - (1 - k / 4) ** 2 for k in range(1, 5)})
    assert r["gain"] == pytest.approx({k: (2 * 4 - 2 * k + 1) / 16 for k in range(1, 5)})
    with pytest.raises(ValueError, match=r"prefixes must be ints in \[1, 4\]"):
        prefix_explained_variance(Blend(), x, prefixes=[0, 2])
    with pytest.raises(ValueError, match="same"):
        explained_variance(x, x[:, :2])
    with pytest.raises(ValueError, match="variance is 0"):
        explained_variance(mean.expand_as(x), x)


def test_tiny_training_loss_falls_and_prefixes_explain_more():
    """16 flat-colour images, 4 tokens of 4 codes: one token tells at most 4 colours apart, so later tokens add
    what it cannot. 150 continuous warm-up steps, then 150 through the codebook; nested dropout throughout."""
    g = torch.Generator().manual_seed(1)
    images = (torch.rand(16, 3, 1, 1, generator=g) * 1.6 - 0.8).expand(16, 3, 32, 32).contiguous()
    m = tiny_pca_tokenizer(num_tokens=4, dim=64, heads=4, decoder_layers=2, num_codes=4, sample_steps=8,
                           time_mean=2.0)
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    losses = []
    for i in range(300):
        out = m(images, random_prefix_lengths(16, 4, 0.0, gen), gen, quantize=i >= 150)
        opt.zero_grad()
        (out.flow_loss + out.quant_loss).backward()
        opt.step()
        losses.append(out.flow_loss.item())
    first, last = sum(losses[:20]) / 20, sum(losses[-20:]) / 20
    assert last < first / 3, (first, last)  # 0.19 -> 0.037 here
    assert out.perplexity > 2.5  # the codes stayed apart
    ev = prefix_explained_variance(m, images)["explained_variance"]
    assert ev[4] > ev[1] + 0.15 and ev[4] > 0.1, ev  # -0.07, 0.06, 0.20, 0.19 here


def test_save_load_bit_identical(images, tmp_path):
    m = tiny_pca_tokenizer()
    m(images)  # a training forward restarts codes: the state differs from a fresh init
    m.eval()
    m.save_pretrained(tmp_path / "pca")
    again = load_tokenizer_component(tmp_path / "pca")
    assert isinstance(again, PCATokenizer) and again.config.num_tokens == K and again.config.sample_steps == 4
    sd, sd2 = m.state_dict(), again.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    ids = m.encode(images)
    assert torch.equal(again.encode(images), ids)
    assert torch.equal(again.decode(ids), m.decode(ids)) and torch.equal(again.decode_prefix(ids, 2),
                                                                         m.decode_prefix(ids, 2))


def test_bad_input_is_refused(images):
    m = tiny_pca_tokenizer().eval()
    ids = m.encode(images)
    with pytest.raises(ValueError, match=r"k must be an int in \[1, 8\]"):
        m.decode_prefix(ids, 0)
    with pytest.raises(ValueError, match=r"k must be an int in \[1, 3\]"):
        m.decode_prefix(ids[..., :3], 4)
    with pytest.raises(ValueError, match="use decode_prefix"):
        m.decode(ids[..., :3])
    with pytest.raises(ValueError, match=r"ids must lie in \[0, 16\)"):
        m.decode(ids + 16)
    with pytest.raises(ValueError, match=r"ids must have shape \(B, n\) or \(B, 1, n\) with 1 <= n <= 8"):
        m.decode(torch.zeros(2, 1, 9, dtype=torch.long))
    with pytest.raises(ValueError, match="num_steps must be a positive int"):
        m.decode(ids, num_steps=0)
    with pytest.raises(ValueError, match=r"images must be a float tensor \(B, 3, 32, 32\)"):
        m.encode(images[..., :16])
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        m.encode(images * 255)
    with pytest.raises(ValueError, match=r"prefix_lengths must be \(B,\) = \(6,\) ints in \[1, 8\]"):
        m(images, torch.tensor([0, 1, 2, 3, 4, 5]))
    with pytest.raises(ValueError, match="multiple of patch_size"):
        PCATokenizer(image_size=30, patch_size=8)
    with pytest.raises(ValueError, match="num_tokens must be a positive int"):
        PCATokenizer(num_tokens=0)


TOK = ["model_type=pca", "model.image_size=32", "model.num_tokens=8", "model.dim=32", "model.heads=2",
       "model.encoder_layers=1", "model.decoder_layers=1", "model.num_codes=16", "model.code_dim=4",
       "model.sample_steps=2", "pca.continuous_steps=1", "pca.ev_images=4", "data.size=32", "data.image_size=32",
       "train.batch_size=4", "train.eval_images=4", "train.log_every=1", "train.ckpt_every=2", "train.warmup=1"]


def run(capsys, *args):
    """train_tokenizer.py's main in-process; returns what it printed."""
    load_script("train_tokenizer").main(list(args))
    out = capsys.readouterr()
    return out.out + out.err


def test_train_script_runs_and_resumes_exactly(tmp_path, capsys):
    out = tmp_path / "run"
    run(capsys, *TOK, f"train.out_dir={out}", "train.steps=3")
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [0, 1, 2] and {"flow", "quant", "perplexity"} <= set(log[0])
    assert log[0]["quant"] == 0 and log[1]["quant"] > 0  # step 0 is the continuous warm-up
    metrics = json.loads((out / "final" / "metrics.json").read_text())
    assert set(metrics) >= {"psnr", "ssim", "codebook_usage", "prefix"}
    assert list(metrics["prefix"]["explained_variance"]) == [str(k) for k in range(1, K + 1)]
    # a run stopped after its checkpoint at step 2 (its log already past it) resumes with the same losses
    cut = tmp_path / "cut"
    shutil.copytree(out, cut)
    shutil.rmtree(cut / "step-0000003")
    shutil.rmtree(cut / "final")
    (cut / "latest").write_text("step-0000002")
    assert "at step 2" in run(capsys, *TOK, f"train.out_dir={cut}", "train.steps=3")
    strip = lambda r: {k: v for k, v in r.items() if k not in ("elapsed_s", "cpu_s")}  # noqa: E731
    assert [strip(json.loads(line)) for line in (cut / "log.jsonl").read_text().splitlines()] == [strip(r) for r in log]
    a = PCATokenizer.from_pretrained(out / "final").state_dict()
    b = PCATokenizer.from_pretrained(cut / "final").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)

    # the generator script reads the saved class and trains a next-token decoder on the (1, K) codes, unchanged
    gen = tmp_path / "gen"
    load_script("train_generator").main(["paradigm=next_token", f"tokenizer={out / 'final'}", "model.dim=32",
                                         "model.n_layers=1", "model.n_heads=4", "data.size=32", "data.image_size=32",
                                         "train.batch_size=4", "train.steps=2", "train.log_every=1",
                                         "train.warmup=1", f"train.out_dir={gen}"])
    pipe = load_pipeline(gen / "pipeline")
    pipe.set_progress_bar_config(disable=True)
    assert isinstance(pipe.vq_model, PCATokenizer)
    images = pipe(prompt="a red circle", output_type="pt", generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (1, 3, 32, 32)
    capsys.readouterr()

    # the prefix script: explained variance per prefix and decodes from the first --num-tokens tokens
    script = load_script("prefix_variance")
    script.main(["--tokenizer", str(out / "final"), "--images", "4", "--num-tokens", "2", "8", "--json",
                 "--out", str(tmp_path / "grid.png"), "--rows", "2"])
    result = json.loads(capsys.readouterr().out)
    assert list(result["explained_variance"]) == ["2", "8"] and result["tokens"] == K
    assert (tmp_path / "grid.png").is_file()
    with pytest.raises(SystemExit):
        script.main(["--tokenizer", str(out / "final"), "--num-tokens", "9"])
    assert "--num-tokens must lie in [1, 8]" in capsys.readouterr().err


def test_shipped_config_builds_the_64px_tokenizer():
    script = load_script("train_tokenizer")
    cfg = load_config(script.TokenizerRunConfig, ROOT / "configs" / "pca_shapes.yaml")
    m = script.build_model(cfg)
    assert isinstance(m, PCATokenizer) and m.grid_size == (1, 32) and m.image_size == 64
    assert m.quantizer.codebook.shape == (1024, 16) and cfg.pca.continuous_steps < cfg.train.steps


def test_next_token_pipeline_generates_with_pca_tokens(tmp_path):
    """The next-token paradigm reads the PCA tokenizer's (1, K) codes as it reads SEED's, unchanged."""
    captions = ["a red circle", "two green stars"]
    vq = tiny_pca_tokenizer().eval()
    tok = train_text_tokenizer(captions)
    vocab = UnifiedVocab(text_vocab_size=len(tok), image_vocab_size=vq.vocab_size)
    pipe = NextTokenPipeline(transformer=tiny_transformer(vocab.size, 32), vq_model=vq, tokenizer=tok, max_text_len=8)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(prompt=captions, output_type="pt", generator=torch.Generator().manual_seed(0))
    assert out.images.shape == (2, 3, 32, 32) and out.tokens.shape == (2, 1, K)
    with torch.no_grad():
        assert torch.equal(out.images, (vq.decode(out.tokens) / 2 + 0.5).clamp(0, 1))
