"""`mmgen convert var` and `VARPipeline` against VAR's own code (fixtures from scripts/make_var_fixtures.py at the
commit manifest.json records): tiny random VAR + VQVAE pairs are rebuilt from their recorded shapes and seeds,
saved as VAR's plain .pth state dicts, converted through the CLI and sampled. Greedy and seeded samples give VAR's
tokens exactly and its uint8 pixels within 1/255 on average; wrong variants of the sampler (guidance without
VAR's ramp, VAR's cfg read as mmgen's scale) do not; bad inputs exit with 2 and write nothing."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from mmgen.cli import main
from mmgen.pipelines import VARPipeline, load_pipeline
from test_diffusers_layout import assert_step_callback
from tokenizers_vis.protocol import VisualTokenizer, load_tokenizer_component
from tokenizers_vis.var_vqvae import VARVQVAE, phi_schedule

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "var"
MANIFEST = json.loads((FIXTURES / "manifest.json").read_text())
RUNS = [(name, run["name"]) for name, variant in MANIFEST["variants"].items() for run in variant["runs"]]


def _fixture_script():
    spec = importlib.util.spec_from_file_location("make_var_fixtures", ROOT / "scripts" / "make_var_fixtures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_checkpoints(variant: str, directory: Path) -> tuple[Path, Path]:
    """VAR's two .pth files of a fixture variant: the synthetic parameters plus the buffers its state dicts carry."""
    make = _fixture_script()
    spec, buffers = MANIFEST["variants"][variant], load_file(FIXTURES / f"buffers_{variant}.safetensors")
    paths = []
    for i, part in enumerate(("var", "vae")):
        sd = make.synthetic_state_dict(spec[f"{part}_params"], spec["seed"] * 2 + i)
        sd |= {k[len(part) + 1:]: v for k, v in buffers.items() if k.startswith(part + ".")}
        paths.append(directory / f"{part}.pth")
        torch.save(sd, paths[-1])
    return paths[0], paths[1]


def convert_cli(var, vae, out, patch_nums, capsys=None) -> dict:
    code = main(["convert", "var", "--var", str(var), "--vae", str(vae), "--out", str(out), "--patch-nums",
                 *map(str, patch_nums), "--json"])
    assert code == 0
    return json.loads(capsys.readouterr().out) if capsys is not None else {}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """variant -> (converted pipeline, the CLI's JSON result)."""
    out = {}
    for variant, spec in MANIFEST["variants"].items():
        d = tmp_path_factory.mktemp(f"var_{variant}")
        var, vae = write_checkpoints(variant, d)
        code = main(["convert", "var", "--var", str(var), "--vae", str(vae), "--out", str(d / "pipe"),
                     "--patch-nums", *map(str, spec["patch_nums"]), "--json"])
        assert code == 0
        out[variant] = (load_pipeline(d / "pipe"), d)
    return out


def run_spec(variant: str, run_name: str) -> dict:
    return next(r for r in MANIFEST["variants"][variant]["runs"] if r["name"] == run_name)


def sample(pipe, run, **overrides):
    """The pipeline call VAR's `autoregressive_infer_cfg(cfg, top_k, top_p, g_seed)` corresponds to (0 = off in
    VAR); each image gets a generator seeded with g_seed (the seeded runs are single images)."""
    kw = dict(class_labels=run["labels"], guidance_scale=1 + run["cfg"], top_k=run["top_k"] or None,
              top_p=run["top_p"] or None, output_type="np",
              generator=[torch.Generator().manual_seed(run["g_seed"]) for _ in run["labels"]])
    kw.update(overrides)
    out = pipe(**kw)
    return out.tokens, np.round(out.images * 255).astype(np.uint8)


@pytest.mark.parametrize("variant,run_name", RUNS)
def test_samples_equal_var(converted, variant, run_name):
    pipe, _ = converted[variant]
    pipe.set_progress_bar_config(disable=True)
    run = run_spec(variant, run_name)
    expected = load_file(FIXTURES / f"expected_{variant}.safetensors")
    tokens, pixels = sample(pipe, run)
    assert torch.equal(tokens, expected[f"tokens/{run_name}"])
    diff = np.abs(pixels.astype(np.int16) - expected[f"pixels/{run_name}"].numpy().astype(np.int16))
    assert diff.mean() <= 1.0 and diff.max() <= 2, (diff.mean(), diff.max())


