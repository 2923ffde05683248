"""Conditioning as one interface (`mmgen.conditioning`): captions, class labels and none, taken by every paradigm of
the registry; class-conditional training on an ImageNet-style folder of real labelled images; the pipelines' and the
CLI's checks on `prompt=` / `class_labels=`."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from tiny import tiny_vqgan

from mmgen import cli
from mmgen.conditioning import (KINDS, CaptionConditioning, ClassConditioning, ConditionConfig, Unconditional,
                                make_conditioning, run_conditioning)
from mmgen.data import ImageClassFolder
from mmgen.data.fashion_mnist import DEFAULT_ROOT as FASHION_ROOT
from mmgen.paradigms.protocol import FlowConfig, ModelConfig
from mmgen.pipelines import load_pipeline, save_pipeline
from mmgen.pipelines.registry import PARADIGMS, check_condition, get_paradigm
from mmgen.sampling.config import SamplingConfig
from mmgen.text import UnifiedVocab, train_text_tokenizer
from mmgen.zoo import conditioning_kind, zoo_card
from test_protocols import images, tiny_tokenizer
from tokenizers_vis.protocol import as_visual_tokenizer

ROOT = Path(__file__).resolve().parents[1]
NAMES = ("cat", "dog", "ankle boot")
needs_fashion = pytest.mark.skipif(not (FASHION_ROOT / "train-labels-idx1-ubyte.gz").is_file(),
                                   reason="Fashion-MNIST not installed (bash scripts/install_data.sh)")
torch.set_num_threads(1)


def parts(name: str, cond):
    """Tiny tokenizer, layout and decoder of paradigm `name` under conditioning `cond` (test_protocols' sizes)."""
    entry = get_paradigm(name)
    component = tiny_tokenizer(entry.module.TOKENS)
    tok = as_visual_tokenizer(component)
    vocab = UnifiedVocab(text_vocab_size=cond.vocab_size, image_vocab_size=tok.vocab_size)
    model_cfg = ModelConfig(dim=32, n_layers=1, n_heads=4, shuffle_window=2 if name == "token_shuffle" else 1)
    flow_cfg = FlowConfig(head_width=16, head_depth=1, flow_width=16, flow_depth=1, flow_heads=2, entity="cell")
    torch.manual_seed(0)
    layout = entry.module.make_layout(tok, vocab, cond.max_len, model_cfg, flow_cfg)
    return entry, component, tok, layout, entry.module.make_model(layout, model_cfg, flow_cfg)


def condition_column(batch) -> torch.Tensor:
    """The one condition token of each row of a training batch (the slot before <boi>)."""
    text = batch.text if hasattr(batch, "text") else batch.tokens
    return text[:, 0]


# ---- the interface ---------------------------------------------------------------------------------------------

def test_each_kind_maps_a_call_to_condition_ids():
    cls = ClassConditioning(3, NAMES)
    assert (cls.vocab_size, cls.max_len) == (4, 1)
    assert cls.condition_ids(class_labels=[0, "Ankle_Boot", 1]) == [[1], [3], [2]]
    assert cls.condition_ids(class_labels=2) == [[3]] and cls.condition_ids(class_labels=torch.tensor(1)) == [[2]]
    assert cls.condition_ids(class_labels=torch.tensor([2, 0])) == [[3], [1]]
    assert ClassConditioning(5).condition_ids(class_labels=[4]) == [[5]]
    assert Unconditional().condition_ids() == [[]] and Unconditional().vocab_size == 1
    tok = train_text_tokenizer(["a red circle"])
    cap = CaptionConditioning(tok, 8)
    assert cap.condition_ids("A red circle.") == [tok("a red circle")["input_ids"]] and cap.vocab_size == len(tok)
    # the saved config rebuilds the same conditioning; none saved means captions
    assert make_conditioning(json.loads(json.dumps(cls.config()))) == cls
    assert make_conditioning(Unconditional().config()) == Unconditional()
    assert make_conditioning(None, tok, 8) == cap and cap.config() == {}
    assert set(KINDS) == {"caption", "class", "unconditional", "text_encoder"}  # text_encoder: test_text_encoder.py
    assert all(entry.conditions == KINDS for entry in PARADIGMS.values())


def test_bad_conditioning_is_refused_by_name():
    cls = ClassConditioning(3, NAMES)
    for bad in (3, -1, True, 1.0, "cow", None, [0, 7], torch.tensor(0.0), torch.tensor([0.0, 1.0])):
        with pytest.raises(ValueError, match=r"class_labels .*integer in \[0, 2\] or a class name \('cat'"):
            cls.condition_ids(class_labels=bad)
    with pytest.raises(ValueError, match="class_labels must not be an empty list"):
        cls.condition_ids(class_labels=[])
    with pytest.raises(ValueError, match="^prompt: this model is class-conditional"):
        cls.condition_ids("a cat", None)
    with pytest.raises(ValueError, match="^class_labels: this model is conditioned on text captions"):
        CaptionConditioning(train_text_tokenizer(["a cat"]), 4).condition_ids("a cat", [0])
    with pytest.raises(ValueError, match="^prompt: this model is unconditional"):
        Unconditional().condition_ids("a cat")
    with pytest.raises(ValueError, match="class_names must differ"):
        ClassConditioning(2, ("Cat", "cat"))
    with pytest.raises(ValueError, match="condition.kind must be one of caption, class, unconditional"):
        run_conditioning(ConditionConfig("text"), None)
    with pytest.raises(ValueError, match="condition.kind=class needs a labelled data set"):
        run_conditioning(ConditionConfig("class"), [1, 2])
    with pytest.raises(ValueError, match="condition.kind must be one of caption, class, unconditional, text_encoder "
                                         "for paradigm"):
        check_condition("flowar", "embedding")


# ---- every paradigm, through the protocol ---------------------------------------------------------------------

@pytest.mark.parametrize("name", list(PARADIGMS))
def test_every_paradigm_trains_and_samples_class_conditioned(name):
    cond = ClassConditioning(3, NAMES)
    entry, component, tok, layout, model = parts(name, cond)
    with torch.no_grad():
        tokens = tok.encode_tokens(images())
    ids = cond.condition_ids(class_labels=[0, 2])
    batch = entry.module.build_batch(layout, ids, tokens, 0.0, tokenizer=tok)
    assert condition_column(batch).tolist() == [1, 3]
    loss = entry.module.loss_fn(model, batch, layout)
    assert torch.isfinite(loss) and loss > 0
    loss.backward()
    model.eval()
    sampling = SamplingConfig(guidance_scale=2.0, num_inference_steps=2)
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    out, _ = entry.module.generate(model, layout, ids, sampling, gens, tokenizer=tok)
    assert out.shape == tokens.shape
    # the registry's pipeline takes the same parts and conditioning, and class labels or names
    pipe = entry.pipeline(transformer=model, tokenizer=None, max_text_len=1, conditioning=cond.config(),
                          **{entry.component: component})
    pipe.set_progress_bar_config(disable=True)
    steps = {"num_inference_steps": 2} if "num_inference_steps" in pipe.call_options else {}
    res = pipe(class_labels=[0, "ankle boot"], guidance_scale=2.0, output_type="pt", **steps,
               generator=[torch.Generator().manual_seed(i) for i in range(2)])
    assert torch.equal(res.tokens, out)
    with pytest.raises(ValueError, match="^prompt: this model is class-conditional"):
        pipe(prompt="a cat")


@pytest.mark.parametrize("name", list(PARADIGMS))
def test_training_batches_drop_the_class_to_null_at_the_given_rate(name):
    """cond_drop_prob turns a row's class into <null> (classifier-free guidance's unconditional rows): counted over
    400 rows against Binomial(400, 0.25) at 5 sigma; a batch that never drops (or always does) fails."""
    cond = ClassConditioning(3, NAMES)
    entry, _, tok, layout, _ = parts(name, cond)
    labels = torch.arange(400) % 3
    with torch.no_grad():
        tokens = tok.encode_tokens(images(1)).expand(400, *tok.token_shape).contiguous()
    column = condition_column(entry.module.build_batch(layout, cond.ids(labels.tolist()), tokens, 0.25,
                                                      torch.Generator().manual_seed(0), tokenizer=tok))
    null = column == layout.vocab.null
    assert abs(int(null.sum()) - 100) <= 5 * (400 * 0.25 * 0.75) ** 0.5, int(null.sum())
    assert torch.equal(column[~null], 1 + labels[~null])  # the rest keep their own class row
    kept = condition_column(entry.module.build_batch(layout, cond.ids(labels.tolist()), tokens, 0.0, tokenizer=tok))
    assert torch.equal(kept, 1 + labels)


@pytest.mark.parametrize("name", list(PARADIGMS))
def test_every_paradigm_samples_unconditionally(name):
    entry, component, _, layout, model = parts(name, Unconditional())
    pipe = entry.pipeline(transformer=model.eval(), tokenizer=None, max_text_len=1,
                          conditioning=Unconditional().config(), **{entry.component: component})
    pipe.set_progress_bar_config(disable=True)
    res = pipe(num_images_per_prompt=2, output_type="pt", generator=torch.Generator().manual_seed(0))
    assert len(res.images) == 2 and layout.vocab.text_vocab_size == 1
    with pytest.raises(ValueError, match="^guidance_scale must be 1"):
        pipe(guidance_scale=3.0)
    with pytest.raises(ValueError, match="^class_labels: this model is unconditional"):
        pipe(class_labels=0)


def test_guidance_runs_the_null_class_beside_the_labels():
    """Sampling with CFG feeds [class rows; <null> rows] and combines them; scale 1 feeds the class rows only."""
    cond = ClassConditioning(3, NAMES)
    entry, component, _, layout, model = parts("next_token", cond)
    torch.manual_seed(1)
    with torch.no_grad():  # large random weights (a fresh head is near zero), so guidance moves the samples
        for p in model.parameters():
            p.normal_(0, 1)
    pipe = entry.pipeline(transformer=model.eval(), tokenizer=None, max_text_len=1, conditioning=cond.config(),
                          vq_model=component)
    pipe.set_progress_bar_config(disable=True)
    seen = []
    hook = model.register_forward_pre_hook(lambda m, args, kw: seen.append(args[0][:, 0].tolist()) if
                                           args[0].shape[1] > 1 else None, with_kwargs=True)
    gens = lambda: [torch.Generator().manual_seed(i) for i in range(2)]  # noqa: E731
    guided = pipe(class_labels=[1, 2], guidance_scale=4.0, output_type="pt", generator=gens()).tokens
    plain = pipe(class_labels=[1, 2], guidance_scale=1.0, output_type="pt", generator=gens()).tokens
    hook.remove()
    assert seen == [[2, 3, layout.vocab.null, layout.vocab.null], [2, 3]]  # the prefill of each call
    assert not torch.equal(guided, plain)


def test_sampled_class_model_reloads_bit_identical(tmp_path):
    cond = ClassConditioning(3, NAMES)
    entry, component, _, _, model = parts("next_scale", cond)
    pipe = entry.pipeline(transformer=model.eval(), tokenizer=None, max_text_len=1, conditioning=cond.config(),
                          vq_model=component.eval())
    pipe.set_progress_bar_config(disable=True)
    save_pipeline(pipe, tmp_path / "m")
    index = json.loads((tmp_path / "m" / "model_index.json").read_text())
    assert conditioning_kind(index) == "class" and index["conditioning"]["class_names"] == list(NAMES)
    again = load_pipeline(tmp_path / "m")
    again.set_progress_bar_config(disable=True)
    assert again.condition == cond and again.tokenizer is None
    call = dict(class_labels=["dog", 2], num_images_per_prompt=2, output_type="pt",
                generator=torch.Generator().manual_seed(7))
    a, b = pipe(**call), again(**{**call, "generator": torch.Generator().manual_seed(7)})
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.images, b.images)


