"""Janus through mmgen's own loop: a tiny random `JanusForConditionalGeneration` + `JanusProcessor` saved in the
hub layout loads with `load_pipeline`; greedy tokens equal transformers' `generate(generation_mode="image")`;
speculative Jacobi decoding samples the model's exact image distribution; the watermark embeds and detects; the
CLI generates and detects on the directory."""

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mmgen.pipelines import load_pipeline
from mmgen.pipelines.backend import sample_ar
from mmgen.pipelines.janus import JanusBackend, JanusPipeline
from mmgen.sampling.logits import SamplingConfig
from mmgen.sampling.sjd import SJDConfig, jacobi_sample
from mmgen.watermark import detect_tokens, detect_tokens_combined

from test_diffusers_layout import assert_step_callback
from test_sjd import empirical, tv, tv_bound  # the enumeration helpers and their sample-size bound

WORDS = ["<bos>", "<pad>", "<image_placeholder>", "<begin_of_image>", "<end_of_image>", "<unk>",
         "a", "red", "cat", "dog", "blue", "sky"]
BOS, PAD, BOI = 0, 1, 3


def tiny_processor(side: int, num_tokens: int, chat_template: str | None = None):
    """A word-level tokenizer with Janus's special tokens (BOS added in front) and a matching image processor."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import JanusImageProcessor, JanusProcessor, PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.add_special_tokens(WORDS[:5])  # so "cat<begin_of_image>" splits at the special token
    tk.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", BOS)])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<bos>", pad_token="<pad>", unk_token="<unk>",
                                  extra_special_tokens={"image_token": WORDS[2], "boi_token": WORDS[3],
                                                        "eoi_token": WORDS[4]})
    return JanusProcessor(image_processor=JanusImageProcessor(size={"height": side, "width": side}), tokenizer=tok,
                          num_image_tokens=num_tokens, chat_template=chat_template)


def tiny_janus(grid: int, codebook: int, seed: int = 0, std: float = 1.0, head_std: float = 0.05):
    """JanusForConditionalGeneration with 4x4-pixel VQ patches: (4 grid)^2 px images, grid^2 tokens. The default
    init gives near-constant greedy images; the decoder's weights are redrawn with spread `std` (varied tokens)
    and the generation head's output layer with `head_std` (logits of moderate entropy, for the watermark)."""
    from transformers import (JanusConfig, JanusForConditionalGeneration, JanusVisionConfig, JanusVQVAEConfig,
                              LlamaConfig)

    H = 32
    config = JanusConfig(
        text_config=LlamaConfig(vocab_size=len(WORDS), hidden_size=H, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                                pad_token_id=PAD, bos_token_id=BOS),
        vision_config=JanusVisionConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=1,
                                        image_size=4 * grid, patch_size=4, num_image_tokens=grid * grid,
                                        projection_dim=H, mlp_ratio=2.0),
        vq_config=JanusVQVAEConfig(base_channels=32, channel_multiplier=[1, 1, 1], embed_dim=4, latent_channels=32,
                                   num_embeddings=codebook, num_res_blocks=1, projection_dim=H,
                                   image_token_embed_dim=H),
        image_token_id=2)
    torch.manual_seed(seed)
    model = JanusForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "language_model" in name or "generation" in name:
                p.normal_(0, std)
        model.model.generation_head.vision_head.weight.normal_(0, head_std)
    gen = model.generation_config
    gen.bos_token_id, gen.pad_token_id, gen.generation_kwargs = BOS, PAD, {"boi_token_id": BOI}
    gen._from_model_config = False  # saved as written (as the hub's generation_config.json), not rebuilt on load
    return model


