"""The two seams of the house: every visual tokenizer behind one protocol (tokenizers_vis.protocol) and every
paradigm behind one protocol, looked up in one registry (mmgen.pipelines.registry). One tiny tokenizer per
kind drives each registered paradigm through layout -> model -> batch -> loss -> generate -> decode -> pipeline,
with no branch on a class."""

import inspect

import pytest
import torch

from mmgen.paradigms.protocol import FlowConfig, GenerationCost, ModelConfig
from mmgen.pipelines.registry import PARADIGMS, get_paradigm, paradigm_name
from mmgen.sampling.config import SamplingConfig
from mmgen.text import UnifiedVocab, train_text_tokenizer
from tokenizers_vis.multiscale import MultiScaleVQGAN
from tokenizers_vis.protocol import (KINDS, VAETokenizer, VisualTokenizer, as_visual_tokenizer,
                                     load_tokenizer_component, tokenizer_class_name)
from tokenizers_vis.vae import encode_latents, make_vae
from tokenizers_vis.vqgan import VQGAN

torch.set_num_threads(1)
SIZE = 32  # 4x4 token grids: tiny and quick


def tiny_tokenizer(kind: str):
    torch.manual_seed(0)
    common = dict(base_channels=8, channel_mult=(1, 2, 2, 2), embed_dim=8, num_codes=16, code_dim=4,
                  image_size=SIZE, mid_attention=False)
    if kind == "codes":
        return VQGAN(**common).eval()
    if kind == "scale_codes":
        return MultiScaleVQGAN(**common, scales=(1, 2, 4)).eval()
    return make_vae(image_size=SIZE, block_out_channels=(8, 8, 8, 8), norm_num_groups=4).eval()


