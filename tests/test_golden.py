"""Behaviour kept through refactors: the shipped models' PNG bytes for fixed prompts and seeds (AR, SJD,
watermarked) and the loss sequences of short seeded training runs of every paradigm and tokenizer kind equal
the ones recorded in tests/golden.json (see tests/golden.py)."""

import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def test_outputs_equal_the_recorded_goldens():
    # a fresh process: no torch state (threads, seeds, flags) carried over from other tests
    proc = subprocess.run([sys.executable, str(HERE / "golden.py")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "identical", proc.stdout[-2000:]


def test_golden_file_covers_every_zoo_model_and_paradigm():
    golden = json.loads((HERE / "golden.json").read_text())
    zoo = {p.name for p in (HERE.parent / "mmgen" / "zoo").iterdir() if (p / "model_index.json").is_file()}
    assert {k.split("/")[0] for k in golden["zoo"]} == zoo
    assert {"generator/next_token", "generator/token_shuffle", "generator/next_scale", "generator/flow_head",
            "generator/flowar", "generator/next_x", "tokenizer/seed"} <= set(golden["training"])


def _load_golden_module():
    sys.path.insert(0, str(HERE))
    try:
        import golden
    finally:
        sys.path.remove(str(HERE))
    return golden


def _mismatch(golden, pipe, key: str, **call_args):
    """Why `pipe`'s output for the golden call `key` differs from the recorded one (None when it holds)."""
    from mmgen.pipelines.base import generators_from_seed

    name, call = key.split("/")
    res = pipe(golden.PROMPT, num_images_per_prompt=2, generator=generators_from_seed(golden.SEED, 2),
               **golden.CALL_ARGS[call], **call_args)
    record, images = golden.record_of(res, key)
    return golden.zoo_mismatch(json.loads((HERE / "golden.json").read_text())["zoo"][key], record,
                               dict(zip(record["images"], images)))


def _scaled(module, name: str, factor):
    """`module` with parameter `name` multiplied by `factor` (a number or a tensor)."""
    import torch

    with torch.no_grad():
        dict(module.named_parameters())[name].mul_(factor)
    return module


def test_golden_tolerances_pass_last_bit_noise_and_fail_real_regressions():
    """The cross-CPU tolerances are wide enough for last-bit differences (modelled as 1e-6 relative noise on every
    weight) and narrow enough that a 1% change of one weight tensor or one flow step fewer fails them."""
    import torch

    from mmgen.pipelines import load_pipeline

    golden = _load_golden_module()
    torch.set_num_threads(1)  # as golden.compute() runs
    key = "shapes-flowar/ar"
    pipe = load_pipeline("shapes-flowar")
    noise = torch.Generator().manual_seed(0)
    for module in (pipe.transformer, pipe.vae):
        for name, p in list(module.named_parameters()):
            _scaled(module, name, 1 + 1e-6 * torch.randn(p.shape, generator=noise))
    assert _mismatch(golden, pipe, key) is None

    assert "latents differ" in _mismatch(golden, load_pipeline("shapes-flowar"), key, num_inference_steps=24)
    pipe = load_pipeline("shapes-flowar")
    _scaled(pipe.transformer, "backbone.layers.4.mlp.w1.weight", 1.01)
    assert "latents differ" in _mismatch(golden, pipe, key)
    pipe = load_pipeline("shapes-flowar")
    _scaled(pipe.vae, "decoder.up_blocks.0.upsamplers.0.conv.weight", 1.01)  # latents unchanged, pixels not
    assert "pixels differ" in _mismatch(golden, pipe, key)

    # discrete codes: exact; a tokenizer decoder change shows in the pixels alone
    pipe = load_pipeline("shapes-emoji")
    assert _mismatch(golden, pipe, "shapes-emoji/ar") is None
    _scaled(pipe.vq_model, "decoder.net.9.block.5.weight", 1.03)
    assert "pixels differ" in _mismatch(golden, pipe, "shapes-emoji/ar")
    assert _mismatch(golden, pipe, "shapes-emoji/ar", guidance_scale=2.0) == "image codes differ"
