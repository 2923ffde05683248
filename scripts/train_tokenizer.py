"""Train a VQGAN visual tokenizer (ViT-VQGAN codebook: factorized, l2-normalized codes).

    python scripts/train_tokenizer.py --config configs/vqgan_shapes.yaml [key.sub=value ...]
    accelerate launch scripts/train_tokenizer.py --config configs/vqgan_shapes.yaml

Losses: L1/L2 reconstruction + EfficientNet-Lite0 perceptual + codebook/commitment, and a PatchGAN hinge loss
with the adaptive weight once `loss.disc_start` is reached. Checkpoints every `train.ckpt_every` steps
(safetensors + JSON); re-running the same command resumes. At the end the model is saved to
`<out_dir>/final` and its held-out PSNR / SSIM / codebook usage to `<out_dir>/final/metrics.json`.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from mmgen.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from mmgen.config import load_config
from mmgen.eval.image_metrics import codebook_usage, psnr, ssim
from mmgen.train_utils import DataConfig, JsonlLogger, batch_indices, cosine_lr, make_dataset, write_json_atomic
from tokenizers_vis.losses import VQGANLoss
from tokenizers_vis.vqgan import VQGAN


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
    model: dict = field(default_factory=dict)  # VQGAN constructor arguments
    loss: dict = field(default_factory=dict)  # VQGANLoss constructor arguments
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def build(cls, kwargs: dict, section: str):
    try:
        return cls(**kwargs)
    except TypeError as e:  # unknown key: report it against the config section
        raise ValueError(f"config section {section!r}: {e}") from None


@torch.no_grad()
def evaluate(model: VQGAN, dataset, n: int, batch_size: int = 128) -> dict:
    model.eval()
    scores = {"psnr": 0.0, "ssim": 0.0}
    ids = []
    n = min(n, len(dataset))
    for i in range(0, n, batch_size):
        imgs = torch.stack([dataset[j]["image"] for j in range(i, min(i + batch_size, n))]).to(model.device)
        out = model(imgs)
        k = imgs.shape[0]
        scores["psnr"] += psnr(out.recon, imgs).item() * k
        scores["ssim"] += ssim(out.recon, imgs).item() * k
        ids.append(out.ids.flatten().cpu())
    usage = codebook_usage(torch.cat(ids), model.vocab_size)
    model.train()
    return {"psnr": scores["psnr"] / n, "ssim": scores["ssim"] / n, "images": n, **usage}


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
    model = build(VQGAN, cfg.model, "model")
    loss_fn = build(VQGANLoss, cfg.loss, "loss")
    opt_g = torch.optim.Adam(model.parameters(), lr=cfg.train.lr, betas=cfg.train.betas)
    opt_d = torch.optim.Adam(loss_fn.discriminator.parameters(), lr=cfg.train.disc_lr, betas=cfg.train.betas)
    start = 0
    ckpt = latest_checkpoint(out)
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
        accelerator.print(f"VQGAN parameters: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M")

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
        out_v = model(images)
        g_loss, logs = loss_fn.generator_loss(images, out_v.recon, out_v.quant_loss, raw.last_layer, step)
        opt_g.zero_grad(set_to_none=True)
        accelerator.backward(g_loss)
        opt_g.step()
        d_loss, d_logs = loss_fn.discriminator_loss(images, out_v.recon.detach(), step)
        if d_loss.requires_grad:  # the discriminator only trains after its warm-up
            opt_d.zero_grad(set_to_none=True)
            accelerator.backward(d_loss)
            opt_d.step()
        if step % cfg.train.log_every == 0 or step + 1 == cfg.train.steps:
            record = {"step": step, **{k: round(float(v), 5) for k, v in {**logs, **d_logs}.items()},
                      "perplexity": round(float(out_v.perplexity), 2), "elapsed_s": round(time.time() - t0, 1)}
            logger.log(record)
            bar.set_postfix(loss=f"{float(g_loss):.4f}", ppl=f"{float(out_v.perplexity):.0f}")
        if (step + 1) % cfg.train.ckpt_every == 0 or step + 1 == cfg.train.steps:
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                save_checkpoint(out, step + 1, {"model": raw, "discriminator": loss_fn.discriminator},
                                {"opt_g": opt_g, "opt_d": opt_d})

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        final = out / "final"
        raw.save_pretrained(final)
        metrics = evaluate(raw, make_dataset(cfg.data, "heldout"), cfg.train.eval_images)
        write_json_atomic(final / "metrics.json", metrics)
        accelerator.print(f"saved tokenizer to {final}; held-out {metrics}")


if __name__ == "__main__":
    main()