def images(n=2, seed=0):
    return torch.rand(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.mark.parametrize("kind, shape", [("codes", (4, 4)), ("scale_codes", (21,)), ("latents", (4, 4, 4))])
def test_every_tokenizer_kind_speaks_the_protocol(kind, shape):
    component = tiny_tokenizer(kind)
    tok = as_visual_tokenizer(component)
    assert isinstance(tok, VisualTokenizer) and tok.kind == kind and tok.image_size == SIZE
    assert tok.token_shape == shape
    with torch.no_grad():
        tokens = tok.encode_tokens(images())
        assert tokens.shape == (2, *shape)
        if kind != "latents":
            assert tokens.dtype == torch.long and 0 <= tokens.min() and tokens.max() < tok.vocab_size == 16
        else:
            assert tok.vocab_size == 0 and torch.equal(tokens, encode_latents(component, images()))
        assert tok.decode_tokens(tokens).shape == (2, 3, SIZE, SIZE)
    if kind == "scale_codes":  # flat codes are the per-scale maps, concatenated coarse to fine
        maps = component.encode(images())
        assert torch.equal(tokens, torch.cat([m.flatten(1) for m in maps], 1))
        assert all(torch.equal(a, b) for a, b in zip(component.split_scales(tokens), maps))
        with pytest.raises(ValueError, match=r"shape \(B, 21\)"):
            component.split_scales(tokens[:, :-1])


def test_vae_is_wrapped_and_other_objects_are_refused():
    assert isinstance(as_visual_tokenizer(tiny_tokenizer("latents")), VAETokenizer)
    vq = tiny_tokenizer("codes")
    assert as_visual_tokenizer(vq) is vq  # ours implement it directly
    with pytest.raises(TypeError, match="VQGAN, MultiScaleVQGAN, SEEDTokenizer, AutoencoderKL"):
        as_visual_tokenizer(torch.nn.Linear(2, 2))


def test_saved_tokenizers_load_by_their_class_name(tmp_path):
    tiny_tokenizer("scale_codes").save_pretrained(tmp_path / "ms")
    assert tokenizer_class_name(tmp_path / "ms") == "MultiScaleVQGAN"
    loaded = load_tokenizer_component(tmp_path / "ms")
    assert as_visual_tokenizer(loaded).kind == "scale_codes" and not loaded.training
    with pytest.raises(FileNotFoundError, match="no config.json"):
        tokenizer_class_name(tmp_path)
    (tmp_path / "config.json").write_text('{"_class_name": "UNet2DModel"}')
    with pytest.raises(ValueError, match="holds 'UNet2DModel'; accepted: VQGAN"):
        tokenizer_class_name(tmp_path)


PROTOCOL = {"make_layout": ["tokenizer", "vocab", "max_text_len", "model", "flow"],
            "layout_from_model": ["decoder", "tokenizer", "vocab", "max_text_len"],
            "make_model": ["layout", "model", "flow"],
            "build_batch": ["layout", "text_ids", None, "cond_drop_prob", "generator", "tokenizer"],
            "loss_fn": ["model", "batch", "layout"],
            "generate": ["model", "layout", "text_ids", None, "generators", "tokenizer", "callback"]}


@pytest.mark.parametrize("name", list(PARADIGMS))
def test_registered_modules_implement_the_protocol(name):
    module = PARADIGMS[name].module
    assert module.TOKENS in KINDS
    for fn, params in PROTOCOL.items():
        got = list(inspect.signature(getattr(module, fn)).parameters)
        assert len(got) >= len(params), (fn, got)
        assert all(p is None or p == g for p, g in zip(params, got)), (fn, got)


DECODER_PASSES = {"next_token": 16, "token_shuffle": 4, "next_scale": 3, "flow_head": 16, "flowar": 3, "next_x": 4,
                  "next_neighbor": 7, "next_block": 4}  # NAR: h + w - 1 anti-diagonals; next-block: h rows


@pytest.mark.parametrize("name", list(PARADIGMS))
def test_each_paradigm_runs_end_to_end_through_the_protocol(name):
    entry = get_paradigm(name)
    paradigm = entry.module
    component = tiny_tokenizer(paradigm.TOKENS)
    tok = as_visual_tokenizer(component)
    captions = ["a red circle", "two blue squares"]
    text_tok = train_text_tokenizer(captions)
    vocab = UnifiedVocab(text_vocab_size=len(text_tok), image_vocab_size=tok.vocab_size)
    model_cfg = ModelConfig(dim=32, n_layers=1, n_heads=4, shuffle_window=2 if name == "token_shuffle" else 1)
    flow_cfg = FlowConfig(head_width=16, head_depth=1, flow_width=16, flow_depth=1, flow_heads=2, entity="cell")
    torch.manual_seed(0)
    layout = paradigm.make_layout(tok, vocab, 8, model_cfg, flow_cfg)
    model = paradigm.make_model(layout, model_cfg, flow_cfg)
    text_ids = [text_tok(c)["input_ids"] for c in captions]
    with torch.no_grad():
        tokens = tok.encode_tokens(images())
    batch = paradigm.build_batch(layout, text_ids, tokens, 0.5, torch.Generator().manual_seed(0), tokenizer=tok)
    loss = paradigm.loss_fn(model, batch, layout)
    assert loss.ndim == 0 and torch.isfinite(loss) and loss > 0
    loss.backward()
    sampling = SamplingConfig(guidance_scale=2.0, num_inference_steps=2)
    out, cost = paradigm.generate(model.eval(), layout, text_ids, sampling,
                                  [torch.Generator().manual_seed(i) for i in range(2)], tokenizer=tok)
    # one decoder pass per token of the 4x4 grid, per 2x2 window (Token-Shuffle), per scale (1, 2, 4), per cell
    assert isinstance(cost, GenerationCost)
    if name in DECODER_PASSES:
        assert cost.decoder_passes == DECODER_PASSES[name], cost
    else:  # a paradigm registered after this test was written
        pytest.fail(f"add {name}'s decoder passes for this 4x4 grid to DECODER_PASSES (it reported {cost})")
    assert out.shape == tokens.shape
    assert tok.decode_tokens(out).shape == (2, 3, SIZE, SIZE)
    # the pipeline the registry names takes these parts and reports the same paradigm back
    pipe = entry.pipeline(transformer=model, tokenizer=text_tok, max_text_len=8, **{entry.component: component})
    assert paradigm_name(pipe) == name and pipe.layout == layout


def test_unknown_paradigm_names_the_registered_ones():
    with pytest.raises(ValueError, match="paradigm must be one of next_token, token_shuffle, next_scale, flow_head"):
        get_paradigm("diffusion")


def shared_blocks(sources: dict[str, str], size: int = 6) -> list[tuple[str, int, str, int]]:
    """Blocks of `size` consecutive code lines that two sources share, as (name, line, name, line). Blank lines,
    comments, imports, docstrings and function signatures are not code lines here (pylint's duplicate-code check
    skips them the same way): a diffusers pipeline spells out its `__call__` parameters, and that is its API."""
    import ast

    def code_lines(text: str) -> list[tuple[int, str]]:
        skip = set()
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                skip.update(range(node.lineno, node.end_lineno + 1))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Module)) and node.body:
                first = node.body[0]
                if not isinstance(node, ast.Module) and not isinstance(node, ast.ClassDef):
                    skip.update(range(node.lineno, first.lineno))  # decorators' next line to the body: the signature
                    skip.update(d.lineno for d in node.decorator_list)
                if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) \
                        and isinstance(first.value.value, str):
                    skip.update(range(first.lineno, first.end_lineno + 1))
        return [(i, line.strip()) for i, line in enumerate(text.splitlines(), 1)
                if i not in skip and line.strip() and not line.strip().startswith("#")]

    lines = {name: code_lines(text) for name, text in sources.items()}
    found = []
    names = sorted(sources)
    for a_i, a in enumerate(names):
        windows = {tuple(s for _, s in lines[a][k:k + size]): lines[a][k][0] for k in range(len(lines[a]) - size + 1)}
        for b in names[a_i + 1:]:
            found += [(a, windows[key], b, lines[b][k][0]) for k in range(len(lines[b]) - size + 1)
                      if (key := tuple(s for _, s in lines[b][k:k + size])) in windows]
    return found


def test_no_block_of_six_lines_repeats_between_two_pipelines_or_two_paradigms():
    """One pipeline skeleton (issue 34): what every pipeline shares lives in pipelines/base.py or backend.py, once;
    what samplers and grid batches share lives in paradigms/sequence.py, once."""
    from pathlib import Path

    import mmgen.paradigms
    import mmgen.pipelines

    for package in (mmgen.pipelines, mmgen.paradigms):
        folder = Path(package.__file__).parent
        assert shared_blocks({p.name: p.read_text() for p in folder.glob("*.py")}) == [], folder.name
    # the check sees a shared block where there is one (a loop body copied into a second file)
    body = "\n".join(f"    x{i} = f(x{i - 1})" for i in range(1, 7))
    copied = {"a.py": f"def a(x0):\n    '''doc'''\n{body}\n    return x6\n",
              "b.py": f"import os\n\n\ndef b(x0, y):\n{body}\n    return y\n"}
    assert shared_blocks(copied) == [("a.py", 3, "b.py", 5)]
    assert shared_blocks(copied, size=7) == []
