"""Emu3 through transformers with mmgen's own sampling loop (`mmgen.pipelines.emu3`), on a tiny random
Emu3ForConditionalGeneration saved with its processor (tokenizer built offline with Emu3's special tokens).

Greedy codes equal transformers' documented image-generation call token for token; SJD equals greedy AR and
samples the exact AR distribution (enumeration of a 2 x 2 image of 4 codes, total variation bound as in
tests/test_sjd.py); the watermark embeds over codebook ids and its detector is calibrated."""

import itertools
import json
import shutil

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (Emu3Config, Emu3ForConditionalGeneration, Emu3ImageProcessor, Emu3Processor,
                          PreTrainedTokenizerFast)

from PIL import Image

from mmgen import cli
from mmgen.pipelines import load_pipeline
from mmgen.pipelines.backend import sample_ar
from mmgen.pipelines.base import generators_from_seed
from mmgen.pipelines.emu3 import Emu3Backend, Emu3Pipeline
from mmgen.sampling.logits import SamplingConfig, cfg_combine, process_logits
from mmgen.sampling.sjd import SJDConfig, jacobi_sample
from mmgen.watermark import detect_tokens, detect_tokens_combined
from test_diffusers_layout import assert_step_callback
from test_sjd import N_SAMPLES, empirical, tv, tv_bound

WORDS = ["a", "red", "circle", "blue", "square", "lowres", "blurry", ".", ",", "*"] + [str(i) for i in range(10)]
# Emu3's special tokens as its hub tokenizer names them (pad, bos, eos, placeholder, image start / end, image
# wrapper, end-of-line, end-of-frame)
SPECIAL = ["<|endoftext|>", "<|extra_203|>", "<|extra_204|>", "<image>", "<|image start|>", "<|image end|>",
           "<|image token|>", "<|extra_200|>", "<|extra_201|>", "[UNK]"]
NEG = "lowres , blurry ."


def tiny_emu3(codebook=16, seed=0, scale=0.35):
    """A 2-layer Emu3 (8x VQ-VAE, `codebook` codes) and its processor: a word-level tokenizer holding Emu3's
    special tokens and one visual token per code, named as the hub's (`<|visual token 000000|>`); LM weights drawn
    with std `scale`."""
    vocab = {t: i for i, t in enumerate(SPECIAL + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(),
                                                     pre_tokenizers.Digits(individual_digits=True)])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<|extra_203|>", eos_token="<|extra_204|>", pad_token="<|endoftext|>",
        unk_token="[UNK]", padding_side="left",
        extra_special_tokens={"image_token": "<image>", "boi_token": "<|image start|>", "eoi_token": "<|image end|>",
                              "image_wrapper_token": "<|image token|>", "eof_token": "<|extra_201|>"})
    tok.add_tokens([f"<|visual token {i:06d}|>" for i in range(codebook)], special_tokens=True)
    processor = Emu3Processor(Emu3ImageProcessor(min_pixels=32 * 32, max_pixels=32 * 32), tok)
    config = Emu3Config(
        vq_config=dict(base_channels=32, channel_multiplier=[1, 1, 1, 1], embed_dim=4, latent_channels=4,
                       codebook_size=codebook, num_res_blocks=1, hidden_size=32, num_attention_heads=1,
                       attn_resolutions=[]),
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0,
                         bos_token_id=1, eos_token_id=2),
        vocabulary_map=tok.get_vocab())
    torch.manual_seed(seed)
    model = Emu3ForConditionalGeneration(config).eval()
    with torch.no_grad():  # conditionals far from uniform
        for name, p in model.named_parameters():
            if p.dim() >= 2 and "vqmodel" not in name:
                p.normal_(0, scale)
    return model, processor


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """tiny_emu3() saved as the hub lays Emu3-Gen-hf out (model + processor in one directory), guidance 2 in its
    generation config; and the pipeline load_pipeline gives for it."""
    d = tmp_path_factory.mktemp("emu3")
    model, processor = tiny_emu3()
    model.generation_config.guidance_scale = 2.0
    model.save_pretrained(d)
    processor.save_pretrained(d)
    pipe = load_pipeline(d)
    pipe.set_progress_bar_config(disable=True)
    return d, pipe


