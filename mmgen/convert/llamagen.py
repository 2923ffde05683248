"""Convert LlamaGen's released checkpoints (Sun et al. 2024, arXiv 2406.06525) into an mmgen pipeline directory.

    mmgen convert llamagen --gpt c2i_L_256.pt --vq vq_ds16_c2i.pt --out llamagen-c2i-L
    mmgen convert llamagen --gpt t2i_XL_stage1_256.pt --vq vq_ds16_t2i.pt --text-encoder flan-t5-xl --out t2i-XL

The GPT's architecture comes from `--gpt-model` (checked tensor by tensor against the file) or, without it,
from the tensor shapes (`--n-head` where the width matches no preset); the VQ's (base width, channel
multipliers, res blocks, codebook) from its tensors. The token grid is `--image-size` / the VQ's downsampling,
`--image-size` defaulting to the number a released file name ends in (`c2i_B_256.pt`). Sampling the result with
`mmgen.pipelines.LlamaGenPipeline` reproduces LlamaGen's `generate` (tests/test_llamagen.py).
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import torch

from mmgen.convert.checkpoint import check_shapes, load_state_dict

# LlamaGen's GPT_models presets: (n_layer, n_head, dim)
PRESETS = {"GPT-B": (12, 12, 768), "GPT-L": (24, 16, 1024), "GPT-XL": (36, 20, 1280), "GPT-XXL": (48, 24, 1536),
           "GPT-XXXL": (48, 40, 2560), "GPT-1B": (22, 32, 2048), "GPT-3B": (24, 32, 3200)}
GPT_KEY, VQ_KEY = "tok_embeddings.weight", "quantize.embedding.weight"


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--gpt", required=True, metavar="FILE", help="LlamaGen GPT checkpoint (c2i_*.pt, t2i_*.pt)")
    parser.add_argument("--vq", required=True, metavar="FILE", help="LlamaGen VQ checkpoint (vq_ds16_c2i.pt, ...)")
    parser.add_argument("--gpt-model", choices=list(PRESETS), default=None,
                        help="architecture preset; default: read from the tensor shapes")
    parser.add_argument("--n-head", type=int, default=None,
                        help="attention heads, when the width matches no preset and --gpt-model is not given")
    parser.add_argument("--image-size", type=int, default=None,
                        help="image side in pixels (the grid is this / the VQ's downsampling); default: the number "
                             "the --gpt file name ends in (c2i_L_384.pt -> 384)")
    parser.add_argument("--text-encoder", metavar="DIR", default=None,
                        help="local T5 encoder directory (FLAN-T5-XL for the released t2i models); required for t2i")


def run(args: argparse.Namespace) -> dict:
    return convert(args.gpt, args.vq, args.out, gpt_model=args.gpt_model, n_head=args.n_head,
                   image_size=args.image_size, text_encoder=args.text_encoder)


def gpt_config(sd: dict[str, torch.Tensor], gpt_model: str | None, n_head: int | None, grid: int) -> dict:
    """LlamaGenGPT's config from the tensors; a preset is checked against them, naming the tensor that differs."""
    if GPT_KEY not in sd or not any(k.endswith("attention.wqkv.weight") for k in sd):
        hint = " (it looks like a VQ tokenizer: pass it as --vq)" if VQ_KEY in sd else ""
        raise ValueError(f"--gpt is not a LlamaGen GPT checkpoint: no {GPT_KEY!r} / layers.*.attention.wqkv.weight "
                         f"tensors{hint}; keys: {', '.join(list(sd)[:5])} ...")
    vocab, dim = sd[GPT_KEY].shape
    layers = sorted({int(m.group(1)) for k in sd if (m := re.match(r"layers\.(\d+)\.", k))})
    n_layer = len(layers)
    if layers != list(range(n_layer)):
        raise ValueError(f"--gpt: layer indices are not 0..{n_layer - 1}: {layers}")
    if gpt_model is not None:
        if gpt_model not in PRESETS:
            raise ValueError(f"--gpt-model must be one of {', '.join(PRESETS)}; got {gpt_model!r}")
        p_layers, p_heads, p_dim = PRESETS[gpt_model]
        if p_dim != dim:
            raise ValueError(f"--gpt-model {gpt_model} has width {p_dim}, but tensor {GPT_KEY!r} has shape "
                             f"{tuple(sd[GPT_KEY].shape)} (width {dim})")
        if p_layers != n_layer:
            name = (f"layers.{p_layers}.attention.wqkv.weight" if n_layer > p_layers
                    else f"layers.{n_layer}.attention.wqkv.weight")
            state = "is present" if n_layer > p_layers else "is missing"
            raise ValueError(f"--gpt-model {gpt_model} has {p_layers} layers, but tensor {name!r} {state} (the file "
                             f"has {n_layer} layers)")
        if n_head is not None and n_head != p_heads:
            raise ValueError(f"--n-head {n_head} contradicts --gpt-model {gpt_model} ({p_heads} heads)")
        n_head = p_heads
    elif n_head is None:
        match = [name for name, (_, _, d) in PRESETS.items() if d == dim]
        if not match:
            raise ValueError(f"--n-head is required: width {dim} (tensor {GPT_KEY!r}) matches no preset "
                             f"({', '.join(f'{n} {d}' for n, (_, _, d) in PRESETS.items())})")
        n_head = PRESETS[match[0]][1]
    if n_head < 1 or dim % n_head or (dim // n_head) % 4:
        raise ValueError(f"--n-head {n_head} does not divide width {dim} into heads of a width divisible by 4")
    head_dim = dim // n_head
    qkv_rows = sd["layers.0.attention.wqkv.weight"].shape[0]
    n_kv_head = (qkv_rows // head_dim - n_head) // 2
    if n_kv_head < 1 or (n_head + 2 * n_kv_head) * head_dim != qkv_rows or n_head % n_kv_head:
        raise ValueError(f"tensor 'layers.0.attention.wqkv.weight' has {qkv_rows} rows, which does not fit {n_head} "
                         f"heads of width {head_dim}")
    if "cls_embedding.embedding_table.weight" in sd:
        cond = {"model_type": "c2i", "num_classes": sd["cls_embedding.embedding_table.weight"].shape[0] - 1,
                "cls_token_num": 1}
    elif "cls_embedding.cap_proj.fc1.weight" in sd and "cls_embedding.uncond_embedding" in sd:
        cond = {"model_type": "t2i", "caption_dim": sd["cls_embedding.cap_proj.fc1.weight"].shape[1],
                "cls_token_num": sd["cls_embedding.uncond_embedding"].shape[0]}
    else:
        raise ValueError("--gpt has neither a class embedding (cls_embedding.embedding_table.weight, c2i) nor a "
                         "caption projection (cls_embedding.cap_proj.fc1.weight + uncond_embedding, t2i)")
    return {"vocab_size": vocab, "dim": dim, "n_layer": n_layer, "n_head": n_head,
            "n_kv_head": n_kv_head if n_kv_head != n_head else None,
            "ffn_hidden": sd["layers.0.feed_forward.w1.weight"].shape[0], "grid_size": grid, **cond}


def vq_config(sd: dict[str, torch.Tensor]) -> dict:
    """LlamaGenVQ's config (without image_size) from the tensors."""
    needed = (VQ_KEY, "encoder.conv_in.weight", "encoder.conv_blocks.0.res.0.conv1.weight", "quant_conv.weight",
              "decoder.conv_blocks.0.res.0.conv1.weight")
    missing = [k for k in needed if k not in sd]
    if missing:
        what = "it looks like a LlamaGen GPT: pass it as --gpt" if GPT_KEY in sd else "another family's VQ-VAE?"
        raise ValueError(f"--vq is not a LlamaGen VQ checkpoint ({what}): tensor {missing[0]!r} is missing; keys: "
                         f"{', '.join(list(sd)[:5])} ...")
    codebook_size, embed_dim = sd[VQ_KEY].shape
    ch = sd["encoder.conv_in.weight"].shape[0]
    levels = sorted({int(m.group(1)) for k in sd if (m := re.match(r"encoder\.conv_blocks\.(\d+)\.", k))})
    ch_mult = []
    for i in levels:
        out = sd[f"encoder.conv_blocks.{i}.res.0.conv1.weight"].shape[0]
        if out % ch:
            raise ValueError(f"--vq: tensor 'encoder.conv_blocks.{i}.res.0.conv1.weight' has {out} channels, not a "
                             f"multiple of the base width {ch}")
        ch_mult.append(out // ch)
    res = {int(m.group(1)) for k in sd if (m := re.match(r"encoder\.conv_blocks\.0\.res\.(\d+)\.", k))}
    return {"codebook_size": codebook_size, "codebook_embed_dim": embed_dim, "ch": ch, "ch_mult": ch_mult,
            "num_res_blocks": len(res), "z_channels": sd["quant_conv.weight"].shape[1]}


def image_size_from_name(path: str | Path) -> int | None:
    m = re.search(r"_(\d+)\.(pt|pth|bin)$", Path(path).name)
    return int(m.group(1)) if m else None


def convert(gpt: str | Path, vq: str | Path, out: str | Path, gpt_model: str | None = None, n_head: int | None = None,
            image_size: int | None = None, text_encoder: str | Path | None = None) -> dict:
    """Read, check, build and save; nothing is written unless every check passed (and then atomically)."""
    # imported here so that `mmgen --help` does not load diffusers, transformers and every pipeline
    from mmgen.conditioning import load_text_encoder
    from mmgen.models.llamagen import LlamaGenGPT
    from mmgen.pipelines import save_pipeline
    from mmgen.pipelines.llamagen import LlamaGenPipeline
    from tokenizers_vis.llamagen_vq import LlamaGenVQ

    out = Path(out)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "model_index.json").is_file())):
        raise ValueError(f"--out {str(out)!r} exists and is not a saved pipeline; choose a new directory")
    gpt_sd, vq_sd = load_state_dict(gpt, "--gpt"), load_state_dict(vq, "--vq")
    vq_sd = {k: v for k, v in vq_sd.items() if not k.endswith("codebook_used")}  # a training statistic
    vq_cfg = vq_config(vq_sd)
    down = 2 ** (len(vq_cfg["ch_mult"]) - 1)
    if image_size is None:
        image_size = image_size_from_name(gpt)
        if image_size is None:
            raise ValueError(f"--image-size is required: {Path(gpt).name!r} does not end in a size (c2i_L_256.pt)")
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < down or image_size % down:
        raise ValueError(f"--image-size must be a positive multiple of the VQ's downsampling {down}, got {image_size}")
    gpt_cfg = gpt_config(gpt_sd, gpt_model, n_head, image_size // down)

    model = LlamaGenGPT(**gpt_cfg)
    check_shapes(model, gpt_sd, "--gpt", f"a LlamaGen {gpt_model or 'GPT'} of this shape")
    model.load_state_dict({k: v.float() for k, v in gpt_sd.items()})
    tokenizer_model = LlamaGenVQ(**vq_cfg, image_size=image_size)
    check_shapes(tokenizer_model, vq_sd, "--vq", "a LlamaGen VQ of this shape")
    tokenizer_model.load_state_dict({k: v.float() for k, v in vq_sd.items()})
    if gpt_cfg["vocab_size"] != vq_cfg["codebook_size"]:
        raise ValueError(f"--gpt predicts {gpt_cfg['vocab_size']} codes but the --vq codebook has "
                         f"{vq_cfg['codebook_size']}: they are not a pair")

    encoder = tokenizer = None
    if gpt_cfg["model_type"] == "t2i":
        if text_encoder is None:
            raise ValueError("--text-encoder is required: --gpt is a text-to-image (t2i) checkpoint, which reads "
                             "T5 features (FLAN-T5-XL for the released models); give its local directory")
        encoder, tokenizer = load_text_encoder(text_encoder, "--text-encoder")
        if type(encoder).__name__ != "T5EncoderModel":
            raise ValueError(f"--text-encoder {str(text_encoder)!r} holds a {type(encoder).__name__}; LlamaGen's t2i "
                             f"models read T5 features (FLAN-T5-XL for the released ones): give a T5 directory")
        if encoder.config.hidden_size != gpt_cfg["caption_dim"]:
            raise ValueError(f"--text-encoder {str(text_encoder)!r} gives features of width "
                             f"{encoder.config.hidden_size}, but --gpt reads {gpt_cfg['caption_dim']} "
                             f"(FLAN-T5-XL: 2048)")
    elif text_encoder is not None:
        raise ValueError("--text-encoder applies to t2i checkpoints only; --gpt is class-conditional (c2i)")

    pipe = LlamaGenPipeline(model.eval(), tokenizer_model.eval(), encoder, tokenizer)
    save_pipeline(pipe, out)
    return {"family": "llamagen", "out": str(out), "model_type": gpt_cfg["model_type"], "image_size": image_size,
            "grid": [image_size // down] * 2, "gpt": gpt_cfg, "vq": vq_cfg,
            "gpt_parameters": sum(p.numel() for p in model.parameters()),
            "vq_parameters": sum(p.numel() for p in tokenizer_model.parameters()),
            "default_guidance_scale": pipe.config.default_guidance_scale, "default_top_k": pipe.config.default_top_k}