@pytest.mark.parametrize("variant", list(MANIFEST["variants"]))
def test_teacher_forced_logits_equal_var(converted, variant):
    """One block-causal pass over VAR's greedy tokens gives the guided logits VAR's cached sampler saw."""
    pipe, _ = converted[variant]
    model, vq = pipe.transformer, pipe.vq_model
    expected = load_file(FIXTURES / f"expected_{variant}.safetensors")
    for run in MANIFEST["variants"][variant]["runs"]:
        tokens_BL, B, K = expected[f"tokens/{run['name']}"], len(run["labels"]), len(model.patch_nums)
        cond_RD = model.class_emb(torch.tensor(run["labels"] + [model.null_class] * B))
        inputs = vq.next_scale_inputs(vq.split_scales(tokens_BL)).repeat(2, 1, 1)
        with torch.no_grad():
            logits = model(model.teacher_forced_input(cond_RD, inputs), cond_RD, mask=model.block_causal_mask())
        t = torch.cat([torch.full((e - b,), run["cfg"] * k / (K - 1)) for k, (b, e) in enumerate(model.begin_ends)])
        guided = (1 + t[:, None]) * logits[:B] - t[:, None] * logits[B:]
        torch.testing.assert_close(guided, expected[f"logits/{run['name']}"], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("variant", list(MANIFEST["variants"]))
def test_vqvae_encodes_as_var(converted, variant):
    """The VQVAE behind the tokenizer protocol: VAR's `img_to_idxBl` codes of two probe images, and back to pixels."""
    vq = converted[variant][0].vq_model
    assert isinstance(vq, VisualTokenizer) and vq.kind == "scale_codes"
    images = _fixture_script().probe_images(2, vq.image_size)
    codes = vq.encode_tokens(images)
    assert torch.equal(codes, load_file(FIXTURES / f"expected_{variant}.safetensors")["encoded/probe"])
    decoded = vq.decode_tokens(codes)
    assert decoded.shape == images.shape and decoded.abs().max() <= 1


def test_phi_schedule_matches_var():
    """Which shared phi each scale uses, as VAR's own quantizer chooses (recorded for several scale and phi counts;
    in the release's 10 scales over 4 phis, k = 2 sits halfway between two ticks up to rounding)."""
    for case, expected in MANIFEST["phi_schedules"].items():
        K, n = map(int, case.split(","))
        assert list(phi_schedule(K, n)) == expected, case
    assert list(phi_schedule(10, 4)) == [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]


def test_wrong_sampler_variants_fail_parity(converted):
    """The test has power: guidance at full strength from the first scale (no ramp), or VAR's cfg 1.5 taken as
    mmgen's guidance scale 1.5 (cfg 0.5), change the tokens."""
    pipe, _ = converted["release"]
    pipe.set_progress_bar_config(disable=True)
    run = run_spec("release", "greedy_cfg1.5")
    expected = load_file(FIXTURES / "expected_release.safetensors")["tokens/greedy_cfg1.5"]
    no_ramp, _ = sample(pipe, run, cfg_schedule="constant")
    off_by_one, _ = sample(pipe, run, guidance_scale=run["cfg"])
    for tokens in (no_ramp, off_by_one):
        assert (tokens != expected).any(dim=1).sum() >= 3  # most of the 4 images differ


def test_convert_reads_widths_and_saves_a_pipeline(converted, tmp_path, capsys):
    _, d = converted["release"]
    result = convert_cli(d / "var.pth", d / "vae.pth", tmp_path / "out", [1, 2, 3, 4], capsys)
    assert {k: result[k] for k in ("pipeline", "depth", "width", "heads", "num_classes", "vocab_size", "image_size",
                                   "patch_nums")} == dict(pipeline="VARPipeline", depth=2, width=64, heads=4,
                                                          num_classes=10, vocab_size=128, image_size=64,
                                                          patch_nums=[1, 2, 3, 4])
    assert (tmp_path / "out" / "checksums.json").is_file()
    assert isinstance(load_pipeline(tmp_path / "out"), VARPipeline)
    assert isinstance(load_tokenizer_component(tmp_path / "out" / "vq_model"), VARVQVAE)
    shared = converted["shared"][0]
    assert (shared.transformer.config.shared_aln, shared.transformer.config.attn_l2_norm,
            shared.transformer.config.num_heads, shared.vq_model.config.num_phis) == (True, False, 2, 3)


def _cli_error(capsys, argv) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    return capsys.readouterr().err


def test_bad_inputs_exit_2_and_write_nothing(converted, tmp_path, capsys):
    _, d = converted["release"]
    var, vae = d / "var.pth", d / "vae.pth"
    llamagen_vq = {"encoder.conv_in.weight": torch.zeros(128, 3, 3, 3),
                   "encoder.conv_blocks.0.res.0.conv1.weight": torch.zeros(128, 128, 3, 3),
                   "quantize.embedding.weight": torch.zeros(16384, 8), "quantize.codebook_used": torch.zeros(65536),
                   "quant_conv.weight": torch.zeros(8, 256, 1, 1), "decoder.conv_out.weight": torch.zeros(3, 128, 3, 3)}
    torch.save(llamagen_vq, tmp_path / "vq_ds16_c2i.pt")
    torch.save({"weight": torch.randn(3, 3)}, tmp_path / "random.pth")
    (tmp_path / "text.pth").write_text("not a checkpoint")
    out = tmp_path / "out"
    cases = [
        ((var, tmp_path / "vq_ds16_c2i.pt", [1, 2, 3, 4]), ["--vae", "LlamaGen"]),
        ((var, tmp_path / "random.pth", [1, 2, 3, 4]), ["--vae", "not a VAR VQVAE"]),
        ((tmp_path / "random.pth", vae, [1, 2, 3, 4]), ["--var", "not a VAR transformer"]),
        ((vae, var, [1, 2, 3, 4]), ["--var", "pass it as --vae"]),
        ((tmp_path / "text.pth", vae, [1, 2, 3, 4]), ["--var", "weights_only=True"]),
        ((var, vae, [1, 2, 3, 5]), ["--patch-nums 1 2 3 5", "30 positions"]),
        ((var, vae, [1, 2, 3, 4, 5, 6, 8, 10, 13, 16]), ["--patch-nums", "4 scales"]),
        ((var, vae, [2, 1]), ["--patch-nums", "strictly increasing"]),
        ((var, converted["shared"][1] / "vae.pth", [1, 2, 3, 4]), ["not a matching pair"]),
    ]
    for (v, q, pn), needles in cases:
        err = _cli_error(capsys, ["convert", "var", "--var", str(v), "--vae", str(q), "--out", str(out),
                                  "--patch-nums", *map(str, pn)])
        assert all(n in err for n in needles), (needles, err)
        assert not out.exists()
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("keep me")
    err = _cli_error(capsys, ["convert", "var", "--var", str(var), "--vae", str(vae), "--out", str(tmp_path / "notes"),
                              "--patch-nums", "1", "2", "3", "4"])
    assert "--out" in err and (tmp_path / "notes" / "a.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes", "random.pth", "text.pth", "vq_ds16_c2i.pt"]


def test_callback_on_step_end_sees_and_steers_every_scale(converted):
    """Once per scale, with every scale's codes so far; the codes the callback sets for a scale are the ones that
    enter f_hat and the output."""
    pipe, _ = converted["release"]
    widths = np.cumsum([s * s for s in pipe.transformer.patch_nums]).tolist()
    call = lambda **kw: pipe(class_labels=[1, 4], generator=[torch.Generator().manual_seed(s) for s in (0, 1)],  # noqa: E731
                             **kw)
    plain = assert_step_callback(call, widths=widths, value=3)
    forced = call(callback_on_step_end=lambda p, i, t, kw: {"tokens": torch.full_like(kw["tokens"], 3)},
                  callback_on_step_end_tensor_inputs=["tokens"], output_type="pt")
    assert not torch.equal(forced.images, call(output_type="pt").images)  # the forced codes were decoded
    assert plain.tokens.shape == (2, widths[-1])


def test_class_labels_checked(converted):
    pipe, _ = converted["release"]
    for bad in (10, -1, [3, 10], [], "cat", 2.0):
        with pytest.raises(ValueError, match="class_labels"):
            pipe(class_labels=bad, top_k=1)
    with pytest.raises(ValueError, match="num_images_per_prompt"):
        pipe(class_labels=[1, 2], num_images_per_prompt=200)
