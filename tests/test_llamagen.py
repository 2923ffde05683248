"""LlamaGen through `mmgen convert llamagen`: parity with LlamaGen's own code, bad input, and SJD.

tests/fixtures/llamagen/ holds tiny random checkpoints saved as LlamaGen's releases are, and the tokens and uint8
pixels LlamaGen's own `generate` and VQ produced from them (scripts/make_llamagen_fixtures.py, LlamaGen commit in
reference.json). Here they go through the CLI converter and mmgen's pipeline, which must give the same tokens and
the same pixels (mean absolute difference <= 1/255); a variant with the wrong rotary table for the condition
slots must not.
"""

import argparse
import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from mmgen.cli import main
from mmgen.models import llamagen as llamagen_model
from mmgen.models.llamagen import LlamaGenGPT
from mmgen.pipelines import load_pipeline
from mmgen.pipelines.llamagen import LlamaGenBackend, LlamaGenPipeline
from mmgen.sampling.logits import SamplingConfig, cfg_combine, process_logits
from mmgen.sampling.sjd import SJDConfig, jacobi_sample
from test_diffusers_layout import assert_step_callback

FIXTURES = Path(__file__).parent / "fixtures" / "llamagen"
META = json.loads((FIXTURES / "reference.json").read_text())
REF = np.load(FIXTURES / "reference.npz")
RUNS = {run["key"]: run for run in META["runs"]}


def tiny_t5(directory: Path, width: int) -> Path:
    """A random T5 encoder of the caption width with a word-level tokenizer (no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

    words = ["<pad>", "</s>", "<unk>", "a", "red", "cat", "dog", "on", "the", "mat"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    torch.manual_seed(0)
    T5EncoderModel(T5Config(vocab_size=len(words), d_model=width, d_kv=8, d_ff=64, num_layers=1,
                            num_heads=4)).save_pretrained(directory)
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(directory)
    return directory


def convert_args(family: str, out: Path, *extra: str) -> list[str]:
    return ["convert", "llamagen", "--gpt", str(FIXTURES / META["files"][family]), "--vq", str(FIXTURES / "vq.pt"),
            "--out", str(out), "--n-head", str(META["gpt"]["n_head"]), "--image-size", str(META["image_size"]),
            *extra]


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory):
    return tiny_t5(tmp_path_factory.mktemp("t5"), META["caption_dim"])


@pytest.fixture(scope="module")
def converted(tmp_path_factory, t5_dir):
    """Both fixture models converted by the CLI."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("converted")
    assert main(convert_args("c2i", root / "c2i", "--json")) == 0
    assert main(convert_args("t2i", root / "t2i", "--text-encoder", str(t5_dir))) == 0
    return root


@pytest.fixture(scope="module")
def pipes(converted):
    """The converted models loaded back through `load_pipeline`."""
    root = converted
    loaded = {family: load_pipeline(root / family) for family in ("c2i", "t2i")}
    for pipe in loaded.values():
        pipe.set_progress_bar_config(disable=True)
    return loaded


def sample_run(pipe, run, **extra):
    """mmgen's call for one fixture run: the same condition, guidance, top-k, and LlamaGen's seed as the generator."""
    b = run["batch"]
    condition = ({"class_labels": REF["class_labels"][:b].tolist()} if run["family"] == "c2i" else
                 {"prompt_embeds": torch.from_numpy(REF["caption_embeds"][:b]),
                  "prompt_attention_mask": torch.from_numpy(REF["caption_mask"][:b])})
    return pipe(**condition, guidance_scale=run["cfg_scale"], top_k=run["top_k"] or None,
                temperature=run.get("temperature", 1.0), cfg_interval=run.get("cfg_interval", -1),
                generator=[torch.Generator().manual_seed(run.get("seed", 0)) for _ in range(b)], output_type="np",
                **extra)


def pixel_mad(images: np.ndarray, key: str) -> float:
    """Mean absolute difference to LlamaGen's uint8 pixels, in [0, 1] units."""
    ours = (images * 255).round().astype(np.int64)
    return float(np.abs(ours - REF[f"{key}_pixels"].astype(np.int64)).mean()) / 255


