"""Tune a next-token pipeline's tokenizer encoder for reverse-cycle consistency: the watermark's detection encoder.

    python scripts/train_rcc.py --config configs/rcc_shapes_emoji.yaml [key.sub=value ...]
    accelerate launch scripts/train_rcc.py --config configs/rcc_shapes_emoji.yaml

A watermark in the generated tokens is read back by encoding the image again, and a VQ encoder does not return
the codes its decoder was given: on the default model decode -> encode keeps about 65-77% of the tokens. As in
Jovanovic et al. 2025 ("Watermarking Autoregressive Image Generation"), a copy of the encoder learns to map
decode(tokens) back to those tokens:

1. codes the generator actually samples: `codes.generated` images drawn by the pipeline (its default guidance)
   for captions of its training data, decoded once by the frozen decoder to 8-bit images (as a detector gets
   them), cached in `<out_dir>/codes.safetensors`; plus `codes.real` real training images with the codes the
   original encoder gives them, so real images keep their reading (and the reconstruction its quality);
2. each step, a batch of those images goes through one random distortion each (`mmgen.training.augment`:
   JPEG 50-95, noise, blur, brightness, down- and up-scaling), and the loss pulls the encoder's continuous
   output in the quantizer's lookup space towards the vectors of the original codes ("hard to soft": a squared
   distance on the l2-normalised vectors, not a token cross-entropy);
3. only the encoder and the lookup projection train; codebook, decoder and generator stay as they are, so
   generation is unchanged. Or, with `train.tune_decoder: true`, the decoder (and its projection out of the
   lookup space) trains too, as in the paper: each step decodes the generated codes with it and passes the
   gradient back through the distortions (rounding and JPEG straight through), while `train.fidelity_weight`
   holds its drawings to the original decoder's and to the real images. Generated tokens are unchanged, their
   pixels move (the report's `generated_psnr_tuned_vs_original`).

Checkpoints every `train.ckpt_every` steps; re-running the same command resumes. At the end the tuned tensors are
written to `<out_dir>/final/<watermark_encoder>` (with a tuned decoder: the whole VQGAN, `final/vq_model`) with a report (`final/metrics.json`: token match after
decode -> encode, clean and distorted, original vs tuned encoder, on held-out generated codes; held-out PSNR of
real images through each encoder). `install: true` also copies the encoder into the pipeline directory and points
its watermark.json at it (`encoder`); with a tuned decoder it replaces the pipeline's VQGAN instead (in the dtype
its files had) and detection reads with that.
"""

from __future__ import annotations

import copy
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm

from mmgen.atomic import atomic_dir, save_file_atomic, write_json_atomic
from mmgen.pipelines import load_pipeline
from mmgen.pipelines.base import WATERMARK_FILE, generators_from_seed, save_detection_encoder
from mmgen.training.augment import DISTORTIONS, distort, distort_differentiable
from mmgen.training.data import DataConfig, make_dataset
from mmgen.training.loop import Run, cosine_lr, load_run_config
from mmgen.watermark import WatermarkConfig
from mmgen.zoo import resolve_model

TUNED = ("encoder.", "quantizer.proj_in.")  # what trains: the encoder and its projection into the lookup space
DECODER = ("quantizer.proj_out.", "decoder.")  # and with train.tune_decoder, the way back to pixels


@dataclass
class CodesConfig:
    generated: int = 4096  # images sampled by the pipeline for training captions (the training set)
    real: int = 1024  # real training images, read by the original encoder
    heldout: int = 256  # generated images kept apart for the report (other captions and seeds)
    batch_size: int = 64  # generation batch
    guidance_scale: float | None = None  # None: the pipeline's own


@dataclass
class TrainConfig:
    out_dir: str = "runs/rcc"
    steps: int = 3000
    batch_size: int = 32
    lr: float = 2e-4
    warmup: int = 100
    real_share: float = 0.25  # share of each batch taken from the real images
    distortions: tuple = tuple(DISTORTIONS)  # drawn uniformly per image; "none" keeps it clean
    ckpt_every: int = 500
    log_every: int = 50
    seed: int = 0
    # also tune the decoder (Jovanovic et al. 2025 tune both): codes that the original decoder draws alike get
    # told apart by small differences it learns to draw, which changes generated pixels; fidelity_weight holds the
    # new decoder to the old one's drawings of the generated codes and to the real images
    tune_decoder: bool = False
    fidelity_weight: float = 100.0


