"""Train a text-to-image decoder on a trained visual tokenizer, under one of the generation paradigms.

    python scripts/train_generator.py --config configs/generator_shapes.yaml [key.sub=value ...]
    python scripts/train_generator.py --config configs/next_scale_shapes.yaml   # paradigm: next_scale (VAR)
    python scripts/train_generator.py --config configs/flow_head_shapes.yaml    # paradigm: flow_head (MAR-style)
    python scripts/train_generator.py --config configs/flowar_shapes.yaml       # paradigm: flowar
    python scripts/train_generator.py --config configs/next_x_shapes.yaml flow.entity=cell   # paradigm: next_x (xAR)
    accelerate launch --config_file configs/accelerate/ddp_2proc.yaml scripts/train_generator.py --config ...
    accelerate launch --config_file configs/accelerate/ddp_2proc.yaml scripts/train_generator.py ... train.fsdp=true

Data-parallel runs split each global batch (`train.batch_size`) over the processes, so N processes take the
same optimisation steps as one (the tests check 2 CPU processes against 1); `train.fsdp=true` shards the decoder
(torch's fully_shard, per Block) instead of replicating it. SIGTERM/SIGINT write a checkpoint at the end of the
current step and exit; a re-run resumes with the same loss sequence. The loop itself is `mmgen.training.loop.Run`.

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

import hashlib
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import AutoencoderKL
from safetensors.torch import load_file
from tqdm.auto import tqdm

from mmgen.alignment import AlignmentConfig, AlignmentHead, make_target_encoder
from mmgen.alignment.losses import resample_patches
from mmgen.atomic import save_file_atomic
from mmgen.models.shuffle import TokenShuffleTransformer
from mmgen.models.transformer import Transformer
from mmgen.paradigms import flow_head, flowar, next_scale, next_token, next_x, token_shuffle
from mmgen.pipelines import (FlowARPipeline, NextScalePipeline, NextTokenPipeline, NextXPipeline, RasterFlowPipeline,
                             save_pipeline)
from mmgen.text import UnifiedVocab, encode_prompts
from mmgen.training.checkpoint import latest_checkpoint
from mmgen.training.data import DataConfig, all_images, image_fields, make_dataset, run_text_tokenizer
from mmgen.training.loop import Run, cosine_lr, load_run_config
from tokenizers_vis.multiscale import MultiScaleVQGAN
from tokenizers_vis.seed import SEEDTokenizer
from tokenizers_vis.vae import encode_latents, latent_channels, vae_grid
from tokenizers_vis.vqgan import VQGAN

# paradigm -> (tokenizer classes it takes, pipeline class); next_token reads VQGAN grids or SEED's 1-D causal codes
PARADIGMS = {
    "next_token": ((VQGAN, SEEDTokenizer), NextTokenPipeline),
    "next_scale": ((MultiScaleVQGAN,), NextScalePipeline),
    "flow_head": ((AutoencoderKL,), RasterFlowPipeline),
    "flowar": ((AutoencoderKL,), FlowARPipeline),
    "next_x": ((AutoencoderKL,), NextXPipeline),
}
ALIGNABLE = ("next_token", "next_scale")


@dataclass
class ModelConfig:
    dim: int = 256
    n_layers: int = 6
    n_heads: int = 8
    n_kv_heads: int | None = None
    mlp_hidden: int | None = None
    rope_2d: bool = True  # next_token and flow_head (scale-wise paradigms place tokens by their own rule)
    shuffle_window: int = 1  # next_token: Token-Shuffle window s (s x s codes per position); 1 = plain raster


@dataclass
class FlowConfig:
    """Continuous paradigms only."""

    head_width: int = 256  # flow_head: width of the per-token MLP head (MAR)
    head_depth: int = 3
    flow_batch_mul: int = 4  # flow_head: (time, noise) draws per token and step, MAR's diffusion_batch_mul
    flow_width: int = 128  # flowar: the Spatial-adaLN flow module
    flow_depth: int = 2
    flow_heads: int = 4
    scales: tuple | None = None  # flowar: doubling scales ending at the latent grid side; default 1, 2, 4, ..., G
    entity: str = "cell"  # next_x: token | cell | subsample | scale | image
    entity_size: int = 0  # next_x: cell side or subsample stride; 0 = default (half the latent side, stride 2)


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
    fsdp: bool = False  # 2+ processes: shard the decoder with torch's fully_shard (per Block, then the root), CPU too


@dataclass
class GeneratorRunConfig:
    paradigm: str = "next_token"  # next_token | next_scale | flow_head | flowar | next_x
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
    save_file_atomic(out, cache_file)
    return out["global"], out.get("patches")


def encode_images(paradigm: str, tok, images: torch.Tensor) -> torch.Tensor:
    """What the decoder learns from: codes (B, h, w), all scales' codes concatenated (B, L), or latents (B, C, h, w)."""
    if paradigm == "next_token":
        return tok.encode(images)
    if paradigm == "next_scale":
        return torch.cat([ids.flatten(1) for ids in tok.encode(images)], 1)
    return encode_latents(tok, images)


