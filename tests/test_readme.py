"""Every example in README.md runs as written, so none can drift from the code.

The commands of its ```bash blocks (continuation lines joined, `&&` chains split, comments dropped) run in
document order in one temporary directory: `mmgen ...` in-process through `mmgen.cli.main`, with the shell's
glob expansion. Its ```python blocks run with `exec`, each in a fresh namespace. A command that cannot run here
(a hub download, a training run, a server, the CI itself) is in NOT_RUN with the reason, and NOT_RUN must name
exactly the README commands that are not run: a new example is never silently unrun.
"""

import contextlib
import glob
import io
import json
import re
import shlex
from pathlib import Path

import pytest

from mmgen.cli import main

README = Path(__file__).resolve().parents[1] / "README.md"

HUB = "needs a hub checkpoint (huggingface-cli download); tests/test_janus.py and test_emu3.py run tiny random ones"
TRAIN = ("a training run (minutes to hours); the loop is tested by tests/test_train_e2e.py, "
         "test_train_paradigms_e2e.py and test_distributed.py")
SETUP = "sets up the environment this test already runs in"
SERVE = "starts a web server that runs until stopped; tests/test_serve.py drives it in a browser"

RUN = ("uses the class-conditional run trained above; tests/test_conditioning.py and tests/test_sample_npz.py run "
       "it small")
FID = ("needs the FID Inception weights file, which cannot be downloaded here; tests/test_fid.py runs it on a random "
       "network saved in that format")
RELEASE = ("needs a released LlamaGen / VAR checkpoint (a hub download); tests/test_llamagen.py and "
           "tests/test_var_convert.py convert fixtures made by each project's own code")

NOT_RUN = {
    "python3 -m venv .venv": SETUP,
    ". .venv/bin/activate": SETUP,
    "pip install torch==2.14.1 torchvision==0.29.1": SETUP,
    "pip install -e .": SETUP,
    "bash .ci/run": "is the CI, which runs this test",
    'mmgen generate "a red fox in the snow" --model Janus-Pro-1B --num-images 4 --seed 0 --out fox.png': HUB,
    'mmgen generate "a red fox in the snow" --model Janus-Pro-1B --sampler sjd --sjd-window 16 --out fox_sjd.png':
        HUB,
    'mmgen generate "a red fox in the snow" --model Emu3-Gen-hf --height 512 --width 512 --out fox_emu3.png': HUB,
    "accelerate launch --mixed_precision bf16 --num_processes N scripts/train_generator.py --config "
    "configs/janus_finetune.yaml init_from=Janus-Pro-1B data.root=MY_FOLDER train.out_dir=runs/janus_ft": HUB,
    "mmgen serve": SERVE,
    "mmgen serve --model shapes-nexttoken --model runs/generator/pipeline --port 8080": SERVE,
    "python scripts/train_tokenizer.py --config configs/vqgan_shapes.yaml": TRAIN,
    "python scripts/train_generator.py --config configs/generator_shapes.yaml tokenizer=runs/vqgan/final": TRAIN,
    "accelerate launch --config_file configs/accelerate/ddp_2proc.yaml scripts/train_generator.py --config "
    "configs/generator_shapes.yaml train.steps=100": TRAIN,
    "accelerate launch --config_file configs/accelerate/ddp_2proc.yaml scripts/train_generator.py --config "
    "configs/generator_shapes.yaml train.fsdp=true": TRAIN,
    "mmgen eval --model runs/generator/pipeline --fd 250 --json --out runs/generator/eval.json":
        "evaluates the run trained above; tests/test_eval_harness.py runs the harness",
    "python scripts/train_tokenizer.py --config configs/msvq_shapes.yaml": TRAIN,
    "python scripts/train_tokenizer.py --config configs/vae_shapes.yaml": TRAIN,
    "python scripts/train_generator.py --config configs/next_scale_shapes.yaml": TRAIN,
    "python scripts/train_generator.py --config configs/flowar_shapes.yaml": TRAIN,
    "python scripts/train_generator.py --config configs/next_x_shapes.yaml flow.entity=cell": TRAIN,
    "python scripts/train_generator.py --config configs/token_shuffle_shapes.yaml model.shuffle_window=2": TRAIN,
    "python scripts/make_imagefolder.py --source fashion_mnist --out data/fashion-folder --per-class 600":
        "writes 6,000 images; tests/test_conditioning.py runs it small",
    "python scripts/train_generator.py --config configs/class_imagefolder.yaml": TRAIN,
    "mmgen generate --model runs/class-fashion/pipeline --class-label sneaker --num-images 4 --out sneaker.png": RUN,
    "mmgen eval --model runs/class-fashion/pipeline --data fashion_mnist --per-category 20": RUN,
    "accelerate launch --config_file configs/accelerate/ddp_2proc.yaml scripts/sample_npz.py --model "
    "runs/class-fashion/pipeline --per-class 50 --out samples.npz": RUN,
    "python scripts/images_to_npz.py data/fashion-folder/train --size 64 --labels --out ref.npz": RUN,
    "mmgen eval --samples samples.npz --reference ref.npz --inception-weights pt_inception-2015-12-05-6726825d.pth "
    "--json --out fid.json": FID,
    "mmgen convert llamagen --gpt c2i_B_256.pt --vq vq_ds16_c2i.pt --gpt-model GPT-B --image-size 256 --out "
    "llamagen-b": RELEASE,
    "mmgen generate --model llamagen-b --class-label 207 --guidance-scale 4 --top-k 2000 --out golden.png": RELEASE,
    "mmgen generate --model llamagen-b --class-label 207 --sampler sjd --out golden_sjd.png": RELEASE,
    "mmgen convert llamagen --gpt t2i_XL_stage1_256.pt --vq vq_ds16_t2i.pt --text-encoder flan-t5-xl --out "
    "llamagen-t2i": RELEASE,
    'mmgen generate --model llamagen-t2i --prompt "a blue Porsche 356 parked in front of a yellow brick wall" --out '
    "car.png": RELEASE,
    "mmgen convert var --var var_d16.pth --vae vae_ch160v4096z32.pth --out var-d16": RELEASE,
    "mmgen generate --model var-d16 --class-label 207 --out var.png": RELEASE,
}


