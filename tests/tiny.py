"""Tiny seeded models shared by the tests: one factory per kind instead of a copy in each file.

Every factory seeds the global torch RNG itself (seed 0 unless told) and builds its modules in a fixed order, so
the same arguments give the same weights, bit for bit, whichever test calls it. Image tokenizers come back in
training mode, as constructed (tests that only encode call .eval()); decoders and pipelines in eval mode.
Test files import them from here (`from tiny import tiny_vqgan`); tests/conftest.py holds only fixtures and hooks."""

import importlib.util
import sys
from pathlib import Path

import torch

from mmgen.data.shapes import all_caption_words
from mmgen.models.shuffle import TokenShuffleTransformer
from mmgen.models.transformer import Transformer
from mmgen.paradigms.flow_head import RasterFlowModel
from mmgen.paradigms.flowar import FlowARModel
from mmgen.paradigms.next_scale import NextScaleModel
from mmgen.paradigms.next_x import NextXModel
from mmgen.pipelines import FlowARPipeline, NextScalePipeline, NextTokenPipeline, NextXPipeline, RasterFlowPipeline
from mmgen.text import UnifiedVocab, train_text_tokenizer
from tokenizers_vis.multiscale import MultiScaleVQGAN
from tokenizers_vis.pca import PCATokenizer
from tokenizers_vis.seed import SEEDTokenizer
from tokenizers_vis.vae import make_vae
from tokenizers_vis.vqgan import VQGAN

ROOT = Path(__file__).resolve().parents[1]
CAPTIONS = ["a red circle", "a blue square above a red circle", "two green stars"]
BACKBONE = dict(dim=32, n_layers=2, n_heads=4)  # the decoder size of every tiny pipeline
SEED_TINY = dict(image_size=32, num_queries=8, dim=32, heads=2, qformer_layers=2, proj_dim=16, num_codes=16,
                 code_dim=4, embed_decoder_layers=1, decoder_layers=1, decoder_base_channels=8,
                 decoder_channel_mult=(1, 2, 2))


def load_script(name: str):
    """`scripts/<name>.py` loaded as a module, so a test calls its `main(argv)` in this process: no interpreter
    start and no torch / transformers import per run (a few CPU seconds each on the CI machine)."""
    spec = importlib.util.spec_from_file_location(f"script_{name}", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


def tiny_vqgan(channel_mult=(1, 2), image_size=16, embed_dim=8, num_codes=32, scales=None, seed=0, **kw):
    """A VQGAN with 8 base channels (4x downsampling for channel_mult (1, 2)); with `scales`, a MultiScaleVQGAN."""
    torch.manual_seed(seed)
    cfg = dict(base_channels=8, channel_mult=channel_mult, num_res_blocks=1, embed_dim=embed_dim, num_codes=num_codes,
               code_dim=4, image_size=image_size, **kw)
    return VQGAN(**cfg) if scales is None else MultiScaleVQGAN(scales=scales, **cfg)


def tiny_vae(image_size=16, block_out_channels=(8, 8, 8), scaling_factor=None, seed=0, **kw):
    """An AutoencoderKL with 4 latent channels (make_vae); `scaling_factor` is registered in its config."""
    torch.manual_seed(seed)
    vae = make_vae(image_size=image_size, latent_channels=4, block_out_channels=block_out_channels,
                   norm_num_groups=4, **kw)
    if scaling_factor is not None:
        vae.register_to_config(scaling_factor=scaling_factor)
    return vae


def tiny_seed_tokenizer(seed=0, **kw) -> SEEDTokenizer:
    """A 32 px SEED 1-D tokenizer (SEED_TINY: 8 tokens of 16 codes), `kw` overriding SEED_TINY."""
    torch.manual_seed(seed)
    return SEEDTokenizer(**{**SEED_TINY, **kw})


PCA_TINY = dict(image_size=32, patch_size=8, num_tokens=8, dim=32, heads=2, encoder_layers=1, decoder_layers=1,
                num_codes=16, code_dim=4, sample_steps=4)


def tiny_pca_tokenizer(seed=0, **kw) -> PCATokenizer:
    """A 32 px PCA-ordered 1-D tokenizer (PCA_TINY: 8 tokens of 16 codes, 4 Euler steps), `kw` overriding PCA_TINY."""
    torch.manual_seed(seed)
    return PCATokenizer(**{**PCA_TINY, **kw})


def tiny_transformer(vocab_size, max_seq_len, seed=0, **kw) -> Transformer:
    """The 2-layer, 32-wide decoder backbone (BACKBONE) in eval mode; `kw` e.g. n_kv_heads, rope_2d, cond_dim."""
    torch.manual_seed(seed)
    return Transformer(vocab_size=vocab_size, max_seq_len=max_seq_len, **BACKBONE, **kw).eval()


def tiny_code_paradigm(paradigm, grid=(4, 4), image_vocab=16, text_vocab=10, max_text_len=4, seed=0, wild=False):
    """(layout, eval-mode model) of a code paradigm module (`mmgen.paradigms.next_block`, `next_neighbor`) on a
    `grid` of `image_vocab` codes with a BACKBONE decoder; `wild`: weights redrawn from N(0, 1) so greedy choices
    are decisive."""
    from types import SimpleNamespace

    from mmgen.paradigms.protocol import ModelConfig

    tok = SimpleNamespace(kind="codes", token_shape=grid, vocab_size=image_vocab)
    layout = paradigm.make_layout(tok, UnifiedVocab(text_vocab, image_vocab), max_text_len, ModelConfig(**BACKBONE))
    torch.manual_seed(seed)
    model = paradigm.make_model(layout, ModelConfig(**BACKBONE))
    if wild:
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, 1)
    return layout, model.eval()


