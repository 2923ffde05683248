"""Train a visual tokenizer: VQGAN (ViT-VQGAN codebook), VAR multi-scale VQGAN, a continuous AutoencoderKL, a
SEED-style 1D causal tokenizer, or the PCA-ordered 1D tokenizer.

    python scripts/train_tokenizer.py --config configs/vqgan_shapes.yaml [key.sub=value ...]
    python scripts/train_tokenizer.py --config configs/msvq_shapes.yaml      # model_type: multiscale
    python scripts/train_tokenizer.py --config configs/vae_shapes.yaml       # model_type: vae
    python scripts/train_tokenizer.py --config configs/seed_shapes_stage1.yaml   # model_type: seed, seed.stage: 1
    python scripts/train_tokenizer.py --config configs/seed_shapes_stage2.yaml   # init_from: the stage-1 final/
    python scripts/train_tokenizer.py --config configs/pca_shapes.yaml       # model_type: pca
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

PCA (`tokenizers_vis/pca.py`, Semanticist's nested dropout with a flow-matching decoder) trains in one loop on
its own loss: the decoder's x0 MSE plus the VQ loss, each image conditioned on a random prefix of k ~ U{1..K}
tokens (`pca.full_prefix_prob` of them on all K); the first `pca.continuous_steps` steps hand the decoder the
continuous token vectors and skip the codebook (the warm-up that keeps the codes apart). No perceptual or GAN
term: the generative decoder is what keeps the low-level spectrum out of the first tokens. metrics.json holds
held-out PSNR / SSIM of full decodes, code usage, and the explained variance of every prefix length with the
gain of each added token on `pca.ev_images` images (`mmgen.eval.tokenizer_metrics.prefix_explained_variance`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

from mmgen.atomic import write_json_atomic
from mmgen.eval.image_metrics import codebook_usage, psnr, ssim
from mmgen.eval.tokenizer_metrics import (prefix_explained_variance, prefix_psnr, reconstruction_metrics,
                                          retrieval_accuracy, same_caption)
from mmgen.text import encode_prompts
from mmgen.training.data import DataConfig, make_dataset, run_text_tokenizer, step_images
from mmgen.training.loop import Run, cosine_lr, load_run_config
from tokenizers_vis.losses import VQGANLoss
from tokenizers_vis.multiscale import MultiScaleVQGAN
from tokenizers_vis.pca import PCATokenizer
from tokenizers_vis.seed import SEEDTextEncoder, SEEDTokenizer, contrastive_loss, pad_text, random_prefix_lengths
from tokenizers_vis.vae import estimate_scaling_factor, make_vae, vae_last_layer, vae_training_forward
from tokenizers_vis.vqgan import VQGAN

MODEL_TYPES = {"vqgan": VQGAN, "multiscale": MultiScaleVQGAN, "vae": make_vae, "seed": SEEDTokenizer,
               "pca": PCATokenizer}


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
    report_to: str = "none"  # none | tensorboard | wandb, beside log.jsonl (pip install 'mmgen[track]')
    resume: str = "latest"  # latest | none | a checkpoint or run directory (also --resume)


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
class PCAConfig:
    continuous_steps: int = 0  # first steps on continuous token vectors, before the codebook (see pca.py)
    full_prefix_prob: float = 0.0  # share of images decoded from all K tokens; the rest: k ~ U{1..K} (Semanticist)
    ev_images: int = 64  # held-out images for the explained variance per prefix length in metrics.json


@dataclass
class TokenizerRunConfig:
    model_type: str = "vqgan"  # vqgan | multiscale | vae | seed | pca
    model: dict = field(default_factory=dict)  # constructor arguments of the model type
    kl_weight: float = 1e-6  # vae only: weight of the KL term (the latent-diffusion autoencoders' order)
    init_from: str | None = None  # a saved tokenizer whose same-named weights start a fresh run (e.g. VQGAN -> multiscale)
    loss: dict = field(default_factory=dict)  # VQGANLoss constructor arguments
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    seed: SEEDConfig = field(default_factory=SEEDConfig)  # model_type seed only
    pca: PCAConfig = field(default_factory=PCAConfig)  # model_type pca only


def build(cls, kwargs: dict, section: str):
    try:
        return cls(**kwargs)
    except TypeError as e:  # unknown key: report it against the config section
        raise ValueError(f"config section {section!r}: {e}") from None


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


class ContrastivePair(torch.nn.Module):
    """Stage 1's two towers behind one forward, so Accelerate (DDP) wraps a single module."""

    def __init__(self, model: SEEDTokenizer, text_encoder: SEEDTextEncoder):
        super().__init__()
        self.model, self.text_encoder = model, text_encoder

    def forward(self, images, ids_BL):
        return self.model.image_embedding(images), self.text_encoder(ids_BL)


