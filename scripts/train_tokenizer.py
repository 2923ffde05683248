"""Train a visual tokenizer: VQGAN (ViT-VQGAN codebook), VAR multi-scale VQGAN, or a continuous AutoencoderKL.

    python scripts/train_tokenizer.py --config configs/vqgan_shapes.yaml [key.sub=value ...]
    python scripts/train_tokenizer.py --config configs/msvq_shapes.yaml      # model_type: multiscale
    python scripts/train_tokenizer.py --config configs/vae_shapes.yaml       # model_type: vae
    accelerate launch scripts/train_tokenizer.py --config configs/vqgan_shapes.yaml

Losses: L1/L2 reconstruction + EfficientNet-Lite0 perceptual, a PatchGAN hinge loss with the adaptive weight
once `loss.disc_start` is reached, and the regulariser of the model type: codebook/commitment (vqgan,
multiscale) or `kl_weight` x KL (vae). Checkpoints every `train.ckpt_every` steps (safetensors + JSON);
re-running the same command resumes. At the end the model is saved to `<out_dir>/final` and its held-out
PSNR / SSIM (and codebook usage for VQ models) to `<out_dir>/final/metrics.json`. A VAE's latent
`scaling_factor` is set to 1 / std of its training latents before saving (the Stable Diffusion recipe).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from safetensors.torch import load_file
from tqdm.auto import tqdm

from mmgen.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from mmgen.config import load_config
from mmgen.eval.image_metrics import codebook_usage, psnr, ssim
from mmgen.train_utils import DataConfig, JsonlLogger, batch_indices, cosine_lr, make_dataset, write_json_atomic
from tokenizers_vis.losses import VQGANLoss
from tokenizers_vis.multiscale import MultiScaleVQGAN
from tokenizers_vis.vae import (decode_latents, encode_latents, estimate_scaling_factor, make_vae,
                                vae_last_layer, vae_training_forward)
from tokenizers_vis.vqgan import VQGAN

MODEL_TYPES = {"vqgan": VQGAN, "multiscale": MultiScaleVQGAN, "vae": make_vae}


@dataclass
class TrainConfig:
    out_dir: str = "runs/vqgan"
    steps: int = 4000
    batch_size: int = 32
    lr: float = 2e-4
    disc_lr: float = 2e-4
    warmup: int = 100
    betas: tuple = (0.5, 0.9)
    ckpt_every: int = 500
    log_every: int = 50
    eval_images: int = 512
    seed: int = 0


@dataclass
class TokenizerRunConfig:
    model_type: str = "vqgan"  # vqgan | multiscale | vae
    model: dict = field(default_factory=dict)  # constructor arguments of the model type
    kl_weight: float = 1e-6  # vae only: weight of the KL term (the latent-diffusion autoencoders' order)
    init_from: str | None = None  # a saved tokenizer whose same-named weights start a fresh run (e.g. VQGAN -> multiscale)
    loss: dict = field(default_factory=dict)  # VQGANLoss constructor arguments
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def build(cls, kwargs: dict, section: str):
    try:
        return cls(**kwargs)
    except TypeError as e:  # unknown key: report it against the config section
        raise ValueError(f"config section {section!r}: {e}") from None


@torch.no_grad()
def evaluate(model, dataset, n: int, batch_size: int = 128) -> dict:
    """Held-out PSNR / SSIM of reconstructions (the posterior mean for a VAE) and, for VQ models, code usage."""
    model.eval()
    scores = {"psnr": 0.0, "ssim": 0.0}
    ids = []
    n = min(n, len(dataset))
    for i in range(0, n, batch_size):
        imgs = torch.stack([dataset[j]["image"] for j in range(i, min(i + batch_size, n))]).to(model.device)
        if hasattr(model, "vocab_size"):
            out = model(imgs)
            recon = out.recon
            ids.append(out.ids.flatten().cpu())
        else:
            recon = decode_latents(model, encode_latents(model, imgs))
        k = imgs.shape[0]
        scores["psnr"] += psnr(recon, imgs).item() * k
        scores["ssim"] += ssim(recon, imgs).item() * k
    usage = codebook_usage(torch.cat(ids), model.vocab_size) if ids else {}
    model.train()
    return {"psnr": scores["psnr"] / n, "ssim": scores["ssim"] / n, "images": n, **usage}


def init_weights(model, directory: str) -> None:
    """Copy the weights of a saved tokenizer that match `model` by name and shape; the rest keep their init."""
    path = Path(directory) / "diffusion_pytorch_model.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"init_from {directory!r} has no diffusion_pytorch_model.safetensors")
    own = model.state_dict()
    src = {k: v for k, v in load_file(path).items() if k in own and own[k].shape == v.shape}
    if not src:
        raise ValueError(f"init_from {directory!r} shares no weight (same name and shape) with the model")
    model.load_state_dict(src, strict=False)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=None, help="YAML config (see configs/)")
    parser.add_argument("overrides", nargs="*", help="dot-list overrides, e.g. train.steps=100")
    args = parser.parse_args(argv)
    cfg = load_config(TokenizerRunConfig, args.config, args.overrides)

    accelerator = Accelerator()
    out = Path(cfg.train.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.train.seed)
    if cfg.model_type not in MODEL_TYPES:
        raise ValueError(f"model_type must be one of {', '.join(MODEL_TYPES)}; got {cfg.model_type!r}")
    is_vae = cfg.model_type == "vae"
    model = build(MODEL_TYPES[cfg.model_type], cfg.model, "model")
    loss_fn = build(VQGANLoss, cfg.loss, "loss")
    opt_g = torch.optim.Adam(model.parameters(), lr=cfg.train.lr, betas=cfg.train.betas)
    opt_d = torch.optim.Adam(loss_fn.discriminator.parameters(), lr=cfg.train.disc_lr, betas=cfg.train.betas)
    start = 0
    ckpt = latest_checkpoint(out)
    if ckpt is None and cfg.init_from:
        init_weights(model, cfg.init_from)
        accelerator.print(f"initialised from {cfg.init_from}")
    if ckpt is not None:
        start = load_checkpoint(ckpt, {"model": model, "discriminator": loss_fn.discriminator},
                                {"opt_g": opt_g, "opt_d": opt_d})["step"]
        accelerator.print(f"resumed from {ckpt} at step {start}")
    model, opt_g, opt_d = accelerator.prepare(model, opt_g, opt_d)
    loss_fn.to(accelerator.device)
    train_set = make_dataset(cfg.data, "train")
    logger = JsonlLogger(out, accelerator.is_main_process)
    if accelerator.is_main_process:
        write_json_atomic(out / "config.json", asdict(cfg))
        accelerator.print(f"{cfg.model_type} parameters: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M")

    raw = accelerator.unwrap_model(model)
    bar = tqdm(range(start, cfg.train.steps), initial=start, total=cfg.train.steps, desc="train tokenizer",
               disable=not accelerator.is_main_process)
    t0 = time.time()
    for step in bar:
        idx = batch_indices(step, cfg.train.batch_size, len(train_set), cfg.train.seed,
                            accelerator.process_index, accelerator.num_processes)
        images = torch.stack([train_set[i]["image"] for i in idx]).to(accelerator.device)
        for group in opt_g.param_groups:
            group["lr"] = cosine_lr(step, cfg.train.lr, cfg.train.warmup, cfg.train.steps)
        if is_vae:
            recon, kl = vae_training_forward(raw, images)
            reg_loss, ppl, last_layer = cfg.kl_weight * kl, None, vae_last_layer(raw)
        else:
            out_v = model(images)
            recon, reg_loss, ppl, last_layer = out_v.recon, out_v.quant_loss, out_v.perplexity, raw.last_layer
        g_loss, logs = loss_fn.generator_loss(images, recon, reg_loss, last_layer, step)
        opt_g.zero_grad(set_to_none=True)
        accelerator.backward(g_loss)
        opt_g.step()
        d_loss, d_logs = loss_fn.discriminator_loss(images, recon.detach(), step)
        if d_loss.requires_grad:  # the discriminator only trains after its warm-up
            opt_d.zero_grad(set_to_none=True)
            accelerator.backward(d_loss)
            opt_d.step()
        if step % cfg.train.log_every == 0 or step + 1 == cfg.train.steps:
            record = {"step": step, **{k: round(float(v), 5) for k, v in {**logs, **d_logs}.items()},
                      "elapsed_s": round(time.time() - t0, 1)}
            if ppl is not None:
                record["perplexity"] = round(float(ppl), 2)
            else:
                record["kl"] = round(kl.item(), 5)
            logger.log(record)
            bar.set_postfix(loss=f"{g_loss.item():.4f}", **({"ppl": f"{ppl.item():.0f}"} if ppl is not None else {}))
        if (step + 1) % cfg.train.ckpt_every == 0 or step + 1 == cfg.train.steps:
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                save_checkpoint(out, step + 1, {"model": raw, "discriminator": loss_fn.discriminator},
                                {"opt_g": opt_g, "opt_d": opt_d})

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        final = out / "final"
        if is_vae:
            raw.eval()
            imgs = torch.stack([train_set[i]["image"] for i in range(min(512, len(train_set)))]).to(raw.device)
            raw.register_to_config(scaling_factor=estimate_scaling_factor(raw, imgs))
        raw.save_pretrained(final)
        metrics = evaluate(raw, make_dataset(cfg.data, "heldout"), cfg.train.eval_images)
        write_json_atomic(final / "metrics.json", metrics)
        accelerator.print(f"saved tokenizer to {final}; held-out {metrics}")


if __name__ == "__main__":
    main()
