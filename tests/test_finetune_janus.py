"""Fine-tuning Janus's image generation with scripts/train_generator.py (paradigm janus) on a tiny random
`JanusForConditionalGeneration` (32 px images, 4 x 4 codes of 32) with an offline processor: the training
forward reproduces transformers' own generate (conditional and unconditional rows), only the generation path
trains, the loss falls, a resumed run continues bit for bit, and the saved directory reloads with
`from_pretrained` to the trained model's exact logits."""

import contextlib
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw
from safetensors.torch import load_file

from tiny import free_port, load_script
from mmgen.training.transformers_models import JanusTrainer, load_finetune

ROOT = Path(__file__).resolve().parents[1]
SPECIAL = ["<pad>", "<bos>", "<eos>", "<image_placeholder>", "<begin_of_image>", "<end_of_image>", "<|User|>",
           "<|Assistant|>", "<unk>"]
WORDS = "a red blue green yellow circle square on the left right small large".split()
CHAT = ("{% for m in messages %}<|User|>: {{ m['content'][0]['text'] }}\n\n{% endfor %}"
        "{% if add_generation_prompt %}<|Assistant|>:{% endif %}")
TRAINED = ("language_model", "generation_embeddings", "generation_aligner", "generation_head")


def group(name: str) -> str:
    """The top-level part of JanusForConditionalGeneration a parameter belongs to (lm_head, vqmodel, ...)."""
    return name.split(".")[1] if name.startswith("model.") else name.split(".")[0]


def tiny_processor():
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, processors
    from transformers import JanusImageProcessor, JanusProcessor, PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIAL + WORDS + [":"])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.add_special_tokens([AddedToken(t, special=True) for t in SPECIAL])
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tk.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                  unk_token="<unk>", extra_special_tokens={
                                      "image_token": "<image_placeholder>", "boi_token": "<begin_of_image>",
                                      "eoi_token": "<end_of_image>"})
    images = JanusImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    return JanusProcessor(image_processor=images, tokenizer=tok, chat_template=CHAT, num_image_tokens=16)


def tiny_janus():
    from transformers import GenerationConfig, JanusConfig, JanusForConditionalGeneration, LlamaConfig

    torch.manual_seed(0)
    cfg = JanusConfig(
        text_config=LlamaConfig(vocab_size=len(SPECIAL) + len(WORDS) + 1, hidden_size=32, intermediate_size=64,
                                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                max_position_embeddings=128, pad_token_id=0),
        vision_config=dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8,
                           projection_dim=32, num_image_tokens=16, mlp_ratio=2.0),
        vq_config=dict(base_channels=32, channel_multiplier=[1, 1, 1, 1], embed_dim=4, latent_channels=32,
                       num_embeddings=32, num_res_blocks=1, projection_dim=32, image_token_embed_dim=32),
        image_token_id=3)
    model = JanusForConditionalGeneration(cfg).eval()
    model.generation_config = GenerationConfig(bos_token_id=1, pad_token_id=0, eos_token_id=2,
                                               generation_kwargs={"boi_token_id": 4})
    return model


