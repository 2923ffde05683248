"""Make the VAR parity fixtures in tests/fixtures/var/ by running VAR's own code.

Source: FoundationVision/VAR at commit 78b95394fc5896192e3a003e4b295f8ea743c48f (Tian et al. 2024, "Visual
Autoregressive Modeling: Scalable Image Generation via Next-Scale Prediction", arXiv 2404.02905).

    python scripts/make_var_fixtures.py /path/to/VAR [--out tests/fixtures/var]

The checkout is imported from where it lies (its `models.VAR`, `models.VQVAE`); nothing of it is copied here.
Tiny configurations are built with its constructors (the VQVAE keeps the release's ch_mult (1, 1, 2, 2, 4) at
ch 32) and every parameter is overwritten by `synthetic_state_dict`: uniform draws from numpy's PCG64 seeded per
tensor name, so the test rebuilds the same floats on any machine (VAR's own init zeroes the AdaLN gates, which
would leave the blocks idle), some heads' `scale_mul_1H11` above the log-100 clamp. Its `autoregressive_infer_cfg`
samples greedily (top_k 1) and, for single images, with top-k / top-p and `g_seed`; a wrapper around its
`sample_with_top_k_top_p_` records the guided logits and chosen ids of every scale; its [0, 1] images become uint8
(x 255, rounded); its VQVAE encodes two probe images (`img_to_idxBl`).

Written (about 400 KB): manifest.json (configs, parameter shapes, runs, VAR's phi choices, source commit),
buffers_<variant>.safetensors (the buffers its state dicts carry) and expected_<variant>.safetensors (tokens,
pixels, logits, probe codes). The weights (17 MB per VQVAE) are not committed: `tests/test_var_convert.py`
rebuilds them, saves them as VAR's .pth files and converts them with `mmgen convert var`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import torch

SOURCE_COMMIT = "78b95394fc5896192e3a003e4b295f8ea743c48f"
# two variants: the release's layout (attn_l2_norm, per-block AdaLN, 4 shared phis), and the other branches
# (shared AdaLN, plain attention scale, one phi per scale)
VARIANTS = {
    "release": dict(seed=1, patch_nums=(1, 2, 3, 4),
                    vae=dict(vocab_size=128, z_channels=8, ch=32, share_quant_resi=4),
                    var=dict(num_classes=10, depth=2, embed_dim=64, num_heads=4, shared_aln=False, attn_l2_norm=True),
                    runs=[dict(name="greedy_cfg1.5", labels=[0, 3, 7, 9], cfg=1.5, top_k=1, top_p=0.0, g_seed=0),
                          dict(name="greedy_cfg4", labels=[0, 3, 7, 9], cfg=4.0, top_k=1, top_p=0.0, g_seed=0),
                          dict(name="sampled_cfg1.5_k20_p0.9", labels=[3], cfg=1.5, top_k=20, top_p=0.9, g_seed=7),
                          dict(name="sampled_cfg4_p0.8", labels=[8], cfg=4.0, top_k=0, top_p=0.8, g_seed=11)]),
    "shared": dict(seed=2, patch_nums=(1, 2, 4),
                   vae=dict(vocab_size=64, z_channels=8, ch=32, share_quant_resi=0),
                   var=dict(num_classes=5, depth=2, embed_dim=64, num_heads=2, shared_aln=True, attn_l2_norm=False),
                   runs=[dict(name="greedy_cfg2", labels=[1, 4], cfg=2.0, top_k=1, top_p=0.0, g_seed=0),
                         dict(name="sampled_cfg2_k8", labels=[2], cfg=2.0, top_k=8, top_p=0.0, g_seed=3)]),
}


def synthetic_tensor(name: str, shape, seed: int) -> torch.Tensor:
    """Uniform draws for one parameter, scaled by its role so every path of the tiny models carries signal."""
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    u = torch.from_numpy(rng.random(tuple(shape)) * 2 - 1).float()  # U(-1, 1), std 0.577
    if name.endswith("scale_mul_1H11"):
        return 3.25 + 2.75 * u  # log scales in [0.5, 6]: some heads above VAR's clamp at log 100 = 4.6
    if len(shape) == 1 or name.endswith(("pos_start", "pos_1LC", "ada_gss")):
        if "norm" in name and name.endswith("weight"):
            return 1 + 0.2 * u  # GroupNorm scales around 1
        return 0.2 * u if len(shape) == 1 else u
    if name.endswith(("class_emb.weight", "lvl_embed.weight", "quantize.embedding.weight")):
        return u
    fan_in = int(np.prod(shape[1:]))
    w = u * (3 / fan_in) ** 0.5  # std 1 / sqrt(fan_in)
    return 0.3 * w if name == "decoder.conv_out.weight" else w  # keep most pixels inside the clamp


def synthetic_state_dict(shapes: dict, seed: int) -> dict[str, torch.Tensor]:
    return {name: synthetic_tensor(name, shape, seed) for name, shape in shapes.items()}


PHI_CASES = [(10, 4), (10, 10), (3, 3), (4, 4), (6, 4), (13, 4), (7, 2), (4, 1)]  # (scales K, phis n)


def phi_schedules() -> dict[str, list[int]]:
    """Which phi VAR's quantizer gives each scale, for (K, n) in PHI_CASES: its `quant_resi[k / (K - 1)]`."""
    from models.quant import PhiPartiallyShared

    out = {}
    for K, n in PHI_CASES:
        phis = torch.nn.ModuleList(torch.nn.Identity() for _ in range(n))
        chooser = PhiPartiallyShared(phis)
        out[f"{K},{n}"] = [[id(m) for m in phis].index(id(chooser[k / (K - 1)])) for k in range(K)]
    return out


