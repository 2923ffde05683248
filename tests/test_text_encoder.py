"""The text_encoder conditioning kind (`mmgen.conditioning.TextEncoderConditioning`, `mmgen.models.text_encoder`):
captions through a frozen pretrained encoder (tiny random T5 and BERT models built here, saved with
`save_pretrained`), features cached once, projected into the decoder's text embedding as the prefix with padding
masked and <null> as the learned null embedding; every paradigm of the registry, training, save / reload, the CLI;
LlamaGen's t2i conversion against fixtures made by LlamaGen's own T5 embedder and `generate`
(scripts/make_llamagen_t2i_fixtures.py)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny import load_script, tiny_vqgan
from safetensors.torch import load_file
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import BertConfig, BertModel, PreTrainedTokenizerFast, T5Config, T5EncoderModel

from mmgen import cli
from mmgen.conditioning import (KINDS, ConditionConfig, TextEncoderConditioning, cached_caption_features,
                                check_kind, load_text_encoder, make_conditioning, run_conditioning)
from mmgen.data.shapes import all_caption_words
from mmgen.models.text_encoder import CaptionProjection, caption_prefix, text_embedding
from mmgen.paradigms.protocol import FlowConfig, ModelConfig
from mmgen.pipelines import load_pipeline, save_pipeline
from mmgen.pipelines.registry import PARADIGMS, get_paradigm
from mmgen.text import UnifiedVocab
from mmgen.zoo import conditioning_kind, zoo_card
from test_protocols import images, tiny_tokenizer
from tokenizers_vis.protocol import as_visual_tokenizer

ROOT = Path(__file__).resolve().parents[1]
WORDS = ["cat", "dog", "on", "mat"] + all_caption_words()  # the shapes captions' words (the training test)
L = 6  # encoder tokens per caption (max_text_len)
torch.set_num_threads(1)


def word_tokenizer(specials: list[str], template: str | None) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over WORDS after `specials`, with an optional post-processing template."""
    vocab = {w: i for i, w in enumerate(specials + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>" if "<unk>" in vocab else "[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if template is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=template, special_tokens=[(s, vocab[s]) for s in specials if s in template])
    return tok


def tiny_t5(directory: Path, width: int = 16) -> Path:
    """A random T5 encoder (d_model `width`, one layer) and a T5-style word tokenizer (pad 0, </s> appended)."""
    specials = ["<pad>", "</s>", "<unk>"]
    torch.manual_seed(0)
    T5EncoderModel(T5Config(vocab_size=len(specials) + len(WORDS), d_model=width, d_kv=8, d_ff=32, num_layers=1,
                            num_heads=2)).save_pretrained(directory)
    PreTrainedTokenizerFast(tokenizer_object=word_tokenizer(specials, "$A </s>"), pad_token="<pad>",
                            eos_token="</s>", unk_token="<unk>").save_pretrained(directory)
    return directory


def tiny_bert(directory: Path) -> Path:
    """A random BERT-family encoder (hidden 24, one layer; MiniLM's family) and its [CLS] ... [SEP] tokenizer."""
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(specials) + len(WORDS), hidden_size=24, num_hidden_layers=1,
                         num_attention_heads=2, intermediate_size=32, max_position_embeddings=32),
              add_pooling_layer=False).save_pretrained(directory)
    PreTrainedTokenizerFast(tokenizer_object=word_tokenizer(specials, "[CLS] $A [SEP]"), pad_token="[PAD]",
                            unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]").save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory):
    return tiny_t5(tmp_path_factory.mktemp("t5"))


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    return tiny_bert(tmp_path_factory.mktemp("bert"))


@pytest.fixture(scope="module")
def cond(t5_dir):
    return TextEncoderConditioning(*load_text_encoder(t5_dir), L)


def parts(name: str, cond):
    """Tiny visual tokenizer, layout, decoder and caption projection of paradigm `name` (test_protocols' sizes)."""
    entry = get_paradigm(name)
    component = tiny_tokenizer(entry.module.TOKENS)
    tok = as_visual_tokenizer(component)
    vocab = UnifiedVocab(text_vocab_size=cond.vocab_size, image_vocab_size=tok.vocab_size)
    model_cfg = ModelConfig(dim=32, n_layers=1, n_heads=4, shuffle_window=2 if name == "token_shuffle" else 1)
    flow_cfg = FlowConfig(head_width=16, head_depth=1, flow_width=16, flow_depth=1, flow_heads=2, entity="cell")
    torch.manual_seed(0)
    layout = entry.module.make_layout(tok, vocab, cond.max_len, model_cfg, flow_cfg)
    model = entry.module.make_model(layout, model_cfg, flow_cfg)
    return entry, component, tok, layout, model, CaptionProjection(cond.feature_dim, 32)