def test_caption_models_keep_their_saved_form_and_refuse_class_labels(tmp_path):
    assert zoo_card("shapes-nexttoken")["conditioning"] == "caption"
    tok = train_text_tokenizer(["a red circle"])
    entry, component, _, _, model = parts("flow_head", CaptionConditioning(tok, 4))
    pipe = entry.pipeline(transformer=model.eval(), tokenizer=tok, max_text_len=4, vae=component)
    assert "conditioning" not in pipe.config  # model_index.json as before
    with pytest.raises(ValueError, match="^class_labels: this model is conditioned on text captions"):
        pipe(class_labels=[0])
    with pytest.raises(ValueError, match="^prompt must be a non-empty string"):
        pipe()
    with pytest.raises(ValueError, match="max_text_len=4 does not fit a class model"):
        entry.pipeline(transformer=model, tokenizer=None, max_text_len=4, vae=component,
                       conditioning=ClassConditioning(3).config())


# ---- data: an ImageNet-style folder ------------------------------------------------------------------------------

def test_image_class_folder_reads_the_imagenet_layout(tmp_path):
    from PIL import Image

    for cls, colour in (("n02_dog", "red"), ("n01_cat", "blue")):
        (tmp_path / "train" / cls).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (20, 12), colour).save(tmp_path / "train" / cls / f"{i}.{'JPEG' if i else 'png'}")
    (tmp_path / "train" / "n01_cat" / "notes.txt").write_text("not an image")
    data = ImageClassFolder(tmp_path, image_size=8)
    assert data.classes == ("n01_cat", "n02_dog") and data.labels == [0, 0, 1, 1]
    assert data.captions[0] == "n01 cat" and len(data) == 4
    item = data[3]
    assert item["label"] == 1 and item["image"].shape == (3, 8, 8) and item["image"][0].min() > 0.9  # red
    with pytest.raises(FileNotFoundError, match="has no 'val' split directory"):
        ImageClassFolder(tmp_path, split="val")
    (tmp_path / "train" / "n03_empty").mkdir()
    with pytest.raises(ValueError, match="n03_empty' holds no images"):
        ImageClassFolder(tmp_path)


