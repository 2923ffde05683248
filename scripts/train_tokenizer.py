"""Train a visual tokenizer: VQGAN (ViT-VQGAN codebook), VAR multi-scale VQGAN, a continuous AutoencoderKL, or a
SEED-style 1D causal tokenizer.

    python scripts/train_tokenizer.py --config configs/vqgan_shapes.yaml [key.sub=value ...]
    python scripts/train_tokenizer.py --config configs/msvq_shapes.yaml      # model_type: multiscale
    python scripts/train_tokenizer.py --config configs/vae_shapes.yaml       # model_type: vae
    python scripts/train_tokenizer.py --config configs/seed_shapes_stage1.yaml   # model_type: seed, seed.stage: 1
    python scripts/train_tokenizer.py --config configs/seed_shapes_stage2.yaml   # init_from: the stage-1 final/
    accelerate launch scripts/train_tokenizer.py --config configs/vqgan_shapes.yaml

Losses: L1/L2 reconstruction + EfficientNet-Lite0 perceptual, a PatchGAN hinge loss with the adaptive weight
once `loss.disc_start` is reached, and the regulariser of the model type: codebook/commitment (vqgan,
multiscale) or `kl_weight` x KL (vae). Checkpoints every `train.ckpt_every` steps (safetensors + JSON);
re-running the same command resumes. At the end the model is saved to `<out_dir>/final` and its held-out
PSNR / SSIM (and codebook usage for VQ models) to `<out_dir>/final/metrics.json`. A VAE's latent
`scaling_factor` is set to 1 / std of its training latents before saving (the Stable Diffusion recipe).

SEED (`tokenizers_vis/seed.py`) trains in two stages, as the paper does. Stage 1: the causal Q-Former and a
small text encoder (`SEEDTextEncoder` on the word-level caption tokenizer) learn from the image-text
contrastive loss on the last causal query; nothing else trains. `final/` holds the tokenizer, `final/
text_encoder` and `final/text_tokenizer`; metrics.json has held-out image -> caption and caption -> image top-1
retrieval among `seed.retrieval_batch` pairs. Stage 2 (`init_from` = a stage-1 `final/`, whose model config it
takes, `model:` keys override): the backbone and Q-Former stay frozen; the detail path, encode head, quantizer,
embedding decoder and pixel decoder learn from the losses above plus `seed.embed_weight` x the embedding
reconstruction loss, each image decoded from a random prefix of its tokens (all of them with
`seed.full_prefix_prob`);
metrics.json adds held-out PSNR when decoding from prefixes (`psnr_prefix_<k>`).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from accelerate.utils import DistributedType
from safetensors.torch import load_file
from tqdm.auto import tqdm

from mmgen.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from mmgen.config import load_config
from mmgen.eval.image_metrics import codebook_usage, psnr, ssim
from mmgen.text import encode_prompts
from mmgen.train_utils import (DataConfig, JsonlLogger, StopRequest, batch_indices, cosine_lr, gather_rng_states,
                               make_accelerator, make_dataset, rank_spread, mean_over_ranks, run_text_tokenizer,
                               step_images, write_json_atomic)
from tokenizers_vis.losses import VQGANLoss
from tokenizers_vis.multiscale import MultiScaleVQGAN
from tokenizers_vis.seed import SEEDTextEncoder, SEEDTokenizer, contrastive_loss, pad_text, random_prefix_lengths
from tokenizers_vis.vae import (decode_latents, encode_latents, estimate_scaling_factor, make_vae,
                                vae_last_layer, vae_training_forward)
from tokenizers_vis.vqgan import VQGAN

MODEL_TYPES = {"vqgan": VQGAN, "multiscale": MultiScaleVQGAN, "vae": make_vae, "seed": SEEDTokenizer}


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
    data_workers: int = 0  # processes that load (render) training batches ahead of the step; 0: in the loop


@dataclass
class SEEDConfig:
    stage: int = 1  # 1: contrastive Q-Former; 2: quantizer + embedding reconstruction + pixel decoder
    text_encoder: dict = field(default_factory=dict)  # stage 1: SEEDTextEncoder arguments (vocab_size is set)
    max_text_len: int = 24
    embed_weight: float = 1.0  # stage 2: weight of the embedding reconstruction loss
    full_prefix_prob: float = 0.5  # stage 2: share of images decoded from all tokens, the rest from a random prefix
    freeze_qformer: bool = True  # stage 2: SEED keeps the Q-Former frozen; false fine-tunes it too
    retrieval_batch: int = 64  # stage-1 metric: top-1 retrieval among this many held-out image-caption pairs


@dataclass
class TokenizerRunConfig:
    model_type: str = "vqgan"  # vqgan | multiscale | vae | seed
    model: dict = field(default_factory=dict)  # constructor arguments of the model type
    kl_weight: float = 1e-6  # vae only: weight of the KL term (the latent-diffusion autoencoders' order)
    init_from: str | None = None  # a saved tokenizer whose same-named weights start a fresh run (e.g. VQGAN -> multiscale)
    loss: dict = field(default_factory=dict)  # VQGANLoss constructor arguments
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    seed: SEEDConfig = field(default_factory=SEEDConfig)  # model_type seed only


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


def init_weights(model, directory: str) -> set[str]:
    """Copy the weights of a saved tokenizer that match `model` by name and shape; the rest keep their init.
    Returns the names copied."""
    path = Path(directory) / "diffusion_pytorch_model.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"init_from {directory!r} has no diffusion_pytorch_model.safetensors")
    own = model.state_dict()
    src = {k: v for k, v in load_file(path).items() if k in own and own[k].shape == v.shape}
    if not src:
        raise ValueError(f"init_from {directory!r} shares no weight (same name and shape) with the model")
    model.load_state_dict(src, strict=False)
    return set(src)


def build_model(cfg: TokenizerRunConfig):
    """The model of `cfg.model_type`; a SEED stage-2 model takes its stage-1 config (`init_from`) under `model:`."""
    kwargs = dict(cfg.model)
    if cfg.model_type == "seed" and cfg.seed.stage == 2:
        if not cfg.init_from:
            raise ValueError("seed stage 2 needs init_from: the final/ directory of a stage-1 run")
        path = Path(cfg.init_from) / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"init_from {cfg.init_from!r} has no config.json (a saved SEEDTokenizer)")
        kwargs = {**{k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_")}, **kwargs}
    return build(MODEL_TYPES[cfg.model_type], kwargs, "model")


def seed_trainable(cfg: TokenizerRunConfig, model: SEEDTokenizer) -> list[torch.nn.Parameter]:
    """SEED's staging: stage 1 trains the Q-Former and its contrastive projection; stage 2 what follows the
    Q-Former (detail path, encode head, codebook, embedding decoder, pixel decoder). Everything else is frozen."""
    model.requires_grad_(False)
    if cfg.seed.stage == 1:
        parts = [model.qformer, model.image_proj]
    else:
        parts = [model.detail_encoder, model.encode_head, model.quantizer, model.embed_decoder, model.pixel_decoder]
        parts += [] if cfg.seed.freeze_qformer else [model.qformer]
    for part in parts:
        part.requires_grad_(True)
    return [p for p in model.parameters() if p.requires_grad]


def same_caption(ids_BL: torch.Tensor) -> torch.Tensor:
    return (ids_BL[:, None, :] == ids_BL[None, :, :]).all(-1)  # (B, B) bool


@torch.no_grad()
def retrieval_accuracy(model, text_encoder, dataset, tokenizer, n: int, batch: int, max_len: int) -> dict:
    """Held-out top-1 retrieval inside batches of `batch` pairs: image -> caption and caption -> image. A hit
    is a retrieved item with the same caption text (duplicate captions count), chance about 1 / batch."""
    model.eval()
    text_encoder.eval()
    n = min(n, len(dataset))
    batch = min(batch, n)
    hits_i2t = hits_t2i = total = 0
    for i in range(0, n - batch + 1, batch):
        items = [dataset[j] for j in range(i, i + batch)]
        images = torch.stack([it["image"] for it in items]).to(model.device)
        ids = pad_text(encode_prompts(tokenizer, [it["caption"] for it in items], max_len), max_len)
        sim = model.image_embedding(images) @ text_encoder(ids.to(model.device)).t()  # (B images, B captions)
        same = same_caption(ids).to(sim.device)
        r = torch.arange(batch, device=sim.device)
        hits_i2t += int(same[r, sim.argmax(1)].sum())
        hits_t2i += int(same[sim.argmax(0), r].sum())
        total += batch
    model.train()
    text_encoder.train()
    return {"retrieval_i2t_top1": hits_i2t / total, "retrieval_t2i_top1": hits_t2i / total,
            "retrieval_batch": batch, "images": total}


@torch.no_grad()
def prefix_psnr(model: SEEDTokenizer, dataset, n: int, batch_size: int = 128) -> dict:
    """Held-out PSNR of images decoded from the first k tokens, k = N/8, N/4, N/2, N: coarse to fine."""
    model.eval()
    N = model.num_tokens
    ks = sorted({max(1, N // 8), max(1, N // 4), max(1, N // 2), N})
    sums = dict.fromkeys(ks, 0.0)
    n = min(n, len(dataset))
    for i in range(0, n, batch_size):
        images = torch.stack([dataset[j]["image"] for j in range(i, min(i + batch_size, n))]).to(model.device)
        ids = model.encode(images)
        for k in ks:
            sums[k] += psnr(model.decode_prefix(ids, k), images).item() * len(images)
    model.train()
    return {f"psnr_prefix_{k}": v / n for k, v in sums.items()}


class ContrastivePair(torch.nn.Module):
    """Stage 1's two towers behind one forward, so Accelerate (DDP) wraps a single module."""

    def __init__(self, model: SEEDTokenizer, text_encoder: SEEDTextEncoder):
        super().__init__()
        self.model, self.text_encoder = model, text_encoder

    def forward(self, images, ids_BL):
        return self.model.image_embedding(images), self.text_encoder(ids_BL)


