"""Make the LlamaGen parity fixtures in tests/fixtures/llamagen/ by running LlamaGen's own code.

Source: FoundationVision/LlamaGen at commit ce98ec41803a74a90ce68c40ababa9eaeffeb4ec (Sun et al. 2024,
"Autoregressive Model Beats Diffusion: Llama for Scalable Image Generation", arXiv 2406.06525).

    python scripts/make_llamagen_fixtures.py /path/to/LlamaGen [--out tests/fixtures/llamagen]

The checkout is imported from where it lies (its `GPT_models`, `VQ_models`, `generate`); nothing of it is
copied here. Tiny random configurations are built with its classes, saved as released checkpoints are
(`torch.save({"model": state_dict})`, float16 to keep the files small; the models run on exactly those
values), sampled with its `generate` and decoded with its VQ, and the tokens and uint8 pixels (its sample
scripts' conversion: clamp(127.5 x + 128, 0, 255) -> uint8) are written to reference.npz with the VQ's codes
of two random images, the settings of every run to reference.json. `tests/test_llamagen.py` converts the checkpoints with `mmgen convert llamagen`
and checks mmgen's pipeline against these files.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

SEED = 0
GRID = 4  # 4 x 4 tokens
GPT = dict(dim=64, n_layer=2, n_head=4, vocab_size=64, block_size=GRID * GRID)
NUM_CLASSES = 10
CAPTION_DIM = 32  # the T5 feature width (2048 for FLAN-T5-XL)
CAPTION_TOKENS = 120  # LlamaGen's t2i condition length (its CaptionEmbedder's uncond_embedding rows)
VQ = dict(codebook_size=64, codebook_embed_dim=8, z_channels=32, ch=32, ch_mult=[1, 1], num_res_blocks=1)
# guidance scale, top-k, temperature, cfg_interval, sampled (multinomial with a seed) or greedy (top-k 1)
RUNS = [
    {"name": "greedy_cfg1", "cfg_scale": 1.0, "top_k": 1},
    {"name": "greedy_cfg4", "cfg_scale": 4.0, "top_k": 1},
    {"name": "greedy_cfg4_interval5", "cfg_scale": 4.0, "top_k": 1, "cfg_interval": 5},
    {"name": "sampled_cfg4_seed7", "cfg_scale": 4.0, "top_k": 0, "temperature": 1.0, "seed": 7, "batch": 1},
]


def randomize(module: torch.nn.Module, std: float, generator: torch.Generator) -> None:
    """Fresh random weights, large enough that a tiny model's greedy tokens vary from step to step (LlamaGen
    zero-initialises its output layer, which would make every logit equal)."""
    for name, p in module.named_parameters():
        if p.dim() == 1:  # norms and biases: around 1 / 0
            base = 1.0 if "norm" in name and name.endswith("weight") else 0.0
            p.data = base + 0.1 * torch.randn(p.shape, generator=generator)
        else:
            p.data = std * torch.randn(p.shape, generator=generator) / p[0].numel() ** 0.5


def to_half_and_back(module: torch.nn.Module) -> dict:
    """The float16 state dict that is saved, and the module set to exactly those values (run in float32)."""
    sd = {k: v.half() if v.is_floating_point() else v for k, v in module.state_dict().items()}
    module.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in sd.items()})
    return sd


def pixels(images: torch.Tensor) -> np.ndarray:
    # LlamaGen's sample scripts: clamp(127.5 * x + 128, 0, 255) -> uint8, (B, H, W, 3)
    return torch.clamp(127.5 * images + 128.0, 0, 255).permute(0, 2, 3, 1).to("cpu", dtype=torch.uint8).numpy()


def checkout_commit(root: Path) -> str:
    try:
        return subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (subprocess.CalledProcessError, FileNotFoundError):
        return "unknown (not a git checkout)"


def vq_architecture(VQ_models, Encoder, Decoder):
    """LlamaGen's VQModel with a narrower encoder/decoder (its own classes; released: ch 128, 2 res blocks), at its
    default initialisation."""
    vq = VQ_models["VQ-16"](codebook_size=VQ["codebook_size"], codebook_embed_dim=VQ["codebook_embed_dim"],
                            z_channels=VQ["z_channels"])
    vq.encoder = Encoder(ch=VQ["ch"], ch_mult=VQ["ch_mult"], num_res_blocks=VQ["num_res_blocks"],
                         z_channels=VQ["z_channels"])
    vq.decoder = Decoder(ch=VQ["ch"], ch_mult=VQ["ch_mult"], num_res_blocks=VQ["num_res_blocks"],
                         z_channels=VQ["z_channels"])
    return vq


def tiny_vq(VQ_models, Encoder, Decoder, g: torch.Generator):
    """`vq_architecture` with random weights from `g`."""
    vq = vq_architecture(VQ_models, Encoder, Decoder)
    randomize(vq, 1.0, g)
    return vq.eval()


def caption_conditions(lengths: list[int], g: torch.Generator):
    """T5-like caption features, right-padded as T5 returns them with their masks, and sample_t2i.py's left-padded
    form (valid tokens moved to the end, padding zeroed) with its mask."""
    caption = torch.randn(len(lengths), CAPTION_TOKENS, CAPTION_DIM, generator=g)
    caption_mask = torch.zeros(len(lengths), CAPTION_TOKENS, dtype=torch.long)
    for i, n in enumerate(lengths):
        caption_mask[i, :n] = 1
    left_mask = torch.flip(caption_mask, dims=[-1])
    left = torch.stack([torch.cat([c[int(m.sum()):], c[:int(m.sum())]]) for c, m in zip(caption, caption_mask)])
    return caption, caption_mask, left * left_mask[:, :, None], left_mask


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("llamagen", help="path of a LlamaGen checkout")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "tests/fixtures/llamagen"))
    args = parser.parse_args(argv)
    root = Path(args.llamagen).resolve()
    sys.path.insert(0, str(root))
    from autoregressive.models.generate import generate
    from autoregressive.models.gpt import GPT_models, ModelArgs, Transformer
    from tokenizer.tokenizer_image.vq_model import VQ_models, Decoder, Encoder

    commit = checkout_commit(root)
    torch.set_num_threads(1)
    torch.set_grad_enabled(False)
    torch.manual_seed(SEED)  # the buffers LlamaGen draws itself (t2i's uncond_embedding)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(SEED)

    # the VQ: VQ_models' VQModel with a narrower encoder/decoder (its own classes; released: ch 128, 2 res blocks)
    vq = tiny_vq(VQ_models, Encoder, Decoder, g)
    vq_sd = to_half_and_back(vq)
    downsample = 2 ** (len(VQ["ch_mult"]) - 1)
    image_size = GRID * downsample
    torch.save({"model": vq_sd}, out / "vq.pt")

    # the GPTs (GPT_models' presets are too large: the same Transformer class with tiny ModelArgs)
    c2i = Transformer(ModelArgs(**GPT, num_classes=NUM_CLASSES, model_type="c2i", cls_token_num=1)).eval()
    t2i = Transformer(ModelArgs(**GPT, caption_dim=CAPTION_DIM, model_type="t2i",
                                cls_token_num=CAPTION_TOKENS)).eval()
    assert set(GPT_models) >= {"GPT-B", "GPT-L", "GPT-XL", "GPT-XXL", "GPT-XXXL", "GPT-1B", "GPT-3B"}
    for model in (c2i, t2i):
        randomize(model, 2.0, g)
    # "model" for c2i (DDP-style), "module" for t2i (DeepSpeed-style): the converter reads both
    torch.save({"model": to_half_and_back(c2i), "steps": 0}, out / "gpt_c2i.pt")
    torch.save({"module": to_half_and_back(t2i)}, out / "gpt_t2i.pt")

    # conditions: class labels; T5-like caption features, right-padded as T5 returns them with their masks
    labels = torch.tensor([3, 7])
    lengths = [5, 11]
    caption, caption_mask, left, left_mask = caption_conditions(lengths, g)

    arrays = {"class_labels": labels.numpy(), "caption_embeds": caption.numpy(),
              "caption_mask": caption_mask.numpy()}
    runs = []
    for family, model in (("c2i", c2i), ("t2i", t2i)):
        for run in RUNS:
            batch = run.get("batch", 2)
            cond = labels[:batch] if family == "c2i" else left[:batch]
            masks = None if family == "c2i" else left_mask[:batch]
            torch.manual_seed(run.get("seed", 0))
            tokens = generate(model, cond, GRID * GRID, masks, cfg_scale=run["cfg_scale"],
                              cfg_interval=run.get("cfg_interval", -1), temperature=run.get("temperature", 1.0),
                              top_k=run["top_k"], top_p=1.0, sample_logits=True)
            images = vq.decode_code(tokens, [batch, VQ["codebook_embed_dim"], GRID, GRID])
            key = f"{family}_{run['name']}"
            arrays[f"{key}_tokens"] = tokens.long().numpy()
            arrays[f"{key}_pixels"] = pixels(images)
            runs.append({"key": key, "family": family, "batch": batch, **run})
            print(key, tokens.tolist())
    # the VQ's encoder and codebook lookup: codes of random images in [-1, 1]
    probe = torch.rand(2, 3, image_size, image_size, generator=g) * 2 - 1
    _, _, (_, _, codes) = vq.encode(probe)
    arrays["vq_probe_images"], arrays["vq_probe_codes"] = probe.numpy(), codes.view(2, GRID, GRID).numpy()
    np.savez_compressed(out / "reference.npz", **arrays)
    meta = {"source": "FoundationVision/LlamaGen", "commit": commit, "image_size": image_size, "grid": GRID,
            "gpt": GPT, "num_classes": NUM_CLASSES, "caption_dim": CAPTION_DIM, "caption_tokens": CAPTION_TOKENS,
            "vq": VQ, "downsample": downsample, "caption_lengths": lengths, "runs": runs,
            "files": {"c2i": "gpt_c2i.pt", "t2i": "gpt_t2i.pt", "vq": "vq.pt", "reference": "reference.npz"}}
    (out / "reference.json").write_text(json.dumps(meta, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
