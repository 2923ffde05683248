"""Train a text-to-image decoder on a trained visual tokenizer, under one of the generation paradigms.

    python scripts/train_generator.py --config configs/generator_shapes.yaml [key.sub=value ...]
    python scripts/train_generator.py --config configs/next_scale_shapes.yaml   # paradigm: next_scale (VAR)
    python scripts/train_generator.py --config configs/flow_head_shapes.yaml    # paradigm: flow_head (MAR-style)
    python scripts/train_generator.py --config configs/flowar_shapes.yaml       # paradigm: flowar
    python scripts/train_generator.py --config configs/next_x_shapes.yaml flow.entity=cell   # paradigm: next_x (xAR)
    python scripts/train_generator.py --config configs/janus_finetune.yaml init_from=<Janus dir> data.root=<folder>
    accelerate launch --config_file configs/accelerate/ddp_2proc.yaml scripts/train_generator.py --config ...
    accelerate launch --config_file configs/accelerate/ddp_2proc.yaml scripts/train_generator.py ... train.fsdp=true

Data-parallel runs split each global batch (`train.batch_size`) over the processes, so N processes take the
same optimisation steps as one (the tests check 2 CPU processes against 1); `train.fsdp=true` shards the decoder
(torch's fully_shard, per Block) instead of replicating it. SIGTERM/SIGINT write a checkpoint at the end of the
current step and exit; a re-run resumes with the same loss sequence. The loop itself is `mmgen.training.loop.Run`.

`paradigm` names an entry of `mmgen.pipelines.PARADIGMS` (the paradigm protocol: layout, decoder, batch, loss,
sampler) and so the tokenizer kind that `tokenizer` must point at: next_token (VQGAN or SEED codes, raster),
token_shuffle (VQGAN codes, s x s per position; also `next_token` with `model.shuffle_window` > 1), next_scale (MultiScaleVQGAN codes, one pass per scale), flow_head (AutoencoderKL latents, raster with a
per-token flow-matching head), flowar (AutoencoderKL latent pyramid, per-scale flow module), next_x (AutoencoderKL
latents grouped into `flow.entity` entities, the decoder regresses each entity by flow matching, xAR).

`init_backbone_from=<pipeline dir>` starts the decoder's trunk from another paradigm's trained decoder of the same
width (e.g. Token-Shuffle from the default next-token model: its layers, norms and text embeddings) and keeps that
pipeline's caption tokenizer; what does not match (the heads, Token-Shuffle's merge/split, VAR's scale inputs)
starts fresh. Over another image codebook (next-scale from the default), the embedding and logits rows of the text
and special ids are copied and the image rows start fresh.

`paradigm: janus` continues a public checkpoint instead (`mmgen.training.transformers_models`): `init_from` is a
transformers `JanusForConditionalGeneration` directory with its processor; the language model and the generation
embeddings, aligner and head train on the images' codes from its own frozen VQ-VAE (images resized to its
generation size), captions prompted as its processor does; `<out_dir>/pipeline` is the fine-tuned model and
processor in the transformers layout (`from_pretrained`). `tokenizer`, `model`, `flow` and `max_text_len` do not apply.

`init_from=<a converted LlamaGen c2i directory>` (`mmgen convert llamagen`) fine-tunes it with LlamaGen's own loss
on a labelled folder (`mmgen.training.llamagen`: `data.name=imagefolder data.root=DIR`, the sorted class directories
being its class ids; the VQ frozen, images at the model's size); `<out_dir>/pipeline` is a `LlamaGenPipeline`.
A converted VAR directory is refused: its next-scale decoder has no training loop here.

`condition.kind` (`mmgen.conditioning`) is what the decoder is conditioned on, with any paradigm: `caption` (the
default: the data's captions through a word-level tokenizer), `class` (the data's class labels: one prefix token per
image, whatever `max_text_len` says, and <null> for CFG; needs labelled data: `data.name=imagefolder
data.root=DIR` for an ImageNet-style `DIR/train/<class>/*.JPEG|png` folder, or `data.name=fashion_mnist`),
`unconditional`, or `text_encoder` (the captions through a frozen pretrained encoder, `condition.encoder=DIR` or
`minilm`: its features, cached under the run directory, become the prefix through a trained projection, LlamaGen-T2I):

    python scripts/train_generator.py --config configs/generator_shapes.yaml data.name=imagefolder \
        data.root=data/fashion-folder condition.kind=class
    python scripts/train_generator.py --config configs/generator_shapes_emoji_minilm.yaml   # condition.encoder=minilm

`ett.enabled=true` (next_token on a VQGAN, `mmgen.training.ett`, configs/ett_shapes.yaml) tunes the tokenizer with
the generator (ETT): the decoder reads code vectors through a projector, trained alone for `ett.stage1_steps`, then
with the decoder and the VQGAN on the AR loss plus `ett.rec_weight` x the VQGAN's loss (`ett.loss`); images are
encoded each step instead of cached, and the pipeline is saved with the tuned VQGAN and the projector folded in.

Steps: train the word-level text tokenizer on the captions, encode every training image once with the frozen
tokenizer (cached under the run directory), then the usual loop. Checkpoints every `train.ckpt_every` steps
(safetensors + JSON); a re-run of the same command resumes from the last one. At the end the whole pipeline
is saved to `<out_dir>/pipeline`, loadable with `mmgen generate --model`.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

from mmgen.alignment import AlignmentConfig, AlignmentHead, make_target_encoder
from mmgen.alignment.targets import alignment_targets, cached_alignment_targets
from mmgen.conditioning import ConditionConfig, check_kind, run_conditioning, run_text_encoder
from mmgen.models.text_encoder import CaptionProjection, caption_prefix
from mmgen.paradigms import next_token
from mmgen.paradigms.protocol import FlowConfig, ModelConfig
from mmgen.pipelines import PARADIGMS, load_visual_tokenizer, resolve_paradigm, save_pipeline
from mmgen.pipelines.registry import check_condition
from mmgen.pipelines.transformers_models import transformers_model_type
from mmgen.text import UnifiedVocab
from mmgen.training.checkpoint import init_backbone, latest_checkpoint, read_tensors
from mmgen.training.data import DataConfig, encode_dataset, image_fields, make_dataset, run_text_tokenizer
from mmgen.training.ett import CodebookProjector, ETTConfig, ETTStep, ett_param_groups, fold_projector
from mmgen.training.llamagen import converted_trainer
from mmgen.training.loop import Run, cosine_lr, decay_groups, load_run_config
from mmgen.training.transformers_models import FINETUNE, load_finetune
from tokenizers_vis.protocol import as_visual_tokenizer


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
    # steps after which the whole pipeline is also saved, to <out_dir>/snapshots/step-XXXXXXX (training curves:
    # each snapshot can be evaluated like the final pipeline)
    snapshots: tuple = ()
    # the field's recipe switches (`mmgen.training.loop`), all off by default
    grad_accum: int = 1  # micro-batches of batch_size per optimisation step (Accelerate's accumulate)
    ema_decay: float = 0.0  # > 0: keep an EMA of the decoder weights (checkpointed as ema.safetensors)
    ema_for_sampling: bool = False  # save the EMA weights as the final pipeline instead of the last ones
    gradient_checkpointing: bool = False  # recompute each decoder block's activations in the backward pass
    fsdp_state_dict: str = "full"  # full | sharded: checkpoints of a train.fsdp run as whole tensors or each rank's
    report_to: str = "none"  # none | tensorboard | wandb, beside log.jsonl (pip install 'mmgen[track]')
    resume: str = "latest"  # latest | none | a checkpoint or run directory (also --resume)


@dataclass
class GeneratorRunConfig:
    paradigm: str = "next_token"  # a name in mmgen.pipelines.PARADIGMS, or a transformers model type to fine-tune
    tokenizer: str = "runs/vqgan/final"  # a saved visual tokenizer directory of the paradigm's kind
    max_text_len: int = 24
    # a saved pipeline to continue from (fine-tune / train longer under a new schedule): its decoder weights and
    # caption tokenizer start the run, the optimizer starts fresh; the decoder config must match
    init_from: str | None = None
    # a saved pipeline of any paradigm whose decoder trunk starts this run's (`mmgen.training.checkpoint.
    # init_backbone`: layers, norms and embeddings that match in name and shape; heads and paradigm parts start
    # fresh) and whose caption tokenizer is kept, so its word embeddings mean the same words
    init_backbone_from: str | None = None
    model: ModelConfig = field(default_factory=ModelConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)
    condition: ConditionConfig = field(default_factory=ConditionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    alignment: AlignmentConfig = field(default_factory=AlignmentConfig)
    ett: ETTConfig = field(default_factory=ETTConfig)  # end-to-end tokenizer tuning (`mmgen.training.ett`), off


class TrainStep(torch.nn.Module):
    """The whole training forward (paradigm loss, plus the alignment head's loss) as one module. Accelerate wraps
    this in DDP: the paradigms call several of the decoder's methods (the flow head, FlowAR's velocity net), and
    only parameters used inside the wrapped forward get their gradients all-reduced."""

    def __init__(self, cfg: GeneratorRunConfig, paradigm, layout, model, head=None, projection=None):
        super().__init__()
        self.cfg, self.paradigm, self.layout = cfg, paradigm, layout
        self.model, self.head, self.projection = model, head, projection

    def forward(self, batch, target_global=None, target_patches=None, caption_features=None):
        """(loss, decoder loss, alignment loss or None). `caption_features` (B, L, E): a text_encoder run's
        features of the batch's captions, projected into the decoder's text embedding for this forward."""
        if caption_features is None:
            return self.losses(batch, target_global, target_patches)
        with caption_prefix(self.model, self.projection(caption_features)):
            return self.losses(batch, target_global, target_patches)

    def losses(self, batch, target_global, target_patches):
        if self.head is None:
            loss = self.paradigm.loss_fn(self.model, batch, self.layout)
            return loss, loss, None
        align = self.cfg.alignment
        ar_loss, hidden = self.paradigm.loss_and_image_hidden(self.model, batch, self.layout, align.layer)
        if target_patches is not None and hidden.shape[1] != target_patches.shape[1]:
            hidden = hidden[:, -target_patches.shape[1]:]  # per-patch targets live on the finest scale's grid
        align_loss = self.head(hidden, target_global, target_patches)
        return ar_loss + align.weight * align_loss, ar_loss, align_loss


def finetune(cfg: GeneratorRunConfig, trainer=None) -> None:
    """Continue the image generation of a released checkpoint `init_from`: a public transformers checkpoint (model
    type `paradigm`), or the converted checkpoint whose `trainer` (`converted_trainer`) is given."""
    if cfg.init_from is None:
        raise ValueError(f"paradigm {cfg.paradigm!r} needs init_from=<a transformers checkpoint directory>")
    if cfg.alignment.type != "none":
        raise ValueError(f"fine-tuning init_from={cfg.init_from!r} takes no alignment.type")

    converted = trainer is not None

    def load():  # the checkpoint as saved; a resume overwrites what trains
        return converted_trainer(cfg.paradigm, cfg.init_from) if converted else \
            load_finetune(cfg.paradigm, cfg.init_from)

    trainer = trainer if converted else load()
    cfg.data.image_size = trainer.image_size  # the model's generation size (and the record in config.json)
    run = Run(cfg, cfg.train, f"fine-tune {getattr(trainer, 'family', cfg.paradigm)}")
    out, device = run.out, run.device
    trainer.to(device)
    dataset = make_dataset(cfg.data)
    prompts = trainer.conditions(dataset)  # per image: prompt ids (Janus) or a class label (LlamaGen)
    key = hashlib.sha256(json.dumps([image_fields(cfg.data), str(Path(cfg.init_from).resolve()),
                                     cfg.paradigm]).encode()).hexdigest()
    codes = encode_dataset(lambda imgs: trainer.encode_images(imgs.to(device)), dataset, out / "codes.safetensors",
                           key, batch_size=16, workers=cfg.train.data_workers)
    params = [(n, p) for n, p in trainer.named_parameters() if p.requires_grad]
    opt = torch.optim.AdamW(decay_groups((p for _, p in params), cfg.train.weight_decay), lr=cfg.train.lr,
                            betas=cfg.train.betas)
    run.resume(trainer.trained_modules())
    train_step, opt = run.prepare(trainer, {"opt": opt}, ema=trainer.model)
    run.print(f"trained parameters: {sum(p.numel() for _, p in params) / 1e6:.2f} M of "
              f"{sum(p.numel() for p in trainer.parameters()) / 1e6:.2f} M; {codes.shape[1]} codes per image "
              f"({trainer.image_size} px); {len(dataset)} images")

    def step(i: int) -> dict:
        idx = run.indices(i, len(dataset))
        drop = torch.rand(len(idx)) < cfg.train.cond_drop_prob
        batch = trainer.batch([prompts[k] for k in idx], codes[idx], drop)
        lr = cosine_lr(i, cfg.train.lr, cfg.train.warmup, cfg.train.steps, cfg.train.min_lr_ratio)
        for group in opt.param_groups:
            group["lr"] = lr
        loss = train_step(**{k: v.to(device) for k, v in batch.items()})
        run.accelerator.backward(loss)
        # the optimizer's parameters: fully_shard (train.fsdp) replaced the module's
        grad_norm = run.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], cfg.train.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return {"loss": loss.detach(), "lr": lr, "grad_norm": grad_norm}

    run.train(step, digits={"lr": None, "grad_norm": 4})
    if run.is_main:
        if run.sharded:  # parameters are shards: the trained modules' whole weights from the last checkpoint
            trainer = load()
            for name, module in trainer.trained_modules().items():
                module.load_state_dict(read_tensors(latest_checkpoint(out), name))
        run.for_sampling(trainer.model)
        trainer.eval().cpu().save_pretrained(out / "pipeline")
        run.print(f"saved the fine-tuned model to {out / 'pipeline'}")


def init_source(cfg, kind: str, run) -> tuple[str | None, Path | None]:
    """The directory a run starts its decoder from (init_from / init_backbone_from), checked; a caption model's word
    ids come with it."""
    if cfg.init_from is not None and cfg.init_backbone_from is not None:
        raise ValueError("set init_from (the same decoder, continued) or init_backbone_from (another decoder's "
                         "trunk), not both")
    init_arg = "init_from" if cfg.init_from is not None else "init_backbone_from"
    if (init := cfg.init_from or cfg.init_backbone_from) is None:
        return None, None
    init_dir = Path(init)
    if not (init_dir / "transformer" / "diffusion_pytorch_model.safetensors").is_file():
        hint = (f"; to fine-tune its {family} checkpoint set paradigm={family} (configs/{family}_finetune.yaml)"
                if (family := transformers_model_type(init_dir)) in FINETUNE else "")
        raise FileNotFoundError(f"{init_arg} {init!r} is not a saved pipeline directory (no transformer/){hint}")
    if kind == "caption" and run.is_main and not (run.out / "text_tokenizer" / "tokenizer.json").is_file():
        shutil.copytree(init_dir / "tokenizer", run.out / "text_tokenizer", dirs_exist_ok=True)  # keep its word ids
    run.accelerator.wait_for_everyone()
    return init, init_dir


def run_condition(cfg, kind: str, dataset, run):
    """(conditioning, text tokenizer, condition ids per image, a text_encoder run's cached features or None)."""
    text_tokenizer = captions = None
    if kind in ("caption", "text_encoder"):
        captions = [dataset[i]["caption"] for i in range(len(dataset))] if not hasattr(dataset, "captions") \
            else list(dataset.captions)
    if kind == "caption":
        text_tokenizer = run_text_tokenizer(cfg.data, captions, run.out, run.is_main)
    if kind == "text_encoder":  # the frozen encoder's features of every caption, computed once
        conditioning, features = run_text_encoder(cfg.condition, captions, cfg.max_text_len,
                                                  run.out / "caption_features.safetensors", run.device)
        return conditioning, conditioning.tokenizer, features.ids(), features
    # condition ids per image: caption words, [1 + class], or [] (<null>), in the vocabulary's first rows
    conditioning, text_ids = run_conditioning(cfg.condition, dataset, captions, text_tokenizer, cfg.max_text_len)
    return conditioning, text_tokenizer, text_ids, None


def alignment_parts(cfg, name: str, tok, vq, dataset, out: Path, device):
    """(head, target encoder, cached targets, target grid) of representation alignment; None where it is off."""
    align = cfg.alignment
    align.validate(cfg.model.n_layers)
    if align.type != "none" and cfg.model.shuffle_window != 1:
        raise ValueError(f"alignment.type={align.type!r} is not available with model.shuffle_window="
                         f"{cfg.model.shuffle_window} (one hidden state covers s x s tokens)")
    alignable = [n for n, e in PARADIGMS.items() if e.alignable]
    if align.type != "none" and name not in alignable:
        raise ValueError(f"alignment.type={align.type!r} needs a discrete paradigm ({', '.join(alignable)}); "
                         f"paradigm is {cfg.paradigm!r}")
    # the image grid alignment targets live on: the token grid, or next-scale's finest scale
    grid = (tok.scales[-1],) * 2 if tok.kind == "scale_codes" else tuple(tok.token_shape[-2:])
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
    return head, encoder, targets, grid


def initialise(cfg, model, projection, init: str, init_dir: Path, shared_rows: int, run) -> None:
    """A fresh run's decoder from init_from (the same decoder, strictly) or init_backbone_from (another's trunk)."""
    weights = load_file(init_dir / "transformer" / "diffusion_pytorch_model.safetensors")
    if cfg.init_from is not None:
        model.load_state_dict({k: v.float() for k, v in weights.items()})  # strict: same architecture
        if projection is not None and (init_dir / "text_projection").is_dir():  # a text_encoder model's
            projection.load_state_dict(load_file(init_dir / "text_projection" / "diffusion_pytorch_model.safetensors"))
        run.print(f"decoder initialised from {init}")
        return
    # the same caption ids; class rows and the specials after them start fresh
    copied, fresh = init_backbone(model, weights, shared_rows=shared_rows)
    run.print(f"decoder trunk initialised from {init}: {len(copied)} tensors copied, {len(fresh)} fresh "
              f"({', '.join(fresh) or 'none'}), {len(weights) - len(copied)} of its {len(weights)} not used")


def final_weights(run, model, projection, sampled):
    """The decoder and projection the pipeline is saved with: a sharded run's rebuilt from its last checkpoint's whole
    weights, else the trained modules (in place: with train.ema_for_sampling, the averaged weights)."""
    if not run.sharded:
        run.for_sampling(sampled)
        return model, projection
    model = type(model).from_config(model.config)
    model.load_state_dict(read_tensors(latest_checkpoint(run.out), "model"))
    if projection is not None:
        projection = CaptionProjection.from_config(projection.config)
        projection.load_state_dict(read_tensors(latest_checkpoint(run.out), "text_projection"))
    return model, projection


def make_optimizer(train, sampled, head, extra_groups=()):
    """AdamW over the sampled modules and the alignment head, weight decay on matrices only; `extra_groups`: more
    parameter groups (ETT's projector and tokenizer)."""
    params = list(sampled.parameters()) + (list(head.parameters()) if head is not None else [])
    return torch.optim.AdamW([*decay_groups(params, train.weight_decay), *extra_groups], lr=train.lr,
                             betas=train.betas)


def step_targets(cfg, head, targets, encoder, dataset, idx, grid, device):
    """(global, patches) alignment targets of the images `idx`: cached, or computed now; (None, None) without."""
    if head is None:
        return None, None
    if targets is None:
        return alignment_targets(encoder, dataset, idx, grid, cfg.alignment.type == "repa", device)
    return targets[0][idx].to(device).float(), targets[1][idx].to(device).float() if targets[1] is not None else None


def ett_forward(cfg, module, train_step, dataset, idx, texts, caption_features, i: int, device):
    """One ETT forward on the images `idx` (rendered now: the tokenizer's codes change in stage 2) -> (loss, logs);
    `module` is the ETTStep that `train_step` runs, prepared."""
    stage2 = i >= cfg.ett.stage1_steps
    module.set_stage(stage2)
    images = torch.stack([dataset[k]["image"] for k in idx]).to(device)
    loss, ar_loss, tok_loss = train_step(images, texts, stage2, cfg.train.cond_drop_prob, i, caption_features)
    logs = {"stage": 2 if stage2 else 1, "ar_loss": ar_loss.detach()}
    return loss, logs if tok_loss is None else logs | {"tok_loss": tok_loss.detach()}


def snapshot_steps(train, sharded: bool) -> set[int]:
    """train.snapshots, checked: steps in 1..train.steps of an unsharded run."""
    snapshots = {int(k) for k in train.snapshots}
    if snapshots and (sharded or min(snapshots) < 1 or max(snapshots) > train.steps):
        raise ValueError(f"train.snapshots={sorted(snapshots)} must be steps in 1..train.steps={train.steps}, "
                         f"in an unsharded run (train.fsdp=false)")
    return snapshots


def save_run_pipeline(entry, vq, conditioning, kind: str, text_tokenizer, decoder, directory: Path,
                      text_projection=None, ett=None) -> None:
    """The run's pipeline (decoder, its visual tokenizer and conditioning), saved atomically with checksums.json.
    `ett`: (projector, image offset) of an ETT run, folded into `decoder`'s image-id rows first (in place)."""
    if ett is not None:
        fold_projector(decoder, vq, *ett)
    extra = {"conditioning": conditioning.config()} if kind != "caption" else {}
    if kind == "unconditional":
        extra["default_guidance_scale"] = 1.0  # nothing to guide by
    if kind == "text_encoder":
        extra |= {"text_encoder": conditioning.text_encoder.cpu(), "text_projection": text_projection.eval().cpu()}
    pipe = entry.pipeline(transformer=decoder.eval().cpu(), tokenizer=text_tokenizer,
                          max_text_len=conditioning.max_len, **{entry.component: vq.cpu()}, **extra)
    save_pipeline(pipe, directory)


def cached_codes(cfg, tok, dataset, out: Path, device) -> torch.Tensor:
    """Every training image's tokens, encoded once by the frozen tokenizer and cached under the run directory
    (paradigms reading the same kind of tokens share the cache)."""
    key = hashlib.sha256(json.dumps([image_fields(cfg.data), cfg.tokenizer, tok.kind]).encode()).hexdigest()
    return encode_dataset(lambda imgs: tok.encode_tokens(imgs.to(device)), dataset, out / "codes.safetensors", key,
                          workers=cfg.train.data_workers)


def build_decoder(cfg, paradigm, tok, conditioning, features):
    """(vocab, layout, decoder, a text_encoder run's caption projection or None, the sampled module)."""
    vocab = UnifiedVocab(text_vocab_size=conditioning.vocab_size, image_vocab_size=tok.vocab_size)
    layout = paradigm.make_layout(tok, vocab, conditioning.max_len, cfg.model, cfg.flow)
    model = paradigm.make_model(layout, cfg.model, cfg.flow)
    projection = CaptionProjection(conditioning.feature_dim, cfg.model.dim) if features is not None else None
    # what the pipeline samples with: the decoder (and a text_encoder run's projection), averaged by EMA as one
    sampled = model if projection is None else torch.nn.ModuleDict({"transformer": model, "projection": projection})
    return vocab, layout, model, projection, sampled


def main(argv=None):
    cfg = load_run_config(GeneratorRunConfig, __doc__, argv)
    if cfg.paradigm in FINETUNE:
        return finetune(cfg)
    if (trainer := converted_trainer(cfg.paradigm, cfg.init_from)) is not None:  # LlamaGen; VAR is refused
        return finetune(cfg, trainer)
    run = Run(cfg, cfg.train, "train generator")
    out, device = run.out, run.device

    name = resolve_paradigm(cfg.paradigm, cfg.model.shuffle_window)
    entry = PARADIGMS[name]
    paradigm = entry.module
    vq = load_visual_tokenizer(name, cfg.tokenizer).to(device)  # the pipeline's component, float32 and frozen
    tok = as_visual_tokenizer(vq)  # its protocol view: encode_tokens, token_shape, vocab_size
    kind = check_kind(cfg.condition.kind, cfg.condition.encoder)
    check_condition(name, kind)
    cfg.ett.validate(name, vq, cfg.train, cfg.alignment.type, run.world)
    ett = cfg.ett.enabled
    dataset = make_dataset(cfg.data)
    init, init_dir = init_source(cfg, kind, run)
    conditioning, text_tokenizer, text_ids, features = run_condition(cfg, kind, dataset, run)

    codes = None if ett else cached_codes(cfg, tok, dataset, out, device)  # ETT encodes each step's images anew
    vocab, layout, model, projection, sampled = build_decoder(cfg, paradigm, tok, conditioning, features)
    head, encoder, targets, grid = alignment_parts(cfg, name, tok, vq, dataset, out, device)
    projector = CodebookProjector(vq.quantizer.code_dim, cfg.model.dim, cfg.ett.projector_hidden) if ett else None
    opt = make_optimizer(cfg.train, sampled, head, ett_param_groups(cfg.train, cfg.ett, vq, projector) if ett else ())
    # built before the resume: the tokenizer loss draws its (unused) discriminator from the RNG the resume restores
    module = ETTStep(cfg.ett, paradigm, layout, model, vq, projector, cfg.ett.make_loss(), projection).to(device) \
        if ett else TrainStep(cfg, paradigm, layout, model, head, projection)
    run.resume({"model": model, "align": head, "text_projection": projection, "ett_projector": projector,
                "vq_model": vq if ett else None})
    if run.ckpt is None and init is not None:
        initialise(cfg, model, projection, init, init_dir, vocab.image_offset if kind == "caption" else 0, run)
    if ett:  # what trains at the resumed step: the optimizer state is restored for the parameters that train
        module.set_stage(run.start >= cfg.ett.stage1_steps)
    train_step, opt = run.prepare(module, {"opt": opt}, ema=sampled)
    run.print(f"decoder parameters: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M; "
              f"sequence length {layout.seq_len}; {len(dataset)} images")

    snapshots = snapshot_steps(cfg.train, run.sharded)

    save = functools.partial(save_run_pipeline, entry, vq, conditioning, kind, text_tokenizer,
                             ett=(projector, vocab.image_offset) if ett else None)

    # plain next-token: every text block padded once, on the device (a step then only gathers rows)
    text_table = next_token.TextTable(layout, text_ids, device) if name == "next_token" else None

    def step(i: int) -> dict:
        idx = run.indices(i, len(dataset))
        texts = text_table.rows(idx) if text_table is not None else [text_ids[k] for k in idx]
        caption_features = features.rows(idx, device) if features is not None else None
        lr = cosine_lr(i, cfg.train.lr, cfg.train.warmup, cfg.train.steps, cfg.train.min_lr_ratio)
        for group in opt.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        if ett:
            loss, extra = ett_forward(cfg, module, train_step, dataset, idx, texts, caption_features, i, device)
        else:
            batch = paradigm.build_batch(layout, texts, codes[idx].to(device), cfg.train.cond_drop_prob, tokenizer=tok)
            tg, tp = step_targets(cfg, head, targets, encoder, dataset, idx, grid, device)
            loss, ar_loss, align_loss = train_step(batch, tg, tp, caption_features)
            extra = {} if align_loss is None else {"ar_loss": ar_loss.detach(), "align_loss": align_loss.detach()}
        run.accelerator.backward(loss)
        grad_norm = run.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], cfg.train.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i + 1 in snapshots and run.is_main and run.sync_gradients:  # after the step's last micro-batch
            save(copy.deepcopy(run.accelerator.unwrap_model(model)), out / "snapshots" / f"step-{i + 1:07d}",
                 copy.deepcopy(projection))
            vq.to(device)
        return {"loss": loss.detach(), "lr": lr, "grad_norm": grad_norm} | extra

    run.train(step, digits={"lr": None, "grad_norm": 4, "stage": 0})
    if run.is_main:
        model, projection = final_weights(run, model, projection, sampled)
        save(model, out / "pipeline", projection)
        run.print(f"saved pipeline to {out / 'pipeline'}")


if __name__ == "__main__":
    main()