def test_fixtures_come_from_llamagen():
    assert META["source"] == "FoundationVision/LlamaGen" and len(META["commit"]) == 40
    assert {run["family"] for run in META["runs"]} == {"c2i", "t2i"}
    assert all(REF[f"{k}_tokens"].shape == (RUNS[k]["batch"], META["grid"] ** 2) for k in RUNS)
    # greedy tokens that vary: the parity below is not a constant image
    assert all(len(np.unique(REF[f"{k}_tokens"])) > 4 for k in RUNS)


@pytest.mark.parametrize("key", list(RUNS))
def test_tokens_and_pixels_equal_llamagen(pipes, key):
    """Greedy at guidance 1 and 4, with cfg_interval, and one seeded multinomial draw, c2i and t2i."""
    run = RUNS[key]
    out = sample_run(pipes[run["family"]], run)
    np.testing.assert_array_equal(out.tokens.flatten(1).numpy(), REF[f"{key}_tokens"])
    assert pixel_mad(out.images, key) <= 1 / 255
    assert out.decoder_passes == META["grid"] ** 2


def test_converted_directory(pipes, tmp_path):
    c2i, t2i = pipes["c2i"], pipes["t2i"]
    assert isinstance(c2i, LlamaGenPipeline) and c2i.text_encoder is None
    assert c2i.transformer.config.num_classes == META["num_classes"]
    assert c2i.transformer.config.ffn_hidden == 256  # find_multiple(int(2 * 4 * 64 / 3), 256)
    assert t2i.transformer.config.cls_token_num == META["caption_tokens"]
    assert tuple(c2i.vq_model.config.ch_mult) == tuple(META["vq"]["ch_mult"])
    assert c2i.vq_model.token_shape == (META["grid"], META["grid"])
    assert "quantize.codebook_used" not in c2i.vq_model.state_dict()
    assert (c2i.config.default_guidance_scale, t2i.config.default_guidance_scale) == (4.0, 7.5)
    # the VQ's encoder gives LlamaGen's codes, and decodes to the protocol's images in [-1, 1]
    codes = c2i.vq_model.encode_tokens(torch.from_numpy(REF["vq_probe_images"]))
    np.testing.assert_array_equal(codes.numpy(), REF["vq_probe_codes"])
    images = c2i.vq_model.decode_tokens(codes)
    assert images.shape == (2, 3, META["image_size"], META["image_size"]) and images.abs().max() <= 1


def test_prompt_through_the_text_encoder(pipes):
    """prompt= runs the saved T5: the same as passing its features, right-padded, as prompt_embeds."""
    pipe = pipes["t2i"]
    feats, mask = pipe.encode_prompt(["a red cat"])
    assert mask.sum() == 4  # three words and </s>
    a = pipe(prompt="A red cat ", guidance_scale=4.0, top_k=1, generator=torch.Generator().manual_seed(0))
    b = pipe(prompt_embeds=feats, prompt_attention_mask=mask, guidance_scale=4.0, top_k=1)
    assert torch.equal(a.tokens, b.tokens) and len(a.images) == 1 and a.images[0].size == (8, 8)


def test_wrong_rotary_variant_breaks_parity(pipes, monkeypatch):
    """Rotating the condition slots like position 0 (cos 1, sin 0) instead of zeroing them changes the tokens."""
    exact = llamagen_model.rope_table

    def identity_for_condition(grid, head_dim, base, cond_tokens):
        table = exact(grid, head_dim, base, cond_tokens)
        table[:cond_tokens, :, 0] = 1.0
        return table

    monkeypatch.setattr(llamagen_model, "rope_table", identity_for_condition)
    for family in ("c2i", "t2i"):
        pipes[family].transformer.__dict__.pop("_rope", None)
    try:
        for key in ("c2i_greedy_cfg4", "t2i_greedy_cfg4"):
            out = sample_run(pipes[RUNS[key]["family"]], RUNS[key])
            assert not np.array_equal(out.tokens.flatten(1).numpy(), REF[f"{key}_tokens"])
    finally:
        for family in ("c2i", "t2i"):
            pipes[family].transformer.__dict__.pop("_rope", None)


def test_greedy_sjd_equals_llamagen(pipes):
    for key in ("c2i_greedy_cfg4", "t2i_greedy_cfg4_interval5"):
        out = sample_run(pipes[RUNS[key]["family"]], RUNS[key], sampler="sjd", sjd_window=4)
        np.testing.assert_array_equal(out.tokens.flatten(1).numpy(), REF[f"{key}_tokens"])
        assert out.decoder_passes <= META["grid"] ** 2


