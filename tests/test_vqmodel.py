"""A diffusers `VQModel` behind the visual tokenizer protocol: codes and decoding agree with the model's own
quantize -> decode path, `scripts/train_generator.py` trains a next-token decoder on its codes from a saved
directory, and the saved pipeline generates and detects its watermark with the VQModel inside."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import VQModel

from mmgen.pipelines import load_pipeline
from mmgen.pipelines.base import generators_from_seed
from tokenizers_vis.protocol import VisualTokenizer, VQModelTokenizer, as_visual_tokenizer

ROOT = Path(__file__).resolve().parents[1]


def tiny_vqmodel(seed=0):
    torch.manual_seed(seed)
    return VQModel(block_out_channels=(8, 8, 8, 8), down_block_types=("DownEncoderBlock2D",) * 4,
                   up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, num_vq_embeddings=16, vq_embed_dim=4,
                   norm_num_groups=4, sample_size=32, layers_per_block=1).eval()


def test_codes_and_decoding_match_the_vqmodel():
    vq = tiny_vqmodel()
    tok = as_visual_tokenizer(vq)
    assert isinstance(tok, VQModelTokenizer) and isinstance(tok, VisualTokenizer)
    assert (tok.kind, tok.image_size, tok.token_shape, tok.vocab_size) == ("codes", 32, (4, 4), 16)
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        ids = tok.encode_tokens(x)
        h = vq.encode(x).latents
        nearest = torch.cdist(h.permute(0, 2, 3, 1).reshape(-1, 4), vq.quantize.embedding.weight).argmin(-1)
        assert ids.shape == (3, 4, 4) and torch.equal(ids.flatten(), nearest)  # the nearest codebook vector
        ref = vq.decode(h).sample.clamp(-1, 1)  # the model's own quantize -> decode
        torch.testing.assert_close(tok.decode_tokens(ids), ref, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match=r"codes must have shape \(B, 4, 4\)"):
        tok.decode_tokens(ids.flatten(1))


def test_train_generator_on_vqmodel_codes(tmp_path):
    tiny_vqmodel().save_pretrained(tmp_path / "vq")
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "train_generator.py"), "paradigm=next_token",
                           f"tokenizer={tmp_path / 'vq'}", "model.dim=32", "model.n_layers=1", "model.n_heads=4",
                           "data.size=32", "data.image_size=32", "train.batch_size=8", "train.steps=4",
                           "train.log_every=1", "train.warmup=1", f"train.out_dir={tmp_path / 'run'}"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [0, 1, 2, 3]
    pipe = load_pipeline(tmp_path / "run" / "pipeline")
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe.vq_model).__name__ == "VQModel"
    out = pipe("a red circle", num_images_per_prompt=2, generator=generators_from_seed(0, 2), watermark_key="k")
    assert out.tokens.shape == (2, 4, 4) and out.images[0].size == (32, 32) and out.decoder_passes == 16
    detections = pipe.detect_watermark(out.images, "k")  # k-means clusters of the VQModel's own codebook
    assert len(detections) == 2 and all(0 <= d["p_value"] <= 1 for d in detections)