@pytest.fixture(scope="module")
def janus_dir(tmp_path_factory):
    """A tiny Janus checkpoint in the hub layout: 16 px images, 4x4 tokens, a codebook of 32."""
    path = tmp_path_factory.mktemp("janus")
    tiny_janus(grid=4, codebook=32).save_pretrained(path)
    tiny_processor(16, 16).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def pipe(janus_dir):
    pipe = load_pipeline(janus_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_loads_from_the_hub_layout(janus_dir, pipe, tmp_path):
    assert isinstance(pipe, JanusPipeline)
    tok = pipe.visual_tokenizer
    assert (tok.image_size, tok.token_shape, tok.vocab_size) == (16, (4, 4), 32)
    assert tok.image_mean == tuple(pipe.processor.image_processor.image_mean)
    assert pipe.default_guidance_scale == 5.0  # transformers' Janus default, the generation config sets none
    cond, uncond = pipe.encode_prompts(["a red cat", "dog"])
    assert cond == [[BOS, 6, 7, 8, BOI], [BOS, 9, BOI]]
    assert uncond == [[BOS, PAD, PAD, PAD, BOI], [BOS, PAD, BOI]]

    template = "{% for m in messages %}sky {{ m['content'][0]['text'] }}{% endfor %}"  # as the hub's: a user turn
    chat = JanusPipeline(pipe.model, tiny_processor(16, 16, chat_template=template))
    assert chat.encode_prompts(["dog"]) == ([[BOS, 11, 9, BOI]], [[BOS, PAD, PAD, BOI]])

    pipe.watermark = config = pipe.watermark_config()  # held, so saved (a watermarked call alone saves none)
    pipe.save_pretrained(tmp_path / "again")
    pipe.watermark = None
    again = load_pipeline(tmp_path / "again")  # the transformers layout back, with watermark.json
    assert isinstance(again, JanusPipeline) and again.watermark.clusters == config.clusters
    assert not (tmp_path / "again" / "model_index.json").exists()
    for key, value in again.model.state_dict().items():
        assert torch.equal(value, pipe.model.state_dict()[key]), key

    with pytest.raises(ValueError, match=r"height=32: this Janus checkpoint generates 16x16 images only"):
        pipe("a cat", height=32)
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "config.json").write_text((janus_dir / "config.json").read_text())
    (partial / "model.safetensors").write_bytes((janus_dir / "model.safetensors").read_bytes())
    with pytest.raises(FileNotFoundError, match=r"missing tokenizer \(tokenizer.json or tokenizer.model\); "
                                                r"image processor config"):
        load_pipeline(partial)


@pytest.mark.parametrize("guidance", [5.0, 2.0])
def test_greedy_tokens_equal_transformers_generate(pipe, guidance):
    prompts = ["a red cat", "dog"]  # different lengths: the shorter one is left-padded in generate()
    inputs = pipe.processor(text=prompts, generation_mode="image", padding=True)
    ref = pipe.model.generate(**inputs, generation_mode="image", do_sample=False, guidance_scale=guidance)
    out = pipe(prompts, temperature=0, guidance_scale=guidance)
    assert ref.shape == (2, 16) and len(set(ref.flatten().tolist())) > 4  # not a degenerate repeat
    assert torch.equal(out.tokens.flatten(1), ref)
    assert out.decoder_passes == 16
    # pixels as transformers' own decode + processor postprocess give them (it truncates where we round)
    ref_pixels = pipe.processor.postprocess(list(pipe.model.decode_image_tokens(ref).float()),
                                            return_tensors="pt")["pixel_values"]
    ours = torch.stack([torch.from_numpy(np.array(im)).permute(2, 0, 1) for im in out.images])
    assert (ours.int() - ref_pixels.int()).abs().max() <= 1
    sjd = pipe(prompts, temperature=0, guidance_scale=guidance, sampler="sjd", sjd_window=6, output_type="pt")
    assert torch.equal(sjd.tokens, out.tokens) and sjd.decoder_passes < 16


def test_sampling_is_seeded_per_image(pipe):
    g = [torch.Generator().manual_seed(s) for s in (3, 4)]
    both = pipe("a red cat", num_images_per_prompt=2, generator=g, output_type="pt").tokens
    one = pipe("a red cat", generator=[torch.Generator().manual_seed(4)], output_type="pt").tokens
    assert torch.equal(both[1:], one) and not torch.equal(both[0], both[1])