def text_rows(model, layout, run):
    """The decoder's text embeddings while `run()` runs: every call of its text embedding that carries the text
    block (ids (R, T) with <boi> after the max_text_len condition slots), as (ids, embeddings)."""
    seen = []

    def hook(module, args, out):
        ids, L = args[0], layout.max_text_len
        if ids.dim() == 2 and ids.shape[1] > L and (ids[:, L] == layout.vocab.boi).all():
            seen.append((ids.clone(), out.detach().clone()))

    handle = text_embedding(model).register_forward_hook(hook)
    try:
        run()
    finally:
        handle.remove()
    return seen


# ---- the conditioning ------------------------------------------------------------------------------------------

def test_t5_and_bert_encoders_give_prefix_ids_and_features(t5_dir, bert_dir, cond):
    assert type(cond.text_encoder).__name__ == "T5EncoderModel" and not cond.text_encoder.training
    assert not any(p.requires_grad for p in cond.text_encoder.parameters())  # frozen
    assert (cond.kind, cond.vocab_size, cond.max_len, cond.feature_dim) == ("text_encoder", L + 1, L, 16)
    # "a red cat" + </s>: four valid tokens, ids 1 + j, padding none
    assert cond.condition_ids(["a red cat", "a dog"]) == [[1, 2, 3, 4], [1, 2, 3]]
    feats, mask = cond.features(["a red cat", "a dog"])
    assert feats.shape == (2, L, 16) and mask.tolist()[1] == [True] * 3 + [False] * 3
    bert = TextEncoderConditioning(*load_text_encoder(bert_dir), L)
    assert type(bert.text_encoder).__name__ == "BertModel" and bert.feature_dim == 24
    assert bert.condition_ids("a red cat") == [[1, 2, 3, 4, 5]]  # [CLS] a red cat [SEP]
    assert bert.features(["a red cat"])[0].shape == (1, L, 24)
    # the saved config names the kind; the pipeline's components rebuild it
    config = json.loads(json.dumps(cond.config()))
    assert config == {"kind": "text_encoder", "encoder": "T5EncoderModel", "feature_dim": 16}
    again = make_conditioning(config, cond.tokenizer, L, cond.text_encoder)
    assert again.condition_ids("a dog") == [[1, 2, 3]]
    assert "text_encoder" in KINDS and all("text_encoder" in entry.conditions for entry in PARADIGMS.values())


def test_bad_encoders_and_prompts_are_refused_by_name(tmp_path, t5_dir, cond):
    with pytest.raises(ValueError, match=r"^condition.encoder '.*missing' is not a directory"):
        load_text_encoder(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"^--text-encoder '.*empty' is not a saved transformers text encoder "
                                         r"\(no config.json\)"):
        load_text_encoder(tmp_path / "empty", "--text-encoder")
    tiny_vqgan().save_pretrained(tmp_path / "vq")  # a config.json, but a diffusers model's
    with pytest.raises(ValueError, match=r"^condition.encoder '.*vq' does not load as a transformers text encoder"):
        load_text_encoder(tmp_path / "vq")
    with pytest.raises(ValueError, match="needs condition.encoder="):
        check_kind("text_encoder")
    with pytest.raises(ValueError, match="condition.encoder applies to condition.kind=text_encoder only"):
        check_kind("caption", str(t5_dir))
    with pytest.raises(ValueError, match="condition.kind=text_encoder: its condition ids come with"):
        run_conditioning(ConditionConfig("text_encoder", str(t5_dir)), None)
    with pytest.raises(ValueError, match="^class_labels: this model is conditioned on text captions"):
        cond.condition_ids(class_labels=[1])
    with pytest.raises(ValueError, match=r"is 7 tokens long for the text encoder; the model accepts at most 6"):
        cond.condition_ids("a red cat on the mat")
    with pytest.raises(ValueError, match="^prompt must be a non-empty string"):
        cond.condition_ids("  ")
    assert cond.features(["a red cat on the mat"], truncate=True)[1].all()  # LlamaGen's T5 embedder cuts


