"""The watermark suite of `mmgen bench --suite watermark`: robustness under image attacks, and the watermark's cost.

Each attack maps a PIL image to a PIL image of the same size, deterministically for a seed. `overhead` times
watermarked sampling against plain sampling of the same model in the same process. The suite lives with the
benchmarks, not in `mmgen.watermark`, because it drives a pipeline (`mmgen.watermark` sits below the pipelines and
knows only tokens).
"""

from __future__ import annotations

import io
import statistics
import time

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageFilter
from torchmetrics.classification import BinaryAUROC
from tqdm.auto import tqdm

from mmgen.bench.common import distinct_prompts, guidance, synchronize
from mmgen.data.shapes import heldout_prompts
from mmgen.paradigms import next_token
from mmgen.pipelines.base import generators_from_seed
from mmgen.sampling.logits import SamplingConfig
from mmgen.sampling.sjd import SJDConfig
from mmgen.text import encode_prompts
from mmgen.watermark import METHODS, WatermarkProcessor, detect_tokens, detect_tokens_combined


def jpeg(quality: int):
    def attack(im: Image.Image, seed: int = 0) -> Image.Image:
        buf = io.BytesIO()
        im.convert("RGB").save(buf, format="JPEG", quality=quality)
        return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    return attack


def gaussian_noise(sigma: float):
    def attack(im: Image.Image, seed: int = 0) -> Image.Image:
        a = np.asarray(im.convert("RGB"), dtype=np.float64) / 255
        a = a + np.random.default_rng(seed).normal(0, sigma, a.shape)
        return Image.fromarray((a.clip(0, 1) * 255).round().astype(np.uint8))
    return attack


def blur(radius: float):
    return lambda im, seed=0: im.filter(ImageFilter.GaussianBlur(radius))


def resize(scale: float):
    def attack(im: Image.Image, seed: int = 0) -> Image.Image:
        w, h = im.size
        small = im.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BILINEAR)
        return small.resize((w, h), Image.BILINEAR)
    return attack


def crop_resize(keep: float):
    def attack(im: Image.Image, seed: int = 0) -> Image.Image:
        w, h = im.size
        cw, ch = round(w * keep), round(h * keep)
        left, top = (w - cw) // 2, (h - ch) // 2
        return im.crop((left, top, left + cw, top + ch)).resize((w, h), Image.BICUBIC)
    return attack


def brightness(factor: float):
    return lambda im, seed=0: ImageEnhance.Brightness(im).enhance(factor)


ATTACKS = {
    "none": lambda im, seed=0: im,
    "jpeg_90": jpeg(90), "jpeg_75": jpeg(75), "jpeg_50": jpeg(50),
    "noise_0.05": gaussian_noise(0.05),
    "blur_1": blur(1.0),
    "resize_0.5": resize(0.5),
    "crop_0.875": crop_resize(0.875),
    "brightness_1.2": brightness(1.2),
    # moves every token to another position: a raster watermark read without synchronisation has no defence
    "flip": lambda im, seed=0: im.transpose(Image.Transpose.FLIP_LEFT_RIGHT),
}


SAMPLERS = ("ar", "ar_compiled", "sjd")  # what the suite times the watermark against: eager AR, compiled AR, SJD


def detection_row(wm_tokens: torch.Tensor, plain: torch.Tensor, tokens: torch.Tensor, cfg, key: str,
                  fpr: float, order=None, set_sizes: tuple[int, ...] = ()) -> dict:
    """One method x attack: TPR and FPR at `fpr`, the z-score's AUC, and how many of the generated `tokens` (and
    their symbols) the re-tokenized marked images `wm_tokens` kept. `order`: the model's key order
    (`pipe.watermark_key_order()`; None for raster). `set_sizes`: also the pooled test over sets of that many
    images (consecutive ones; sizes above the image count are left out), as `sets`."""
    det_w, det_p = detect_tokens(wm_tokens, cfg, key, order), detect_tokens(plain, cfg, key, order)
    scores = torch.tensor([d.score for d in det_w] + [d.score for d in det_p])
    labels = torch.tensor([1] * len(det_w) + [0] * len(det_p))
    row = {
        "tpr": sum(d.p_value < fpr for d in det_w) / len(det_w),
        "fpr": sum(d.p_value < fpr for d in det_p) / len(det_p),
        "auc": round(float(BinaryAUROC()(scores, labels)), 4),
        "token_match": round(float((wm_tokens == tokens).float().mean()), 4),
        "symbol_match": round(float((cfg.symbols(wm_tokens) == cfg.symbols(tokens)).float().mean()), 4),
        "scored_positions": round(sum(d.scored for d in det_w) / len(det_w), 1),
    }
    sets = {str(size): set_detection(wm_tokens, plain, cfg, key, fpr, size, order) for size in set_sizes
            if size <= min(len(wm_tokens), len(plain))}
    return {**row, "sets": sets} if sets else row