def test_callback_on_step_end_sees_and_steers_every_code(pipe):
    """Once per decoder pass (16 codes, AR), with the codes so far; a code the callback sets is the one generated.
    Under SJD once per pass, with no tensors."""
    call = lambda **kw: pipe("a red cat", generator=[torch.Generator().manual_seed(0)], **kw)  # noqa: E731
    assert_step_callback(call, widths=list(range(1, 17)), value=5)
    steps = []
    out = pipe("a red cat", sampler="sjd", sjd_window=4, generator=[torch.Generator().manual_seed(0)],
               callback_on_step_end=lambda p, i, t, kw: steps.append((i, kw)) or kw)
    assert steps == [(i, {}) for i in range(out.decoder_passes)] and out.decoder_passes < 16
    with pytest.raises(ValueError, match="callback_on_step_end_tensor_inputs needs sampler='ar', got 'sjd'"):
        pipe("a red cat", sampler="sjd", callback_on_step_end=lambda p, i, t, kw: kw,
             callback_on_step_end_tensor_inputs=["tokens"])


# exactness by enumeration: 2x2 tokens over a codebook of 4 (256 images)
GRID, CODES = 2, 4


@torch.no_grad()
def exact_distribution(model, cond, uncond, sampling: SamplingConfig) -> torch.Tensor:
    """P(image) for all CODES ** (GRID*GRID) images from the model's own conditionals, by teacher forcing
    through transformers' forward (full causal attention, no cache: independent of `JanusBackend`)."""
    images = torch.tensor(list(itertools.product(range(CODES), repeat=GRID * GRID)))
    N, P = len(images), len(cond)

    def logits(prompt):
        text = model.get_input_embeddings()(torch.tensor(prompt)).expand(N, P, -1)
        x = torch.cat([text, model.prepare_embeddings_for_image_generation(images[:, :-1])], 1)
        h = model.model.language_model(inputs_embeds=x).last_hidden_state[:, P - 1:]  # from <boi> on
        return model.model.generation_head(h).float()

    c, u = logits(cond), logits(uncond)
    logp = torch.log_softmax((u + sampling.guidance_scale * (c - u)) / sampling.temperature, -1)
    return logp.gather(-1, images[..., None]).squeeze(-1).sum(1).exp()


@torch.no_grad()
def sample_images(model, cond, uncond, sampling, sjd: SJDConfig | None, n: int, seed: int) -> torch.Tensor:
    """n images (n, GRID*GRID) with plain AR (`sjd` None) or SJD, one generator per image."""
    gens = [torch.Generator().manual_seed(seed + i) for i in range(n)]
    backend = JanusBackend(model, [cond] * n, [uncond] * n, GRID * GRID, 1 if sjd is None else sjd.window,
                           sampling.guidance_scale, PAD)
    if sjd is None:
        return sample_ar(backend, GRID * GRID, sampling, gens)
    return jacobi_sample(backend, GRID * GRID, sampling, sjd, gens, grid_width=GRID)[0]


N_SAMPLES = 20000
EXACT = dict(cond=[BOS, 6, 7, 8, BOI], uncond=[BOS, PAD, PAD, PAD, BOI],
             sampling=SamplingConfig(guidance_scale=2.0, temperature=0.8))


@pytest.fixture(scope="module")
def exact_model():
    model = tiny_janus(GRID, CODES, seed=1, std=0.5).requires_grad_(False)
    target = exact_distribution(model, **EXACT)
    assert abs(float(target.sum()) - 1) < 1e-4
    assert target.max() < 0.5 and (target > 1e-3).sum() > 20  # a distribution worth testing
    return model, target


@pytest.mark.parametrize("sjd", [None, SJDConfig(window=4, init="random"),
                                 SJDConfig(window=3, init="repeat", coupled=True)],
                         ids=["ar", "sjd-random", "sjd-coupled"])
def test_sampling_matches_the_exact_distribution(exact_model, sjd):
    model, target = exact_model
    codes = sample_images(model, **EXACT, sjd=sjd, n=N_SAMPLES, seed=10)
    assert tv(empirical(codes, CODES), target) < tv_bound(target, N_SAMPLES)


