"""The pieces of `scripts/gpu_check.sh`, one GPU for a few minutes (`--tiny`: every piece at toy sizes, any device):

    python -m mmgen.bench.device suites --device cuda OUT.json     the sjd and decode suites on the default model
    python -m mmgen.bench.device pass-time --device cuda OUT.json  a verify pass's time against its window width on
                                                                   a random decoder of Janus-Pro-1B's shape
    python -m mmgen.bench.device train --device cuda OUT.json      bf16 training throughput of the default config
    python -m mmgen.bench.device report PARTS_DIR                  the script's one JSON report, on stdout

Each piece writes its JSON as soon as it has a part of it, so a piece stopped by its time budget still leaves what
it measured. On a GPU a decoder pass is nearly flat in its width (launch- and weight-bound), which is where
speculative decoding pays; `pass-time` shows how flat.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import torch

from mmgen.atomic import write_json_atomic
from mmgen.bench.common import distinct_prompts, synchronize
from mmgen.bench.decode import bench_hf_generate
from mmgen.bench.sjd import bench_sjd
from mmgen.data.shapes import heldout_prompts
from mmgen.models.compiled_decode import WindowStep
from mmgen.models.transformer import Transformer
from mmgen.paradigms import next_token
from mmgen.paradigms.next_token import NextTokenBackend, NextTokenLayout
from mmgen.pipelines import load_pipeline
from mmgen.text import UnifiedVocab, encode_prompts
from mmgen.zoo import DEFAULT_MODEL

# Janus-Pro-1B's language model (LLaMA: 24 layers, width 2048, 16 heads, SwiGLU 5632) and its image generation:
# 24 x 24 codes of a 16384-entry codebook, CFG 5 (two rows per image)
JANUS_PRO_1B = dict(dim=2048, n_layers=24, n_heads=16, mlp_hidden=5632)
JANUS_IMAGE = dict(grid=(24, 24), codes=16384, text_len=64, guidance=5.0)
TINY_DECODER = dict(dim=64, n_layers=2, n_heads=4, mlp_hidden=128)
TINY_IMAGE = dict(grid=(4, 4), codes=64, text_len=8, guidance=5.0)
SUITE_MODES = ("ar", "ar_compiled", "sjd_coupled", "sjd_adaptive", "sjd_shared", "sjd_compiled",
               "sjd_compiled_adaptive")


def suites(device: str, out: Path, tiny: bool = False, model=DEFAULT_MODEL) -> dict:
    """`mmgen bench --suite sjd --suite decode` on the default model, cut to fit the script's budget: the exact
    chain modes against eager and compiled AR at batch 1, 8, 32 over 32 prompts, one timed pass each, the pass
    time against width, the AR decode against `generate()`. One batch size after another, each saved as it ends."""
    sizes, prompts = ((1, 2), 2) if tiny else ((1, 8, 32), 32)
    report = {"sjd": {}}
    for b in sizes:
        part = bench_sjd(model, batch_sizes=(b,), repeats=1, num_prompts=prompts, eval_per_category=0,
                         sweep_windows=(), tree_widths=(), accept_widths=(), profile=False, hf_generate=False,
                         modes=SUITE_MODES, device=device, progress=False, pass_widths=(1, 2) if tiny else
                         (1, 2, 4, 8, 16))
        for key, value in part.items():
            report["sjd"][key] = report["sjd"].get(key, {}) | value if isinstance(value, dict) else value
        write_json_atomic(out, report, indent=2)
    pipe = load_pipeline(model).to(device)
    report["decode"] = bench_hf_generate(pipe, sizes, repeats=2 if tiny else 3)
    write_json_atomic(out, report, indent=2)
    return report


@torch.no_grad()
def pass_time(device: str, out: Path, tiny: bool = False, widths=(1, 2, 4, 8, 16, 32), repeats: int = 10,
              dtype=torch.bfloat16) -> dict:
    """Milliseconds of one SJD verify pass (one image: its two guidance rows) at each width on a random decoder of
    Janus-Pro-1B's shape, halfway through its 576 codes; eager, then through the compiled window step at the
    narrowest and widest widths. Medians over `repeats`."""
    shape, image = (TINY_DECODER, TINY_IMAGE) if tiny else (JANUS_PRO_1B, JANUS_IMAGE)
    widths = widths[:2] if tiny else widths
    vocab = UnifiedVocab(text_vocab_size=1000, image_vocab_size=image["codes"])
    layout = NextTokenLayout(vocab, image["text_len"], image["grid"])
    torch.manual_seed(0)
    model = Transformer(vocab_size=vocab.size, max_seq_len=layout.seq_len, **shape).to(device, dtype).eval()
    text = [torch.randint(2, 1000, (image["text_len"] - 4,)).tolist()]
    n = torch.full((1,), layout.num_image_tokens // 2, device=device)
    report = {"device": device, "dtype": str(dtype), "decoder": shape, "image": image,
              "parameters": sum(p.numel() for p in model.parameters()), "eager_ms": {}, "compiled_ms": {}}
    for kind, chosen in (("eager", widths), ("compiled", (widths[0], widths[-1]))):
        backend = NextTokenBackend(model, layout, text, image["guidance"], max(widths), compile=kind == "compiled")
        backend.forward(torch.zeros(1, 1, dtype=torch.long, device=device), torch.zeros_like(n))  # the prompt pass
        if kind == "compiled":  # a graph per measured width, unpadded (the sampler's GPU path pads to its window)
            backend.window_step = WindowStep(model, max(widths), widths=chosen)
        for w in chosen:
            drafts = torch.randint(0, image["codes"], (1, w), device=device)
            backend.forward(drafts, n)  # compiles; not timed
            seconds = []
            for _ in range(repeats):
                synchronize(device)
                t0 = time.perf_counter()
                backend.forward(drafts, n)
                synchronize(device)
                seconds.append(time.perf_counter() - t0)
            report[f"{kind}_ms"][f"width_{w}"] = round(1000 * statistics.median(seconds), 3)
            write_json_atomic(out, report, indent=2)
    return report


def train(device: str, out: Path, tiny: bool = False, steps: int = 20, model=DEFAULT_MODEL) -> dict:
    """Training steps per second of the default model's decoder (`configs/generator_shapes_emoji_gpu.yaml`: its
    width, depth, caption length and code grid, batch 256) on random codes and shapes captions, AdamW, under bf16
    autocast and in float32; the first steps (warm-up) are not timed."""
    pipe = load_pipeline(model)
    layout, config = pipe.layout, dict(pipe.transformer.config)
    batch, steps = (4, 2) if tiny else (256, steps)
    g = torch.Generator().manual_seed(0)
    text_ids = encode_prompts(pipe.tokenizer, distinct_prompts(heldout_prompts, batch, 0), layout.max_text_len)
    report = {"device": device, "batch_size": batch, "steps": steps, "decoder": {k: config[k] for k in (
        "dim", "n_layers", "n_heads")}, "tokens_per_image": layout.seq_len - 1}
    for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        torch.manual_seed(0)
        model = Transformer.from_config(config).to(device).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        codes = torch.randint(0, layout.vocab.image_vocab_size, (batch, *layout.grid), generator=g).to(device)
        data = next_token.build_batch(layout, text_ids, codes, cond_drop_prob=0.1, generator=g)
        seconds, losses = [], []
        for i in range(steps + 2):
            synchronize(device)
            t0 = time.perf_counter()
            with torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype != torch.float32):
                loss = next_token.loss_fn(model, data, layout)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            synchronize(device)
            if i >= 2:
                seconds.append(time.perf_counter() - t0)
            losses.append(round(loss.item(), 4))
        step = statistics.median(seconds)
        report[name] = {"ms_per_step": round(1000 * step, 2), "images_per_second": round(batch / step, 1),
                        "tokens_per_second": round(batch * report["tokens_per_image"] / step),
                        "first_loss": losses[0], "last_loss": losses[-1]}
        write_json_atomic(out, report, indent=2)
    report["bf16_speedup"] = round(report["fp32"]["ms_per_step"] / report["bf16"]["ms_per_step"], 3)
    write_json_atomic(out, report, indent=2)
    return report


def _tests(junit: Path) -> dict:
    if not junit.is_file():
        return {"ran": False}
    suite = ET.parse(junit).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    failed = [f"{case.get('classname')}::{case.get('name')}" for case in suite.iter("testcase")
              if case.find("failure") is not None or case.find("error") is not None]
    return {"ran": True, **counts, "failed": failed}


def report(parts: Path) -> dict:
    """The script's report from its parts directory: each step's exit status and seconds (steps.txt: `name status
    seconds` lines; status 124 = stopped by its budget), the tests' counts, and every piece's JSON."""
    steps = {}
    for line in (parts / "steps.txt").read_text().splitlines():
        name, status, seconds = line.split()
        steps[name] = {"exit_status": int(status), "seconds": int(seconds), "timed_out": status == "124"}
    out = {"machine": {"platform": platform.platform(), "python": platform.python_version(),
                       "torch": torch.__version__,
                       "accelerator": torch.cuda.get_device_name() if torch.cuda.is_available() else None},
           "steps": steps, "tests": _tests(parts / "tests.xml")}
    for name in ("suites", "pass_time", "train"):
        path = parts / f"{name}.json"
        out[name] = json.loads(path.read_text()) if path.is_file() else None
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mmgen.bench.device", description=__doc__.split("\n\n")[0])
    parser.add_argument("piece", choices=("suites", "pass-time", "train", "report"))
    parser.add_argument("path", help="the piece's JSON output (report: the parts directory)")
    parser.add_argument("--device", default="cuda", help="torch device (default cuda)")
    parser.add_argument("--tiny", action="store_true", help="toy sizes: a dry run of the piece on any device")
    args = parser.parse_args(argv)
    if args.piece == "report":
        print(json.dumps(report(Path(args.path)), indent=2))
        return 0
    piece = {"suites": suites, "pass-time": pass_time, "train": train}[args.piece]
    piece(args.device, Path(args.path), tiny=args.tiny)
    return 0


if __name__ == "__main__":
    sys.exit(main())
