"""Held-out metrics of a trained visual tokenizer, written to `final/metrics.json` by `scripts/train_tokenizer.py`:
reconstruction PSNR / SSIM and code usage, PSNR and explained variance when decoding from token prefixes (SEED,
the PCA tokenizer), and image-caption retrieval of SEED's stage-1 contrastive embeddings."""

from __future__ import annotations

import torch

from mmgen.eval.image_metrics import codebook_usage, psnr, ssim
from mmgen.text import encode_prompts
from tokenizers_vis.seed import SEEDTokenizer, pad_text
from tokenizers_vis.vae import decode_latents, encode_latents


@torch.no_grad()
def reconstruction_metrics(model, dataset, n: int, batch_size: int = 128) -> dict:
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


def explained_variance(images: torch.Tensor, recon: torch.Tensor) -> float:
    """1 - sum ||x - x_hat||^2 / sum ||x - mean||^2 over a set of images (B, 3, H, W), the mean being the set's
    mean image: the share of the set's variance a reconstruction accounts for, as PCA counts it (1: exact, 0: no
    better than the mean image, negative: worse)."""
    if images.shape != recon.shape or images.dim() != 4 or len(images) < 2:
        raise ValueError(f"images and recon must be the same (B >= 2, 3, H, W) shape, got {tuple(images.shape)} "
                         f"and {tuple(recon.shape)}")
    x, x_hat = images.double(), recon.double()
    total = (x - x.mean(0, keepdim=True)).pow(2).sum()
    if total == 0:
        raise ValueError("images must not all be the same image (their variance is 0)")
    return float(1 - (x - x_hat).pow(2).sum() / total)


@torch.no_grad()
def prefix_explained_variance(model, images: torch.Tensor, prefixes=None, batch_size: int = 64) -> dict:
    """Explained variance EV(k) of `images` (B, 3, H, W) decoded from the first k tokens (`model.decode_prefix`
    with its fixed default noise), for each k in `prefixes` (default 1..K), and the gain of each added token,
    EV(k) - EV(previous k) (EV(0) = 0, the mean image). A PCA-ordered tokenizer's EV rises and its gain falls."""
    K = model.num_tokens
    prefixes = list(range(1, K + 1)) if prefixes is None else sorted(set(prefixes))
    bad = [k for k in prefixes if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= K]
    if bad or not prefixes:
        raise ValueError(f"prefixes must be ints in [1, {K}] (the tokenizer's tokens), got {bad or prefixes}")
    was_training = model.training
    model.eval()
    ids = torch.cat([model.encode(images[i:i + batch_size]) for i in range(0, len(images), batch_size)])
    ev, gain, prev = {}, {}, 0.0
    for k in prefixes:
        recon = torch.cat([model.decode_prefix(ids[i:i + batch_size], k).cpu()
                           for i in range(0, len(ids), batch_size)])
        ev[k] = explained_variance(images.cpu(), recon)
        gain[k], prev = ev[k] - prev, ev[k]
    model.train(was_training)
    return {"explained_variance": ev, "gain": gain, "images": len(images)}