def train_seed_stage1(cfg: TokenizerRunConfig, accelerator, model: SEEDTokenizer, out: Path) -> None:
    """SEED stage 1: image-text contrastive learning of the causal Q-Former (its last query) and a text encoder."""
    train_set = make_dataset(cfg.data, "train")
    captions = list(train_set.captions) if hasattr(train_set, "captions") \
        else [train_set[i]["caption"] for i in range(len(train_set))]
    tokenizer = run_text_tokenizer(cfg.data, captions, out, accelerator.is_main_process)
    L = cfg.seed.max_text_len
    text_ids = pad_text(encode_prompts(tokenizer, captions, L), L)  # (n, L)
    text_encoder = build(SEEDTextEncoder, {"max_len": L, "proj_dim": model.config.proj_dim, **cfg.seed.text_encoder,
                                           "vocab_size": len(tokenizer)}, "seed.text_encoder")
    params = seed_trainable(cfg, model) + list(text_encoder.parameters())
    opt = torch.optim.Adam(params, lr=cfg.train.lr, betas=cfg.train.betas)
    modules = {"model": model, "text_encoder": text_encoder}
    start = 0
    ckpt = latest_checkpoint(out)
    if ckpt is None and cfg.init_from:
        init_weights(model, cfg.init_from)
        accelerator.print(f"initialised from {cfg.init_from}")
    if ckpt is not None:
        start = load_checkpoint(ckpt, modules, {"opt": opt})["step"]
        accelerator.print(f"resumed from {ckpt} at step {start}")
    pair, opt = accelerator.prepare(ContrastivePair(model, text_encoder), opt)
    logger = JsonlLogger(out, accelerator.is_main_process)
    if accelerator.is_main_process:
        write_json_atomic(out / "config.json", asdict(cfg))
        accelerator.print(f"seed stage 1 trainable parameters: {sum(p.numel() for p in params) / 1e6:.2f} M")

    bar = tqdm(range(start, cfg.train.steps), initial=start, total=cfg.train.steps, desc="seed stage 1",
               disable=not accelerator.is_main_process)
    t0 = time.time()
    for step in bar:
        idx = batch_indices(step, cfg.train.batch_size, len(train_set), cfg.train.seed,
                            accelerator.process_index, accelerator.num_processes)
        images = torch.stack([train_set[i]["image"] for i in idx]).to(accelerator.device)
        ids = text_ids[idx].to(accelerator.device)
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, cfg.train.lr, cfg.train.warmup, cfg.train.steps)
        img, txt = pair(images, ids)
        loss = contrastive_loss(img, txt, text_encoder.logit_scale, same_caption(ids))
        opt.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        opt.step()
        if step % cfg.train.log_every == 0 or step + 1 == cfg.train.steps:
            with torch.no_grad():
                acc = same_caption(ids)[torch.arange(len(ids)), (img @ txt.t()).argmax(1)].float().mean()
            logger.log({"step": step, "loss": round(loss.item(), 5), "batch_i2t_top1": round(acc.item(), 4),
                        "logit_scale": round(text_encoder.logit_scale.exp().item(), 3),
                        "elapsed_s": round(time.time() - t0, 1)})
            bar.set_postfix(loss=f"{loss.item():.4f}", acc=f"{acc.item():.2f}")
        if (step + 1) % cfg.train.ckpt_every == 0 or step + 1 == cfg.train.steps:
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                save_checkpoint(out, step + 1, modules, {"opt": opt})

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        final = out / "final"
        model.save_pretrained(final)
        text_encoder.save_pretrained(final / "text_encoder")
        tokenizer.save_pretrained(final / "text_tokenizer")
        metrics = retrieval_accuracy(model, text_encoder, make_dataset(cfg.data, "heldout"), tokenizer,
                                     cfg.train.eval_images, cfg.seed.retrieval_batch, L)
        write_json_atomic(final / "metrics.json", metrics)
        accelerator.print(f"saved tokenizer to {final}; held-out {metrics}")