# --- bad input: a clear error naming the problem, exit 2 on the CLI, no output directory ---


def cli_error(capsys, argv) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    return capsys.readouterr().err


def test_preset_that_does_not_fit_names_the_tensor(tmp_path, capsys):
    err = cli_error(capsys, convert_args("c2i", tmp_path / "out", "--gpt-model", "GPT-B"))
    assert "GPT-B" in err and "'tok_embeddings.weight'" in err and "(64, 64)" in err
    assert not (tmp_path / "out").exists()


def test_vq_of_another_family_is_refused(tmp_path, capsys):
    other = {"encoder.conv_in.weight": torch.zeros(8, 3, 3, 3), "encoder.down.0.block.0.conv1.weight":
             torch.zeros(8, 8, 3, 3), "quantize.embedding.weight": torch.zeros(64, 8), "quant_conv.weight":
             torch.zeros(8, 8, 3, 3)}  # a VAR / taming-style VQ-VAE: other module names
    torch.save(other, tmp_path / "vae.pth")
    argv = convert_args("c2i", tmp_path / "out")
    argv[argv.index("--vq") + 1] = str(tmp_path / "vae.pth")
    err = cli_error(capsys, argv)
    assert "--vq" in err and "not a LlamaGen VQ" in err and "encoder.conv_blocks.0.res.0.conv1.weight" in err
    assert not (tmp_path / "out").exists()


def test_swapped_files_and_unsafe_pickles_are_refused(tmp_path, capsys):
    argv = convert_args("c2i", tmp_path / "out")
    gpt, vq = argv.index("--gpt") + 1, argv.index("--vq") + 1
    argv[gpt], argv[vq] = argv[vq], argv[gpt]
    assert "pass it as --gpt" in cli_error(capsys, argv)
    torch.save({"model": {"w": torch.zeros(2)}, "hook": Unsafe()}, tmp_path / "pickled.pt")
    argv = convert_args("c2i", tmp_path / "out")
    argv[argv.index("--gpt") + 1] = str(tmp_path / "pickled.pt")
    assert "weights_only=True" in cli_error(capsys, argv)
    assert not (tmp_path / "out").exists()


class Unsafe:
    """An arbitrary pickled class: weights_only loading must refuse to rebuild it."""


def test_training_checkpoints_with_their_arguments_convert(tmp_path):
    """LlamaGen's training scripts save {"model", "optimizer", "steps", "args" (argparse.Namespace), "ema"}."""
    sd = torch.load(FIXTURES / "gpt_c2i.pt", weights_only=True)["model"]
    ckpt = {"model": {f"module._orig_mod.{k}": v for k, v in sd.items()}, "optimizer": {"state": {}},
            "steps": 5000, "args": argparse.Namespace(gpt_model="GPT-B", lr=1e-4), "ema": {"x": torch.zeros(1)}}
    torch.save(ckpt, tmp_path / "0005000.pt")
    argv = convert_args("c2i", tmp_path / "out")
    argv[argv.index("--gpt") + 1] = str(tmp_path / "0005000.pt")
    assert main(argv) == 0
    assert torch.equal(load_pipeline(tmp_path / "out").transformer.output.weight, sd["output.weight"].float())


def test_t2i_needs_a_text_encoder_and_out_must_be_new(tmp_path, capsys):
    err = cli_error(capsys, convert_args("t2i", tmp_path / "out"))
    assert "--text-encoder is required" in err and "t2i" in err
    assert not (tmp_path / "out").exists()
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("mine")
    assert "--out" in cli_error(capsys, convert_args("c2i", tmp_path / "notes"))
    assert (tmp_path / "notes" / "keep.txt").read_text() == "mine"


def test_call_errors_name_the_argument(pipes):
    c2i, t2i = pipes["c2i"], pipes["t2i"]
    with pytest.raises(ValueError, match=r"class_labels entries must be an integer in \[0, 9\]; got 10"):
        c2i(class_labels=[3, 10])
    with pytest.raises(ValueError, match="class_labels is required"):
        c2i()
    with pytest.raises(ValueError, match="class-conditional .*class_labels="):
        c2i(prompt="a red cat")
    with pytest.raises(ValueError, match="text-conditional"):
        t2i(class_labels=3)
    with pytest.raises(ValueError, match="cfg_interval"):
        c2i(class_labels=3, cfg_interval=-2)
    with pytest.raises(ValueError, match=r"prompt_embeds must be a tensor of shape \(B, 120, 32\)"):
        t2i(prompt_embeds=torch.zeros(1, 7, META["caption_dim"]))


