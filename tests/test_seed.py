"""SEED-style 1D causal tokenizer (tokenizers_vis/seed.py): ids and shapes, causality at both ends, the two
training stages on tiny overfit runs, save/load, the training script (both stages, resume) and next-token
generation with SEED tokens."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from tiny import load_script, tiny_seed_tokenizer, tiny_transformer
from mmgen.data.shapes import ShapesDataset
from mmgen.eval.image_metrics import psnr
from mmgen.pipelines import NextTokenPipeline, load_pipeline
from mmgen.text import UnifiedVocab, encode_prompts, train_text_tokenizer
from tokenizers_vis.seed import (SEEDTextEncoder, SEEDTokenizer, contrastive_loss, pad_text,
                                 random_prefix_lengths)

ROOT = Path(__file__).resolve().parents[1]
N = 8  # tokens per image in the tiny models (tiny.SEED_TINY)


@pytest.fixture(scope="module")
def data():
    ds = ShapesDataset(size=8, seed=0, image_size=32)
    items = [ds[i] for i in range(8)]
    return torch.stack([it["image"] for it in items]), [it["caption"] for it in items]


def test_ids_shapes_and_errors(data):
    images, _ = data
    m = tiny_seed_tokenizer().eval()
    assert m.grid_size == (1, N) and m.vocab_size == 16 and m.num_tokens == N
    ids = m.encode(images)
    assert ids.shape == (8, 1, N) and ids.dtype == torch.long and 0 <= int(ids.min()) and int(ids.max()) < 16
    out = m.decode(ids)
    assert out.shape == (8, 3, 32, 32) and out.abs().max() <= 1
    assert torch.equal(m.decode(ids[:, 0]), out)  # (B, N) and (B, 1, N) are the same ids
    assert m.quantizer.codebook.shape == (16, 4)
    with pytest.raises(ValueError, match="decode_prefix"):
        m.decode(ids[..., :3])
    with pytest.raises(ValueError, match=r"k must be an int in \[1, 3\]"):
        m.decode_prefix(ids[..., :3], 4)
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        m.encode(images * 255)
    with pytest.raises(ValueError, match="images must be a float tensor"):
        m.encode(images[:, :, :16])
    with pytest.raises(ValueError, match="backbone_taps"):
        SEEDTokenizer(backbone_taps=(10, 4))
    with pytest.raises(ValueError, match="heads"):
        SEEDTokenizer(dim=30, heads=4)


def test_later_queries_never_change_earlier_codes(data):
    """The Q-Former's query mask is causal: moving the learned queries j >= 4 moves later codes, never the
    codes (or embeddings) before them, and embedding i has zero gradient from queries after i."""
    images, _ = data
    m = tiny_seed_tokenizer().eval()
    emb, ids = m.query_embeddings(images).detach(), m.encode(images)
    with torch.no_grad():
        m.qformer.queries[4:] += 3 * torch.randn(N - 4, 32, generator=torch.Generator().manual_seed(1))
    emb2, ids2 = m.query_embeddings(images).detach(), m.encode(images)
    assert torch.equal(ids2[..., :4], ids[..., :4]) and torch.equal(emb2[:, :4], emb[:, :4])
    assert not torch.equal(ids2[..., 4:], ids[..., 4:])  # the perturbation did reach the later tokens

    q, w = m.qformer.queries, torch.randn(32, generator=torch.Generator().manual_seed(2))
    for i in range(N):
        # a random projection: a plain sum of a LayerNorm output is constant, its gradient always zero
        (g,) = torch.autograd.grad((m.query_embeddings(images[:2])[:, i] @ w).sum(), q)
        seen = g.abs().sum(1) > 0  # (N,) which queries row i depends on
        assert seen.tolist() == [j <= i for j in range(N)]


def test_prefix_decoding_reads_only_the_prefix(data):
    images, _ = data
    m = tiny_seed_tokenizer().eval()
    ids = m.encode(images)
    other = ids.clone()
    other[..., 3:] = (other[..., 3:] + 5) % 16
    with torch.no_grad():
        # the embedding decoder is causal: a changed tail leaves earlier embeddings alone
        torch.testing.assert_close(m.embeddings_from_ids(other)[:, :3], m.embeddings_from_ids(ids)[:, :3])
        torch.testing.assert_close(m.embeddings_from_ids(ids[..., :3]), m.embeddings_from_ids(ids)[:, :3])
        assert torch.equal(m.decode_prefix(other, 3), m.decode_prefix(ids, 3))
        assert not torch.equal(m.decode_prefix(ids, 1), m.decode_prefix(ids, N))
        # training hides later codes per image: the same as decoding the truncated prefix
        k = torch.tensor([1, 2, 3, 4, 5, 6, 7, 8])
        masked = m.pixel_decoder(m.code_vectors(ids), k)
        for b in range(8):
            torch.testing.assert_close(masked[b].clamp(-1, 1), m.decode_prefix(ids[b:b + 1], int(k[b]))[0],
                                       atol=1e-5, rtol=1e-5)


def test_random_prefix_lengths():
    k = random_prefix_lengths(4000, 32, 0.5, torch.Generator().manual_seed(0))
    assert int(k.min()) == 1 and int(k.max()) == 32
    full = (k == 32).float().mean().item()
    assert abs(full - (0.5 + 0.5 / 32)) < 0.03  # P(k = N) = p + (1 - p) / N
    assert torch.equal(k, random_prefix_lengths(4000, 32, 0.5, torch.Generator().manual_seed(0)))


def test_stage1_contrastive_loss_falls(data):
    images, captions = data
    m = tiny_seed_tokenizer()
    tok = train_text_tokenizer(captions)
    ids = pad_text(encode_prompts(tok, captions, 16), 16)
    same = (ids[:, None] == ids[None]).all(-1)
    torch.manual_seed(0)
    text = SEEDTextEncoder(len(tok), max_len=16, dim=32, n_layers=1, n_heads=2, proj_dim=16)
    opt = torch.optim.Adam(list(m.qformer.parameters()) + list(m.image_proj.parameters()) + list(text.parameters()),
                           lr=3e-3)
    losses = []
    for _ in range(40):
        loss = contrastive_loss(m.image_embedding(images), text(ids), text.logit_scale, same)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0], losses
    with torch.no_grad():
        sim = m.image_embedding(images) @ text(ids).t()
    assert same[torch.arange(8), sim.argmax(1)].all()  # every image retrieves its own caption


def test_stage2_reconstructs_each_image_and_prefixes_refine(data):
    """Stage 2 on a tiny overfit run: the losses fall, the frozen Q-Former stays put, and the decoder draws each
    image rather than the mean image (what the pixel decoder collapsed to before the detail paths: every
    prefix decoded to the same background canvas), with PSNR rising from 1 token to all N."""
    images, _ = data
    m = tiny_seed_tokenizer()
    m.requires_grad_(False)
    parts = [m.detail_encoder, m.encode_head, m.quantizer, m.embed_decoder, m.pixel_decoder]
    for p in parts:
        p.requires_grad_(True)
    qformer = {k: v.clone() for k, v in m.qformer.state_dict().items()}
    opt = torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=3e-3)
    rec, emb = [], []
    for step in range(200):
        out = m(images, random_prefix_lengths(8, N, 0.5, torch.Generator().manual_seed(step)))
        r = F.mse_loss(out.recon, images)
        loss = r + out.embed_loss + out.quant_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        rec.append(r.item())
        emb.append(out.embed_loss.item())
    assert sum(rec[-5:]) / 5 < 0.5 * rec[0], rec
    assert sum(emb[-5:]) / 5 < 0.5 * emb[0], emb
    assert all(torch.equal(v, m.qformer.state_dict()[k]) for k, v in qformer.items())  # frozen stays put
    m.eval()
    with torch.no_grad():
        ids = m.encode(images)
        full, first = psnr(m.decode(ids), images).item(), psnr(m.decode_prefix(ids, 1), images).item()
    mean = psnr(images.mean(0, keepdim=True).expand_as(images), images).item()
    assert full > mean + 2.0, (full, mean)  # 25.0 vs 20.9 dB here; the old decoder stayed at 20.5
    assert full > first + 1.0, (full, first)  # 25.0 vs 20.5 dB


def test_save_load_bit_identical_without_backbone(data, tmp_path):
    images, _ = data
    m = tiny_seed_tokenizer()
    m.train()
    m(images)  # the first training forward restarts codes: the state differs from a fresh init
    m.eval()
    m.save_pretrained(tmp_path / "seed")
    keys = load_file(tmp_path / "seed" / "diffusion_pytorch_model.safetensors").keys()
    assert not any("backbone" in k or k.startswith("_") for k in keys)
    assert (tmp_path / "seed" / "diffusion_pytorch_model.safetensors").stat().st_size < 2_000_000  # no 4.6M-param net
    again = SEEDTokenizer.from_pretrained(tmp_path / "seed").eval()
    assert again.config.backbone_taps == (4, 10) and again.config.decoder_channel_mult == (1, 2, 2)
    sd, sd2 = m.state_dict(), again.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    ids = m.encode(images)
    assert torch.equal(again.encode(images), ids)
    with torch.no_grad():
        assert torch.equal(again.decode(ids), m.decode(ids))

    text = SEEDTextEncoder(20, max_len=8, dim=32, n_layers=1, n_heads=2, proj_dim=16)
    text.save_pretrained(tmp_path / "text")
    t = torch.tensor([[3, 4, 5, 0], [6, 0, 0, 0]])
    assert torch.equal(SEEDTextEncoder.from_pretrained(tmp_path / "text")(t), text(t))


TOK = ["model_type=seed", "model.image_size=32", "model.num_queries=8", "model.dim=32", "model.heads=2",
       "model.qformer_layers=1", "model.proj_dim=16", "model.num_codes=16", "model.code_dim=4",
       "model.embed_decoder_layers=1", "model.decoder_layers=1", "model.decoder_base_channels=8",
       "model.decoder_channel_mult=[1,2,2]", "seed.text_encoder.dim=32", "seed.text_encoder.n_layers=1",
       "seed.text_encoder.n_heads=2", "seed.retrieval_batch=8", "data.size=32", "data.image_size=32",
       "train.batch_size=8", "train.eval_images=16", "train.log_every=1", "train.ckpt_every=2", "train.warmup=1"]
STAGE2 = ["model_type=seed", "seed.stage=2", "loss.perceptual_weight=0", "loss.disc_start=100000",
          "loss.disc_channels=8", "data.size=32", "data.image_size=32", "train.batch_size=8", "train.eval_images=16",
          "train.log_every=1", "train.ckpt_every=2", "train.warmup=1"]


def run(capsys, *args):
    """train_tokenizer.py's main in-process; returns what it printed."""
    load_script("train_tokenizer").main(list(args))
    out = capsys.readouterr()
    return out.out + out.err