def train_seed_stage1(cfg: TokenizerRunConfig, run: Run, model: SEEDTokenizer) -> None:
    """SEED stage 1: image-text contrastive learning of the causal Q-Former (its last query) and a text encoder."""
    train_set = make_dataset(cfg.data, "train")
    captions = list(train_set.captions) if hasattr(train_set, "captions") \
        else [train_set[i]["caption"] for i in range(len(train_set))]
    text_tokenizer = run_text_tokenizer(cfg.data, captions, run.out, run.is_main)
    L = cfg.seed.max_text_len
    text_ids = pad_text(encode_prompts(text_tokenizer, captions, L), L)  # (n, L)
    text_encoder = build(SEEDTextEncoder, {"max_len": L, "proj_dim": model.config.proj_dim, **cfg.seed.text_encoder,
                                           "vocab_size": len(text_tokenizer)}, "seed.text_encoder")
    params = seed_trainable(cfg, model) + list(text_encoder.parameters())
    opt = torch.optim.Adam(params, lr=cfg.train.lr, betas=cfg.train.betas)
    run.resume({"model": model, "text_encoder": text_encoder})
    if run.ckpt is None and cfg.init_from:
        init_weights(model, cfg.init_from)
        run.print(f"initialised from {cfg.init_from}")
    pair, opt = run.prepare(ContrastivePair(model, text_encoder), {"opt": opt})
    run.print(f"seed stage 1 trainable parameters: {sum(p.numel() for p in params) / 1e6:.2f} M")

    def step(i: int) -> dict:
        idx = run.indices(i, len(train_set))
        images = torch.stack([train_set[k]["image"] for k in idx]).to(run.device)
        ids = text_ids[idx].to(run.device)
        for group in opt.param_groups:
            group["lr"] = cosine_lr(i, cfg.train.lr, cfg.train.warmup, cfg.train.steps)
        img, txt = pair(images, ids)
        same = same_caption(ids)
        loss = contrastive_loss(img, txt, text_encoder.logit_scale, same)
        opt.zero_grad(set_to_none=True)
        run.accelerator.backward(loss)
        opt.step()
        with torch.no_grad():
            acc = same[torch.arange(len(ids)), (img @ txt.t()).argmax(1)].float().mean()
        return {"loss": loss, "batch_i2t_top1": acc, "logit_scale": text_encoder.logit_scale.exp()}

    run.train(step, digits={"batch_i2t_top1": 4, "logit_scale": 3}, show=("loss", "batch_i2t_top1"))
    if run.is_main:
        final = run.out / "final"
        model.save_pretrained(final)
        text_encoder.save_pretrained(final / "text_encoder")
        text_tokenizer.save_pretrained(final / "text_tokenizer")
        metrics = retrieval_accuracy(model, text_encoder, make_dataset(cfg.data, "heldout"), text_tokenizer,
                                     cfg.train.eval_images, cfg.seed.retrieval_batch, L)
        write_json_atomic(final / "metrics.json", metrics)
        run.print(f"saved tokenizer to {final}; held-out {metrics}")