def test_distribution_check_has_power(exact_model):
    """The same bound rejects SJD whose unconditional rows keep the prompt (guidance then does nothing)."""
    model, target = exact_model
    codes = sample_images(model, EXACT["cond"], EXACT["cond"], EXACT["sampling"], SJDConfig(4), N_SAMPLES, 10)
    assert tv(empirical(codes, CODES), target) > tv_bound(target, N_SAMPLES)


def test_watermark_embeds_in_ar_and_sjd_and_is_detected(pipe):
    config = pipe.watermark_config()  # k-means over the model's own VQ codebook
    assert len(config.clusters) == 32 and len(set(config.clusters)) == 16
    g = lambda: [torch.Generator().manual_seed(100 + i) for i in range(8)]  # noqa: E731
    prompts = ["a red cat", "dog blue sky"]
    marked = [pipe(prompts, num_images_per_prompt=4, generator=g(), watermark_key="k", output_type="pt",
                   **extra).tokens.flatten(1) for extra in ({}, {"sampler": "sjd", "sjd_window": 4})]
    plain = pipe(prompts, num_images_per_prompt=4, generator=g(), output_type="pt").tokens.flatten(1)
    for tokens in marked:  # the 8 images' tokens as one set
        p_key = detect_tokens_combined(tokens, config, "k").p_value
        p_others = torch.tensor([detect_tokens_combined(tokens, config, f"other-{i}").p_value for i in range(20)])
        assert p_key < 1e-3 and p_others.min() > p_key and p_others.median() > 0.1
    assert detect_tokens_combined(plain, config, "k").p_value > 0.01


def test_watermark_false_positive_rate_is_calibrated(pipe):
    """Unwatermarked token streams sampled from the model, each tested under its own key: the p-value is exact
    under no watermark, so at most the nominal rate (+ 3 binomial sds) is flagged."""
    config = pipe.watermark_config()
    tokens = pipe(["a red cat", "dog"], num_images_per_prompt=120, generator=torch.Generator().manual_seed(7),
                  output_type="pt").tokens.flatten(1)
    p = torch.tensor([detect_tokens(row[None], config, f"key-{i}")[0].p_value for i, row in enumerate(tokens)])
    for nominal in (0.01, 0.05, 0.2):
        assert (p < nominal).float().mean() <= nominal + 3 * (nominal * (1 - nominal) / len(p)) ** 0.5, nominal
    assert (p < 0.5).float().mean() > 0.3  # p-values spread over [0, 1], not stuck at 1


def test_cli_generates_and_detects_on_a_janus_directory(janus_dir, tmp_path, capsys):
    from mmgen import cli

    outs = []
    for run in ("a", "b"):
        assert cli.main(["generate", "a red cat", "--model", str(janus_dir), "--num-images", "2", "--seed", "0",
                         "--watermark-key", "k", "--sampler", "sjd", "--out", str(tmp_path / run / "img.png"),
                         "--json"]) == 0
        result = json.loads(capsys.readouterr().out)
        assert result["pipeline"] == "JanusPipeline" and result["nfe_per_image"] < 16
        outs.append([Path(p).read_bytes() for p in result["images"]])
    assert outs[0] == outs[1] and outs[0][0] != outs[0][1]  # same seed, same bytes; two different images
    images = [str(tmp_path / "a" / f"img_{i}.png") for i in range(2)]
    assert cli.main(["watermark", "detect", *images, "--model", str(janus_dir), "--key", "k", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["method"] == "c-reweight" and all(0 <= r["p_value"] <= 1 for r in report["images"])


def test_a_text_only_checkpoint_is_refused(tmp_path, capsys):
    from transformers import LlamaConfig, LlamaForCausalLM

    from mmgen import cli

    LlamaForCausalLM(LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                 num_attention_heads=1)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"type 'llama'.*supported model types: janus, emu3"):
        load_pipeline(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        cli.main(["generate", "a cat", "--model", str(tmp_path), "--out", str(tmp_path / "x.png")])
    assert exit_.value.code == 2 and "supported model types: janus, emu3" in capsys.readouterr().err