def set_detection(wm_tokens: torch.Tensor, plain: torch.Tensor, cfg, key: str, fpr: float, size: int,
                  order=None) -> dict:
    """Set-level detection (`detect_tokens_combined`) over consecutive sets of `size` images: the fraction of
    marked sets and of unmarked sets with p < fpr."""
    def flagged(tokens):
        chunks = [tokens[i:i + size] for i in range(0, len(tokens) - size + 1, size)]
        return [detect_tokens_combined(c, cfg, key, order).p_value < fpr for c in chunks]

    hits, false = flagged(wm_tokens), flagged(plain)
    return {"sets": len(hits), "tpr": sum(hits) / len(hits), "unmarked_sets": len(false),
            "fpr": sum(false) / len(false)}


def attack_suite(pipe, n_images: int = 100, key: str = "mmgen-bench-key", fpr: float = 0.01, seed: int = 0,
                 guidance_scale: float | None = None, batch_size: int = 25, configs: dict | None = None,
                 delta: float | None = None, progress: bool = True, overhead_repeats: int = 7,
                 set_sizes: tuple[int, ...] = ()) -> dict:
    """Generate n_images per method with the watermark and n_images without, attack, re-tokenize, detect.

    Per method and attack: TPR at the nominal FPR (p-value < fpr), the empirical FPR on the unwatermarked
    images, AUC of the z-score (watermarked vs not), and the re-tokenization match rate of token and symbol.
    Row "tokens" detects on the generated tokens themselves (no decoding): the ceiling without mismatch.
    `guidance_scale` None: the model's own; `delta`: the KGW rows' strength (None: the config's). The report's
    "overhead" is `overhead` at batch 1 and 8 over `overhead_repeats` repeats (0: not measured). `set_sizes`: each
    row also gives set-level detection over that many images pooled (`set_detection`)."""
    if n_images == 0:  # the overhead block alone
        return {"n_images": 0, "overhead": overhead(pipe, repeats=overhead_repeats or 7, samplers=SAMPLERS,
                                                     guidance_scale=guidance_scale, key=key, seed=seed,
                                                     progress=progress)}
    base = pipe.watermark_config()
    if configs is None:
        # KGW is tested with its own statistic, the green-list count
        configs = {m: base.variant(m, delta if m.startswith("kgw") else None) for m in METHODS}
    prompts = heldout_prompts(n_images, seed=seed)
    pipe.set_progress_bar_config(disable=True)
    if guidance_scale is None:
        guidance_scale = pipe.config.default_guidance_scale

    def make(wm_config):
        saved = pipe.watermark
        pipe.watermark = wm_config
        images, tokens = [], []
        try:
            for i in range(0, n_images, batch_size):
                chunk = prompts[i:i + batch_size]
                out = pipe(prompt=chunk, guidance_scale=guidance_scale,
                           generator=generators_from_seed(seed + i, len(chunk)),
                           watermark_key=key if wm_config is not None else None)
                images.extend(out.images)
                tokens.append(out.tokens.flatten(1).cpu())
        finally:
            pipe.watermark = saved
        return images, torch.cat(tokens)

    def encode(images):
        return pipe.retokenize(images).cpu()

    bar = tqdm(total=(len(configs) + 1) * (len(ATTACKS) + 1), desc="watermark attacks", disable=not progress)
    plain_images, plain_tokens = make(None)
    plain_attacked = {}
    for name, attack in ATTACKS.items():
        plain_attacked[name] = encode([attack(im, seed + j) for j, im in enumerate(plain_images)])
        bar.update()
    bar.update()

    report = {"n_images": n_images, "fpr": fpr, "guidance_scale": guidance_scale, "key_context": base.context,
              "num_clusters": base.num_clusters,
              "clustering": base.clustering, "keying": base.keying, "statistic": base.statistic,
              "kgw_delta": {m: c.delta for m, c in configs.items() if m.startswith("kgw")},
              "detection_encoder": base.encoder, "methods": {}}
    for method, cfg in configs.items():
        images, tokens = make(cfg)
        rows = {}
        conditions = {"tokens": (tokens, plain_tokens)}
        for name, attack in ATTACKS.items():
            conditions[name] = (encode([attack(im, seed + j) for j, im in enumerate(images)]), plain_attacked[name])
            bar.update()
        for name, (wm_tokens, plain) in conditions.items():
            rows[name] = detection_row(wm_tokens, plain, tokens, cfg, key, fpr, pipe.watermark_key_order(),
                                       set_sizes)
        bar.update()
        report["methods"][method] = rows
    bar.close()
    if overhead_repeats:
        report["overhead"] = overhead(pipe, repeats=overhead_repeats, samplers=SAMPLERS,
                                      guidance_scale=guidance_scale, key=key, seed=seed, progress=progress)
    return report


class _Timed:
    """A watermark processor that adds the seconds spent in it (its queued device work waited for) to `seconds`."""

    def __init__(self, processor: WatermarkProcessor, device):
        self.processor, self.device, self.seconds = processor, device, 0.0

    def __call__(self, *args):
        return self._time(self.processor, *args)

    def keyed_by(self, *args):
        return self._time(self.processor.keyed_by, *args)

    def _time(self, fn, *args):
        synchronize(self.device)
        t0 = time.perf_counter()
        out = fn(*args)
        synchronize(self.device)
        self.seconds += time.perf_counter() - t0
        return out