def test_load_pipeline_generates_reproducibly(saved):
    d, pipe = saved
    assert isinstance(pipe, Emu3Pipeline) and pipe.config.default_guidance_scale == 2.0
    assert pipe.default_size == (720, 720)  # the processor's own image area (518400 px), in whole codes
    out = pipe(["a red circle"], num_images_per_prompt=2, image_size=32, generator=generators_from_seed(0, 2))
    again = pipe("a red circle", num_images_per_prompt=2, height=32, width=32, generator=generators_from_seed(0, 2))
    assert out.tokens.shape == (2, 4, 4) and out.tokens.max() < 16 and out.decoder_passes == 16
    assert torch.equal(out.tokens, again.tokens) and not torch.equal(out.tokens[0], out.tokens[1])
    assert [im.size for im in out.images] == [(32, 32)] * 2
    alone = pipe("a red circle", height=32, width=32, generator=[torch.Generator().manual_seed(1)])
    assert torch.equal(alone.tokens[0], out.tokens[1])  # image i's codes do not depend on the batch
    wide = pipe("a red circle", height=16, width=48, output_type="pt", generator=generators_from_seed(0, 1))
    assert wide.tokens.shape == (1, 2, 6) and wide.images.shape == (1, 3, 16, 48)


def _documented_generate(pipe, prompts, guidance):
    """Codes from transformers' documented Emu3 image-generation call: prefix_allowed_tokens_fn forcing the row
    structure, negative_prompt_ids for guidance; greedy."""
    model, processor = pipe.model, pipe.processor
    tok = processor.tokenizer
    inputs = processor(text=prompts, padding=True, return_tensors="pt", return_for_image_generation=True,
                       image_area=32 * 32)
    neg = processor(text=[NEG] * len(prompts), return_tensors="pt")
    height, width = inputs.pop("image_sizes")[0]
    visual = model.vocabulary_mapping.image_tokens

    def prefix_allowed_tokens_fn(batch_id, input_ids):
        position = torch.nonzero(input_ids == tok.image_wrapper_token_id, as_tuple=True)[0][0]
        offset = input_ids.shape[0] - position
        if offset % (width + 1) == 0:
            return (model.vocabulary_mapping.eol_token_id,)
        for i, token in enumerate((tok.eof_token_id, tok.eoi_token_id, tok.eos_token_id)):
            if offset == (width + 1) * height + 1 + i:
                return (token,)
        return (tok.pad_token_id,) if offset > (width + 1) * height + 3 else visual

    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=height * (width + 1) + 3, do_sample=False,
                             prefix_allowed_tokens_fn=prefix_allowed_tokens_fn, negative_prompt_ids=neg.input_ids,
                             negative_prompt_attention_mask=neg.attention_mask, guidance_scale=guidance)
    new = out[:, inputs.input_ids.shape[1]:]
    assert torch.equal(new[:, -3:], torch.tensor([[tok.eof_token_id, tok.eoi_token_id, tok.eos_token_id]] * 2))
    return model.vocabulary_mapping.convert_bpe2img(new[:, :-3].reshape(-1, height, width + 1)).long()


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_greedy_codes_equal_transformers_generate(saved, guidance):
    """Two prompts of different lengths (left-padded together), forced end-of-lines, the negative prompt as the
    unconditional row: the same codes as generate()."""
    _, pipe = saved
    prompts = ["a red circle", "blue"]
    ref = _documented_generate(pipe, prompts, guidance)
    ours = pipe(prompts, guidance_scale=guidance, negative_prompt=NEG, image_size=32, temperature=0)
    assert torch.equal(ours.tokens, ref)
    sjd = pipe(prompts, guidance_scale=guidance, negative_prompt=NEG, image_size=32, temperature=0, sampler="sjd",
               sjd_window=6, generator=generators_from_seed(0, 2))
    assert torch.equal(sjd.tokens, ref) and sjd.decoder_passes <= 16


@pytest.mark.parametrize("init,window", [("random", 6), ("above", 5), ("sample_left", 16)])
def test_greedy_sjd_equals_greedy_ar(saved, init, window):
    _, pipe = saved
    kw = dict(guidance_scale=3.0, temperature=0, top_k=5, height=32, width=48, generator=generators_from_seed(3, 3))
    ar = pipe(["a red circle", "blue square", "a"], **kw)
    sjd = pipe(["a red circle", "blue square", "a"], sampler="sjd", sjd_window=window, sjd_init=init, **kw)
    assert torch.equal(sjd.tokens, ar.tokens) and sjd.decoder_passes < ar.decoder_passes == 24


def test_callback_on_step_end_sees_and_steers_every_code(saved):
    """Once per decoder pass (a 2 x 2 grid: 4 codes, the forced end-of-lines not among them), with the codes so far;
    a code the callback sets is the one generated."""
    _, pipe = saved
    call = lambda **kw: pipe("a red circle", image_size=16, generator=generators_from_seed(0, 2),  # noqa: E731
                             num_images_per_prompt=2, **kw)
    assert_step_callback(call, widths=[1, 2, 3, 4], value=7)


