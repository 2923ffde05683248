"""Train the Fashion-MNIST classifier that scores the class accuracy of generated images.

    python scripts/train_classifier.py --out mmgen/eval/weights/fashion-classifier --json

Trains `mmgen.eval.classifier.FashionClassifier` on the Fashion-MNIST training split at the generators'
resolution (28 px upsampled to 64 px exactly as `mmgen.data.FashionMNIST` does it), then reports accuracy on
the test split. AdamW with a one-cycle learning rate (warm-up, cosine decay); the data order and the weight
initialisation follow --seed, so a rerun on the same machine reproduces the weights. The shipped weights
came from the defaults here, on one CPU thread.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from mmgen.atomic import atomic_dir
from mmgen.data.fashion_mnist import CLASSES, FashionMNIST, to_tensor
from mmgen.eval.classifier import DEFAULT_WEIGHTS, FashionClassifier


@torch.no_grad()
def evaluate(model: FashionClassifier, data: FashionMNIST, batch_size: int = 500) -> dict:
    """Overall and per-class accuracy of `model` on `data`."""
    preds = torch.cat([model.predict(to_tensor(data.images[i:i + batch_size], data.image_size))
                       for i in range(0, len(data), batch_size)])
    labels = torch.from_numpy(data.labels)
    per_class = {name: round((preds[labels == k] == k).float().mean().item(), 4) for k, name in enumerate(CLASSES)
                 if (labels == k).any()}
    return {"accuracy": round((preds == labels).float().mean().item(), 4), "per_class": per_class}


def train(data: FashionMNIST, epochs: int = 3, batch_size: int = 128, lr: float = 3e-3, weight_decay: float = 1e-4,
          seed: int = 0, progress: bool = True) -> tuple[FashionClassifier, list[float]]:
    """Train a fresh classifier on `data`; returns it (in eval mode) and the loss of every step."""
    torch.manual_seed(seed)
    image_size = data.image_size
    if batch_size > len(data):
        raise ValueError(f"batch_size {batch_size} exceeds the training set size {len(data)}")
    model = FashionClassifier(image_size=image_size).train()
    steps_per_epoch = len(data) // batch_size
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch,
                                                pct_start=0.15)
    gen = torch.Generator().manual_seed(seed)
    labels = torch.from_numpy(data.labels)
    losses = []
    bar = tqdm(total=epochs * steps_per_epoch, desc="train classifier", disable=not progress)
    for _ in range(epochs):
        perm = torch.randperm(len(data), generator=gen)
        for k in range(steps_per_epoch):
            idx = perm[k * batch_size:(k + 1) * batch_size]
            x = to_tensor(data.images[idx.numpy()], image_size)
            loss = F.cross_entropy(model(x), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    return model.eval(), losses


def save_atomic(model: FashionClassifier, out: Path) -> None:
    """save_pretrained into a temporary sibling, then swap it in: an interrupted run leaves the old weights."""
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=DEFAULT_WEIGHTS, help="directory to save the model to "
                   "(diffusers save_pretrained layout; default: the shipped weights)")
    p.add_argument("--epochs", type=int, default=3, help="passes over the training split")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate of the one-cycle schedule")
    p.add_argument("--seed", type=int, default=0, help="seeds the initialisation, the data order and the subset")
    p.add_argument("--train-size", type=int, default=None, help="train on a seeded subset of this many images "
                   "(default: all 60000)")
    p.add_argument("--eval-size", type=int, default=None, help="score on a seeded subset of this many test "
                   "images (default: all 10000)")
    p.add_argument("--image-size", type=int, default=64, help="input resolution (the generators' image size)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    args = p.parse_args(argv)
    for name in ("epochs", "batch_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    start = time.perf_counter()
    try:
        data = FashionMNIST("train", image_size=args.image_size, size=args.train_size, seed=args.seed)
        test = FashionMNIST("test", image_size=args.image_size, size=args.eval_size, seed=args.seed)
        model, losses = train(data, args.epochs, args.batch_size, args.lr, seed=args.seed)
    except (ValueError, FileNotFoundError) as e:
        p.error(str(e))
    metrics = evaluate(model, test)
    save_atomic(model, args.out)
    result = {"out": str(args.out), "epochs": args.epochs, "steps": len(losses), "train_images": len(data),
              "test_images": len(test), "test_accuracy": metrics["accuracy"],
              "per_class_accuracy": metrics["per_class"], "first_loss": round(losses[0], 4),
              "final_loss": round(sum(losses[-20:]) / len(losses[-20:]), 4),
              "parameters": sum(p.numel() for p in model.parameters()),
              "seconds": round(time.perf_counter() - start, 1)}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"test accuracy {result['test_accuracy']:.4f} on {len(test)} images; saved to {args.out}",
              file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