@torch.no_grad()
def overhead(pipe, batch_sizes=(1, 8), repeats: int = 7, methods=METHODS, samplers=("ar", "sjd"),
             guidance_scale: float | None = None, key: str = "mmgen-bench-key", seed: int = 0, sjd_window: int = 16,
             progress: bool = True) -> dict:
    """What the watermark costs: the model's tokens sampled without it and with each method (the processor made per
    call, as a pipeline call makes it), by its own paradigm's `generate` (`samplers`: for a next-token model also
    "ar_compiled", the compiled AR step, and "sjd"), interleaved repeat by repeat with the same prompt and seeds;
    median seconds over `repeats` after a warm-up. `ratio`: watermarked / plain seconds (the goal: <= 1.05 at
    batch 8); `processor_share`: the share of the watermarked call spent inside the processor, timed in the same
    call, so it does not move with the machine's load as two calls' ratio does. Decoding tokens to pixels is left
    out of both."""
    layout, device = pipe.layout, pipe.transformer.device
    scale = guidance(pipe, guidance_scale)
    prompts = distinct_prompts(heldout_prompts, repeats + 1, seed)
    texts = encode_prompts(pipe.tokenizer, prompts, layout.max_text_len)
    sampling = SamplingConfig(scale)
    if pipe.paradigm is not next_token:
        samplers = tuple(s for s in samplers if s == "ar")
    compiled = {"ar": False, "ar_compiled": True}

    def call(sampler, text, b, r, method=None):
        gens = generators_from_seed(seed + r, b)
        processor = None if method is None else _Timed(WatermarkProcessor(pipe.watermark_config(method), key), device)
        synchronize(device)
        t0 = time.perf_counter()
        if sampler in compiled:
            pipe.paradigm.generate(pipe.transformer, layout, [text] * b, sampling, gens, processor=processor,
                                   **({"compile": True} if compiled[sampler] else {}))
        else:
            next_token.generate_sjd(pipe.transformer, layout, [text] * b, sampling, SJDConfig(sjd_window), gens,
                                    processor=processor)
        synchronize(device)
        seconds = time.perf_counter() - t0
        return seconds, 0.0 if processor is None else processor.seconds / seconds

    variants = (None, *methods)
    report = {"guidance_scale": scale, "repeats": repeats, "prompts": prompts[1:], "sjd_window": sjd_window}
    bar = tqdm(total=len(batch_sizes) * len(samplers) * len(variants) * (repeats + 1), desc="watermark overhead",
               disable=not progress)
    for b in batch_sizes:
        for sampler in samplers:
            for m in variants:  # warm-up
                call(sampler, texts[0], b, 0, m)
                bar.update()
            times = {m: [] for m in variants}
            for r, text in enumerate(texts[1:]):
                for m in variants[r % len(variants):] + variants[: r % len(variants)]:  # rotate who goes first
                    times[m].append(call(sampler, text, b, r, m))
                    bar.update()
            plain = statistics.median(t for t, _ in times[None])
            report[f"batch_{b}/{sampler}"] = {"plain_seconds": round(plain, 4), "methods": {
                m: {"seconds": round(statistics.median(t for t, _ in times[m]), 4),
                    "ratio": round(statistics.median(t for t, _ in times[m]) / plain, 4),
                    "processor_share": round(statistics.median(share for _, share in times[m]), 4)}
                for m in methods}}
    bar.close()
    return report


@torch.no_grad()
def clean_fpr(pipe, n_images: int = 1000, keys: int = 10, fpr: float = 0.01, seed: int = 10_000,
              guidance_scale: float | None = None, batch_size: int = 50, methods: tuple[str, ...] | None = None,
              progress: bool = True) -> dict:
    """The detector's false-positive rate on images, not token streams: `n_images` unwatermarked PNG-equivalent
    images of the pipeline (held-out prompts, seeds from `seed`, its default guidance) re-encoded once, then
    tested under `keys` different keys per method. Per method: the mean and worst FPR over the keys at `fpr`."""
    prompts = heldout_prompts(n_images, seed=seed)
    pipe.set_progress_bar_config(disable=True)
    tokens = []
    for i in tqdm(range(0, n_images, batch_size), desc="clean images", disable=not progress):
        chunk = prompts[i:i + batch_size]
        out = pipe(prompt=chunk, guidance_scale=guidance_scale, generator=generators_from_seed(seed + i, len(chunk)))
        tokens.append(pipe.retokenize(out.images).cpu())
    tokens, order = torch.cat(tokens), pipe.watermark_key_order()
    report = {"images": n_images, "keys": keys, "fpr": fpr, "methods": {}}
    for method in methods or METHODS:
        cfg = pipe.watermark_config(method)
        rates = [sum(d.p_value < fpr for d in detect_tokens(tokens, cfg, f"clean-fpr-key-{k}", order)) / n_images
                 for k in range(keys)]
        report["methods"][method] = {"fpr_mean": round(sum(rates) / keys, 4), "fpr_max": round(max(rates), 4)}
    return report