def train_pca(cfg: TokenizerRunConfig, run: Run, model: PCATokenizer) -> None:
    """The PCA tokenizer: flow decoder loss + VQ loss under nested dropout, after a continuous warm-up."""
    if cfg.pca.continuous_steps < 0 or not 0 <= cfg.pca.full_prefix_prob <= 1 or cfg.pca.ev_images < 2:
        raise ValueError(f"pca needs continuous_steps >= 0, full_prefix_prob in [0, 1] and ev_images >= 2; got "
                         f"{cfg.pca.continuous_steps}, {cfg.pca.full_prefix_prob}, {cfg.pca.ev_images}")
    opt = torch.optim.Adam(model.parameters(), lr=cfg.train.lr, betas=cfg.train.betas)
    run.resume({"model": model})
    if run.ckpt is None and cfg.init_from:
        init_weights(model, cfg.init_from)
        run.print(f"initialised from {cfg.init_from}")
    raw = model
    model, opt = run.prepare(model, {"opt": opt})
    train_set = make_dataset(cfg.data, "train")
    run.print(f"pca parameters: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M")
    batches = step_images(train_set, range(run.start, cfg.train.steps), cfg.train.batch_size, cfg.train.seed,
                          run.rank, run.world, cfg.train.data_workers)

    def step(i: int) -> dict:
        images = next(batches).to(run.device)
        for group in opt.param_groups:
            group["lr"] = cosine_lr(i, cfg.train.lr, cfg.train.warmup, cfg.train.steps)
        # prefix lengths, flow times and noise are a function of (seed, step, rank): a resumed run draws the same
        gen = torch.Generator().manual_seed((cfg.train.seed * 100003 + i) * 64 + run.rank)
        k = random_prefix_lengths(len(images), raw.num_tokens, cfg.pca.full_prefix_prob, gen)
        out = model(images, k, gen, quantize=i >= cfg.pca.continuous_steps)
        loss = out.flow_loss + out.quant_loss
        opt.zero_grad(set_to_none=True)
        run.accelerator.backward(loss)
        opt.step()
        return {"loss": loss.detach(), "flow": out.flow_loss.detach(), "quant": out.quant_loss.detach(),
                "perplexity": out.perplexity}

    run.train(step, digits={"perplexity": 2}, show=("loss", "perplexity"))
    if run.is_main:
        final = run.out / "final"
        raw.save_pretrained(final)
        raw.eval()
        heldout = make_dataset(cfg.data, "heldout")
        n = min(cfg.train.eval_images, len(heldout))
        images = torch.stack([heldout[j]["image"] for j in range(n)]).to(raw.device)
        ids = torch.cat([raw.encode(images[j:j + 64]) for j in range(0, n, 64)])
        with torch.no_grad():
            recon = torch.cat([raw.decode(ids[j:j + 64]) for j in range(0, n, 64)])
        metrics = {"psnr": psnr(recon, images).item(), "ssim": ssim(recon, images).item(), "images": n,
                   **codebook_usage(ids.flatten().cpu(), raw.vocab_size),
                   "prefix": prefix_explained_variance(raw, images[: cfg.pca.ev_images])}
        write_json_atomic(final / "metrics.json", metrics)
        ev = metrics["prefix"]["explained_variance"]
        run.print(f"saved tokenizer to {final}; held-out PSNR {metrics['psnr']:.2f} dB, explained variance "
                  f"{ev[1]:.3f} (1 token) .. {ev[raw.num_tokens]:.3f} ({raw.num_tokens} tokens)")


