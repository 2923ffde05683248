"""The training data: data sets by name (`DataConfig`, `make_dataset`), the run's caption tokenizer and the batch
order.

The data order is a pure function of (seed, step), so a resumed run sees exactly the batches it would have
seen had it never stopped, with no sampler state to save.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm

from mmgen.atomic import save_file_atomic


def batch_indices(step: int, global_batch: int, dataset_size: int, seed: int, rank: int = 0, world: int = 1):
    """This rank's share of the global batch at `step`: epoch-wise permutations without replacement."""
    if global_batch > dataset_size:
        raise ValueError(f"batch_size {global_batch} exceeds the dataset size {dataset_size}")
    per_epoch = dataset_size // global_batch
    epoch, k = divmod(step, per_epoch)
    return _epoch_permutation(dataset_size, seed, epoch)[k * global_batch:(k + 1) * global_batch][rank::world].tolist()


@functools.lru_cache(maxsize=2)
def _epoch_permutation(dataset_size: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(dataset_size, generator=torch.Generator().manual_seed(seed * 100003 + epoch))


def _stack_images(items: list[dict]) -> torch.Tensor:
    return torch.stack([it["image"] for it in items])


class _StepSampler(torch.utils.data.Sampler):
    def __init__(self, steps: range, global_batch: int, dataset_size: int, seed: int, rank: int, world: int):
        self.steps, self.args = steps, (global_batch, dataset_size, seed, rank, world)

    def __iter__(self):
        return (batch_indices(step, *self.args) for step in self.steps)

    def __len__(self) -> int:
        return len(self.steps)


def step_images(dataset, steps: range, global_batch: int, seed: int, rank: int = 0, world: int = 1,
                workers: int = 0):
    """Image batches (B, 3, H, W) for `steps` in order, each exactly `batch_indices(step, ...)` of `dataset`;
    with `workers` > 0 they are loaded (rendered, for procedural data) that many processes ahead of use."""
    sampler = _StepSampler(steps, global_batch, len(dataset), seed, rank, world)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=workers,
                                         collate_fn=_stack_images,
                                         prefetch_factor=4 if workers else None, persistent_workers=False)
    return iter(loader)


def all_images(dataset, batch_size: int = 256, workers: int = 0):
    """The whole data set in order, as image batches (B, 3, H, W) (for one encoding pass)."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                                         collate_fn=_stack_images)
    return iter(loader)


DATASET_NAMES = ("shapes", "folder", "imagefolder", "fashion_mnist", "emoji", "shapes+emoji", "flags", "icons")


@dataclass
class DataConfig:
    name: str = "shapes"  # one of DATASET_NAMES
    size: int = 20000  # shapes: scenes per split; fashion_mnist: a seeded subset of at most this many per split
    seed: int = 0
    image_size: int = 64
    root: str | None = None  # folder: directory with captions.jsonl; imagefolder: root/train/<class>/<image>
    caption_mode: str = "caption"  # fashion_mnist: "caption" ("a photo of a sneaker") or "class" ("sneaker")
    include_flags: bool = False  # emoji, shapes+emoji: keep the flag emoji too
    emoji_repeat: int = 1  # shapes+emoji: the Twemoji set appears this many times, to set its share of the mix


def image_fields(cfg: DataConfig) -> dict:
    """The data settings that decide the images (not the captions): the key of the encoded-image caches, so
    that changing only the caption form, or adding a field, does not re-encode a data set."""
    fields = {k: v for k, v in vars(cfg).items() if k != "caption_mode"}
    if "emoji" not in cfg.name.split("+"):
        fields.pop("include_flags")
    if cfg.name != "shapes+emoji" or cfg.emoji_repeat == 1:
        fields.pop("emoji_repeat")  # keeps the keys of caches made before the field existed
    return fields


def make_dataset(cfg: DataConfig, split: str = "train"):
    """The run's data set; `split` "heldout" is the evaluation side: shapes' held-out (color, shape) pairs, the
    Fashion-MNIST test set, the Twemoji, flag and icon test names (the folder data set has one split)."""
    from mmgen.data import (ConcatCaptions, FashionMNIST, Flags, Icons, ImageCaptionFolder, ImageClassFolder,
                            ShapesDataset, Twemoji)

    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    real_split = "train" if split == "train" else "test"
    if cfg.name == "shapes":
        return ShapesDataset(split=split, size=cfg.size, seed=cfg.seed, image_size=cfg.image_size)
    if cfg.name == "folder":
        if not cfg.root:
            raise ValueError("data.root must name a directory with captions.jsonl when data.name is 'folder'")
        return ImageCaptionFolder(cfg.root, image_size=cfg.image_size)
    if cfg.name == "imagefolder":
        if not cfg.root:
            raise ValueError("data.root must name an ImageNet-style folder (root/train/<class>/<image>) when "
                             "data.name is 'imagefolder'")
        return ImageClassFolder(cfg.root, image_size=cfg.image_size, split="train" if split == "train" else "val")
    if cfg.name == "fashion_mnist":
        from mmgen.data.fashion_mnist import load_split
        available = len(load_split(real_split)[1])
        return FashionMNIST(real_split, image_size=cfg.image_size, caption_mode=cfg.caption_mode,
                            size=min(cfg.size, available), seed=cfg.seed)
    if cfg.name == "emoji":
        return Twemoji(image_size=cfg.image_size, include_flags=cfg.include_flags, split=real_split)
    if cfg.name == "shapes+emoji":
        # One model on both worlds: `size` scenes, then every emoji of the split (`emoji_repeat` times in training).
        if not isinstance(cfg.emoji_repeat, int) or cfg.emoji_repeat < 1:
            raise ValueError(f"data.emoji_repeat must be an integer >= 1, got {cfg.emoji_repeat!r}")
        emoji = Twemoji(image_size=cfg.image_size, include_flags=cfg.include_flags, split=real_split)
        repeat = cfg.emoji_repeat if split == "train" else 1
        return ConcatCaptions([ShapesDataset(split=split, size=cfg.size, seed=cfg.seed, image_size=cfg.image_size)]
                              + [emoji] * repeat)
    if cfg.name == "flags":
        return Flags(image_size=cfg.image_size, split=real_split)
    if cfg.name == "icons":
        return Icons(image_size=cfg.image_size, split=real_split)  # Font Awesome 5 solid
    raise ValueError(f"data.name must be one of {DATASET_NAMES}, got {cfg.name!r}")


def run_text_tokenizer(data: DataConfig, captions: list[str], out: Path, is_main_process: bool = True):
    """The run's word-level caption tokenizer under `out/text_tokenizer`: trained once on the captions (plus every
    word the shapes generator can emit, since held-out prompts may use words the training captions lack), then
    reloaded, so a resumed run keeps its ids."""
    from transformers import PreTrainedTokenizerFast

    from mmgen.text import train_text_tokenizer

    tok_dir = Path(out) / "text_tokenizer"
    if (tok_dir / "tokenizer.json").is_file():
        return PreTrainedTokenizerFast.from_pretrained(tok_dir)
    extra = []
    if "shapes" in data.name.split("+"):
        from mmgen.data.shapes import all_caption_words
        extra = all_caption_words()
    tokenizer = train_text_tokenizer(captions, extra)
    if is_main_process:
        tokenizer.save_pretrained(tok_dir)
    return tokenizer


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