def test_callback_on_step_end_sees_and_steers_every_code(pipes):
    """Once per decoder pass, with the codes so far; a code the callback sets is the one generated (c2i, AR)."""
    c2i = pipes["c2i"]
    h, w = c2i.vq_model.token_shape
    call = lambda **kw: c2i(class_labels=[3, 5], generator=[torch.Generator().manual_seed(s) for s in (0, 1)],  # noqa: E731
                            **kw)
    assert_step_callback(call, widths=list(range(1, h * w + 1)), value=2)


def test_generate_cli_with_a_class_label(converted, tmp_path, capsys):
    out = tmp_path / "img.png"
    assert main(["generate", "--model", str(converted / "c2i"), "--class-label", "3", "--top-k", "1", "--out", str(out),
                 "--json"]) == 0
    assert out.is_file()
    assert "--class-label is required" in cli_error(capsys, ["generate", "--model", str(converted / "c2i"), "a cat"])


# --- speculative Jacobi decoding through LlamaGenBackend: exact in distribution ---

N_SAMPLES = 10000


def test_sjd_samples_the_exact_distribution():
    """A 2x2-token, 4-code c2i model: every image's probability by teacher forcing (guidance 2 with
    cfg_interval 1, temperature 0.8, top-k 3), against 10000 SJD samples through `LlamaGenBackend` (total variation
    within the McDiarmid bound of tests/test_sjd.py for a 1e-6 failure rate). Plain AR runs through the same
    backend and draws LlamaGen's own multinomial tokens (the parity tests above)."""
    torch.manual_seed(0)
    model = LlamaGenGPT(vocab_size=4, dim=32, n_layer=2, n_head=2, ffn_hidden=32, num_classes=3, grid_size=2).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.2)
    V, N, label = 4, 4, 1
    cfg = SamplingConfig(guidance_scale=2.0, temperature=0.8, top_k=3)
    images = torch.tensor(list(itertools.product(range(V), repeat=N)))
    with torch.no_grad():
        def logits(labels):  # teacher forcing, no cache: condition at slot 0, image token k at slot 1 + k
            x = torch.cat([model.embed_condition(labels), model.tok_embeddings(images[:, :-1])], 1)
            return model(x, torch.arange(N).expand(len(images), N))
        c = logits(torch.full((len(images),), label))
        u = logits(torch.full((len(images),), model.null_class))
    guided = torch.where((torch.arange(N) > 2)[None, :, None], c, cfg_combine(c, u, cfg.guidance_scale))
    logp = process_logits(guided.flatten(0, 1), cfg).view(-1, N, V).log_softmax(-1)
    target = logp.gather(-1, images[..., None]).squeeze(-1).sum(-1).exp()
    assert target.max() < 0.5 and (target > 1e-3).sum() > 20  # a distribution worth testing
    bound = 0.5 * float((target * (1 - target) / N_SAMPLES).sqrt().sum()) + math.sqrt(math.log(1e6) / (2 * N_SAMPLES))

    def backend():
        labels = torch.tensor([label] * N_SAMPLES + [model.null_class] * N_SAMPLES)
        return LlamaGenBackend(model, model.embed_condition(labels), torch.ones(2 * N_SAMPLES, 1, dtype=torch.bool),
                               cfg.guidance_scale, cfg_interval=1, window=3)

    def distance(samples, p=target):
        index = (samples * V ** torch.arange(N - 1, -1, -1)).sum(1)
        empirical = torch.bincount(index, minlength=V ** N).double() / len(samples)
        return 0.5 * float((empirical - p.double()).abs().sum())

    with torch.no_grad():
        torch.manual_seed(1)
        sjd, stats = jacobi_sample(backend(), N, cfg, SJDConfig(3, "random"))
    assert distance(sjd) < bound
    assert stats.mean_accepted_length > 1.2  # drafts were accepted: SJD did more than plain AR
    # the check has power: the distribution with guidance on every token (no cfg_interval) is rejected
    always = process_logits(cfg_combine(c, u, cfg.guidance_scale).flatten(0, 1), cfg).view(-1, N, V).log_softmax(-1)
    wrong = always.gather(-1, images[..., None]).squeeze(-1).sum(-1).exp()
    assert distance(sjd, wrong) > 2 * bound
