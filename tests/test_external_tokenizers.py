"""Other libraries' VQ tokenizers behind the visual tokenizer protocol. diffusers `VQModel`: codes and decoding
agree with the model's own quantize -> decode path, `scripts/train_generator.py` trains a next-token decoder on
its codes from a saved directory, and the saved pipeline generates and detects its watermark with it.
transformers' Janus and Emu3 VQ-VAEs (tiny random configs): codes and decoding are the models' own, and a
next-token decoder generates through them with the paradigm protocol."""

import json

import pytest
import torch
from diffusers import VQModel

from tiny import load_script
from mmgen.pipelines import load_pipeline
from mmgen.pipelines.base import generators_from_seed
from mmgen.paradigms import next_token
from mmgen.paradigms.protocol import ModelConfig
from mmgen.sampling.config import SamplingConfig
from mmgen.text import UnifiedVocab
from tokenizers_vis.protocol import (Emu3VQTokenizer, JanusVQTokenizer, VisualTokenizer, VQModelTokenizer,
                                     as_visual_tokenizer)



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
    load_script("train_generator").main(["paradigm=next_token", f"tokenizer={tmp_path / 'vq'}", "model.dim=32",
                                         "model.n_layers=1", "model.n_heads=4", "data.size=32", "data.image_size=32",
                                         "train.batch_size=8", "train.steps=4", "train.log_every=1",
                                         "train.warmup=1", f"train.out_dir={tmp_path / 'run'}"])
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [0, 1, 2, 3]
    pipe = load_pipeline(tmp_path / "run" / "pipeline")
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe.vq_model).__name__ == "VQModel"
    out = pipe("a red circle", num_images_per_prompt=2, generator=generators_from_seed(0, 2), watermark_key="k")
    assert out.tokens.shape == (2, 4, 4) and out.images[0].size == (32, 32) and out.decoder_passes == 16
    detections = pipe.detect_watermark(out.images, "k")  # k-means clusters of the VQModel's own codebook
    assert len(detections) == 2 and all(0 <= d["p_value"] <= 1 for d in detections)


def tiny_janus_vq():
    from transformers import JanusVQVAE, JanusVQVAEConfig

    torch.manual_seed(0)
    return JanusVQVAE(JanusVQVAEConfig(base_channels=32, channel_multiplier=[1, 1, 1], embed_dim=4, latent_channels=32,
                                       num_embeddings=16, num_patches=8, num_res_blocks=1, projection_dim=16,
                                       image_token_embed_dim=16)).eval()


def tiny_emu3_vq():
    from transformers import Emu3VQVAE, Emu3VQVAEConfig

    torch.manual_seed(0)
    return Emu3VQVAE(Emu3VQVAEConfig(base_channels=32, channel_multiplier=[1, 1, 1], embed_dim=4, latent_channels=4,
                                     codebook_size=16, num_res_blocks=1, hidden_size=32, num_attention_heads=1,
                                     attn_resolutions=[])).eval()


@pytest.mark.parametrize("family", ["janus", "emu3"])
def test_transformers_vq_vaes_speak_the_protocol(family):
    vq = tiny_janus_vq() if family == "janus" else tiny_emu3_vq()
    mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)  # CLIP's, as processors
    tok = JanusVQTokenizer(vq, mean, std) if family == "janus" else Emu3VQTokenizer(vq, 32, mean, std)
    assert isinstance(tok, VisualTokenizer) and (tok.kind, tok.image_size, tok.token_shape, tok.vocab_size) == (
        "codes", 32, (8, 8), 16)
    if family == "janus":
        assert isinstance(as_visual_tokenizer(vq), JanusVQTokenizer)  # Emu3 needs the pipeline's image size
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    torch.testing.assert_close(tok.from_model(tok.to_model(x)), x, atol=1e-6, rtol=0)
    with torch.no_grad():
        ids = tok.encode_tokens(x)
        pixels = tok.to_model(x)  # the model sees its processor's normalization
        if family == "janus":
            h = vq.quant_conv(vq.encoder(pixels)).permute(0, 2, 3, 1).reshape(-1, 4)
            assert torch.equal(ids.flatten(), torch.cdist(h, vq.quantize.embedding.weight).argmin(-1))
            ref = vq.decode(ids.flatten(1))
        else:  # the quantizer's own input (B, T, C, h, w), captured: ids are its nearest codebook entries
            seen = []
            handle = vq.quantize.register_forward_hook(lambda mod, inp, out: seen.append(inp[0]))
            tok.encode_tokens(x)
            handle.remove()
            h = seen[0][:, 0].permute(0, 2, 3, 1).reshape(-1, 4)  # one image = the first temporal frame
            assert torch.equal(ids.flatten(), torch.cdist(h, vq.quantize.embedding.weight).argmin(-1))
            ref = vq.decode(ids)
        assert ids.shape == (2, 8, 8) and ids.max() < 16
        torch.testing.assert_close(tok.decode_tokens(ids), tok.from_model(ref))
        # a next-token decoder generates through the tokenizer with the paradigm protocol alone
        vocab = UnifiedVocab(text_vocab_size=8, image_vocab_size=tok.vocab_size)
        layout = next_token.make_layout(tok, vocab, 4, ModelConfig(dim=32, n_layers=1, n_heads=4))
        model = next_token.make_model(layout, ModelConfig(dim=32, n_layers=1, n_heads=4)).eval()
        codes, cost = next_token.generate(model, layout, [[3, 4]], SamplingConfig(), [torch.Generator()])
        assert cost.decoder_passes == 64 and tok.decode_tokens(codes).shape == (1, 3, 32, 32)