def test_caption_features_are_computed_once_and_cached(tmp_path, t5_dir, cond):
    calls = []
    handle = cond.text_encoder.register_forward_hook(lambda m, args, out: calls.append(1))
    captions = ["a red cat", "a dog", "a red cat", "a blue square"]
    cache = tmp_path / "caption_features.safetensors"
    try:
        first = cached_caption_features(cond, captions, cache, t5_dir)
        assert len(calls) == 1 and first.features.shape == (3, L, 16)  # three distinct captions, one batch
        second = cached_caption_features(cond, captions, cache, t5_dir)
        assert len(calls) == 1  # read from the file: the encoder did not run again
        cached_caption_features(cond, captions[:2], cache, t5_dir)  # other captions: another key
        assert len(calls) == 2
    finally:
        handle.remove()
    assert torch.equal(second.features, first.features) and torch.equal(second.mask, first.mask)
    assert second.ids() == [[1, 2, 3, 4], [1, 2, 3], [1, 2, 3, 4], [1, 2, 3, 4]]
    feats, _ = cond.features(["a red cat", "a dog"])
    assert torch.allclose(second.rows([2, 1]), feats)


# ---- the prefix in the decoder ---------------------------------------------------------------------------------

def test_padding_is_masked_and_valid_features_matter(cond):
    entry, _, tok, layout, model, proj = parts("next_token", cond)
    with torch.no_grad():
        tokens = tok.encode_tokens(images())
    feats, mask = cond.features(["a red cat", "a dog"])
    batch = entry.module.build_batch(layout, cond.condition_ids(["a red cat", "a dog"]), tokens)

    def logits(f):
        with torch.no_grad(), caption_prefix(model, proj(f)):
            return model(batch.tokens, positions=batch.positions, mask=batch.mask)

    ref = logits(feats)
    noisy = torch.where(mask[..., None], feats, torch.randn_like(feats) * 10)  # other features at the padding
    assert torch.equal(logits(noisy), ref)
    valid = feats.clone()
    valid[1, 0] += 1.0  # a valid token of caption 1 changes caption 1's logits only
    moved = logits(valid)
    assert torch.equal(moved[0], ref[0]) and not torch.allclose(moved[1], ref[1])


def test_null_embedding_serves_dropped_rows_and_the_unconditional_branch(cond):
    entry, component, tok, layout, model, proj = parts("next_token", cond)
    null_row = text_embedding(model).weight[layout.vocab.null]
    with torch.no_grad():
        tokens = tok.encode_tokens(images())
    feats, _ = cond.features(["a red cat", "a dog"])
    ids = cond.condition_ids(["a red cat", "a dog"])
    # training: dropped rows are [<null>] before <boi>, whatever their caption's features
    batch = entry.module.build_batch(layout, ids, tokens, cond_drop_prob=1.0)
    assert (batch.tokens[:, L - 1] == layout.vocab.null).all() and (batch.tokens[:, : L - 1] == 0).all()
    with torch.no_grad(), caption_prefix(model, proj(feats)):
        (_, emb), = text_rows(model, layout, lambda: model(batch.tokens, positions=batch.positions, mask=batch.mask))
    assert torch.equal(emb[:, L - 1], null_row.expand(2, -1))
    # sampling with guidance: caption rows embed the projected features, the unconditional rows <null>
    pipe = entry.pipeline(transformer=model.eval(), tokenizer=cond.tokenizer, max_text_len=L, vq_model=component,
                          conditioning=cond.config(), text_encoder=cond.text_encoder, text_projection=proj)
    pipe.set_progress_bar_config(disable=True)
    (ids_RT, emb_RTC), = text_rows(model, layout, lambda: pipe(["a red cat", "a dog"], guidance_scale=3.0,
                                                         generator=torch.Generator().manual_seed(0)))
    with torch.no_grad():
        prefix = proj(feats)
    assert ids_RT.shape[0] == 4 and torch.equal(ids_RT[2:, L - 1], torch.full((2,), layout.vocab.null))
    assert torch.equal(emb_RTC[2:, L - 1], null_row.expand(2, -1))
    assert torch.allclose(emb_RTC[0, L - 4:L], prefix[0, :4]) and torch.allclose(emb_RTC[1, L - 3:L], prefix[1, :3])


