"""Train a text-to-image decoder on a trained visual tokenizer, under one of the generation paradigms.

    python scripts/train_generator.py --config configs/generator_shapes.yaml [key.sub=value ...]
    python scripts/train_generator.py --config configs/next_scale_shapes.yaml   # paradigm: next_scale (VAR)
    python scripts/train_generator.py --config configs/flow_head_shapes.yaml    # paradigm: flow_head (MAR-style)
    python scripts/train_generator.py --config configs/flowar_shapes.yaml       # paradigm: flowar
    python scripts/train_generator.py --config configs/next_x_shapes.yaml flow.entity=cell   # paradigm: next_x (xAR)
    accelerate launch --config_file configs/accelerate/ddp_2proc.yaml scripts/train_generator.py --config ...

Data-parallel runs split each global batch (`train.batch_size`) over the processes, so N processes take the
same optimisation steps as one (the tests check 2 CPU processes against 1). SIGTERM/SIGINT write a checkpoint
at the end of the current step and exit; a re-run resumes with the same loss sequence.

`paradigm` picks the tokenizer kind that `tokenizer` must point at and the decoder: next_token (VQGAN codes,
raster), next_scale (MultiScaleVQGAN codes, one pass per scale), flow_head (AutoencoderKL latents, raster with a
per-token flow-matching head), flowar (AutoencoderKL latent pyramid, per-scale flow module), next_x (AutoencoderKL
latents grouped into `flow.entity` entities, the decoder regresses each entity by flow matching, xAR).

Steps: train the word-level text tokenizer on the captions, encode every training image once with the frozen
tokenizer (cached under the run directory), then the usual loop. Checkpoints every `train.ckpt_every` steps
(safetensors + JSON); a re-run of the same command resumes from the last one. At the end the whole pipeline
is saved to `<out_dir>/pipeline`, loadable with `mmgen generate --model`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from accelerate.utils import DistributedType
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from mmgen.alignment import AlignmentConfig, AlignmentHead, make_target_encoder
from mmgen.alignment.losses import resample_patches
from mmgen.checkpoint import (gather_training_state, latest_checkpoint, load_checkpoint, restore_optimizer,
                              save_checkpoint)
from mmgen.config import load_config
from mmgen.paradigms import next_token
from mmgen.paradigms.protocol import FlowConfig, ModelConfig
from mmgen.pipelines import PARADIGMS, get_paradigm, save_pipeline
from mmgen.text import UnifiedVocab, encode_prompts
from mmgen.train_utils import (DataConfig, JsonlLogger, StopRequest, all_images, batch_indices, cosine_lr,
                               gather_rng_states, image_fields, make_accelerator, make_dataset, rank_spread,
                               run_text_tokenizer, write_json_atomic)
from tokenizers_vis.protocol import CLASS_KINDS, as_visual_tokenizer, load_tokenizer_component, tokenizer_class_name


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
    data_workers: int = 0  # processes that load (render) images for the one encoding pass


@dataclass
class GeneratorRunConfig:
    paradigm: str = "next_token"  # next_token | token_shuffle | next_scale | flow_head | flowar | next_x
    tokenizer: str = "runs/vqgan/final"  # a saved tokenizer directory of the paradigm's kind
    max_text_len: int = 24
    # a saved pipeline to continue from (fine-tune / train longer under a new schedule): its decoder weights and
    # caption tokenizer start the run, the optimizer starts fresh; the decoder config must match
    init_from: str | None = None
    model: ModelConfig = field(default_factory=ModelConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)
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


def encode_dataset(encode, dataset, cache_file: Path, key: str, batch_size: int = 256,
                   workers: int = 0) -> torch.Tensor:
    """`encode(images)` of the whole dataset, computed once and cached as safetensors; `workers` processes
    load the images ahead of the encoder."""
    if cache_file.is_file():
        cached = load_file(cache_file)
        if cached.get("key") is not None and bytes(cached["key"].tolist()).decode() == key:
            return cached["codes"]
    codes = []
    with torch.no_grad():
        for imgs in tqdm(all_images(dataset, batch_size, workers), total=-(-len(dataset) // batch_size),
                         desc="encode images"):
            codes.append(encode(imgs).cpu())
    codes = torch.cat(codes).contiguous()
    tmp = cache_file.with_name(cache_file.name + ".tmp")
    save_file({"codes": codes, "key": torch.tensor(list(key.encode()), dtype=torch.uint8)}, tmp)
    tmp.replace(cache_file)
    return codes


def resolve_paradigm(cfg: GeneratorRunConfig) -> str:
    """The registry name of the run's paradigm; `next_token` with `model.shuffle_window` > 1 is Token-Shuffle."""
    get_paradigm(cfg.paradigm)
    if cfg.model.shuffle_window != 1 and cfg.paradigm not in ("next_token", "token_shuffle"):
        raise ValueError(f"model.shuffle_window={cfg.model.shuffle_window} needs paradigm token_shuffle; "
                         f"paradigm is {cfg.paradigm!r}")
    if cfg.paradigm == "token_shuffle" and cfg.model.shuffle_window == 1:
        raise ValueError("paradigm token_shuffle needs model.shuffle_window >= 2 (the window side s)")
    return "token_shuffle" if cfg.model.shuffle_window != 1 else cfg.paradigm