class VAEForward(torch.nn.Module):
    """The VAE's training forward (encode, sample the posterior, decode) as one module call, so that DDP sees the
    encoder and decoder used inside its wrapped forward and all-reduces their gradients."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, images):
        return vae_training_forward(self.vae, images)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=None, help="YAML config (see configs/)")
    parser.add_argument("overrides", nargs="*", help="dot-list overrides, e.g. train.steps=100")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(TokenizerRunConfig, args.config, args.overrides)
    except (ValueError, FileNotFoundError) as e:  # unknown key, bad value, missing file: usage error, exit 2
        parser.error(str(e))

    accelerator = make_accelerator()
    if accelerator.distributed_type == DistributedType.FSDP:
        parser.error("train_tokenizer.py trains data-parallel only (the tokenizers are small enough to replicate): "
                     "launch it with configs/accelerate/ddp_2proc.yaml, not an FSDP config")
    out = Path(cfg.train.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.train.seed)
    if cfg.model_type not in MODEL_TYPES:
        raise ValueError(f"model_type must be one of {', '.join(MODEL_TYPES)}; got {cfg.model_type!r}")
    is_vae, is_seed = cfg.model_type == "vae", cfg.model_type == "seed"
    if is_seed and cfg.seed.stage not in (1, 2):
        raise ValueError(f"seed.stage must be 1 (contrastive Q-Former) or 2 (codebook + decoders), "
                         f"got {cfg.seed.stage!r}")
    model = build_model(cfg)
    if is_seed and cfg.seed.stage == 1:
        return train_seed_stage1(cfg, accelerator, model, out)
    loss_fn = build(VQGANLoss, cfg.loss, "loss")
    params = seed_trainable(cfg, model) if is_seed else list(model.parameters())
    opt_g = torch.optim.Adam(params, lr=cfg.train.lr, betas=cfg.train.betas)
    opt_d = torch.optim.Adam(loss_fn.discriminator.parameters(), lr=cfg.train.disc_lr, betas=cfg.train.betas)
    start = 0
    ckpt = latest_checkpoint(out)
    if ckpt is None and cfg.init_from:
        copied = init_weights(model, cfg.init_from)
        if is_seed and not {k for k in model.state_dict() if k.startswith("qformer.")} <= copied:
            raise ValueError(f"init_from {cfg.init_from!r} does not hold this model's whole Q-Former; seed stage 2 "
                             f"starts from a stage-1 tokenizer of the same Q-Former config")
        accelerator.print(f"initialised from {cfg.init_from}")
    if ckpt is not None:
        start = load_checkpoint(ckpt, {"model": model, "discriminator": loss_fn.discriminator},
                                {"opt_g": opt_g, "opt_d": opt_d}, rank=accelerator.process_index)["step"]
        accelerator.print(f"resumed from {ckpt} at step {start}")
    else:
        torch.manual_seed(cfg.train.seed + accelerator.process_index)  # same init everywhere, own noise per rank
    raw, discriminator = model, loss_fn.discriminator
    loss_fn.to(accelerator.device)
    model, opt_g, opt_d = accelerator.prepare(VAEForward(model) if is_vae else model, opt_g, opt_d)
    if accelerator.num_processes > 1:
        loss_fn.discriminator = accelerator.prepare(discriminator)  # the loss calls it; DDP syncs its gradients
    train_set = make_dataset(cfg.data, "train")
    logger = JsonlLogger(out, accelerator.is_main_process)
    if accelerator.is_main_process:
        write_json_atomic(out / "config.json", asdict(cfg))
        accelerator.print(f"{cfg.model_type} parameters: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M")

    logger.rewind(start)
    stop = StopRequest(accelerator)
    bar = tqdm(range(start, cfg.train.steps), initial=start, total=cfg.train.steps, desc="train tokenizer",
               disable=not accelerator.is_main_process)
    batches = step_images(train_set, range(start, cfg.train.steps), cfg.train.batch_size, cfg.train.seed,
                          accelerator.process_index, accelerator.num_processes, cfg.train.data_workers)
    t0 = time.time()
    for step in bar:
        images = next(batches).to(accelerator.device)
        for group in opt_g.param_groups:
            group["lr"] = cosine_lr(step, cfg.train.lr, cfg.train.warmup, cfg.train.steps)
        if is_vae:
            recon, kl = model(images)
            reg_loss, ppl, last_layer = cfg.kl_weight * kl, None, vae_last_layer(raw)
        elif is_seed:
            # prefix lengths are a function of (seed, step, rank), so a resumed run draws the same ones
            gen = torch.Generator().manual_seed((cfg.train.seed * 100003 + step) * 64 + accelerator.process_index)
            out_v = model(images, random_prefix_lengths(len(images), raw.num_tokens, cfg.seed.full_prefix_prob, gen))
            recon, ppl, last_layer = out_v.recon, out_v.perplexity, raw.last_layer
            reg_loss = out_v.quant_loss + cfg.seed.embed_weight * out_v.embed_loss
        else:
            out_v = model(images)
            recon, reg_loss, ppl, last_layer = out_v.recon, out_v.quant_loss, out_v.perplexity, raw.last_layer
        g_loss, logs = loss_fn.generator_loss(images, recon, reg_loss, last_layer, step)
        if is_seed:
            logs["quant"], logs["embed"] = out_v.quant_loss.item(), out_v.embed_loss.item()
        opt_g.zero_grad(set_to_none=True)
        accelerator.backward(g_loss)
        opt_g.step()
        d_loss, d_logs = loss_fn.discriminator_loss(images, recon.detach(), step)
        if d_loss.requires_grad:  # the discriminator only trains after its warm-up
            opt_d.zero_grad(set_to_none=True)
            accelerator.backward(d_loss)
            opt_d.step()
        if step % cfg.train.log_every == 0 or step + 1 == cfg.train.steps:
            logs, d_logs = (mean_over_ranks(accelerator, d) for d in (logs, d_logs))
            record = {"step": step, **{k: round(float(v), 5) for k, v in {**logs, **d_logs}.items()},
                      "elapsed_s": round(time.time() - t0, 1)}
            if ppl is not None:
                record["perplexity"] = round(float(ppl), 2)
            else:
                record["kl"] = round(kl.item(), 5)
            logger.log(record)
            bar.set_postfix(loss=f"{g_loss.item():.4f}", **({"ppl": f"{ppl.item():.0f}"} if ppl is not None else {}))
        signum = stop.requested()
        if (step + 1) % cfg.train.ckpt_every == 0 or step + 1 == cfg.train.steps or signum:
            rng = gather_rng_states(accelerator)
            modules = {"model": raw, "discriminator": discriminator}
            spread = rank_spread(accelerator, modules)
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                save_checkpoint(out, step + 1, modules, {"opt_g": opt_g, "opt_d": opt_d},
                                extra={"rank_spread": spread}, rng_states=rng)
        if signum:
            stop.exit(signum, step + 1)

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        final = out / "final"
        if is_vae:
            raw.eval()
            imgs = torch.stack([train_set[i]["image"] for i in range(min(512, len(train_set)))]).to(raw.device)
            raw.register_to_config(scaling_factor=estimate_scaling_factor(raw, imgs))
        raw.save_pretrained(final)
        heldout = make_dataset(cfg.data, "heldout")
        metrics = evaluate(raw, heldout, cfg.train.eval_images)
        if is_seed:
            metrics.update(prefix_psnr(raw, heldout, cfg.train.eval_images))
        write_json_atomic(final / "metrics.json", metrics)
        accelerator.print(f"saved tokenizer to {final}; held-out {metrics}")


if __name__ == "__main__":
    main()