@pytest.mark.parametrize("name", list(PARADIGMS))
def test_every_paradigm_trains_and_samples_on_encoder_features(name, cond):
    entry, component, tok, layout, model, proj = parts(name, cond)
    prompts, losses = ["a red cat", "a dog"], []
    with torch.no_grad():
        tokens = tok.encode_tokens(images())
    batch = entry.module.build_batch(layout, cond.condition_ids(prompts), tokens, 0.0, tokenizer=tok)
    prefix = proj(cond.features(prompts)[0])
    with caption_prefix(model, prefix):
        (_, emb), = text_rows(model, layout, lambda: losses.append(entry.module.loss_fn(model, batch, layout)))
    losses[0].backward()
    # the decoder's input holds the projected features at the captions' slots; the projection is in the graph
    # (its gradient may be zero at init where a head starts at zero: the flow heads' adaLN)
    prefix = prefix.detach()
    assert torch.equal(emb[0, L - 4:L], prefix[0, :4]) and torch.equal(emb[1, L - 3:L], prefix[1, :3])
    assert torch.isfinite(losses[0]) and proj.mlp.fc1.weight.grad is not None
    pipe = entry.pipeline(transformer=model.eval(), tokenizer=cond.tokenizer, max_text_len=L,
                          conditioning=cond.config(), text_encoder=cond.text_encoder, text_projection=proj.eval(),
                          **{entry.component: component})
    pipe.set_progress_bar_config(disable=True)
    steps = {"num_inference_steps": 2} if "num_inference_steps" in pipe.call_options else {}
    out = pipe(prompts, guidance_scale=2.0, output_type="pt", generator=torch.Generator().manual_seed(0), **steps)
    assert out.tokens.shape == (2, *tok.token_shape)
    with pytest.raises(ValueError, match="^class_labels: this model is conditioned on text captions"):
        pipe(class_labels=[0])


# ---- training, saving, the CLI ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(tmp_path_factory, t5_dir):
    """train_generator condition.kind=text_encoder on 8 shapes captions through the tiny T5."""
    root = tmp_path_factory.mktemp("trained")
    tiny_vqgan(channel_mult=(1, 2, 2, 2), image_size=32).save_pretrained(root / "vq")  # 4 x 4 codes
    run = root / "run"
    load_script("train_generator").main([
        "paradigm=next_token", f"tokenizer={root / 'vq'}", "data.name=shapes", "data.size=8", "data.image_size=32",
        "condition.kind=text_encoder", f"condition.encoder={t5_dir}", "max_text_len=16", "model.dim=32",
        "model.n_layers=1", "model.n_heads=4", "train.batch_size=8", "train.steps=25", "train.lr=3e-3",
        "train.warmup=2", "train.log_every=1", "train.ckpt_every=1000", "train.ema_decay=0.5",
        "train.ema_for_sampling=true", f"train.out_dir={run}"])
    return run


def test_training_loss_falls_and_the_pipeline_reloads_bit_identical(trained, tmp_path):
    losses = [json.loads(line)["loss"] for line in (trained / "log.jsonl").read_text().splitlines()]
    assert len(losses) == 25 and sum(losses[-5:]) / 5 < 0.7 * losses[0], losses  # from ln(32 codes) = 3.5
    assert (trained / "caption_features.safetensors").is_file()
    # the projection trains, is checkpointed and averaged with the decoder: the pipeline holds both averages
    ckpt = trained / "step-0000025"
    ema, raw = load_file(ckpt / "ema.safetensors"), load_file(ckpt / "text_projection.safetensors")
    saved = load_file(trained / "pipeline" / "text_projection" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(saved[k], ema[f"module.projection.{k}"]) and not torch.equal(saved[k], raw[k])
               for k in saved)
    decoder = load_file(trained / "pipeline" / "transformer" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(decoder[k], ema[f"module.transformer.{k}"]) for k in decoder)
    pipe = load_pipeline(trained / "pipeline")
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe.text_encoder).__name__ == "T5EncoderModel" and pipe.condition.kind == "text_encoder"
    index = json.loads((trained / "pipeline" / "model_index.json").read_text())
    assert conditioning_kind(index) == "text_encoder" and index["text_projection"][1] == "CaptionProjection"
    card = zoo_card(str(trained / "pipeline"))  # what `mmgen models` shows of a model
    assert card["conditioning"] == "text_encoder" and set(card["parameters"]) >= {"text_encoder", "text_projection"}
    call = dict(prompt=["a red circle", "a blue square"], num_images_per_prompt=2, output_type="pt",
                guidance_scale=3.0)
    a = pipe(**call, generator=torch.Generator().manual_seed(3))
    save_pipeline(pipe, tmp_path / "again")
    again = load_pipeline(tmp_path / "again")
    again.set_progress_bar_config(disable=True)
    b = again(**call, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.images, b.images)
    other = pipe(**{**call, "prompt": ["a green circle", "a blue square"]}, generator=torch.Generator().manual_seed(3))
    assert not torch.equal(other.tokens[:2], a.tokens[:2])  # the caption reaches the decoder
    greedy = {**call, "temperature": 0}  # speculative Jacobi decoding reads the same prefix: the greedy tokens
    assert torch.equal(pipe(**greedy, sampler="sjd", sjd_window=4).tokens, pipe(**greedy).tokens)