def _split_unquoted(line: str) -> list[str]:
    """Drop a trailing `# comment` and split at `&&`, both only outside quotes (as the shell does)."""
    parts, cur, quote = [], "", None
    i = 0
    while i < len(line):
        c = line[i]
        if quote:
            quote = None if c == quote else quote
        elif c in "'\"":
            quote = c
        elif c == "#" and (not cur or cur[-1].isspace()):
            break
        elif line.startswith("&&", i):
            parts.append(cur)
            cur, i = "", i + 2
            continue
        cur += c
        i += 1
    return [" ".join(p.split()) for p in parts + [cur] if p.strip()]


def readme_examples() -> list[tuple[int, str, str]]:
    """(line, kind, text) of every example in README order: kind "bash" is one command, "python" one block."""
    examples, lines, n = [], README.read_text().splitlines(), 0
    while n < len(lines):
        fence = re.fullmatch(r"```(\w+)", lines[n].strip())
        n += 1
        if not fence:
            continue
        start, block = n, []
        while not lines[n].strip().startswith("```"):
            block.append(lines[n])
            n += 1
        n += 1
        if fence[1] == "python":
            examples.append((start + 1, "python", "\n".join(block)))
        elif fence[1] == "bash":
            joined, first = "", None
            for i, line in enumerate(block):
                first = start + i + 1 if first is None else first
                if line.rstrip().endswith("\\"):
                    joined += line.rstrip()[:-1] + " "
                    continue
                for cmd in _split_unquoted(joined + line):
                    examples.append((first, "bash", cmd))
                joined, first = "", None
    return examples


EXAMPLES = readme_examples()
COMMANDS = [text for _, kind, text in EXAMPLES if kind == "bash"]


def test_not_run_names_exactly_the_commands_that_are_not_run():
    not_listed = [c for c in COMMANDS if not c.startswith("mmgen ") and c not in NOT_RUN]
    assert not not_listed, f"README commands that are neither run nor in NOT_RUN: {not_listed}"
    stale = [c for c in NOT_RUN if c not in COMMANDS]
    assert not stale, f"NOT_RUN names commands that are not in README.md: {stale}"
    assert len(EXAMPLES) > len(NOT_RUN) and any(kind == "python" for _, kind, _ in EXAMPLES)


def _expand(arg: str, cwd: Path) -> list[str]:
    """The shell's glob expansion: matches in sorted order, the pattern itself when nothing matches."""
    if not any(c in arg for c in "*?["):
        return [arg]
    return sorted(str(Path(p).relative_to(cwd)) for p in glob.glob(str(cwd / arg))) or [arg]


# What the README says of a command's output (a part of the command -> a test of its stdout), where cheap.
CLAIMS = {
    "mmgen models": lambda out: "shapes-emoji (default)" in out,
    "--sjd-window 16": lambda out: json.loads(out)["lossless"] is True and json.loads(out)["nfe_per_image"] < 64,
    "--sjd-lantern-delta": lambda out: json.loads(out)["lossless"] is False,
    "--model shapes-nextscale": lambda out: "nfe_per_image: 6" in out,
    "--model shapes-nextx": lambda out: json.loads(out)["nfe_per_image"] == 4,
    "--combine": lambda out: len(json.loads(out)["images"]) == 8 and "p_value" in json.loads(out)["combined"],
}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """One directory for the whole README, as a reader's shell would be (wm_*.png is made, then detected)."""
    return tmp_path_factory.mktemp("readme")


# the examples this test runs, in README order (NOT_RUN's are accounted for above, each with its reason)
RUN_EXAMPLES = [(i, line, kind, text) for i, (line, kind, text) in enumerate(EXAMPLES) if text not in NOT_RUN]


@pytest.mark.parametrize("line, kind, text", [example[1:] for example in RUN_EXAMPLES],
                         ids=[f"{i:02d}-L{line}-{kind}" for i, line, kind, _ in RUN_EXAMPLES])
def test_readme_example(line, kind, text, workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    if kind == "python":
        exec(compile(text, f"README.md:{line}", "exec"), {"__name__": "__readme__"})
        return
    assert text.startswith("mmgen "), f"README.md:{line}: {text!r} is neither run nor in NOT_RUN"
    argv = [a for arg in shlex.split(text)[1:] for a in _expand(arg, workdir)]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            rc = main(argv)
        except SystemExit as e:  # --help exits 0; an error exits 2
            rc = e.code
    assert rc in (0, None), f"README.md:{line}: {text!r} exited {rc}:\n{out.getvalue()}"
    for flag, holds in CLAIMS.items():
        if flag in text:
            assert holds(out.getvalue()), f"README.md:{line}: {text!r} gave {out.getvalue()}"