class TrainStep(torch.nn.Module):
    """The whole training forward (paradigm loss, plus the alignment head's loss) as one module. Accelerate wraps
    this in DDP: the paradigms call several of the decoder's methods (the flow head, FlowAR's velocity net), and
    only parameters used inside the wrapped forward get their gradients all-reduced."""

    def __init__(self, cfg: GeneratorRunConfig, paradigm, layout, model, head=None):
        super().__init__()
        self.cfg, self.paradigm, self.layout = cfg, paradigm, layout
        self.model, self.head = model, head

    def forward(self, batch, target_global=None, target_patches=None):
        """(loss, decoder loss, alignment loss or None)."""
        if self.head is None:
            loss = self.paradigm.loss_fn(self.model, batch, self.layout)
            return loss, loss, None
        align = self.cfg.alignment
        ar_loss, hidden = self.paradigm.loss_and_image_hidden(self.model, batch, self.layout, align.layer)
        if target_patches is not None and hidden.shape[1] != target_patches.shape[1]:
            hidden = hidden[:, -target_patches.shape[1]:]  # per-patch targets live on the finest scale's grid
        align_loss = self.head(hidden, target_global, target_patches)
        return ar_loss + align.weight * align_loss, ar_loss, align_loss


def load_tokenizer(paradigm: str, directory: str):
    """The saved visual tokenizer in `directory`, checked to give the tokens the paradigm reads."""
    wanted = PARADIGMS[paradigm].module.TOKENS
    name = tokenizer_class_name(directory)
    if CLASS_KINDS[name] != wanted:
        names = " or ".join(c for c, kind in CLASS_KINDS.items() if kind == wanted)
        raise ValueError(f"paradigm {paradigm!r} needs tokenizer class {names}; {directory!r} holds {name}")
    return load_tokenizer_component(directory)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=None, help="YAML config (see configs/)")
    parser.add_argument("overrides", nargs="*", help="dot-list overrides, e.g. train.steps=100")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(GeneratorRunConfig, args.config, args.overrides)
    except (ValueError, FileNotFoundError) as e:  # unknown key, bad value, missing file: usage error, exit 2
        parser.error(str(e))

    accelerator = make_accelerator()
    out = Path(cfg.train.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.train.seed)

    name = resolve_paradigm(cfg)
    paradigm = PARADIGMS[name].module
    vq = load_tokenizer(name, cfg.tokenizer).to(accelerator.device)  # the pipeline's component (float32)
    tok = as_visual_tokenizer(vq)  # the protocol view: encode_tokens, token_shape, vocab_size
    dataset = make_dataset(cfg.data)
    captions = [dataset[i]["caption"] for i in range(len(dataset))] if not hasattr(dataset, "captions") \
        else list(dataset.captions)
    if cfg.init_from is not None:
        init_dir = Path(cfg.init_from)
        if not (init_dir / "transformer" / "diffusion_pytorch_model.safetensors").is_file():
            raise FileNotFoundError(f"init_from {cfg.init_from!r} is not a saved pipeline directory (no transformer/)")
        if accelerator.is_main_process and not (out / "text_tokenizer" / "tokenizer.json").is_file():
            shutil.copytree(init_dir / "tokenizer", out / "text_tokenizer", dirs_exist_ok=True)  # keep its word ids
        accelerator.wait_for_everyone()
    tokenizer = run_text_tokenizer(cfg.data, captions, out, accelerator.is_main_process)
    text_ids = encode_prompts(tokenizer, captions, cfg.max_text_len)

    encoding = tok.kind  # paradigms reading the same kind of tokens share the cache
    key = hashlib.sha256(json.dumps([image_fields(cfg.data), cfg.tokenizer, encoding]).encode()).hexdigest()
    codes = encode_dataset(lambda imgs: tok.encode_tokens(imgs.to(accelerator.device)), dataset,
                           out / "codes.safetensors", key, workers=cfg.train.data_workers)
    vocab = UnifiedVocab(text_vocab_size=len(tokenizer), image_vocab_size=tok.vocab_size)
    layout = paradigm.make_layout(tok, vocab, cfg.max_text_len, cfg.model, cfg.flow)
    model = paradigm.make_model(layout, cfg.model, cfg.flow)
    align = cfg.alignment
    align.validate(cfg.model.n_layers)
    if align.type != "none" and cfg.model.shuffle_window != 1:
        raise ValueError(f"alignment.type={align.type!r} is not available with model.shuffle_window="
                         f"{cfg.model.shuffle_window} (one hidden state covers s x s tokens)")
    alignable = [n for n, entry in PARADIGMS.items() if entry.alignable]
    if align.type != "none" and name not in alignable:
        raise ValueError(f"alignment.type={align.type!r} needs a discrete paradigm ({', '.join(alignable)}); "
                         f"paradigm is {cfg.paradigm!r}")
    # the image grid the alignment targets live on: the token grid, or the finest scale for next-scale
    grid = (tok.scales[-1],) * 2 if tok.kind == "scale_codes" else tuple(tok.token_shape[-2:])
    head = encoder = targets = None
    if align.type != "none":
        encoder = make_target_encoder(align.encoder, vq=vq).to(accelerator.device)
        want_patches = align.type == "repa"
        head = AlignmentHead(align, cfg.model.dim, encoder.patch_dim if want_patches else encoder.global_dim)
        if align.cache:
            akey = hashlib.sha256(json.dumps([image_fields(cfg.data), align.encoder, want_patches, list(grid)])
                                  .encode()).hexdigest()
            targets = cached_alignment_targets(encoder, dataset, grid, want_patches,
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
        start = load_checkpoint(ckpt, modules, {}, rank=accelerator.process_index)["step"]
    else:
        if cfg.init_from is not None:
            weights = load_file(Path(cfg.init_from) / "transformer" / "diffusion_pytorch_model.safetensors")
            model.load_state_dict({k: v.float() for k, v in weights.items()})  # strict: same architecture
            accelerator.print(f"decoder initialised from {cfg.init_from}")
        # the model was initialised identically on every rank; from here each rank draws its own noise
        torch.manual_seed(cfg.train.seed + accelerator.process_index)
    train_step, opt = accelerator.prepare(TrainStep(cfg, paradigm, layout, model, head), opt)
    if ckpt is not None:  # after prepare, so that FSDP shards the optimizer state as it shards the parameters
        restore_optimizer(ckpt, "opt", train_step, opt)
        accelerator.print(f"resumed from {ckpt} at step {start}")
    logger = JsonlLogger(out, accelerator.is_main_process)
    logger.rewind(start)
    stop = StopRequest(accelerator)
    if accelerator.is_main_process:
        write_json_atomic(out / "config.json", asdict(cfg))
    print(f"decoder parameters: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M; "
          f"sequence length {layout.seq_len}; {len(dataset)} images") if accelerator.is_main_process else None

    # plain next-token: every text block padded once, on the device (a step then only gathers rows)
    text_table = next_token.TextTable(layout, text_ids, accelerator.device) \
        if name == "next_token" else None
    bar = tqdm(range(start, cfg.train.steps), initial=start, total=cfg.train.steps, desc="train generator",
               disable=not accelerator.is_main_process)
    t0 = time.time()
    for step in bar:
        idx = batch_indices(step, cfg.train.batch_size, len(dataset), cfg.train.seed,
                            accelerator.process_index, accelerator.num_processes)
        texts = text_table.rows(idx) if text_table is not None else [text_ids[i] for i in idx]
        batch = paradigm.build_batch(layout, texts, codes[idx].to(accelerator.device), cfg.train.cond_drop_prob,
                                     tokenizer=tok)
        lr = cosine_lr(step, cfg.train.lr, cfg.train.warmup, cfg.train.steps, cfg.train.min_lr_ratio)
        for group in opt.param_groups:
            group["lr"] = lr
        tg = tp = None
        if head is not None and targets is not None:
            tg = targets[0][idx].to(accelerator.device).float()
            tp = targets[1][idx].to(accelerator.device).float() if targets[1] is not None else None
        elif head is not None:
            tg, tp = alignment_targets(encoder, dataset, idx, grid, align.type == "repa", accelerator.device)
        loss, ar_loss, align_loss = train_step(batch, tg, tp)
        opt.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        grad_norm = accelerator.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], cfg.train.grad_clip)
        opt.step()
        if step % cfg.train.log_every == 0 or step + 1 == cfg.train.steps:
            loss = accelerator.reduce(loss.detach(), reduction="mean")  # the global batch's loss, not this rank's
            record = {"step": step, "loss": round(loss.item(), 5), "lr": lr, "grad_norm": round(float(grad_norm), 4),
                      "elapsed_s": round(time.time() - t0, 1)}
            if align_loss is not None:
                ar_loss, align_loss = (accelerator.reduce(v.detach(), reduction="mean") for v in (ar_loss, align_loss))
                record |= {"ar_loss": round(ar_loss.item(), 5), "align_loss": round(align_loss.item(), 5)}
            logger.log(record)
            bar.set_postfix(loss=f"{record['loss']:.4f}")
        signum = stop.requested()
        if (step + 1) % cfg.train.ckpt_every == 0 or step + 1 == cfg.train.steps or signum:
            rng = gather_rng_states(accelerator)
            spread = rank_spread(accelerator, {"model": model} | ({"align": head} if head is not None else {}))
            model_sd, opt_sd = gather_training_state(train_step, opt)  # whole tensors on rank 0 (FSDP too)
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                parts = {part: {k[len(prefix):]: v for k, v in model_sd.items() if k.startswith(prefix)}
                         for part, prefix in (("model", "model."), ("align", "head."))}  # align: training only
                save_checkpoint(out, step + 1, {k: v for k, v in parts.items() if v}, {"opt": opt_sd},
                                extra={"rank_spread": spread}, rng_states=rng)
        if signum:
            stop.exit(signum, step + 1)

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if accelerator.distributed_type == DistributedType.FSDP:  # parameters are shards: rebuild the decoder
            model = type(model).from_config(model.config)         # from the last checkpoint's whole weights
            model.load_state_dict(load_file(latest_checkpoint(out) / "model.safetensors"))
        entry = PARADIGMS[name]
        pipe = entry.pipeline(transformer=model.eval().cpu(), tokenizer=tokenizer,
                              max_text_len=cfg.max_text_len, **{entry.component: vq.cpu()})
        save_pipeline(pipe, out / "pipeline")  # atomic, with checksums.json
        accelerator.print(f"saved pipeline to {out / 'pipeline'}")


if __name__ == "__main__":
    main()