def test_generate_cli_takes_a_prompt_and_refuses_a_class_label(trained, tmp_path, capsys):
    out = tmp_path / "img.png"
    assert cli.main(["generate", "--model", str(trained / "pipeline"), "--prompt", "a red circle", "--out", str(out),
                     "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["images"] == [str(out)] and result["prompt"] == "a red circle" and out.is_file()
    with pytest.raises(SystemExit) as exit_:
        cli.main(["generate", "--model", str(trained / "pipeline"), "--class-label", "1", "--out", str(out)])
    last = capsys.readouterr().err.rstrip("\n").split("\n")[-1]
    assert exit_.value.code == 2 and "--class-label does not apply" in last and "conditioned on text" in last, last


# ---- LlamaGen t2i: conversion against LlamaGen's own code ------------------------------------------------------

FIXTURES = ROOT / "tests" / "fixtures" / "llamagen_t2i"


def test_llamagen_t2i_through_t5_equals_llamagen(tmp_path, capsys):
    """The tiny t2i GPT and T5 of tests/fixtures/llamagen_t2i, converted by `mmgen convert llamagen --text-encoder`:
    prompts (one cut at the 120-token condition length) through the pipeline's T5 give the features LlamaGen's
    T5Embedder gave, then the tokens (greedy at guidance 1, 4 and 7.5) and pixels of its generate and VQ."""
    meta = json.loads((FIXTURES / "reference.json").read_text())
    ref = np.load(FIXTURES / "reference.npz")
    files = meta["files"]
    base = ["convert", "llamagen", "--gpt", str(FIXTURES / files["gpt"]), "--vq", str(ROOT / files["vq"]),
            "--n-head", str(meta["gpt"]["n_head"]), "--image-size", str(meta["image_size"])]
    with pytest.raises(SystemExit) as exit_:
        cli.main([*base, "--out", str(tmp_path / "refused")])
    assert exit_.value.code == 2 and "--text-encoder is required" in capsys.readouterr().err
    assert not (tmp_path / "refused").exists()
    assert cli.main([*base, "--text-encoder", str(FIXTURES / files["t5"]), "--out", str(tmp_path / "t2i")]) == 0
    pipe = load_pipeline(tmp_path / "t2i")
    pipe.set_progress_bar_config(disable=True)
    assert pipe.condition.kind == "text_encoder" and pipe.condition.max_len == meta["cls_token_num"]
    feats, mask = pipe.encode_prompt(meta["prompts"])
    assert mask.sum(1).tolist() == meta["prompt_tokens"] and torch.equal(mask, torch.from_numpy(ref["t5_mask"]).bool())
    torch.testing.assert_close(feats, torch.from_numpy(ref["t5_features"]), rtol=1e-5, atol=1e-5)
    assert conditioning_kind(json.loads((tmp_path / "t2i" / "model_index.json").read_text())) == "text_encoder"
    for run in meta["runs"]:
        out = pipe(prompt=meta["prompts"], guidance_scale=run["cfg_scale"], top_k=1, output_type="np",
                   generator=[torch.Generator().manual_seed(0) for _ in meta["prompts"]])
        np.testing.assert_array_equal(out.tokens.flatten(1).numpy(), ref[f"{run['key']}_tokens"])
        ours = (out.images * 255).round().astype(np.int64)
        assert np.abs(ours - ref[f"{run['key']}_pixels"].astype(np.int64)).mean() <= 1, run["key"]
