"""`mmgen convert var`: VAR's released checkpoints (Tian et al., 2024, arXiv 2404.02905; `var_d16.pth` ...
`var_d30.pth` and `vae_ch160v4096z32.pth`, plain state dicts) -> an mmgen `VARPipeline` directory.

Every width is read from the tensors: the transformer's depth, width, heads (the per-head `scale_mul_1H11` of
attn_l2_norm; without it VAR's rule heads = depth), MLP width, classes, shared AdaLN; the VQVAE's channels,
levels, code width, vocabulary and phi layout. The scale schedule is not stored in the weights; `--patch-nums`
(VAR's ten scales by default) is checked against the positions and levels the weights have. Nothing is written
unless every check passes, and then the directory appears whole (`mmgen.safe_save.save_pipeline`).

    mmgen convert var --var var_d16.pth --vae vae_ch160v4096z32.pth --out var-d16
    mmgen generate --model var-d16 --class-label 207 --out dog.png
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from mmgen.convert.checkpoint import check_shapes, load_state_dict
from mmgen.models.var import VARTransformer
from mmgen.pipelines.var import VARPipeline
from mmgen.safe_save import save_pipeline
from tokenizers_vis.var_vqvae import VARVQVAE

PATCH_NUMS = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)  # the released 256 px schedule
# buffers of VAR's modules that its state dicts carry and this port recomputes
VAR_BUFFERS = re.compile(r"^(lvl_1L|attn_bias_for_masking|blocks\.\d+\.attn\.zero_k_bias)$")
VAE_BUFFERS = {"quantize.ema_vocab_hit_SV"}
PHI_KEY = re.compile(r"^quantize\.quant_resi\.(?:qresi_ls\.(\d+)|(\d+)|qresi)\.(weight|bias)$")
VAR_KEYS = ("word_embed.weight", "class_emb.weight", "pos_start", "pos_1LC", "lvl_embed.weight",
            "blocks.0.attn.mat_qkv.weight", "blocks.0.ffn.fc1.weight", "head_nm.ada_lin.1.weight", "head.weight")
VAE_KEYS = ("encoder.conv_in.weight", "encoder.down.0.block.0.conv1.weight", "decoder.conv_out.weight",
            "quant_conv.weight", "post_quant_conv.weight", "quantize.embedding.weight")


def _family_hint(sd: dict) -> str:
    if any(k in sd for k in VAR_KEYS[:3]):
        return " (it looks like a VAR transformer: pass it as --var)"
    if any(k.startswith("quantize.quant_resi.") for k in sd):
        return " (it looks like a VAR VQVAE: pass it as --vae)"
    if "quantize.codebook_used" in sd or any(".conv_blocks." in k for k in sd):
        return " (it looks like a LlamaGen VQ model: convert LlamaGen checkpoints with `mmgen convert llamagen`)"
    return ""


def _require(sd: dict, keys, flag: str, path: str, what: str) -> None:
    missing = [k for k in keys if k not in sd]
    if missing:
        raise ValueError(f"{flag}: {str(path)!r} is not {what}: it has no {', '.join(missing[:3])}"
                         f"{' ...' if len(missing) > 3 else ''}{_family_hint(sd)}")


def _count(sd: dict, template: str) -> int:
    n = 0
    while template.format(n) in sd:
        n += 1
    return n


def vae_from_state_dict(sd: dict, patch_nums, path: str) -> VARVQVAE:
    """The VQVAE the tensors describe, with them loaded (phis renamed to `quantize.phis.<i>`)."""
    _require(sd, VAE_KEYS, "--vae", path, "a VAR VQVAE state dict (the layout of vae_ch160v4096z32.pth)")
    phis = {}
    for k, v in sd.items():
        m = PHI_KEY.match(k)
        if m:
            phis[f"quantize.phis.{m.group(1) or m.group(2) or 0}.{m.group(3)}"] = v
    if not phis:
        raise ValueError(f"--vae: {str(path)!r} has no phi convs (quantize.quant_resi.*): it is not VAR's multi-scale "
                         f"VQVAE{_family_hint(sd)}")
    rest = {k: v for k, v in sd.items() if not k.startswith("quantize.quant_resi.") and k not in VAE_BUFFERS}
    conv_in, z = sd["encoder.conv_in.weight"], sd["quant_conv.weight"]
    ch, levels = conv_in.shape[0], _count(sd, "encoder.down.{}.block.0.conv1.weight")
    mult = [sd[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] for i in range(levels)]
    if any(m % ch for m in mult):
        raise ValueError(f"--vae: {str(path)!r} has level widths {mult}, not multiples of its base width {ch}")
    last = levels - 1
    config = dict(in_channels=conv_in.shape[1], ch=ch, ch_mult=tuple(m // ch for m in mult),
                  num_res_blocks=_count(sd, "encoder.down.0.block.{}.conv1.weight"), z_channels=z.shape[0],
                  vocab_size=sd["quantize.embedding.weight"].shape[0], quant_conv_kernel=z.shape[-1],
                  num_phis=len(phis) // 2, patch_nums=tuple(patch_nums),
                  using_sa=f"encoder.down.{last}.attn.0.qkv.weight" in sd,
                  using_mid_sa="encoder.mid.attn_1.qkv.weight" in sd)
    try:
        vae = VARVQVAE(**config)
    except ValueError as e:
        raise ValueError(f"--vae: {str(path)!r} describes no VAR VQVAE this port builds: {e}") from None
    _load(vae, {**rest, **phis}, "--vae")
    return vae


def transformer_from_state_dict(sd: dict, patch_nums, path: str) -> VARTransformer:
    """The transformer the tensors describe, with them loaded; `patch_nums` checked against its positions."""
    _require(sd, VAR_KEYS, "--var", path, "a VAR transformer state dict (the layout of var_d16.pth)")
    C, Cv = sd["word_embed.weight"].shape
    depth = _count(sd, "blocks.{}.attn.mat_qkv.weight")
    l2 = "blocks.0.attn.scale_mul_1H11" in sd
    L, K, first = sd["pos_1LC"].shape[1], sd["lvl_embed.weight"].shape[0], sd["pos_start"].shape[1]
    pn = tuple(patch_nums)
    if len(pn) != K or sum(s * s for s in pn) != L or pn[0] ** 2 != first:
        raise ValueError(f"--patch-nums {' '.join(map(str, pn))} do not fit {str(path)!r}: its weights have {K} "
                         f"scales and {L} positions in all (the sum of the squares), {first} in the first scale; "
                         f"VAR's 256 px release uses {' '.join(map(str, PATCH_NUMS))}")
    config = dict(num_classes=sd["class_emb.weight"].shape[0] - 1, depth=depth, embed_dim=C,
                  num_heads=sd["blocks.0.attn.scale_mul_1H11"].shape[1] if l2 else depth,
                  mlp_hidden=sd["blocks.0.ffn.fc1.weight"].shape[0], vae_dim=Cv,
                  vocab_size=sd["head.weight"].shape[0], patch_nums=pn,
                  shared_aln="shared_ada_lin.1.weight" in sd, attn_l2_norm=l2)
    try:
        model = VARTransformer(**config)
    except ValueError as e:
        raise ValueError(f"--var: {str(path)!r} describes no VAR transformer this port builds: {e}") from None
    _load(model, {k: v for k, v in sd.items() if not VAR_BUFFERS.match(k)}, "--var")
    return model


def _load(module, sd: dict, flag: str) -> None:
    check_shapes(module, sd, flag, f"a {type(module).__name__} of the widths read from the file")
    module.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in sd.items()})
    module.eval().requires_grad_(False)


def convert(var_path: str, vae_path: str, patch_nums=PATCH_NUMS) -> VARPipeline:
    """The pipeline of a VAR transformer and VQVAE checkpoint pair, checked to fit each other."""
    pn = tuple(patch_nums)
    if len(pn) < 2 or any(not isinstance(s, int) or s < 1 for s in pn) or any(a >= b for a, b in zip(pn, pn[1:])):
        raise ValueError(f"--patch-nums must be at least 2 strictly increasing positive integers (the side of every "
                         f"scale's token map), got {' '.join(map(str, pn))}")
    var_sd, vae_sd = load_state_dict(var_path, "--var"), load_state_dict(vae_path, "--vae")
    transformer = transformer_from_state_dict(var_sd, pn, var_path)
    vae = vae_from_state_dict(vae_sd, pn, vae_path)
    t, v = transformer.config, vae.config
    if (t.vocab_size, t.vae_dim) != (v.vocab_size, v.z_channels):
        raise ValueError(f"--var {str(var_path)!r} predicts {t.vocab_size} codes of width {t.vae_dim}, but --vae "
                         f"{str(vae_path)!r} has {v.vocab_size} codes of width {v.z_channels}: not a matching pair")
    return VARPipeline(transformer, vae)


def _check_out(out: Path) -> None:
    """--out is replaced as a whole, so it must be new, empty, or an earlier saved pipeline."""
    if out.exists() and not (out.is_dir() and (not any(out.iterdir()) or (out / "model_index.json").is_file())):
        raise ValueError(f"--out {str(out)!r} exists and is not a saved pipeline; give a new directory")


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--var", required=True, metavar="PTH", help="VAR transformer checkpoint, e.g. var_d16.pth")
    parser.add_argument("--vae", required=True, metavar="PTH", help="VAR VQVAE checkpoint, vae_ch160v4096z32.pth")
    parser.add_argument("--patch-nums", type=int, nargs="+", default=list(PATCH_NUMS), metavar="N",
                        help=f"token-map side of every scale, coarse to fine (default: VAR's "
                             f"{' '.join(map(str, PATCH_NUMS))})")


def run(args: argparse.Namespace) -> dict:
    out = Path(args.out)
    _check_out(out)
    pipe = convert(args.var, args.vae, args.patch_nums)
    try:
        save_pipeline(pipe, out)
    except OSError as e:
        raise ValueError(f"--out {str(out)!r} cannot be written: {e.strerror or e}") from None
    t = pipe.transformer.config
    return {"family": "var", "out": str(out), "pipeline": type(pipe).__name__, "depth": t.depth,
            "width": t.embed_dim, "heads": t.num_heads, "num_classes": t.num_classes, "vocab_size": t.vocab_size,
            "patch_nums": list(t.patch_nums), "image_size": pipe.vq_model.image_size,
            "parameters": {"transformer": sum(p.numel() for p in pipe.transformer.parameters()),
                           "vq_model": sum(p.numel() for p in pipe.vq_model.parameters())}}