class VAEForward(torch.nn.Module):
    """The VAE's training forward (encode, sample the posterior, decode) as one module call, so that DDP sees the
    encoder and decoder used inside its wrapped forward and all-reduces their gradients."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, images):
        return vae_training_forward(self.vae, images)


def main(argv=None):
    cfg = load_run_config(TokenizerRunConfig, __doc__, argv)
    is_vae, is_seed = cfg.model_type == "vae", cfg.model_type == "seed"
    run = Run(cfg, cfg.train, "seed stage 1" if is_seed and cfg.seed.stage == 1 else "train tokenizer")
    if run.sharded:  # a usage error, like a bad key
        run.print("train_tokenizer.py trains data-parallel only (the tokenizers are small enough to replicate): "
                  "launch it with configs/accelerate/ddp_2proc.yaml, not an FSDP config")
        raise SystemExit(2)
    if cfg.model_type not in MODEL_TYPES:
        raise ValueError(f"model_type must be one of {', '.join(MODEL_TYPES)}; got {cfg.model_type!r}")
    if is_seed and cfg.seed.stage not in (1, 2):
        raise ValueError(f"seed.stage must be 1 (contrastive Q-Former) or 2 (codebook + decoders), "
                         f"got {cfg.seed.stage!r}")
    model = build_model(cfg)
    if is_seed and cfg.seed.stage == 1:
        return train_seed_stage1(cfg, run, model)
    if cfg.model_type == "pca":
        return train_pca(cfg, run, model)
    loss_fn = build(VQGANLoss, cfg.loss, "loss")
    params = seed_trainable(cfg, model) if is_seed else list(model.parameters())
    opt_g = torch.optim.Adam(params, lr=cfg.train.lr, betas=cfg.train.betas)
    opt_d = torch.optim.Adam(loss_fn.discriminator.parameters(), lr=cfg.train.disc_lr, betas=cfg.train.betas)
    run.resume({"model": model, "discriminator": loss_fn.discriminator})
    if run.ckpt is None and cfg.init_from:
        copied = init_weights(model, cfg.init_from)
        if is_seed and not {k for k in model.state_dict() if k.startswith("qformer.")} <= copied:
            raise ValueError(f"init_from {cfg.init_from!r} does not hold this model's whole Q-Former; seed stage 2 "
                             f"starts from a stage-1 tokenizer of the same Q-Former config")
        run.print(f"initialised from {cfg.init_from}")
    raw = model
    loss_fn.to(run.device)
    model, opt_g = run.prepare(VAEForward(model) if is_vae else model, {"opt_g": opt_g})
    loss_fn.discriminator, opt_d = run.prepare(loss_fn.discriminator, {"opt_d": opt_d})  # the loss calls it
    train_set = make_dataset(cfg.data, "train")
    run.print(f"{cfg.model_type} parameters: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M")
    batches = step_images(train_set, range(run.start, cfg.train.steps), cfg.train.batch_size, cfg.train.seed,
                          run.rank, run.world, cfg.train.data_workers)

    def step(i: int) -> dict:
        images = next(batches).to(run.device)
        for group in opt_g.param_groups:
            group["lr"] = cosine_lr(i, cfg.train.lr, cfg.train.warmup, cfg.train.steps)
        if is_vae:
            recon, kl = model(images)
            reg_loss, ppl, last_layer = cfg.kl_weight * kl, None, vae_last_layer(raw)
        elif is_seed:
            # prefix lengths are a function of (seed, step, rank), so a resumed run draws the same ones
            gen = torch.Generator().manual_seed((cfg.train.seed * 100003 + i) * 64 + run.rank)
            out = model(images, random_prefix_lengths(len(images), raw.num_tokens, cfg.seed.full_prefix_prob, gen))
            recon, ppl, last_layer = out.recon, out.perplexity, raw.last_layer
            reg_loss = out.quant_loss + cfg.seed.embed_weight * out.embed_loss
        else:
            out = model(images)
            recon, reg_loss, ppl, last_layer = out.recon, out.quant_loss, out.perplexity, raw.last_layer
        g_loss, logs = loss_fn.generator_loss(images, recon, reg_loss, last_layer, i)
        if is_seed:
            logs["quant"], logs["embed"] = out.quant_loss.item(), out.embed_loss.item()
        opt_g.zero_grad(set_to_none=True)
        run.accelerator.backward(g_loss)
        opt_g.step()
        d_loss, d_logs = loss_fn.discriminator_loss(images, recon.detach(), i)
        if d_loss.requires_grad:  # the discriminator only trains after its warm-up
            opt_d.zero_grad(set_to_none=True)
            run.accelerator.backward(d_loss)
            opt_d.step()
        return {**logs, **d_logs, **({"kl": kl} if ppl is None else {"perplexity": ppl})}

    run.train(step, digits={"perplexity": 2}, show=("loss", "perplexity"))
    if run.is_main:
        final = run.out / "final"
        if is_vae:
            raw.eval()
            imgs = torch.stack([train_set[i]["image"] for i in range(min(512, len(train_set)))]).to(raw.device)
            raw.register_to_config(scaling_factor=estimate_scaling_factor(raw, imgs))
        raw.save_pretrained(final)
        heldout = make_dataset(cfg.data, "heldout")
        metrics = reconstruction_metrics(raw, heldout, cfg.train.eval_images)
        if is_seed:
            metrics.update(prefix_psnr(raw, heldout, cfg.train.eval_images))
        write_json_atomic(final / "metrics.json", metrics)
        run.print(f"saved tokenizer to {final}; held-out {metrics}")


if __name__ == "__main__":
    main()
