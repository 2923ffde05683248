"""The next-scale, raster flow-head, FlowAR and next-X (xAR) pipelines end to end: tiny seeded components -> save/load ->
generate (exact pass counts, bit-identical reload) -> CLI (option routing by pipeline, errors) -> bench."""

import json
from functools import partial

import pytest
import torch
from PIL import Image

from tiny import BACKBONE, CAPTIONS, tiny_pipeline, tiny_text_tokenizer, tiny_vae
from mmgen import bench, cli
from mmgen.paradigms.flow_head import RasterFlowModel
from mmgen.pipelines import FlowARPipeline, NextScalePipeline, NextXPipeline, RasterFlowPipeline, load_pipeline
from mmgen.pipelines.base import generators_from_seed
from mmgen.text import UnifiedVocab, train_text_tokenizer
from mmgen.zoo import zoo_models

TEXT_LEN = 16

# name -> (builder, pipeline class, decoder passes per image, tokens shape per image)
KINDS = {
    "next_scale": (partial(tiny_pipeline, "next_scale"), NextScalePipeline, 3, (1 + 4 + 16,)),
    "flow_head": (partial(tiny_pipeline, "flow_head"), RasterFlowPipeline, 16, (4, 4, 4)),
    "flowar": (partial(tiny_pipeline, "flowar"), FlowARPipeline, 3, (4, 4, 4)),
    "next_x": (partial(tiny_pipeline, "next_x"), NextXPipeline, 4, (4, 4, 4)),  # 4 stride-2 subsample entities
}


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    tok = tiny_text_tokenizer(CAPTIONS, shapes_words=True)  # the bench draws shapes prompts
    out = {}
    for name, (build, *_rest) in {**KINDS, "next_token": (partial(tiny_pipeline, "next_token"),)}.items():
        d = tmp_path_factory.mktemp(name)
        build(tok).save_pretrained(d)
        out[name] = d
    return out


@pytest.mark.parametrize("kind", list(KINDS))
def test_pipeline_generates_and_reloads_identically(dirs, kind):
    _, cls, nfe, token_shape = KINDS[kind]
    pipe = load_pipeline(dirs[kind])
    assert type(pipe) is cls
    pipe.set_progress_bar_config(disable=True)
    kw = dict(prompt=["a red circle", "two green stars"], num_images_per_prompt=2, guidance_scale=2.0,
              generator=generators_from_seed(3, 4))
    out = pipe(**kw)
    assert len(out.images) == 4 and all(isinstance(i, Image.Image) and i.size == (16, 16) for i in out.images)
    assert out.nfe == nfe and tuple(out.tokens.shape) == (4, *token_shape)
    assert out.step_compression == pytest.approx(pipe.layout.num_image_tokens / nfe)
    again = load_pipeline(dirs[kind])
    again.set_progress_bar_config(disable=True)
    out2 = again(**{**kw, "generator": generators_from_seed(3, 4)})
    assert torch.equal(out.tokens, out2.tokens)
    assert all(a.tobytes() == b.tobytes() for a, b in zip(out.images, out2.images))
    # different prompts and different seeds give different images
    assert not torch.equal(out.tokens[0], out.tokens[2]) and not torch.equal(out.tokens[0], out.tokens[1])
    files = {p.name for p in dirs[kind].rglob("*") if p.is_file()}
    assert not any(f.endswith((".bin", ".pt", ".pth", ".pkl")) for f in files)


def test_flow_pipelines_steps_and_sampler(dirs):
    pipe = load_pipeline(dirs["flowar"])
    pipe.set_progress_bar_config(disable=True)
    euler = pipe(prompt="a red circle", num_inference_steps=4, generator=generators_from_seed(0, 1), output_type="pt")
    heun = pipe(prompt="a red circle", num_inference_steps=4, flow_sampler="heun", generator=generators_from_seed(0, 1),
                output_type="pt")
    assert euler.nfe == heun.nfe == 3  # decoder passes; the flow steps run in the small module
    assert not torch.equal(euler.tokens, heun.tokens)
    for bad, needle in ((dict(num_inference_steps=0), "num_inference_steps"), (dict(flow_sampler="rk4"), "flow_sampler"),
                        (dict(cfg_schedule="cosine"), "cfg_schedule"), (dict(guidance_scale=float("nan")), "guidance")):
        with pytest.raises(ValueError, match=needle):
            pipe(prompt="a red circle", **bad)