@pytest.fixture(scope="module")
def janus_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("janus")
    tiny_janus().save_pretrained(d)
    tiny_processor().save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """16 captioned 40 x 48 images (resized and cropped to the model's 32 px)."""
    d = tmp_path_factory.mktemp("folder")
    colors = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 200, 30), "yellow": (230, 220, 30)}
    lines = []
    for i in range(16):
        color, shape, side = list(colors)[i % 4], ("circle", "square")[i // 4 % 2], ("left", "right")[i // 8]
        img = Image.new("RGB", (48, 40), (255, 255, 255))
        x = 4 if side == "left" else 24
        box = (x, 10, x + 18, 28)
        (ImageDraw.Draw(img).ellipse if shape == "circle" else ImageDraw.Draw(img).rectangle)(box,
                                                                                               fill=colors[color])
        img.save(d / f"{i}.png")
        lines.append(json.dumps({"file": f"{i}.png", "caption": f"a {color} {shape} on the {side}"}))
    (d / "captions.jsonl").write_text("\n".join(lines) + "\n")
    return d


def args(janus_dir, folder, out, steps):
    return ["--config", str(ROOT / "configs" / "janus_finetune.yaml"), f"init_from={janus_dir}",
            f"data.root={folder}", f"train.out_dir={out}", f"train.steps={steps}", "train.batch_size=8",
            "train.lr=1e-2", "train.warmup=1", "train.ckpt_every=3", "train.log_every=1", "train.weight_decay=0.05"]


def run(*argv) -> str:
    """train_generator.py's main in this process; returns what it printed."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        load_script("train_generator").main(list(argv))
    return printed.getvalue()


def losses(out):
    return {r["step"]: r["loss"] for r in map(json.loads, (Path(out) / "log.jsonl").read_text().splitlines())}


@pytest.fixture(scope="module")
def trained(janus_dir, folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    run(*args(janus_dir, folder, out, 9))
    return out


def test_training_forward_reproduces_transformers_generate(janus_dir):
    trainer = load_finetune("janus", janus_dir)
    trainer.eval()
    prompt = trainer.prompts(["a red circle on the left"])
    assert prompt[0][0] == 1 and prompt[0][-1] == 4  # BOS ... begin-of-image, as the processor writes it
    message = {"role": "user", "content": [{"type": "text", "text": "a red circle on the left"}]}
    text = trainer.processor.apply_chat_template([message], add_generation_prompt=True)
    inputs = trainer.processor(text=[text], generation_mode="image")
    assert inputs["input_ids"][0].tolist() == prompt[0]
    scale = 3.0
    with torch.no_grad():
        codes = trainer.model.generate(**inputs, generation_mode="image", do_sample=False, guidance_scale=scale)
        assert codes.shape == (1, 16)
        # teacher-forced on its own output: the conditional row and the dropped (unconditional) row, guided as
        # generate guides, pick every generated code
        b = trainer.batch(prompt * 2, codes.repeat(2, 1), torch.tensor([False, True]))
        assert b["input_ids"][1].tolist() == [1] + [0] * (len(prompt[0]) - 2) + [4]
        cond, uncond = trainer.logits(b["input_ids"], b["attention_mask"], b["codes"])
        assert torch.equal((uncond + scale * (cond - uncond)).argmax(-1), codes[0])
        # in a left-padded batch a row computes as it does alone
        short = trainer.prompts(["a blue square"])
        b = trainer.batch(short + prompt, codes.repeat(2, 1), torch.tensor([False, False]))
        alone = trainer.batch(short, codes, torch.tensor([False]))
        torch.testing.assert_close(trainer.logits(**b)[0], trainer.logits(**alone)[0], atol=1e-5, rtol=0)


def test_only_the_generation_path_trains(janus_dir):
    trainer = load_finetune("janus", janus_dir)
    model = trainer.model
    trains = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trains == {n for n, _ in model.named_parameters() if group(n) in TRAINED}
    frozen = {group(n) for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {"vision_model", "aligner", "vqmodel"}  # the tiny model ties lm_head to the embeddings
    assert set(trainer.trained_modules()) == set(TRAINED)


def test_finetune_loss_falls_and_only_the_generation_path_moves(janus_dir, trained):
    log = losses(trained)
    assert sorted(log) == list(range(9))
    # ln(32) = 3.47 at the start; measured 3.47 -> 3.05 (mean of the last 3) in 9 steps
    assert log[0] > 3.4 and sum(log[s] for s in (6, 7, 8)) / 3 < log[0] - 0.3, log
    ckpt = trained / "step-0000009"
    assert {f.name for f in ckpt.glob("*.safetensors")} == {f"{m}.safetensors" for m in TRAINED} | {
        "opt.optim.safetensors", "rng.safetensors"}
    cfg = json.loads((trained / "config.json").read_text())
    assert cfg["data"]["image_size"] == 32 and cfg["paradigm"] == "janus"
    assert load_file(trained / "codes.safetensors")["codes"].shape == (16, 16)  # encoded once, 4 x 4 codes each

    from transformers import JanusForConditionalGeneration
    init = JanusForConditionalGeneration.from_pretrained(janus_dir).state_dict()
    saved = JanusForConditionalGeneration.from_pretrained(trained / "pipeline").state_dict()
    assert saved.keys() == init.keys()
    moved = {group(k) for k in init if not torch.equal(init[k], saved[k])}
    # every frozen tensor (VQ-VAE, vision encoder and aligner) bit-identical; the text head is tied to the input
    # embeddings here, so it moves with them
    assert moved == {*TRAINED, "lm_head"} and {group(k) for k in init} - moved == {"vision_model", "aligner",
                                                                                 "vqmodel"}


def test_saved_directory_reloads_to_the_trained_logits(janus_dir, trained):
    from transformers import JanusForConditionalGeneration, JanusProcessor

    # the trained model: the checkpoint as the run resumes it (init_from + the trained modules of the last step)
    model = JanusForConditionalGeneration.from_pretrained(janus_dir).eval()
    for name in TRAINED:
        getattr(model.model, name).load_state_dict(load_file(trained / "step-0000009" / f"{name}.safetensors"))
    reloaded = JanusForConditionalGeneration.from_pretrained(trained / "pipeline").eval()
    processor = JanusProcessor.from_pretrained(trained / "pipeline")
    assert reloaded.dtype == model.dtype == torch.float32
    a, b = JanusTrainer(model, processor), JanusTrainer(reloaded, processor)
    codes = load_file(trained / "codes.safetensors")["codes"][:4]
    batch = a.batch(a.prompts(["a red circle on the left", "a blue square", "green", "a"]), codes,
                    torch.tensor([False, True, False, False]))
    with torch.no_grad():
        assert torch.equal(a.logits(**batch), b.logits(**batch))
        gen = dict(generation_mode="image", do_sample=False, guidance_scale=2.0)
        inputs = processor(text=["a red circle"], generation_mode="image")
        assert torch.equal(model.generate(**inputs, **gen), reloaded.generate(**inputs, **gen))


def test_resumed_run_continues_bit_for_bit(janus_dir, folder, trained, tmp_path):
    out = tmp_path / "resumed"
    shutil.copytree(trained, out)
    shutil.rmtree(out / "step-0000009")  # as a run killed after step 6's checkpoint left it
    shutil.rmtree(out / "pipeline")
    (out / "latest").write_text("step-0000006")
    assert "resumed from" in run(*args(janus_dir, folder, out, 9))
    assert losses(out) == losses(trained)
    for f in (trained / "step-0000009").glob("*.safetensors"):
        ref, got = load_file(f), load_file(out / "step-0000009" / f.name)
        assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref), f.name
    assert (out / "pipeline" / "model.safetensors").read_bytes() == (
        trained / "pipeline" / "model.safetensors").read_bytes()


def test_bad_init_dirs_are_rejected(janus_dir, folder, tmp_path):
    from transformers import LlamaConfig

    train = load_script("train_generator")
    LlamaConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2).save_pretrained(tmp_path / "llama")
    with pytest.raises(ValueError, match=r"type 'llama'.*supported model types: janus"):
        train.main(args(tmp_path / "llama", folder, tmp_path / "a", 1))
    bare = tmp_path / "no_processor"
    shutil.copytree(janus_dir, bare)
    for f in ("processor_config.json", "preprocessor_config.json"):
        (bare / f).unlink(missing_ok=True)
    with pytest.raises(FileNotFoundError, match=r"lacks its processor files .*JanusProcessor.save_pretrained"):
        train.main(args(bare, folder, tmp_path / "b", 1))
    with pytest.raises(FileNotFoundError, match=r"set paradigm=janus"):  # a Janus dir given to a decoder run
        train.main(["paradigm=next_token", f"init_from={janus_dir}", "data.size=8", "train.steps=1",
                    f"train.out_dir={tmp_path / 'c'}", f"tokenizer={ROOT / 'mmgen/zoo/shapes-nexttoken/vq_model'}"])
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()  # rejected before the run starts


def test_two_processes_take_the_steps_of_one(janus_dir, folder, tmp_path):
    """`accelerate launch`, 2 CPU processes (gloo): each takes half of every global batch, the copies stay equal
    (rank_spread 0) and the losses are one process's. No condition dropout: its draws are per process."""
    import os

    common = [a for a in args(janus_dir, folder, tmp_path, 3) if not a.startswith("train.out_dir")]
    common += ["train.cond_drop_prob=0"]
    run(*common, f"train.out_dir={tmp_path / 'one'}")
    proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                           str(ROOT / "configs" / "accelerate" / "ddp_2proc.yaml"),
                           "--main_process_port", str(free_port()), str(ROOT / "scripts" / "train_generator.py"), *common,
                           f"train.out_dir={tmp_path / 'two'}"],
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = json.loads((tmp_path / "two" / "step-0000003" / "state.json").read_text())
    assert state["extra"]["rank_spread"] == 0.0
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert sorted(two) == [0, 1, 2] and all(abs(one[s] - two[s]) < 1e-4 for s in one), (one, two)