def _script(name: str):
    spec = importlib.util.spec_from_file_location(f"conditioning_{name}", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@needs_fashion
def test_class_conditional_training_on_a_labelled_folder_then_generate(tmp_path, capsys):
    """make_imagefolder (real Fashion-MNIST classes) -> train_generator condition.kind=class -> mmgen generate
    --class-label: the loss falls, the saved model carries the folder's class names, misuse exits 2 naming it."""
    assert _script("make_imagefolder").main(["--source", "fashion_mnist", "--out", str(tmp_path / "folder"),
                                             "--per-class", "8"]) == 0
    assert json.loads(capsys.readouterr().out)["images"] == 80
    tiny_vqgan(image_size=16).save_pretrained(tmp_path / "vq")
    run = tmp_path / "run"
    _script("train_generator").main([
        "paradigm=next_token", f"tokenizer={tmp_path / 'vq'}", "data.name=imagefolder",
        f"data.root={tmp_path / 'folder'}", "data.image_size=16", "condition.kind=class", "model.dim=32",
        "model.n_layers=2", "model.n_heads=4", "train.batch_size=16", "train.steps=30", "train.lr=3e-3",
        "train.warmup=5", "train.log_every=1", "train.ckpt_every=1000", f"train.out_dir={run}"])
    losses = [json.loads(line)["loss"] for line in (run / "log.jsonl").read_text().splitlines()]
    assert len(losses) == 30 and sum(losses[-5:]) / 5 < 0.5 * losses[0], losses  # from ln(32 codes) = 3.5
    capsys.readouterr()  # the training run's own output
    pipe = load_pipeline(run / "pipeline")
    assert pipe.condition.class_names[0] == "ankle_boot" and pipe.condition.num_classes == 10
    out = tmp_path / "boot.png"
    assert cli.main(["generate", "--model", str(run / "pipeline"), "--class-label", "ankle boot",
                     "--class-label", "9", "--out", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["class_labels"] == ["ankle boot", 9]
    assert (tmp_path / "boot_0.png").is_file() and (tmp_path / "boot_1.png").is_file()
    for argv, message in ((["--class-label", "10"], "--class-label: class_labels entries must be an integer in "
                                                    "[0, 9] or a class name ('ankle_boot'"),
                          (["a sneaker"], "--class-label is required"),
                          (["a sneaker", "--class-label", "1"], "PROMPT does not apply with --class-label")):
        with pytest.raises(SystemExit) as exit_:
            cli.main(["generate", *argv, "--model", str(run / "pipeline"), "--out", str(out)])
        last = capsys.readouterr().err.rstrip("\n").split("\n")[-1]  # after the loading bar, one line
        assert exit_.value.code == 2 and last.startswith("mmgen generate: error: ") and message in last, last
    with pytest.raises(SystemExit) as exit_:
        cli.main(["generate", "--class-label", "1", "--out", str(out)])  # the default model is a caption model
    assert exit_.value.code == 2 and "--class-label does not apply" in capsys.readouterr().err


def test_fashion_class_accuracy_draws_a_class_model_by_class_name():
    """`mmgen eval --data fashion_mnist` on a class-conditional model asks for each Fashion-MNIST class by name (a
    folder's "ankle_boot" is "ankle boot"); a judge that always answers class 0 scores exactly 1/10."""
    from mmgen.data.fashion_mnist import CLASSES
    from mmgen.eval.harness import evaluate_pipeline

    names = tuple(sorted(n.replace(" ", "_") for n in CLASSES))  # as make_imagefolder writes them
    cond = ClassConditioning(10, names)
    entry, component, _, _, model = parts("next_token", cond)
    pipe = entry.pipeline(transformer=model.eval(), tokenizer=None, max_text_len=1, conditioning=cond.config(),
                          vq_model=component)
    asked = []
    call = type(pipe).__call__
    pipe.__class__ = type("Spy", (type(pipe),), {"__call__": lambda self, **kw: asked.extend(kw["class_labels"])
                                                 or call(self, **kw)})

    class Zero:
        def predict(self, x):
            return torch.zeros(len(x), dtype=torch.long)

    result = evaluate_pipeline(pipe, data="fashion_mnist", per_category=1, classifier=Zero(), progress=False)
    assert asked == list(CLASSES)
    acc = result["class_accuracy"]
    assert acc["n"] == 10 and acc["accuracy"] == 0.1 and acc["per_class"]["t-shirt"] == 1.0


def test_fd_of_a_class_model_draws_each_real_image_s_class():
    """FD-ENL0 on a class-conditional model generates from the real images' class names, one per real image."""
    from mmgen.data.fashion_mnist import CLASSES
    from mmgen.eval.harness import _subset, evaluate_pipeline, real_dataset

    cond = ClassConditioning(10, CLASSES)
    entry, component, _, _, model = parts("next_token", cond)
    pipe = entry.pipeline(transformer=model.eval(), tokenizer=None, max_text_len=1, conditioning=cond.config(),
                          vq_model=component)
    asked = []
    call = type(pipe).__call__
    pipe.__class__ = type("Spy", (type(pipe),), {"__call__": lambda self, **kw: asked.extend(kw["class_labels"])
                                                 or call(self, **kw)})

    class Zero:
        def predict(self, x):
            return torch.zeros(len(x), dtype=torch.long)

    result = evaluate_pipeline(pipe, data="fashion_mnist", per_category=1, fd=4, classifier=Zero(), progress=False)
    real = real_dataset("fashion_mnist", "train", 64)
    fd_asked = asked[10:]  # after the 10 class-accuracy draws
    assert len(fd_asked) == 4 and set(fd_asked) <= set(CLASSES)
    assert fd_asked == [CLASSES[int(real.labels[i])] for i in _subset(len(real), 4, 0)]
    assert result["fd_enl0"]["n"] == 4 and result["fd_enl0"]["value"] > 0
