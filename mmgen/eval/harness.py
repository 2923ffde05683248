"""The evaluation harness behind `mmgen eval` and `scripts/evaluate.py`: one saved model in, one JSON-able dict out.

Generation is scored by what the model's data set allows:

- shapes: GenEval-style compositional accuracy (`mmgen.eval.compositional`) per prompt category on the
  held-out split (attribute pairs never seen in training) and on the training split;
- fashion_mnist: class accuracy, the share of "a photo of a <class>" images that a classifier trained here on
  real Fashion-MNIST (`mmgen.eval.classifier`) assigns to the prompted class (a conditional-generation check
  in the spirit of the classification accuracy score, Ravuri & Vinyals, 2019);
- emoji, flags, icons: FD-ENL0 only (no closed-world judge exists for free-form names).

FD-ENL0 (`mmgen.eval.frechet`, a Frechet distance on EfficientNet-Lite0 features, not Inception FID) compares
generated images with real training images whose captions prompted them (a seeded draw: the distribution
the model was fit to, and captions its text tokenizer knows). The visual tokenizer is scored on its own
by reconstruction: PSNR, SSIM, rFD-ENL0 (real held-out images against their reconstructions) and, for VQ
tokenizers, codebook usage and perplexity.

Every image i of a prompt list is generated with seed `seed + i`, so results do not depend on the batch size.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from tqdm.auto import tqdm

from mmgen.data.shapes import (CATEGORIES, ShapesDataset, heldout_prompts, prompt_scenes, render, to_tensor,
                               train_prompts)
from mmgen.eval.compositional import evaluate as compositional_accuracy
from mmgen.eval.frechet import fd_enl0
from mmgen.eval.image_metrics import codebook_usage, psnr, ssim
from mmgen.options import check_seed, refuse_options
from mmgen.pipelines.registry import PARADIGMS, paradigm_name
from tokenizers_vis.protocol import as_visual_tokenizer

DATASETS = ("shapes", "fashion_mnist", "emoji", "flags", "icons")
FD_ONLY = ("emoji", "flags", "icons")  # open-world names: no judge, only the Frechet distance
SPLITS = ("heldout", "train")
# training data names (`mmgen.training.data.DataConfig.name`) -> the evaluation that fits them; a shapes+emoji
# model is judged where a closed-world judge exists (pass data="emoji" for its emoji FD)
_TRAINED_ON = {"shapes": "shapes", "fashion_mnist": "fashion_mnist", "emoji": "emoji", "shapes+emoji": "shapes",
               "flags": "flags", "icons": "icons"}
FD_REAL_SEED_OFFSET = 12345  # shapes FD scenes: a seed apart from the prompt draws (seed + 1)


# ------------------------------------------------------------------------------------------------ generation

@dataclass
class _Meter:
    """Images generated, wall time, and decoder passes summed per image (a batched pass counts for each image)."""

    images: int = 0
    seconds: float = 0.0
    passes: int = 0
    evals: int = 0
    has_evals: bool = False
    lossless: bool = True  # False once any call sampled with a lossy acceptance (SJD's lantern_delta)

    def as_dict(self) -> dict:
        out = {"images": self.images, "seconds_per_image": round(self.seconds / self.images, 4),
               "nfe_per_image": round(self.passes / self.images, 2), "lossless": self.lossless}
        if self.has_evals:
            out["model_evals_per_image"] = round(self.evals / self.images, 2)
        return out


def _generate(pipe, prompts: list, batch_size: int, seed: int, meter: _Meter, progress: bool, desc: str,
              sampling: dict, condition: str = "prompt") -> tuple[list, float]:
    """Images for `prompts` (image i seeded seed + i) and the seconds they took; `condition`: the call argument they
    go to ("class_labels" for a class-conditional model)."""
    from mmgen.pipelines.base import generators_from_seed

    images, seconds = [], 0.0
    for i in tqdm(range(0, len(prompts), batch_size), desc=desc, leave=False, disable=not progress):
        chunk = prompts[i:i + batch_size]
        t0 = time.perf_counter()
        out = pipe(**{condition: chunk}, generator=generators_from_seed(seed + i, len(chunk)), **sampling)
        seconds += time.perf_counter() - t0
        images.extend(out.images)
        meter.passes += out.decoder_passes * len(chunk)
        meter.lossless &= getattr(out, "lossless", True)
        if out.model_evals is not None:
            meter.evals += out.model_evals * len(chunk)
            meter.has_evals = True
    meter.images += len(prompts)
    meter.seconds += seconds
    return images, seconds


def _positive_int(name: str, value, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _check_fd(fd) -> None:
    # a Frechet distance needs a covariance on each side: at least two images
    if isinstance(fd, bool) or not isinstance(fd, int) or fd < 0 or fd == 1:
        raise ValueError(f"fd must be 0 (off) or an integer >= 2 (images per side), got {fd!r}")


def _image_size(pipe) -> int:
    return pipe.visual_tokenizer.image_size


def _stack(dataset, indices: Sequence[int]) -> torch.Tensor:
    return torch.stack([dataset[i]["image"] for i in indices])


def _subset(n_items: int, n: int, seed: int) -> list[int]:
    """n indices drawn without replacement (all of them, in order, when n >= n_items)."""
    if n >= n_items:
        return list(range(n_items))
    return sorted(torch.randperm(n_items, generator=torch.Generator().manual_seed(seed))[:n].tolist())


def _class_model(pipe) -> bool:
    return getattr(getattr(pipe, "condition", None), "kind", None) == "class"


def _class_conditions(pipe, class_names: Sequence[str], labels: list[int]) -> list:
    """The `class_labels` that ask a class-conditional model for a data set's classes: by name when the model's
    conditioning names its classes, else by index (a converted LlamaGen or VAR model knows its classes by number
    only, in the order of an ImageNet-style folder's sorted class directories)."""
    cond = pipe.condition
    if cond.class_names:
        return [class_names[c] for c in labels]
    if len(class_names) > cond.num_classes:
        raise ValueError(f"the data set has {len(class_names)} classes but {type(pipe).__name__} takes "
                         f"{cond.accepted()}: evaluate it on data (--data) with at most {cond.num_classes} classes")
    return list(labels)


def _fd_block(pipe, dataset, indices: list[int], batch_size: int, seed: int, device, meter: _Meter,
              progress: bool, sampling: dict) -> dict:
    """FD-ENL0 between the real images at `indices` and images generated from their captions (a class-conditional
    model: from their class names, as the data set names them)."""
    real = _stack(dataset, indices)
    if _class_model(pipe):
        if not hasattr(dataset, "labels") or not hasattr(dataset, "classes"):
            raise ValueError(f"fd on a class-conditional model needs a labelled data set; {type(dataset).__name__} "
                             f"has no labels")
        conditions = _class_conditions(pipe, dataset.classes, [int(dataset.labels[i]) for i in indices])
        condition = "class_labels"
    else:
        conditions, condition = [dataset[i]["caption"] for i in indices], "prompt"
    fake, _ = _generate(pipe, conditions, batch_size, seed, meter, progress, "fd", sampling, condition)
    return {"n": len(indices), "value": round(fd_enl0(real, fake, device=device), 3)}


def real_dataset(data: str, split: str, image_size: int, size: int = 10000, seed: int = 0):
    """Real images of `data`. split "train": what the generators fit (the FD reference, whose captions the
    model's text tokenizer knows); "heldout": images no model trained on (the tokenizer metrics), i.e. the
    test split of fashion_mnist and emoji. shapes makes `size` procedural scenes of the split with `seed`."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}; got {split!r}")
    if data == "shapes":
        return ShapesDataset(split, size=size, seed=seed, image_size=image_size)
    split = {"train": "train", "heldout": "test"}[split]
    if data == "fashion_mnist":
        from mmgen.data.fashion_mnist import FashionMNIST
        return FashionMNIST(split=split, image_size=image_size)
    if data == "emoji":
        from mmgen.data.emoji import Twemoji
        return Twemoji(split=split, image_size=image_size)
    if data == "flags":
        from mmgen.data.flags import Flags
        return Flags(split=split, image_size=image_size)
    if data == "icons":
        from mmgen.data.icons import Icons
        return Icons(split=split, image_size=image_size)
    raise ValueError(f"data must be one of {', '.join(DATASETS)}; got {data!r}")


def _class_accuracy(pipe, per_category: int, batch_size: int, seed: int, device, classifier, meter: _Meter,
                    progress: bool, sampling: dict) -> dict:
    from mmgen.data.fashion_mnist import CLASSES, caption_for

    if classifier is None:
        from mmgen.eval.classifier import load_default
        classifier = load_default()
    if isinstance(classifier, torch.nn.Module):
        classifier = classifier.to(device).eval()
    labels = [c for c in range(len(CLASSES)) for _ in range(per_category)]
    if _class_model(pipe):  # `mmgen.conditioning`: by class name, or by index for a model without names
        conditions, condition = _class_conditions(pipe, CLASSES, labels), "class_labels"
    else:
        conditions, condition = [caption_for(c) for c in labels], "prompt"
    images, seconds = _generate(pipe, conditions, batch_size, seed, meter, progress, "fashion_mnist", sampling,
                                condition)
    side = getattr(getattr(classifier, "config", None), "image_size", None)
    if side is not None and images[0].size != (side, side):
        # a model of another resolution is judged at the classifier's (bicubic, as `retokenize` resizes)
        images = [im.resize((side, side), Image.Resampling.BICUBIC) for im in images]
    x = torch.stack([to_tensor(im) for im in images])
    with torch.no_grad():
        pred = torch.cat([torch.as_tensor(classifier.predict(x[i:i + batch_size].to(device))).cpu()
                          for i in range(0, len(x), batch_size)])
    hit = pred == torch.tensor(labels)
    per_class = hit.view(len(CLASSES), per_category).double().mean(1).tolist()
    return {"accuracy": hit.double().mean().item(), "n": len(labels),
            "per_class": dict(zip(CLASSES, per_class)), "seconds_per_image": round(seconds / len(labels), 4)}


def evaluate_pipeline(pipe, data: str = "shapes", per_category: int = 50, splits: Sequence[str] = SPLITS,
                      fd: int = 0, batch_size: int = 25, seed: int = 0, device="cpu", progress: bool = True,
                      classifier=None, **sampling) -> dict:
    """Score a text-to-image pipeline's samples on `data`.

    shapes: compositional accuracy per split in `splits` ({"accuracy", "n", "per_category", "per_check",
    "seconds_per_image"} under "splits"), `per_category` prompts per category and split. fashion_mnist:
    "class_accuracy" over `per_category` images per class (drawn from the class captions, or by class name from a
    class-conditional model, whose names must be Fashion-MNIST's), judged by `classifier` (anything with
    `predict(images (B, 3, H, W) in [-1, 1]) -> class ids`; default: the shipped Fashion-MNIST classifier).
    emoji: FD-ENL0 only, so `fd` must be >= 2. With `fd` > 0, "fd_enl0" compares `fd` real training images of the
    data set with images generated from their captions. "speed" sums every generated image: seconds and decoder
    passes per image. `sampling` goes to every pipeline call (e.g. guidance_scale); the pipeline is moved to
    `device` and its own progress bar turned off.
    """
    if data not in DATASETS:
        raise ValueError(f"data must be one of {', '.join(DATASETS)}; got {data!r}")
    _positive_int("per_category", per_category)
    _positive_int("batch_size", batch_size)
    check_seed(seed)
    _check_fd(fd)
    splits = list(splits)
    if data == "shapes" and (not splits or any(s not in SPLITS for s in splits)):
        raise ValueError(f"splits must be a non-empty list drawn from {', '.join(SPLITS)}; got {splits!r}")
    if data in FD_ONLY and fd == 0:
        raise ValueError(f"data={data!r} is scored by FD-ENL0 only: set fd (--fd) to the number of images, >= 2")
    if data == "shapes" and _class_model(pipe):
        raise ValueError(f"data='shapes' prompts captions, and {type(pipe).__name__} is class-conditional: pass data "
                         f"(--data) fashion_mnist, whose classes it is asked for by index (or by name when it names "
                         f"its classes), scored by class accuracy and, with fd (--fd) >= 2, FD-ENL0")
    refuse_options(pipe, sampling)  # the CLI's check: options the pipeline's `__call__` does not take
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    meter = _Meter()
    result = {"data": data, "sampling": dict(sampling)}
    size = _image_size(pipe)
    if data == "shapes":
        result["splits"] = {}
        for split in splits:
            make = {"heldout": heldout_prompts, "train": train_prompts}[split]
            prompts = [q for c in CATEGORIES for q in make(per_category, seed=seed + 1, category=c)]
            images, seconds = _generate(pipe, prompts, batch_size, seed, meter, progress, split, sampling)
            scores = compositional_accuracy(images, prompts)
            scores["seconds_per_image"] = round(seconds / len(prompts), 4)
            result["splits"][split] = scores
        if fd:
            real = real_dataset("shapes", "train", size, size=fd, seed=seed + FD_REAL_SEED_OFFSET)
            result["fd_enl0"] = _fd_block(pipe, real, list(range(fd)), batch_size, seed, device, meter, progress,
                                          sampling)
    else:
        if data == "fashion_mnist":
            result["class_accuracy"] = _class_accuracy(pipe, per_category, batch_size, seed, device, classifier,
                                                       meter, progress, sampling)
        if fd:
            real = real_dataset(data, "train", size)
            result["fd_enl0"] = _fd_block(pipe, real, _subset(len(real), fd, seed), batch_size, seed, device,
                                          meter, progress, sampling)
    result["speed"] = meter.as_dict()
    return result


# ------------------------------------------------------------------------------------------------- tokenizer

def tokenizer_of(pipe):
    """A pipeline's visual tokenizer component (the module it saves), named by the paradigm registry; a pipeline
    that runs no registered paradigm (a converted LlamaGen or VAR model) states its own `visual_tokenizer`."""
    if getattr(pipe, "paradigm", None) is None:
        return pipe.visual_tokenizer
    return getattr(pipe, PARADIGMS[paradigm_name(pipe)].component)


def reconstruct(tokenizer, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(reconstructions in [-1, 1], the flattened code ids or None for a continuous tokenizer), through the
    visual tokenizer protocol (an AutoencoderKL's tokens are its posterior means)."""
    tok = as_visual_tokenizer(tokenizer)
    tokens = tok.encode_tokens(images)
    recon = tok.decode_tokens(tokens)
    return recon, (None if tok.kind == "latents" else tokens.flatten(1))


@torch.no_grad()
def evaluate_tokenizer(tokenizer, dataset, n: int = 256, batch_size: int = 64, device="cpu",
                       progress: bool = False) -> dict:
    """Reconstruction quality on the first `n` items of `dataset` (items {"image": (3, H, W) in [-1, 1]}):
    mean per-image PSNR (dB) and SSIM, rFD-ENL0 between the real images and their reconstructions, and for VQ
    tokenizers the share of codes used and the perplexity of their histogram."""
    _positive_int("n", n, 2)  # rFD needs a covariance on each side
    _positive_int("batch_size", batch_size)
    n = min(n, len(dataset))
    if n < 2:
        raise ValueError(f"dataset must hold at least 2 images for rFD-ENL0, got {len(dataset)}")
    if isinstance(tokenizer, torch.nn.Module):
        tokenizer = tokenizer.to(device).eval()
    reals, recons, ids, sums = [], [], [], {"psnr": 0.0, "ssim": 0.0}
    for i in tqdm(range(0, n, batch_size), desc="tokenizer", leave=False, disable=not progress):
        real = _stack(dataset, range(i, min(i + batch_size, n))).to(device)
        recon, codes = reconstruct(tokenizer, real)
        recon = recon.clamp(-1, 1)
        sums["psnr"] += psnr(recon, real).item() * len(real)
        sums["ssim"] += ssim(recon, real).item() * len(real)
        reals.append(real.cpu())
        recons.append(recon.cpu())
        if codes is not None:
            ids.append(codes.cpu())
    result = {"images": n, "psnr": round(sums["psnr"] / n, 3), "ssim": round(sums["ssim"] / n, 4),
              "rfd_enl0": round(fd_enl0(torch.cat(reals), torch.cat(recons), device=device), 3)}
    if ids:
        usage = codebook_usage(torch.cat(ids), as_visual_tokenizer(tokenizer).vocab_size)
        result.update({k: round(v, 4) for k, v in usage.items()})
    return result


# ----------------------------------------------------------------------------------------------------- model

def trained_data(model_dir: str | Path) -> tuple[str | None, str | None]:
    """(the data a saved model was evaluated or trained on, the file that says so), or (None, None).

    Looks at `<model_dir>/eval.json` ("data", written by `mmgen eval --out`) and then at the generator run's
    `config.json` beside the pipeline (`scripts/train_generator.py` saves `<out_dir>/pipeline` next to it)."""
    model_dir = Path(model_dir)
    recorded = []
    report, run = model_dir / "eval.json", model_dir.parent / "config.json"
    if report.is_file():
        recorded.append((report, json.loads(report.read_text()).get("data")))
    if run.is_file():
        config = json.loads(run.read_text())
        if "paradigm" in config:  # a generator run's config, not another model's config.json
            recorded.append((run, (config.get("data") or {}).get("name")))
    for path, name in recorded:
        if name is None:
            continue
        if name not in _TRAINED_ON:
            raise ValueError(f"{str(path)!r} records data {name!r}, which has no evaluation here; pass data= "
                             f"(--data) one of {', '.join(DATASETS)}")
        return _TRAINED_ON[name], str(path)
    return None, None


def _parameters(module) -> int:
    return sum(p.numel() for p in module.parameters())


def _effective_sampling(pipe, sampling: dict) -> dict:
    """The sampling arguments of the pipeline's call as this run used them: given values over its defaults."""
    used = dict(type(pipe).call_options)  # the declared defaults of the pipeline's call
    used.update({k: v for k, v in sampling.items() if v is not None or k not in used})
    if used.get("guidance_scale") is None and "default_guidance_scale" in pipe.config:
        used["guidance_scale"] = pipe.config.default_guidance_scale  # what the pipelines resolve None to
    if used.get("cfg_schedule") is None and "cfg_schedule" in pipe.call_options:
        used["cfg_schedule"] = pipe.paradigm.DEFAULT_CFG_SCHEDULE  # what None resolves to
    if used.get("watermark_key") is not None:
        used["watermark_key"] = "<set>"  # never write a secret key into a report
    return used


@torch.no_grad()
def reconstruction_accuracy(tokenizer, per_category: int = 50, splits: Sequence[str] = SPLITS, seed: int = 0,
                            batch_size: int = 64, device="cpu") -> dict:
    """The tokenizer's ceiling on compositional accuracy: the ground-truth scenes of the evaluation prompts
    (the same `per_category` prompts per category that `evaluate_pipeline` uses with this `seed`), encoded,
    decoded and judged by the same checker. {split: {"accuracy", "per_category"}}."""
    _positive_int("per_category", per_category)
    if isinstance(tokenizer, torch.nn.Module):
        tokenizer = tokenizer.to(device).eval()
    from diffusers.image_processor import VaeImageProcessor

    size = as_visual_tokenizer(tokenizer).image_size
    to_pil = VaeImageProcessor(do_resize=False, do_normalize=True)
    out = {}
    for split in splits:
        scenes = [sc for c in CATEGORIES for sc in prompt_scenes(split, per_category, seed + 1, c)]
        images = []
        for i in range(0, len(scenes), batch_size):
            real = torch.stack([to_tensor(render(sc, size)) for sc in scenes[i:i + batch_size]]).to(device)
            recon = reconstruct(tokenizer, real)[0].clamp(-1, 1)
            images += to_pil.postprocess(recon.cpu(), output_type="pil")  # the pipelines' own conversion
        scores = compositional_accuracy(images, [sc.caption for sc in scenes])
        out[split] = {"accuracy": scores["accuracy"], "per_category": scores["per_category"]}
    return out


def evaluate_model(model_dir: str | Path, data: str | None = None, per_category: int = 50,
                   splits: Sequence[str] = SPLITS, fd: int = 0, tokenizer_images: int = 256, batch_size: int = 25,
                   seed: int = 0, device="cpu", progress: bool = True, classifier=None, pipeline=None,
                   **sampling) -> dict:
    """Evaluate a saved pipeline directory: generation (`evaluate_pipeline`) and its tokenizer
    (`evaluate_tokenizer` on `tokenizer_images` held-out real images; 0 skips it), plus parameter counts,
    decoder passes and seconds per image, and the settings used.

    data=None takes the data the model directory records (`trained_data`), else shapes. `pipeline`: the
    pipeline already loaded from `model_dir`, to save loading it twice. `model_dir` may name a shipped model."""
    from mmgen.pipelines import load_pipeline
    from mmgen.zoo import resolve_model

    model_dir = resolve_model(model_dir)
    source = "argument"
    if data is None:
        data, source = trained_data(model_dir)
        data, source = (data, source) if data is not None else ("shapes", "default")
    if data not in DATASETS:
        raise ValueError(f"data must be one of {', '.join(DATASETS)}; got {data!r}")
    if tokenizer_images != 0:
        _positive_int("tokenizer_images", tokenizer_images, 2)
    pipe = pipeline if pipeline is not None else load_pipeline(model_dir)
    tok = tokenizer_of(pipe)
    result = {"model": str(model_dir), "pipeline": type(pipe).__name__, "data": data, "data_from": source,
              "parameters": {"decoder": _parameters(pipe.transformer), "tokenizer": _parameters(tok),
                             "tokenizer_class": type(tok).__name__}}
    settings = {} if data in FD_ONLY else {"per_category": per_category}
    if data == "shapes":
        settings["splits"] = list(splits)
    result["settings"] = {**settings, "fd": fd, "tokenizer_images": tokenizer_images, "batch_size": batch_size,
                          "seed": seed, "device": str(device)}
    gen = evaluate_pipeline(pipe, data, per_category=per_category, splits=splits, fd=fd, batch_size=batch_size,
                            seed=seed, device=device, progress=progress, classifier=classifier, **sampling)
    del gen["data"]
    gen["sampling"] = _effective_sampling(pipe, sampling)
    result.update(gen)
    if tokenizer_images:
        real = real_dataset(data, "heldout", _image_size(pipe), size=tokenizer_images, seed=seed)
        result["tokenizer"] = evaluate_tokenizer(tok, real, n=tokenizer_images, device=device, progress=progress)
        if data == "shapes":
            result["tokenizer"]["reconstruction_accuracy"] = reconstruction_accuracy(
                tok, per_category, splits, seed, device=device)
    return result