def split_scales(flat_BL: torch.Tensor, scales) -> list[torch.Tensor]:
    return [t.reshape(-1, s, s) for t, s in zip(flat_BL.split([s * s for s in scales], 1), scales)]


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
    save_file_atomic({"codes": codes, "key": torch.tensor(list(key.encode()), dtype=torch.uint8)}, cache_file)
    return codes


PARADIGM_MODULES = {"next_token": next_token, "next_scale": next_scale, "flow_head": flow_head, "flowar": flowar,
                    "next_x": next_x}


def build_decoder(cfg: GeneratorRunConfig, tok, text_vocab_size: int):
    """The paradigm's layout and a freshly initialised decoder for tokenizer `tok`."""
    m, f = cfg.model, cfg.flow
    backbone = dict(dim=m.dim, n_layers=m.n_layers, n_heads=m.n_heads, n_kv_heads=m.n_kv_heads, mlp_hidden=m.mlp_hidden)
    if cfg.paradigm == "next_token":
        vocab = UnifiedVocab(text_vocab_size=text_vocab_size, image_vocab_size=tok.vocab_size)
        if m.shuffle_window != 1:
            layout = token_shuffle.TokenShuffleLayout.for_tokens(vocab, cfg.max_text_len, tuple(tok.grid_size),
                                                                 m.shuffle_window, rope_2d=m.rope_2d)
            return layout, TokenShuffleTransformer(vocab.size, tok.vocab_size, shuffle_window=m.shuffle_window,
                                                   max_seq_len=layout.seq_len, rope_2d=m.rope_2d, **backbone)
        layout = next_token.NextTokenLayout(vocab, cfg.max_text_len, tuple(tok.grid_size), rope_2d=m.rope_2d)
        return layout, Transformer(vocab_size=vocab.size, max_seq_len=layout.seq_len, rope_2d=m.rope_2d, **backbone)
    if cfg.paradigm == "next_scale":
        vocab = UnifiedVocab(text_vocab_size=text_vocab_size, image_vocab_size=tok.vocab_size)
        layout = next_scale.NextScaleLayout(vocab, cfg.max_text_len, tuple(tok.scales))
        return layout, next_scale.NextScaleModel(vocab_size=vocab.size, feature_dim=tok.feature_dim,
                                                 scales=list(tok.scales), max_seq_len=layout.seq_len, **backbone)
    vocab = UnifiedVocab(text_vocab_size=text_vocab_size, image_vocab_size=0)
    C, (G, _) = latent_channels(tok), vae_grid(tok)
    if cfg.paradigm == "flow_head":
        layout = flow_head.RasterFlowLayout(vocab, cfg.max_text_len, (G, G), C)
        return layout, flow_head.RasterFlowModel(vocab_size=vocab.size, token_dim=C, max_seq_len=layout.seq_len,
                                                 rope_2d=m.rope_2d, head_width=f.head_width,
                                                 head_depth=f.head_depth, **backbone)
    if cfg.paradigm == "next_x":
        if G != vae_grid(tok)[1]:
            raise ValueError(f"next_x needs a square latent grid, got {vae_grid(tok)}")
        layout = next_x.NextXLayout(vocab, cfg.max_text_len, next_x.Entities(f.entity, G, f.entity_size), C)
        return layout, next_x.NextXModel(vocab_size=vocab.size, token_dim=C, grid_side=G, entity=f.entity,
                                         entity_size=layout.entities.size, max_seq_len=layout.seq_len, **backbone)
    scales = tuple(f.scales) if f.scales else tuple(2 ** i for i in range(G.bit_length()) if 2 ** i <= G)
    layout = flowar.FlowARLayout(vocab, cfg.max_text_len, scales, C)
    return layout, flowar.FlowARModel(vocab_size=vocab.size, token_dim=C, scales=list(scales),
                                      max_seq_len=layout.seq_len, flow_width=f.flow_width, flow_depth=f.flow_depth,
                                      flow_heads=f.flow_heads, **backbone)


def build_batch(cfg: GeneratorRunConfig, layout, tok, text_ids, codes):
    drop = cfg.train.cond_drop_prob
    if isinstance(layout, token_shuffle.TokenShuffleLayout):
        return token_shuffle.build_batch(layout, text_ids, codes, cond_drop_prob=drop)
    if cfg.paradigm == "next_token":
        return next_token.build_batch(layout, text_ids, codes, cond_drop_prob=drop)
    if cfg.paradigm == "next_scale":
        return next_scale.build_batch(layout, text_ids, split_scales(codes, layout.scales), tok, cond_drop_prob=drop)
    return PARADIGM_MODULES[cfg.paradigm].build_batch(layout, text_ids, codes, cond_drop_prob=drop)