def tiny_text_tokenizer(captions=CAPTIONS, shapes_words=False):
    """A word-level text tokenizer on `captions`, plus every shapes caption word when `shapes_words`."""
    return train_text_tokenizer(captions, all_caption_words()) if shapes_words else train_text_tokenizer(captions)


def tiny_next_token_pipeline(tok, vq=None, max_seq_len=32, max_text_len=8, shuffle_window=0) -> NextTokenPipeline:
    """A next-token pipeline: `vq` (default tiny_vqgan(), 16 px, 8x8 codes) then a BACKBONE decoder drawn from the
    global RNG as it stands after `vq` (a Token-Shuffle decoder with `shuffle_window` > 0)."""
    vq = tiny_vqgan() if vq is None else vq
    vocab = UnifiedVocab(len(tok), vq.vocab_size)
    if shuffle_window:
        tr = TokenShuffleTransformer(vocab.size, vq.vocab_size, shuffle_window, max_seq_len=max_seq_len, **BACKBONE)
    else:
        tr = Transformer(vocab_size=vocab.size, max_seq_len=max_seq_len, **BACKBONE)
    return NextTokenPipeline(transformer=tr.eval(), vq_model=vq.eval(), tokenizer=tok, max_text_len=max_text_len)


def _perturbed(module):
    """Zero-initialised output layers make a fresh flow model ignore the noise; perturb them."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05 * torch.randn_like(p))


def tiny_pipeline(kind, tok, max_seq_len=48, next_x=None):
    """A 16 px pipeline of one paradigm on a 2-layer decoder, text up to 16 tokens. kind: next_token /
    token_shuffle (tiny_vqgan with channel_mult (1, 2, 2): 4x4 codes), next_scale (its MultiScaleVQGAN, scales 1, 2,
    4), flow_head / flowar / next_x (tiny_vae, 4x4 latents; output layers perturbed). `next_x`: NextXModel's entity
    arguments, default dict(entity="subsample")."""
    if kind in ("next_token", "token_shuffle"):
        return tiny_next_token_pipeline(tok, tiny_vqgan(channel_mult=(1, 2, 2)), max_seq_len=max_seq_len,
                                        max_text_len=16, shuffle_window=2 if kind == "token_shuffle" else 0)
    if kind == "next_scale":
        vq = tiny_vqgan(channel_mult=(1, 2, 2), scales=(1, 2, 4))
        tr = NextScaleModel(vocab_size=UnifiedVocab(len(tok), vq.vocab_size).size, feature_dim=vq.feature_dim,
                            scales=list(vq.scales), max_seq_len=max_seq_len, **BACKBONE)
        return NextScalePipeline(transformer=tr.eval(), vq_model=vq.eval(), tokenizer=tok, max_text_len=16)
    vae = tiny_vae(scaling_factor=0.7).eval()
    text_vocab = UnifiedVocab(len(tok), 0).size
    if kind == "flow_head":
        tr = RasterFlowModel(vocab_size=text_vocab, token_dim=4, max_seq_len=max_seq_len, head_width=32, head_depth=2,
                             **BACKBONE)
        _perturbed(tr.head)
        return RasterFlowPipeline(transformer=tr.eval(), vae=vae, tokenizer=tok, max_text_len=16)
    if kind == "flowar":
        tr = FlowARModel(vocab_size=text_vocab, token_dim=4, scales=(1, 2, 4), max_seq_len=max_seq_len, flow_width=16,
                         flow_depth=1, flow_heads=2, **BACKBONE)
        _perturbed(tr.flow)
        return FlowARPipeline(transformer=tr.eval(), vae=vae, tokenizer=tok, max_text_len=16)
    if kind == "next_x":
        tr = NextXModel(vocab_size=text_vocab, token_dim=4, grid_side=4, max_seq_len=max_seq_len,
                        **(next_x or dict(entity="subsample")), **BACKBONE)
        _perturbed(tr.final_proj)
        return NextXPipeline(transformer=tr.eval(), vae=vae, tokenizer=tok, max_text_len=16)
    raise ValueError(f"unknown pipeline kind {kind!r}")


def free_port() -> int:
    """A TCP port free right now, for a launched run's rendezvous: tests running side by side (pytest -n) must not
    share one."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