def test_next_x_pipeline_counts_evaluations_and_keeps_its_entity(dirs):
    pipe = load_pipeline(dirs["next_x"])
    pipe.set_progress_bar_config(disable=True)
    assert pipe.transformer.config.entity == "subsample" and pipe.layout.num_entities == 4
    out = pipe(prompt=["a red circle", "two green stars"], num_inference_steps=3, output_type="pt",
               generator=generators_from_seed(0, 2))
    assert out.nfe == 4 and out.model_evals == 1 + 4 * 3 + 3  # prompt, 3 Euler steps per entity, 3 cache writes
    # the default guidance ramps over entities (xAR): a constant schedule gives other latents
    const = pipe(prompt=["a red circle", "two green stars"], num_inference_steps=3, output_type="pt",
                 cfg_schedule="constant", generator=generators_from_seed(0, 2))
    assert not torch.equal(out.tokens, const.tokens)


def test_next_scale_pipeline_arguments(dirs):
    """(The ramp's values are tested on the logits in test_next_scale.py.)"""
    pipe = load_pipeline(dirs["next_scale"])
    pipe.set_progress_bar_config(disable=True)
    out = pipe(prompt="a red circle", guidance_scale=4.0, cfg_schedule="linear", top_p=0.9, output_type="pt")
    assert out.nfe == 3 and out.images.shape == (1, 3, 16, 16)
    for bad, needle in ((dict(cfg_schedule="cosine"), "cfg_schedule"), (dict(top_k=0), "top_k"),
                        (dict(prompt=""), "prompt"), (dict(num_images_per_prompt=0), "num_images_per_prompt")):
        with pytest.raises(ValueError, match=needle):
            pipe(**{"prompt": "a red circle", **bad})


@pytest.mark.parametrize("kind, extra", [("next_scale", ["--cfg-schedule", "linear", "--top-k", "8"]),
                                         ("flow_head", ["--steps", "3", "--flow-sampler", "heun"]),
                                         ("flowar", ["--steps", "3", "--cfg-schedule", "constant"]),
                                         ("next_x", ["--steps", "2", "--flow-sampler", "heun"])])