def paradigm_loss(cfg: GeneratorRunConfig, model, batch, layout):
    if isinstance(layout, token_shuffle.TokenShuffleLayout):
        return token_shuffle.loss_fn(model, batch, layout)
    if cfg.paradigm == "next_token":
        return next_token.loss_fn(model, batch)
    if cfg.paradigm == "flow_head":
        return flow_head.loss_fn(model, batch, layout, flow_batch_mul=cfg.flow.flow_batch_mul)
    return PARADIGM_MODULES[cfg.paradigm].loss_fn(model, batch, layout)


class TrainStep(torch.nn.Module):
    """The whole training forward (paradigm loss, plus the alignment head's loss) as one module. Accelerate wraps
    this in DDP: the paradigms call several of the decoder's methods (the flow head, FlowAR's velocity net), and
    only parameters used inside the wrapped forward get their gradients all-reduced."""

    def __init__(self, cfg: GeneratorRunConfig, layout, model, head=None):
        super().__init__()
        self.cfg, self.layout = cfg, layout
        self.model, self.head = model, head

    def forward(self, batch, target_global=None, target_patches=None):
        """(loss, decoder loss, alignment loss or None)."""
        if self.head is None:
            loss = paradigm_loss(self.cfg, self.model, batch, self.layout)
            return loss, loss, None
        align = self.cfg.alignment
        ar_loss, hidden = PARADIGM_MODULES[self.cfg.paradigm].loss_and_image_hidden(self.model, batch, self.layout,
                                                                                     align.layer)
        if self.cfg.paradigm == "next_scale" and align.type == "repa":
            hidden = hidden[:, -target_patches.shape[1]:]  # per-patch targets live on the finest scale's grid
        align_loss = self.head(hidden, target_global, target_patches)
        return ar_loss + align.weight * align_loss, ar_loss, align_loss


def load_tokenizer_class(paradigm: str, directory: str):
    """The class of the saved tokenizer in `directory` (its config's `_class_name`), checked against the paradigm."""
    accepted = PARADIGMS[paradigm][0]
    names = " or ".join(c.__name__ for c in accepted)
    config = Path(directory) / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"tokenizer {directory!r} is not a saved tokenizer directory (a saved {names})")
    name = json.loads(config.read_text()).get("_class_name")
    for cls in accepted:
        if cls.__name__ == name:
            return cls
    raise ValueError(f"paradigm {paradigm!r} needs tokenizer class {names}; {directory!r} holds {name}")