def test_train_script_both_stages_and_resume(tmp_path, capsys):
    s1, s2 = tmp_path / "s1", tmp_path / "s2"
    run(capsys, *TOK, f"train.out_dir={s1}", "train.steps=3")
    log = [json.loads(line) for line in (s1 / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [0, 1, 2] and (s1 / "latest").read_text() == "step-0000003"
    m1 = json.loads((s1 / "final" / "metrics.json").read_text())
    assert set(m1) >= {"retrieval_i2t_top1", "retrieval_t2i_top1"} and m1["retrieval_batch"] == 8
    assert (s1 / "final" / "text_encoder" / "config.json").is_file()
    assert (s1 / "final" / "text_tokenizer" / "tokenizer.json").is_file()
    # stage 1 runs the one training loop: rank_spread in its checkpoints, and a run stopped after its checkpoint
    # at step 2 (its log already past it) resumes with the same losses, each step logged once
    assert json.loads((s1 / "step-0000003" / "state.json").read_text())["extra"]["rank_spread"] == 0.0
    cut = tmp_path / "s1_cut"
    shutil.copytree(s1, cut)
    shutil.rmtree(cut / "step-0000003")
    shutil.rmtree(cut / "final")
    (cut / "latest").write_text("step-0000002")
    assert "at step 2" in run(capsys, *TOK, f"train.out_dir={cut}", "train.steps=3")
    assert (cut / "log.jsonl").read_text().count('"step": 2,') == 1
    assert [{k: v for k, v in json.loads(line).items() if k not in ("elapsed_s", "cpu_s")}
            for line in (cut / "log.jsonl").read_text().splitlines()] == [
        {k: v for k, v in r.items() if k not in ("elapsed_s", "cpu_s")} for r in log]

    first = run(capsys, *STAGE2, f"init_from={s1 / 'final'}", f"train.out_dir={s2}", "train.steps=2")
    assert "initialised from" in first
    resumed = run(capsys, *STAGE2, f"init_from={s1 / 'final'}", f"train.out_dir={s2}", "train.steps=3")
    assert "resumed from" in resumed and "at step 2" in resumed
    log = [json.loads(line) for line in (s2 / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [0, 1, 2] and "embed" in log[0]
    m2 = json.loads((s2 / "final" / "metrics.json").read_text())
    assert set(m2) >= {"psnr", "ssim", "codebook_usage", "psnr_prefix_1", "psnr_prefix_4", "psnr_prefix_8"}
    # stage 2 took stage 1's config and kept its Q-Former frozen; the codebook and decoders trained
    assert SEEDTokenizer.from_pretrained(s2 / "final").config.num_queries == 8
    w1 = load_file(s1 / "final" / "diffusion_pytorch_model.safetensors")
    w2 = load_file(s2 / "final" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(w1[k], w2[k]) for k in w1 if k.startswith("qformer."))
    assert not torch.equal(w1["pixel_decoder.queries"], w2["pixel_decoder.queries"])

    # the generator script reads the saved class and trains a next-token decoder on the 1-D SEED codes
    gen = tmp_path / "gen"
    load_script("train_generator").main(["paradigm=next_token", f"tokenizer={s2 / 'final'}", "model.dim=32",
                                         "model.n_layers=1", "model.n_heads=4", "data.size=32", "data.image_size=32",
                                         "train.batch_size=8", "train.steps=3", "train.log_every=1",
                                         "train.warmup=1", f"train.out_dir={gen}"])
    pipe = load_pipeline(gen / "pipeline")
    pipe.set_progress_bar_config(disable=True)
    assert isinstance(pipe.vq_model, SEEDTokenizer)
    out = pipe(prompt="a red circle", output_type="pt", generator=torch.Generator().manual_seed(0))
    assert out.nfe == 8 and out.tokens.shape == (1, 1, 8) and out.images.shape == (1, 3, 32, 32)
    # a fresh process (nothing imported beforehand) loads it from the CLI
    proc = subprocess.run([sys.executable, "-m", "mmgen.cli", "generate", "a red circle", "--model",
                           str(gen / "pipeline"), "--out", str(tmp_path / "seed.png"), "--json"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout)["nfe_per_image"] == 8 and (tmp_path / "seed.png").is_file()


def test_stage2_needs_a_stage1_tokenizer(tmp_path):
    script_module = load_script("train_tokenizer")
    with pytest.raises(ValueError, match="seed stage 2 needs init_from"):
        script_module.main([*STAGE2, f"train.out_dir={tmp_path}", "train.steps=1"])
    with pytest.raises(ValueError, match="seed.stage must be 1"):
        script_module.main(["model_type=seed", "seed.stage=3", f"train.out_dir={tmp_path}"])


def test_next_token_pipeline_generates_with_seed_tokens(tmp_path):
    captions = ["a red circle", "two green stars"]
    vq = tiny_seed_tokenizer().eval()
    tok = train_text_tokenizer(captions)
    vocab = UnifiedVocab(text_vocab_size=len(tok), image_vocab_size=vq.vocab_size)
    tr = tiny_transformer(vocab.size, 32)
    pipe = NextTokenPipeline(transformer=tr, vq_model=vq, tokenizer=tok, max_text_len=8)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(prompt=captions, guidance_scale=2.0, output_type="pt", generator=torch.Generator().manual_seed(0))
    assert out.images.shape == (2, 3, 32, 32) and out.nfe == N and out.tokens.shape == (2, 1, N)
    with torch.no_grad():
        # the SEED decoder drew them; output_type "pt" is in [0, 1], as diffusers' postprocess gives it
        assert torch.equal(out.images, (vq.decode(out.tokens) / 2 + 0.5).clamp(0, 1))
    pipe.save_pretrained(tmp_path)
    again = load_pipeline(tmp_path)
    again.set_progress_bar_config(disable=True)
    out2 = again(prompt=captions, guidance_scale=2.0, output_type="pt", generator=torch.Generator().manual_seed(0))
    assert torch.equal(out2.tokens, out.tokens) and torch.equal(out2.images, out.images)


def test_prefix_figure_script(tmp_path, capsys):
    """scripts/seed_prefixes.py decodes held-out images from each prefix: one PSNR per prefix, the full
    prefix equal to plain decoding, a grid of rows x (1 + prefixes) images, and a named error for a bad k."""
    script = load_script("seed_prefixes")
    tiny_seed_tokenizer().save_pretrained(tmp_path / "tok")
    out = tmp_path / "prefixes.png"
    script.main(["--tokenizer", str(tmp_path / "tok"), "--prefixes", "2", "8", "--rows", "2", "--images", "4",
                 "--out", str(out), "--json"])
    result = json.loads(capsys.readouterr().out)
    assert list(result["psnr_by_prefix"]) == ["2", "8"] and result["tokens"] == N
    from PIL import Image
    assert Image.open(out).size == (32 * 3, 32 * 2) and not list(tmp_path.glob("*.tmp*"))
    tok = SEEDTokenizer.from_pretrained(tmp_path / "tok").eval()
    imgs = torch.stack([ShapesDataset("heldout", size=4, seed=0, image_size=32)[i]["image"] for i in range(4)])
    with torch.no_grad():
        full = psnr(tok.decode(tok.encode(imgs)), imgs).item()
    assert result["psnr_by_prefix"]["8"] == pytest.approx(full, abs=1e-3)
    with pytest.raises(SystemExit):
        script.main(["--tokenizer", str(tmp_path / "tok"), "--prefixes", "9"])
    assert "--prefixes must lie in [1, 8]" in capsys.readouterr().err
