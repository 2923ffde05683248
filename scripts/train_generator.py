"""Train a next-token text-to-image decoder on a trained visual tokenizer.

    python scripts/train_generator.py --config configs/generator_shapes.yaml [key.sub=value ...]
    accelerate launch scripts/train_generator.py --config configs/generator_shapes.yaml

Steps: train the word-level text tokenizer on the captions, encode every training image once with the frozen
tokenizer (cached under the run directory), then the usual loop. Checkpoints every `train.ckpt_every` steps
(safetensors + JSON); a re-run of the same command resumes from the last one. At the end the whole pipeline
is saved to `<out_dir>/pipeline`, loadable with `mmgen generate --model`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerFast

from mmgen.alignment import AlignmentConfig, AlignmentHead, make_target_encoder
from mmgen.alignment.losses import resample_patches
from mmgen.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from mmgen.config import load_config
from mmgen.models.transformer import Transformer
from mmgen.paradigms import next_token
from mmgen.pipelines import NextTokenPipeline
from mmgen.text import UnifiedVocab, encode_prompts, train_text_tokenizer
from mmgen.train_utils import DataConfig, JsonlLogger, batch_indices, cosine_lr, make_dataset, write_json_atomic
from tokenizers_vis.vqgan import VQGAN


@dataclass
class ModelConfig:
    dim: int = 256
    n_layers: int = 6
    n_heads: int = 8
    n_kv_heads: int | None = None
    mlp_hidden: int | None = None
    rope_2d: bool = True


@dataclass
class TrainConfig:
    out_dir: str = "runs/generator"
    steps: int = 6000
    batch_size: int = 64
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup: int = 200
    weight_decay: float = 0.05
    betas: tuple = (0.9, 0.95)
    grad_clip: float = 1.0
    cond_drop_prob: float = 0.1
    ckpt_every: int = 500
    log_every: int = 50
    seed: int = 0


@dataclass
class GeneratorRunConfig:
    tokenizer: str = "runs/vqgan/final"  # a saved VQGAN directory
    max_text_len: int = 24
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    alignment: AlignmentConfig = field(default_factory=AlignmentConfig)


def alignment_targets(encoder, dataset, idx, grid, want_patches: bool, device):
    """Target features of dataset images `idx`: global (B, D) and patches on the token grid (B, h*w, Dp)."""
    imgs = torch.stack([dataset[int(i)]["image"] for i in idx]).to(device)
    g, patches = encoder(imgs)
    patches = resample_patches(patches, encoder.patch_grid, grid) if want_patches else None
    return g, patches


def cached_alignment_targets(encoder, dataset, grid, want_patches, cache_file: Path, key: str, device,
                             batch_size: int = 256):
    """Target features for the whole dataset, computed once (fp16) and cached as safetensors."""
    if cache_file.is_file():
        cached = load_file(cache_file)
        if bytes(cached["key"].tolist()).decode() == key:
            return cached["global"], cached.get("patches")
    gs, ps = [], []
    for i in tqdm(range(0, len(dataset), batch_size), desc="alignment targets"):
        g, p = alignment_targets(encoder, dataset, range(i, min(i + batch_size, len(dataset))), grid,
                                 want_patches, device)
        gs.append(g.half().cpu())
        if p is not None:
            ps.append(p.half().cpu())
    out = {"global": torch.cat(gs), "key": torch.tensor(list(key.encode()), dtype=torch.uint8)}
    if ps:
        out["patches"] = torch.cat(ps)
    tmp = cache_file.with_name(cache_file.name + ".tmp")
    save_file(out, tmp)
    tmp.replace(cache_file)
    return out["global"], out.get("patches")


def encode_dataset(vq: VQGAN, dataset, cache_file: Path, key: str, batch_size: int = 256) -> torch.Tensor:
    """Image codes (N, h, w) for the whole dataset, computed once and cached as safetensors."""
    if cache_file.is_file():
        cached = load_file(cache_file)
        if cached.get("key") is not None and bytes(cached["key"].tolist()).decode() == key:
            return cached["codes"]
    codes = []
    with torch.no_grad():
        for i in tqdm(range(0, len(dataset), batch_size), desc="encode images"):
            imgs = torch.stack([dataset[j]["image"] for j in range(i, min(i + batch_size, len(dataset)))])
            codes.append(vq.encode(imgs.to(vq.device)).cpu())
    codes = torch.cat(codes)
    tmp = cache_file.with_name(cache_file.name + ".tmp")
    save_file({"codes": codes, "key": torch.tensor(list(key.encode()), dtype=torch.uint8)}, tmp)
    tmp.replace(cache_file)
    return codes


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=None, help="YAML config (see configs/)")
    parser.add_argument("overrides", nargs="*", help="dot-list overrides, e.g. train.steps=100")
    args = parser.parse_args(argv)
    cfg = load_config(GeneratorRunConfig, args.config, args.overrides)

    accelerator = Accelerator()
    out = Path(cfg.train.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.train.seed)

    vq = VQGAN.from_pretrained(cfg.tokenizer).eval().requires_grad_(False).to(accelerator.device)
    dataset = make_dataset(cfg.data)
    captions = [dataset[i]["caption"] for i in range(len(dataset))] if not hasattr(dataset, "captions") \
        else list(dataset.captions)
    tok_dir = out / "text_tokenizer"
    if (tok_dir / "tokenizer.json").is_file():
        tokenizer = PreTrainedTokenizerFast.from_pretrained(tok_dir)
    else:
        extra = []
        if cfg.data.name == "shapes":
            from mmgen.data.shapes import all_caption_words
            extra = all_caption_words()  # held-out prompts use words the training captions may lack
        tokenizer = train_text_tokenizer(captions, extra)
        if accelerator.is_main_process:
            tokenizer.save_pretrained(tok_dir)
    text_ids = encode_prompts(tokenizer, captions, cfg.max_text_len)

    key = hashlib.sha256(json.dumps([asdict(cfg.data), cfg.tokenizer]).encode()).hexdigest()
    codes = encode_dataset(vq, dataset, out / "codes.safetensors", key)
    vocab = UnifiedVocab(text_vocab_size=len(tokenizer), image_vocab_size=vq.vocab_size)
    layout = next_token.NextTokenLayout(vocab, cfg.max_text_len, tuple(codes.shape[1:]), rope_2d=cfg.model.rope_2d)

    model = Transformer(vocab_size=vocab.size, max_seq_len=layout.seq_len, **asdict(cfg.model))
    align = cfg.alignment
    align.validate(cfg.model.n_layers)
    head = encoder = targets = None
    if align.type != "none":
        encoder = make_target_encoder(align.encoder, vq=vq).to(accelerator.device)
        want_patches = align.type == "repa"
        head = AlignmentHead(align, cfg.model.dim, encoder.patch_dim if want_patches else encoder.global_dim)
        if align.cache:
            akey = hashlib.sha256(json.dumps([asdict(cfg.data), align.encoder, want_patches, list(layout.grid)])
                                  .encode()).hexdigest()
            targets = cached_alignment_targets(encoder, dataset, layout.grid, want_patches,
                                               out / "alignment_targets.safetensors", akey, accelerator.device)
    params = list(model.named_parameters()) + ([("align." + n, p) for n, p in head.named_parameters()]
                                               if head is not None else [])
    decay = [p for n, p in params if p.dim() >= 2]
    no_decay = [p for n, p in params if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.train.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.train.lr, betas=cfg.train.betas)
    start = 0
    ckpt = latest_checkpoint(out)
    if ckpt is not None:
        modules = {"model": model} | ({"align": head} if head is not None else {})
        start = load_checkpoint(ckpt, modules, {"opt": opt})["step"]
        accelerator.print(f"resumed from {ckpt} at step {start}")
    if head is not None:
        model, head, opt = accelerator.prepare(model, head, opt)
    else:
        model, opt = accelerator.prepare(model, opt)
    logger = JsonlLogger(out, accelerator.is_main_process)
    if accelerator.is_main_process:
        write_json_atomic(out / "config.json", asdict(cfg))
    print(f"decoder parameters: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M; "
          f"sequence length {layout.seq_len}; {len(dataset)} images") if accelerator.is_main_process else None

    bar = tqdm(range(start, cfg.train.steps), initial=start, total=cfg.train.steps, desc="train generator",
               disable=not accelerator.is_main_process)
    t0 = time.time()
    for step in bar:
        idx = batch_indices(step, cfg.train.batch_size, len(dataset), cfg.train.seed,
                            accelerator.process_index, accelerator.num_processes)
        batch = next_token.build_batch(layout, [text_ids[i] for i in idx], codes[idx].to(accelerator.device),
                                       cond_drop_prob=cfg.train.cond_drop_prob)
        lr = cosine_lr(step, cfg.train.lr, cfg.train.warmup, cfg.train.steps, cfg.train.min_lr_ratio)
        for group in opt.param_groups:
            group["lr"] = lr
        if head is None:
            loss = next_token.loss_fn(model, batch)
            align_loss = None
        else:
            ar_loss, hidden = next_token.loss_and_image_hidden(model, batch, layout, align.layer)
            if targets is not None:
                tg = targets[0][idx].to(accelerator.device).float()
                tp = targets[1][idx].to(accelerator.device).float() if targets[1] is not None else None
            else:
                tg, tp = alignment_targets(encoder, dataset, idx, layout.grid, align.type == "repa",
                                           accelerator.device)
            align_loss = head(hidden, tg, tp)
            loss = ar_loss + align.weight * align_loss
        opt.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        grad_norm = accelerator.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], cfg.train.grad_clip)
        opt.step()
        if step % cfg.train.log_every == 0 or step + 1 == cfg.train.steps:
            record = {"step": step, "loss": round(loss.item(), 5), "lr": lr, "grad_norm": round(float(grad_norm), 4),
                      "elapsed_s": round(time.time() - t0, 1)}
            if align_loss is not None:
                record |= {"ar_loss": round(ar_loss.item(), 5), "align_loss": round(align_loss.item(), 5)}
            logger.log(record)
            bar.set_postfix(loss=f"{record['loss']:.4f}")
        if (step + 1) % cfg.train.ckpt_every == 0 or step + 1 == cfg.train.steps:
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                modules = {"model": accelerator.unwrap_model(model)}
                if head is not None:
                    modules["align"] = accelerator.unwrap_model(head)  # training-only; not in the pipeline
                save_checkpoint(out, step + 1, modules, {"opt": opt})

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        pipe = NextTokenPipeline(transformer=accelerator.unwrap_model(model).eval().cpu(), vq_model=vq.cpu(),
                                 tokenizer=tokenizer, max_text_len=cfg.max_text_len)
        pipe.save_pretrained(out / "pipeline")
        accelerator.print(f"saved pipeline to {out / 'pipeline'}")


if __name__ == "__main__":
    main()