def _configured(saved, tmp_path, **tokenizer_config):
    """A copy of the saved checkpoint whose processor is configured through tokenizer_config.json (where
    transformers' processor reads its default image area and ratio from)."""
    d = shutil.copytree(saved[0], tmp_path / "emu3")
    config = json.loads((d / "tokenizer_config.json").read_text())
    (d / "tokenizer_config.json").write_text(json.dumps(config | tokenizer_config))
    return d


def test_default_size_is_the_processors_own(saved, tmp_path, capsys):
    """A processor configured for a 32 x 32 default area: the call and `mmgen generate` with no size give the image
    the processor's generation path describes (4 x 4 codes), with its very prompt."""
    d = _configured(saved, tmp_path, image_area=32 * 32)
    pipe = load_pipeline(d)
    assert pipe.default_size == (32, 32) and saved[1].default_size == (720, 720)
    own = pipe.processor(text=["a red circle"], return_for_image_generation=True)
    assert own["image_sizes"] == [[4, 4]] and pipe.prompt_ids(["a red circle"], (4, 4)) == own["input_ids"]
    out = tmp_path / "img.png"
    assert cli.main(["generate", "a red circle", "--model", str(d), "--out", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["nfe_per_image"] == 16 and Image.open(out).size == (32, 32)
    wide = pipe("a red circle", width=48, output_type="pt", generator=generators_from_seed(0, 1))
    assert wide.images.shape == (1, 3, 32, 48)  # the other side still the default


@pytest.mark.parametrize("config, why", [(dict(image_area=10), "makes a 0 x 0 code grid"),
                                         (dict(ratio="wide"), "fails (ValueError")])
def test_a_processor_without_a_usable_size_asks_for_one(saved, tmp_path, capsys, config, why):
    d = _configured(saved, tmp_path, **config)
    out = tmp_path / "img.png"
    with pytest.raises(SystemExit) as exc:
        cli.main(["generate", "a red circle", "--model", str(d), "--out", str(out)])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "height and width are required" in err and why in err and not out.exists()
    assert cli.main(["generate", "a red circle", "--model", str(d), "--out", str(out), "--height", "16",
                     "--width", "16"]) == 0
    assert Image.open(out).size == (16, 16)


# ---- exactness: a 2 x 2 image of 4 codes, every image enumerated ---------------------------------------------


CFG = SamplingConfig(guidance_scale=2.0, temperature=0.9, top_k=3)
SCALE = 0.15  # LM weight std of the 4-code model: 29 images above 1e-3, none above 0.17


@pytest.fixture(scope="module")
def small():
    """tiny_emu3 with 4 codes, its prompt rows for a 2 x 2 image, and the exact probability of each of the 256
    images under CFG, from teacher-forced full sequences (the end-of-line written after each row)."""
    model, processor = tiny_emu3(codebook=4, seed=1, scale=SCALE)
    pipe = Emu3Pipeline(model=model, processor=processor)
    cond, uncond = pipe.prompt_ids(["a red circle"], (2, 2))[0], pipe.negative_ids([NEG])[0]
    images = torch.tensor(list(itertools.product(range(4), repeat=4)))
    lm = pipe.code_ids[images]
    eol = torch.full((len(images), 1), pipe.eol_id)
    body = torch.cat([lm[:, :2], eol, lm[:, 2:]], 1)  # c0 c1 <eol> c2 c3
    logits = []
    with torch.no_grad():
        for prompt in (cond, uncond):
            ids = torch.cat([torch.tensor(prompt).expand(len(images), -1), body], 1)
            before = [len(prompt) - 1 + k for k in (0, 1, 3, 4)]  # the position whose logits give each code
            logits.append(model(input_ids=ids).logits[:, before][..., pipe.code_ids])
    scores = process_logits(cfg_combine(*logits, CFG.guidance_scale).flatten(0, 1), CFG).view(len(images), 4, 4)
    target = scores.log_softmax(-1).gather(-1, images[..., None]).squeeze(-1).sum(-1).exp()
    return pipe, cond, uncond, target


def _backend(pipe, cond, uncond, window, n=N_SAMPLES):
    return Emu3Backend(pipe.model, [cond] * n, (2, 2), pipe.code_ids, pipe.eol_id, 0, window=window,
                       guidance_scale=CFG.guidance_scale, uncond_prompts=[uncond] * n)


def test_ar_and_sjd_sample_the_exact_distribution(small):
    pipe, cond, uncond, target = small
    assert target.sum().item() == pytest.approx(1.0, abs=1e-4)
    assert target.max() < 0.5 and (target > 1e-3).sum() > 10  # a distribution worth testing
    bound = tv_bound(target, N_SAMPLES)
    torch.manual_seed(0)
    ar = sample_ar(_backend(pipe, cond, uncond, 1), 4, CFG)
    assert tv(empirical(ar, 4), target) < bound
    for init, window, coupled in [("random", 4, False), ("above", 3, True)]:  # windows span the forced <eol>
        torch.manual_seed(1)
        codes, stats = jacobi_sample(_backend(pipe, cond, uncond, window), 4, CFG, SJDConfig(window, init, coupled),
                                     grid_width=2)
        distance = tv(empirical(codes, 4), target)
        assert distance < bound, f"init={init}: TV {distance:.4f} >= bound {bound:.4f}"
        assert stats.mean_accepted_length > 1.2  # drafts accepted across the forced <eol>


# ---- watermark ------------------------------------------------------------------------------------------------


def test_watermark_embeds_and_detector_is_calibrated(saved):
    _, pipe = saved
    cfg = pipe.watermark_config()  # k-means of the model's own VQ codebook
    assert len(cfg.clusters) == 16 and cfg.clusters == pipe.watermark_config().clusters
    kw = dict(num_images_per_prompt=6, image_size=64, generator=generators_from_seed(10, 6))
    plain = pipe("a red circle", **kw)
    # false positives: unwatermarked codes under 60 keys (the codes do not depend on the key, so each test is H0)
    p = torch.tensor([d.p_value for k in range(60) for d in detect_tokens(plain.tokens, cfg, f"key-{k}")])
    for nominal in (0.05, 0.2):
        assert (p < nominal).float().mean() <= nominal + 3 * (nominal * (1 - nominal) / len(p)) ** 0.5
    assert (p < 0.5).float().mean() > 0.3
    for sampler in ("ar", "sjd"):
        marked = pipe("a red circle", watermark_key="k1", sampler=sampler, sjd_window=8, **kw)
        assert not torch.equal(marked.tokens, plain.tokens)
        assert detect_tokens_combined(marked.tokens, cfg, "k1").p_value < 0.01, sampler
        assert detect_tokens_combined(marked.tokens, cfg, "k2").p_value > 0.01
    found = pipe.detect_watermark(marked.images, "k1", combine=True)  # re-encoded at their own 64 px size
    assert len(found["images"]) == 6 and found["combined"]["images"] == 6
    assert all(0 <= d["p_value"] <= 1 and 0 < d["scored"] <= 64 for d in found["images"])


def test_save_pretrained_round_trip_with_watermark(saved, tmp_path):
    d, pipe = saved
    pipe.watermark = pipe.watermark_config()  # saved only when the pipeline holds one (a call does not make it so)
    pipe.save_pretrained(tmp_path / "copy")
    again = Emu3Pipeline.from_pretrained(tmp_path / "copy")
    again.set_progress_bar_config(disable=True)
    assert (tmp_path / "copy" / "watermark.json").is_file() and again.watermark == pipe.watermark
    kw = dict(image_size=32, temperature=0)
    assert torch.equal(again("a blue square", **kw).tokens, pipe("a blue square", **kw).tokens)


# ---- bad input -----------------------------------------------------------------------------------------------


def test_missing_processor_files_are_named(saved, tmp_path):
    d, _ = saved
    for name in ("config.json", "generation_config.json", "model.safetensors"):
        shutil.copy(d / name, tmp_path / name)
    with pytest.raises(FileNotFoundError, match=r"not a complete Emu3ForConditionalGeneration checkpoint: missing "
                                                r"image processor config \(processor_config\.json or "
                                                r"preprocessor_config\.json\); tokenizer config"):
        load_pipeline(tmp_path)


@pytest.mark.parametrize("kwargs,needle", [
    (dict(height=30), "height must be a positive multiple of 8"),
    (dict(width=0), "width must be a positive multiple of 8"),
    (dict(image_size=32, height=32), "either image_size or height/width"),
    (dict(image_size=32, negative_prompt=["x", "y"]), "negative_prompt must be a string or a list of one string"),
    (dict(image_size=32, sampler="beam"), "sampler must be one of ar, sjd"),
    (dict(image_size=32, top_k=0), "top_k must be an integer >= 1"),
])
def test_bad_call_arguments_are_named(saved, kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        saved[1]("a red circle", **kwargs)