def main(argv=None):
    cfg = load_run_config(GeneratorRunConfig, __doc__, argv)
    run = Run(cfg, cfg.train, "train generator")
    out, device = run.out, run.device

    if cfg.paradigm not in PARADIGMS:
        raise ValueError(f"paradigm must be one of {', '.join(PARADIGMS)}; got {cfg.paradigm!r}")
    tok_cls, pipe_cls = load_tokenizer_class(cfg.paradigm, cfg.tokenizer), PARADIGMS[cfg.paradigm][1]
    vq = tok_cls.from_pretrained(cfg.tokenizer).float().eval().requires_grad_(False).to(device)  # zoo: fp16
    dataset = make_dataset(cfg.data)
    captions = [dataset[i]["caption"] for i in range(len(dataset))] if not hasattr(dataset, "captions") \
        else list(dataset.captions)
    if cfg.init_from is not None:
        init_dir = Path(cfg.init_from)
        if not (init_dir / "transformer" / "diffusion_pytorch_model.safetensors").is_file():
            raise FileNotFoundError(f"init_from {cfg.init_from!r} is not a saved pipeline directory (no transformer/)")
        if run.is_main and not (out / "text_tokenizer" / "tokenizer.json").is_file():
            shutil.copytree(init_dir / "tokenizer", out / "text_tokenizer", dirs_exist_ok=True)  # keep its word ids
        run.accelerator.wait_for_everyone()
    tokenizer = run_text_tokenizer(cfg.data, captions, out, run.is_main)
    text_ids = encode_prompts(tokenizer, captions, cfg.max_text_len)

    encoding = cfg.paradigm if cfg.paradigm in ("next_token", "next_scale") else "latents"  # continuous ones share
    key = hashlib.sha256(json.dumps([image_fields(cfg.data), cfg.tokenizer, encoding]).encode()).hexdigest()
    codes = encode_dataset(lambda imgs: encode_images(cfg.paradigm, vq, imgs.to(device)), dataset,
                           out / "codes.safetensors", key, workers=cfg.train.data_workers)
    layout, model = build_decoder(cfg, vq, len(tokenizer))
    align = cfg.alignment
    align.validate(cfg.model.n_layers)
    if cfg.model.shuffle_window != 1 and cfg.paradigm != "next_token":
        raise ValueError(f"model.shuffle_window={cfg.model.shuffle_window} needs paradigm next_token; "
                         f"paradigm is {cfg.paradigm!r}")
    if align.type != "none" and cfg.model.shuffle_window != 1:
        raise ValueError(f"alignment.type={align.type!r} is not available with model.shuffle_window="
                         f"{cfg.model.shuffle_window} (one hidden state covers s x s tokens)")
    if align.type != "none" and cfg.paradigm not in ALIGNABLE:
        raise ValueError(f"alignment.type={align.type!r} needs a discrete paradigm ({', '.join(ALIGNABLE)}); "
                         f"paradigm is {cfg.paradigm!r}")
    grid = tuple(vq.grid_size) if cfg.paradigm in ALIGNABLE else vae_grid(vq)
    head = encoder = targets = None
    if align.type != "none":
        encoder = make_target_encoder(align.encoder, vq=vq).to(device)
        want_patches = align.type == "repa"
        head = AlignmentHead(align, cfg.model.dim, encoder.patch_dim if want_patches else encoder.global_dim)
        if align.cache:
            akey = hashlib.sha256(json.dumps([image_fields(cfg.data), align.encoder, want_patches, list(grid)])
                                  .encode()).hexdigest()
            targets = cached_alignment_targets(encoder, dataset, grid, want_patches,
                                               out / "alignment_targets.safetensors", akey, device)
    params = list(model.named_parameters()) + ([("align." + n, p) for n, p in head.named_parameters()]
                                               if head is not None else [])
    decay = [p for n, p in params if p.dim() >= 2]
    no_decay = [p for n, p in params if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.train.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.train.lr, betas=cfg.train.betas)
    run.resume({"model": model, "align": head})
    if run.ckpt is None and cfg.init_from is not None:
        weights = load_file(Path(cfg.init_from) / "transformer" / "diffusion_pytorch_model.safetensors")
        model.load_state_dict({k: v.float() for k, v in weights.items()})  # strict: same architecture
        run.print(f"decoder initialised from {cfg.init_from}")
    train_step, opt = run.prepare(TrainStep(cfg, layout, model, head), {"opt": opt})
    run.print(f"decoder parameters: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M; "
              f"sequence length {layout.seq_len}; {len(dataset)} images")

    # plain next-token: every text block padded once, on the device (a step then only gathers rows)
    text_table = next_token.TextTable(layout, text_ids, device) \
        if cfg.paradigm == "next_token" and not isinstance(layout, token_shuffle.TokenShuffleLayout) else None

    def step(i: int) -> dict:
        idx = run.indices(i, len(dataset))
        texts = text_table.rows(idx) if text_table is not None else [text_ids[k] for k in idx]
        batch = build_batch(cfg, layout, vq, texts, codes[idx].to(device))
        lr = cosine_lr(i, cfg.train.lr, cfg.train.warmup, cfg.train.steps, cfg.train.min_lr_ratio)
        for group in opt.param_groups:
            group["lr"] = lr
        tg = tp = None
        if head is not None and targets is not None:
            tg = targets[0][idx].to(device).float()
            tp = targets[1][idx].to(device).float() if targets[1] is not None else None
        elif head is not None:
            tg, tp = alignment_targets(encoder, dataset, idx, grid, align.type == "repa", device)
        loss, ar_loss, align_loss = train_step(batch, tg, tp)
        opt.zero_grad(set_to_none=True)
        run.accelerator.backward(loss)
        grad_norm = run.accelerator.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]],
                                                    cfg.train.grad_clip)
        opt.step()
        logs = {"loss": loss.detach(), "lr": lr, "grad_norm": grad_norm}
        return logs if align_loss is None else logs | {"ar_loss": ar_loss.detach(), "align_loss": align_loss.detach()}

    run.train(step, digits={"lr": None, "grad_norm": 4})
    if run.is_main:
        tok_name = "vae" if tok_cls is AutoencoderKL else "vq_model"
        if run.sharded:  # parameters are shards: rebuild the decoder from the last checkpoint's whole weights
            model = type(model).from_config(model.config)
            model.load_state_dict(load_file(latest_checkpoint(out) / "model.safetensors"))
        pipe = pipe_cls(transformer=model.eval().cpu(), tokenizer=tokenizer,
                        max_text_len=cfg.max_text_len, **{tok_name: vq.cpu()})
        save_pipeline(pipe, out / "pipeline")  # atomic, with checksums.json
        run.print(f"saved pipeline to {out / 'pipeline'}")


if __name__ == "__main__":
    main()