@dataclass
class RCCConfig:
    model: str = "shapes-emoji"  # a NextTokenPipeline directory or shipped model name
    data: DataConfig = field(default_factory=lambda: DataConfig(name="shapes+emoji", size=200000, emoji_repeat=16))
    codes: CodesConfig = field(default_factory=CodesConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    watermark_encoder: str = "watermark_encoder"  # directory name inside the pipeline
    install: bool = False  # copy the tuned encoder into the pipeline and point watermark.json at it


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float images -> uint8, rounded as the pipeline's PNG output is."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def to_float(images: torch.Tensor) -> torch.Tensor:
    return images.float() / 127.5 - 1


@torch.no_grad()
def sample_codes(pipe, captions: list[str], seed: int, batch_size: int, guidance_scale) -> torch.Tensor:
    """Codes (N, h, w) the pipeline samples for `captions`, image i with seed `seed + i`."""
    pipe.set_progress_bar_config(disable=True)
    out = []
    for i in tqdm(range(0, len(captions), batch_size), desc="sample codes"):
        chunk = captions[i:i + batch_size]
        out.append(pipe(prompt=chunk, guidance_scale=guidance_scale, output_type="pt",
                        generator=generators_from_seed(seed + i, len(chunk))).tokens.cpu())
    return torch.cat(out)


@torch.no_grad()
def decode_to_uint8(vq, codes: torch.Tensor, batch_size: int = 128) -> torch.Tensor:
    return torch.cat([to_uint8(vq.decode(codes[i:i + batch_size])) for i in range(0, len(codes), batch_size)])


def build_data(cfg: RCCConfig, pipe, out: Path) -> dict:
    """The cached training and report tensors (`<out_dir>/codes.safetensors`), built on first use."""
    cache = out / "codes.safetensors"
    key = json.dumps({"model": str(resolve_model(cfg.model)), "data": vars(cfg.data), "codes": vars(cfg.codes)},
                     sort_keys=True)
    if cache.is_file():
        cached = load_file(cache)
        if bytes(cached.pop("key").tolist()).decode() == key:
            return cached
    c, vq = cfg.codes, pipe.vq_model
    dataset = make_dataset(cfg.data, "train")
    g = torch.Generator().manual_seed(cfg.train.seed)
    picks = torch.randperm(len(dataset), generator=g)[:c.generated + c.heldout + c.real].tolist()
    captions = dataset.captions
    gen = sample_codes(pipe, [captions[i] for i in picks[:c.generated + c.heldout]], cfg.train.seed,
                       c.batch_size, c.guidance_scale)
    real = torch.stack([dataset[i]["image"] for i in tqdm(picks[c.generated + c.heldout:], desc="real images")])
    real_codes = torch.cat([vq.encode(real[i:i + 128]) for i in range(0, len(real), 128)])
    tensors = {"codes": gen[:c.generated], "images": decode_to_uint8(vq, gen[:c.generated]),
               "heldout_codes": gen[c.generated:], "heldout_images": decode_to_uint8(vq, gen[c.generated:]),
               "real_codes": real_codes, "real_images": to_uint8(real)}
    save_file_atomic({**{k: v.contiguous() for k, v in tensors.items()},
                      "key": torch.tensor(list(key.encode()), dtype=torch.uint8)}, cache)
    return tensors


def rcc_loss(vq, images: torch.Tensor, codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Squared distance of the encoder's lookup-space vectors to the codes' vectors, summed over the vector and
    averaged over positions; and the share of positions whose nearest code is the original one."""
    z_BhwD = vq.quantizer.project(vq.encoder(images))
    target = vq.quantizer.codebook[codes]
    loss = (z_BhwD - target).pow(2).sum(-1).mean()
    with torch.no_grad():
        ids = vq.quantizer.nearest(z_BhwD.reshape(-1, z_BhwD.shape[-1]), vq.quantizer.codebook)
        match = (ids == codes.reshape(-1)).float().mean()
    return loss, match


@torch.no_grad()
def match_report(vq, images: torch.Tensor, codes: torch.Tensor, seed: int) -> dict:
    """Token match of `vq`'s encoder on `images` (uint8) against `codes`, clean and per distortion (one fixed
    draw of strengths per image, the same for every encoder compared)."""
    report = {}
    for name in DISTORTIONS:
        g = torch.Generator().manual_seed(seed)
        x = to_float(distort(images, g, (name,)))
        ids = torch.cat([vq.encode(x[i:i + 128]) for i in range(0, len(x), 128)])
        report["clean" if name == "none" else name] = round(float((ids == codes).float().mean()), 4)
    return report


@torch.no_grad()
def psnr(vq, images: torch.Tensor) -> float:
    x = to_float(images)
    rec = torch.cat([vq.decode(vq.encode(x[i:i + 128])) for i in range(0, len(x), 128)])
    mse = ((to_float(to_uint8(rec)) - x) / 2).pow(2).flatten(1).mean(1)
    return round(float((-10 * torch.log10(mse.clamp_min(1e-10))).mean()), 3)


def fidelity_loss(vq, codes: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean squared error, on the [0, 1] scale, of `vq`'s decoding of `codes` against `target` (uint8); and the
    decoding itself in [0, 1]."""
    x01 = (vq.decoder(vq.quantizer.lookup(codes)).clamp(-1, 1) + 1) / 2
    return (x01 - target.float() / 255).pow(2).mean(), x01


def check_train(t):
    """train's RCC fields checked at the edge."""
    if not 0 <= t.real_share < 1:
        raise SystemExit(f"train.real_share must be in [0, 1), got {t.real_share}")
    if t.fidelity_weight < 0:
        raise SystemExit(f"train.fidelity_weight must be >= 0, got {t.fidelity_weight}")
    unknown = [d for d in t.distortions if d not in DISTORTIONS]
    if unknown or not t.distortions:
        raise SystemExit(f"train.distortions must be a non-empty subset of {', '.join(DISTORTIONS)}; got "
                         f"{list(t.distortions)}")
    return t


def heldout_report(original, tuned, data: dict, tune_decoder: bool) -> dict:
    """Token match on held-out generated images and PSNR on real ones, original against tuned; with a tuned decoder
    also how far its drawing of the same codes moves from the original's."""
    heldout = data["heldout_images"]
    if tune_decoder:  # detection reads what the tuned decoder draws
        tuned_heldout = decode_to_uint8(tuned, data["heldout_codes"])
        drift = ((tuned_heldout.float() - heldout.float()) / 255).pow(2).flatten(1).mean(1)
    report = {"heldout_generated_images": len(data["heldout_codes"]), "tune_decoder": tune_decoder,
              "token_match": {"original": match_report(original, heldout, data["heldout_codes"], 1),
                              "tuned": match_report(tuned, tuned_heldout if tune_decoder else heldout,
                                                    data["heldout_codes"], 1)},
              "real_psnr": {"original": psnr(original, data["real_images"][:256]),
                            "tuned": psnr(tuned, data["real_images"][:256])}}
    if tune_decoder:  # how far generated images move: tuned against original drawing of the same codes
        report["generated_psnr_tuned_vs_original"] = round(
            float((-10 * torch.log10(drift.clamp_min(1e-10))).mean()), 3)
    return report


def main(argv=None) -> None:
    cfg = load_run_config(RCCConfig, __doc__, argv)
    t = check_train(cfg.train)
    run = Run(cfg, t, "train rcc")
    pipe = load_pipeline(cfg.model)
    if getattr(pipe, "vq_model", None) is None or not hasattr(pipe.vq_model, "quantizer"):
        raise SystemExit(f"model {cfg.model!r} is not a next-token pipeline over a VQGAN; reverse-cycle tuning "
                         f"needs one (its encoder, quantizer and decoder)")
    data = build_data(cfg, pipe, run.out) if run.is_main else None
    run.accelerator.wait_for_everyone()
    if data is None:
        data = build_data(cfg, pipe, run.out)  # the other ranks read the cache rank 0 wrote
    original = pipe.vq_model.eval().requires_grad_(False)
    vq = copy.deepcopy(original)
    tuned_prefixes = TUNED + DECODER if t.tune_decoder else TUNED
    for name, p in vq.named_parameters():
        p.requires_grad_(name.startswith(tuned_prefixes))
    run.resume({"vq": vq})
    params = [p for p in vq.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=t.lr, weight_decay=0.0)
    model, opt = run.prepare(vq, {"opt": opt})
    model.train()
    n_real = round(t.batch_size * t.real_share)

    def step(i):
        lr = cosine_lr(i, t.lr, t.warmup, t.steps)
        for group in opt.param_groups:
            group["lr"] = lr
        g = torch.Generator().manual_seed(t.seed * 1_000_003 + i * run.world + run.rank)
        gi = torch.randint(len(data["codes"]), (t.batch_size - n_real,), generator=g)
        ri = torch.randint(len(data["real_codes"]), (n_real,), generator=g)
        images = torch.cat([data["images"][gi], data["real_images"][ri]])
        codes = torch.cat([data["codes"][gi], data["real_codes"][ri]]).to(run.device)
        vq_now = run.accelerator.unwrap_model(model)
        if not t.tune_decoder:
            x = to_float(distort(images, g, tuple(t.distortions))).to(run.device)
            loss, match = rcc_loss(vq_now, x, codes)
            logs = {}
        else:
            # generated codes are drawn by the decoder being tuned (its drawing is what detection will read),
            # real images are read as they are; both through the distortions, with gradients
            fid_gen, drawn = fidelity_loss(vq_now, codes[:len(gi)], images[:len(gi)].to(run.device))
            fid_real = fidelity_loss(vq_now, codes[len(gi):], images[len(gi):].to(run.device))[0] if n_real else 0.0
            x01 = torch.cat([drawn, images[len(gi):].to(run.device).float() / 255])
            cycle, match = rcc_loss(vq_now, distort_differentiable(x01, g, tuple(t.distortions)) * 2 - 1, codes)
            loss = cycle + t.fidelity_weight * (fid_gen + fid_real)
            logs = {"cycle": cycle.detach(), "fid_gen": fid_gen.detach()}
        opt.zero_grad(set_to_none=True)
        run.accelerator.backward(loss)
        opt.step()
        return {"loss": loss.detach(), "match": match, "lr": lr, **logs}

    run.train(step, digits={"lr": None}, show=("loss", "match"))
    if not run.is_main:
        return
    tuned = run.accelerator.unwrap_model(model).eval()
    report = heldout_report(original, tuned, data, t.tune_decoder)
    final = run.out / "final"
    info = {"steps": t.steps, "trained_by": "scripts/train_rcc.py", "model": cfg.model}
    if t.tune_decoder:
        with atomic_dir(final / "vq_model") as tmp:
            tuned.save_pretrained(tmp)
    else:
        save_detection_encoder(tuned, final / cfg.watermark_encoder, TUNED, info)
    write_json_atomic(final / "metrics.json", report)
    print(json.dumps(report))
    if cfg.install:
        if t.tune_decoder:
            install_tokenizer(resolve_model(cfg.model), final / "vq_model")
        else:
            install(resolve_model(cfg.model), final / cfg.watermark_encoder, cfg.watermark_encoder)


def install_tokenizer(pipe_dir: Path, tokenizer_dir: Path) -> None:
    """Replace the pipeline's VQGAN (encoder and decoder tuned together) in the dtype its files had, and let
    detection read with it: watermark.json's separate detection encoder, if any, is dropped."""
    from mmgen.safe_save import write_checksums

    pipe = load_pipeline(pipe_dir)
    stored = next(iter(load_file(next((pipe_dir / "vq_model").glob("*.safetensors"))).values()))
    tuned = type(pipe.vq_model).from_pretrained(tokenizer_dir, torch_dtype=stored.dtype)  # float16 in the zoo
    with atomic_dir(pipe_dir / "vq_model") as tmp:
        tuned.save_pretrained(tmp)
    path = pipe_dir / WATERMARK_FILE
    if path.is_file():
        config = WatermarkConfig.load(path)
        if config.encoder is not None:
            shutil.rmtree(pipe_dir / config.encoder, ignore_errors=True)
            config.encoder = None
            config.save(path)
    write_checksums(pipe_dir)


def install(pipe_dir: Path, encoder_dir: Path, name: str) -> None:
    """Copy the tuned encoder into the pipeline directory, point watermark.json at it, refresh the checksums."""
    from mmgen.safe_save import write_checksums

    target = pipe_dir / name
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(encoder_dir, target)
    path = pipe_dir / WATERMARK_FILE
    config = WatermarkConfig.load(path) if path.is_file() else None
    if config is None:
        config = load_pipeline(pipe_dir).watermark_config()
    config.encoder = name
    config.save(path)
    write_checksums(pipe_dir)


if __name__ == "__main__":
    main()