def test_cli_generate_each_paradigm(dirs, kind, extra, tmp_path, capsys):
    out = tmp_path / "img.png"
    assert cli.main(["generate", "a red circle", "--model", str(dirs[kind]), "--out", str(out), "--json", *extra]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["pipeline"] == KINDS[kind][1].__name__ and result["nfe_per_image"] == KINDS[kind][2]
    if kind == "next_x":  # prompt + 4 entities x (2 Heun steps = 3 evaluations) + 3 cache writes
        assert result["model_evals_per_image"] == 1 + 4 * 3 + 3
    else:
        assert "model_evals_per_image" not in result
    assert Image.open(out).size == (16, 16)


@pytest.mark.parametrize("kind, args, needle", [
    ("flowar", ["--sampler", "sjd"], "--sampler does not apply to FlowARPipeline"),
    ("next_scale", ["--watermark-key", "k"], "--watermark-key does not apply to NextScalePipeline"),
    ("flow_head", ["--top-k", "5"], "--top-k does not apply to RasterFlowPipeline"),
    ("next_token", ["--steps", "5"], "--steps does not apply to NextTokenPipeline"),
    ("flowar", ["--steps", "0"], "--steps"),
    ("next_x", ["--top-p", "0.9"], "--top-p does not apply to NextXPipeline"),
])
def test_cli_rejects_options_of_other_paradigms(dirs, kind, args, needle, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["generate", "a red circle", "--model", str(dirs[kind]), "--out", str(tmp_path / "o.png"), *args])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and needle in err, err
    assert not any(tmp_path.iterdir())


def test_bench_paradigms_ratios(dirs):
    models = {k: dirs[k] for k in KINDS}
    r = bench.bench_paradigms(models, baseline=dirs["next_token"], batch_sizes=(1, 2), repeats=1, progress=False,
                              eval_per_category=1)
    rows = r["models"]
    assert rows["baseline"]["nfe_per_image"] == 16 and rows["baseline"]["nfe_ratio"] == 1.0
    assert rows["baseline"]["latency"]["batch_2"]["latency_ratio"] == 1.0
    for name, (_, cls, nfe, _) in KINDS.items():
        row = rows[name]
        assert row["pipeline"] == cls.__name__ and row["nfe_per_image"] == nfe
        assert row["nfe_ratio"] == pytest.approx(nfe / 16, abs=1e-4)
        lat = row["latency"]["batch_1"]
        assert abs(lat["speedup"] * lat["latency_ratio"] - 1) <= 5e-4 * (lat["speedup"] + lat["latency_ratio"]) + 1e-6
        assert row["accuracy"]["n"] == 4 and 0 <= row["accuracy"]["accuracy"] <= 1
    # xAR's decoder integrates each entity's flow itself: prompt + 4 entities x 25 Euler steps + 3 cache writes
    assert rows["next_x"]["model_evals_per_image"] == 1 + 4 * 25 + 3 and "model_evals_per_image" not in rows["flowar"]
    with pytest.raises(ValueError, match="baseline"):
        bench.bench_paradigms(models, baseline=dirs["flowar"], batch_sizes=(1,), repeats=1, progress=False)


def test_shipped_zoo_models_generate(tmp_path):
    """Every model shipped in mmgen/zoo loads with load_pipeline and draws a real 64x64 image; each stays within
    25 MB (every file it loads) and the zoo within 100 MB (each distinct file once: shared files are links)."""
    from mmgen.zoo import model_mb, zoo_mb

    zoo = zoo_models()
    assert "shapes-nexttoken" in zoo
    sizes = {name: model_mb(d) for name, d in zoo.items()}
    assert max(sizes.values()) <= 25 and zoo_mb() <= 100, sizes
    assert zoo_mb() < sum(sizes.values())  # shapes-shuffle reads shapes-emoji's VQGAN file, stored once
    for name, d in zoo.items():
        pipe = load_pipeline(d)
        pipe.set_progress_bar_config(disable=True)
        flow = isinstance(pipe, (RasterFlowPipeline, FlowARPipeline, NextXPipeline))
        kw = {"num_inference_steps": 4} if flow else {}
        img = pipe(prompt="a red circle above a blue square", generator=generators_from_seed(0, 1), **kw).images[0]
        assert img.size == (64, 64) and len(img.getcolors(maxcolors=4096) or range(4097)) > 10, name


def test_mismatched_parts_are_rejected():
    tok = train_text_tokenizer(CAPTIONS)
    vocab = UnifiedVocab(len(tok), 0)
    tr = RasterFlowModel(vocab_size=vocab.size + 1, token_dim=4, max_seq_len=48, head_width=32, head_depth=2,
                         **BACKBONE)
    with pytest.raises(ValueError, match=r"transformer.vocab_size=\d+ does not match text"):
        RasterFlowPipeline(transformer=tr, vae=tiny_vae(scaling_factor=0.7).eval(), tokenizer=tok,
                           max_text_len=TEXT_LEN)
    tr = RasterFlowModel(vocab_size=vocab.size, token_dim=8, max_seq_len=48, head_width=32, head_depth=2, **BACKBONE)
    with pytest.raises(ValueError, match="token_dim=8 differs from the VAE's 4 latent channels"):
        RasterFlowPipeline(transformer=tr, vae=tiny_vae(scaling_factor=0.7).eval(), tokenizer=tok,
                           max_text_len=TEXT_LEN)