def probe_images(n: int, size: int) -> torch.Tensor:
    """Smooth deterministic test images (n, 3, size, size) in [-1, 1] for the VQVAE's encoder."""
    y, x = torch.meshgrid(torch.linspace(-1, 1, size, dtype=torch.float64),
                          torch.linspace(-1, 1, size, dtype=torch.float64), indexing="ij")
    imgs = [torch.stack([torch.sin(3 * x + i), torch.cos(2 * y - i), torch.sin(x * y * 4 + i)]) for i in range(n)]
    return torch.stack(imgs).float()


def build(variant: dict):
    from models import VAR, VQVAE  # the checkout, on sys.path

    pn = tuple(variant["patch_nums"])
    vae = VQVAE(test_mode=True, v_patch_nums=pn, **variant["vae"])
    var = VAR(vae_local=vae, patch_nums=pn, norm_eps=1e-6, flash_if_available=False, fused_if_available=False,
              **variant["var"])
    for module, prefix in ((var, "var"), (vae, "vae")):
        shapes = {k: list(p.shape) for k, p in module.named_parameters() if not k.startswith("vae_")}
        sd = synthetic_state_dict(shapes, variant["seed"] * 2 + (prefix == "vae"))
        module.load_state_dict(sd, strict=False)
        variant[f"{prefix}_params"] = shapes
    return var.eval(), vae.eval()


def sample(var, run: dict):
    """VAR's own sampler; returns tokens (B, L), uint8 pixels (B, H, W, 3), guided logits before filtering
    (B, L, V)."""
    import models.var as var_module

    real = var_module.sample_with_top_k_top_p_
    seen_logits, seen_ids = [], []

    def recording(logits_BlV, **kw):
        seen_logits.append(logits_BlV.clone())
        ids = real(logits_BlV, **kw)
        seen_ids.append(ids[:, :, 0].clone())
        return ids

    var_module.sample_with_top_k_top_p_ = recording
    try:
        labels = torch.tensor(run["labels"])
        img = var.autoregressive_infer_cfg(B=len(labels), label_B=labels, g_seed=run["g_seed"], cfg=run["cfg"],
                                           top_k=run["top_k"], top_p=run["top_p"])
    finally:
        var_module.sample_with_top_k_top_p_ = real
    pixels = img.mul(255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()
    return torch.cat(seen_ids, 1), pixels, torch.cat(seen_logits, 1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("var_repo", type=Path, help="a checkout of FoundationVision/VAR")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "tests/fixtures/var")
    args = parser.parse_args()
    repo = args.var_repo.resolve()
    commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    if commit != SOURCE_COMMIT:
        print(f"warning: {repo} is at {commit or 'an unknown commit'}, the fixtures record {SOURCE_COMMIT}",
              file=sys.stderr)
    sys.path.insert(0, str(repo))
    os.chdir(repo)  # VAR imports its own `dist` module from the checkout root
    from safetensors.torch import save_file

    torch.set_grad_enabled(False)
    args.out.mkdir(parents=True, exist_ok=True)
    manifest = {"source": {"repository": "FoundationVision/VAR", "commit": commit}, "phi_schedules": phi_schedules(),
                "variants": {}}
    for name, variant in VARIANTS.items():
        variant = json.loads(json.dumps(variant))  # a copy, lists for tuples
        var, vae = build(variant)
        buffers = {f"var.{k}": v for k, v in var.named_buffers() if not k.startswith("vae_")}
        buffers |= {f"vae.{k}": v for k, v in vae.named_buffers()}
        save_file({k: v.contiguous() for k, v in buffers.items()}, str(args.out / f"buffers_{name}.safetensors"))
        expected = {}
        for run in variant["runs"]:
            tokens, pixels, logits = sample(var, run)
            top2 = logits.topk(2, -1).values
            run["min_top1_margin"] = float((top2[..., 0] - top2[..., 1]).min())
            expected |= {f"tokens/{run['name']}": tokens, f"pixels/{run['name']}": pixels,
                         f"logits/{run['name']}": logits}
            print(f"{name} {run['name']}: tokens {tokens.tolist()[0][:12]}..., pixel mean {pixels.float().mean():.1f}, "
                  f"min top-1 margin {run['min_top1_margin']:.4f}")
        scale_mul = [p.flatten() for k, p in var.named_parameters() if k.endswith("scale_mul_1H11")]
        if scale_mul:
            above = int((torch.cat(scale_mul) > var.blocks[0].attn.max_scale_mul).sum())
            print(f"{name}: {above} of {len(torch.cat(scale_mul))} heads above the log-100 clamp")
        ids = vae.img_to_idxBl(probe_images(2, vae.downsample * variant["patch_nums"][-1]))
        expected["encoded/probe"] = torch.cat(ids, 1)
        save_file({k: v.contiguous() for k, v in expected.items()}, str(args.out / f"expected_{name}.safetensors"))
        manifest["variants"][name] = variant
    (args.out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
