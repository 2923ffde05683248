"""Fine-tuning a converted LlamaGen class-to-image model (Sun et al. 2024, "Autoregressive Model Beats Diffusion:
Llama for Scalable Image Generation", arXiv 2406.06525) on a labelled image folder, with LlamaGen's own objective
(its `train_c2i.py`): the class embedding starts the sequence, the codes follow teacher-forced, cross-entropy on
every code; a label becomes the null class with probability `train.cond_drop_prob` (LlamaGen's
class_dropout_prob, 0.1), the row classifier-free guidance samples against. The VQ stays frozen.

`scripts/train_generator.py init_from=<converted dir>` picks this trainer by the pipeline class the directory
names (`converted_trainer`); it runs in the one training loop beside Janus's (`mmgen.training.transformers_models`)
and saves a `LlamaGenPipeline` that `load_pipeline` reads. Converted VAR models are refused there: VAR's
class-AdaLN next-scale decoder has no training loop here.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from mmgen.pipelines import load_pipeline
from mmgen.safe_save import pipeline_class_name, save_pipeline

# the converted families fine-tuning continues (pipeline class -> the paradigm names it runs under), and the ones
# it refuses, with why
FINETUNE_CONVERTED = {"LlamaGenPipeline": ("next_token", "llamagen")}
REFUSED = {"VARPipeline": "a converted VAR model: its class-AdaLN next-scale decoder has no training loop here"}


class LlamaGenTrainer(torch.nn.Module):
    """A converted c2i `LlamaGenPipeline`, its VQ frozen; `forward(labels, codes)` is LlamaGen's training loss."""

    family = "llamagen"

    def __init__(self, pipe):
        super().__init__()
        if pipe.model_type != "c2i":
            raise ValueError(f"init_from holds a text-to-image (t2i) LlamaGen model; fine-tuning continues "
                             f"class-to-image (c2i) models, on a labelled folder (data.name=imagefolder)")
        self.pipe, self.model = pipe, pipe.transformer
        self.vq = pipe.vq_model.requires_grad_(False).eval()
        self.model.requires_grad_(True).train()
        self._no_split_modules = ["TransformerBlock"]  # FSDP units (`mmgen.training.memory.shard_classes`)

    @property
    def image_size(self) -> int:
        return self.vq.image_size

    def trained_modules(self) -> dict:
        return {"transformer": self.model}

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) in [-1, 1] -> the frozen VQ's codes (B, h*w), raster."""
        return self.vq.encode_tokens(images).flatten(1)

    def conditions(self, dataset) -> list[int]:
        """Each image's class label: an ImageNet-style folder's sorted class directories are LlamaGen's class ids."""
        if not hasattr(dataset, "labels"):
            raise ValueError(f"fine-tuning a class-to-image LlamaGen model needs labelled data (data.name=imagefolder "
                             f"or fashion_mnist); {type(dataset).__name__} has no labels")
        labels = [int(c) for c in dataset.labels]
        classes = self.model.config.num_classes
        if max(labels) >= classes:
            raise ValueError(f"the data holds {max(labels) + 1} classes but the model takes {classes} (class ids "
                             f"0..{classes - 1}); use a folder with at most {classes} class directories")
        return labels

    def batch(self, labels: list[int], codes: torch.Tensor, drop: torch.Tensor) -> dict:
        labels = torch.tensor(labels)
        return {"labels": torch.where(drop, self.model.null_class, labels), "codes": codes}

    def logits(self, labels: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """(B, N, V): slot 0 is the class embedding, slot k >= 1 code k - 1; the output at slot k predicts code k."""
        x_BNC = torch.cat([self.model.embed_condition(labels), self.model.tok_embeddings(codes[:, :-1])], 1)
        slots = torch.arange(x_BNC.shape[1], device=x_BNC.device).expand(len(x_BNC), -1)
        return self.model(x_BNC, slots)

    def forward(self, labels: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.logits(labels, codes).flatten(0, 1), codes.flatten())

    def save_pretrained(self, directory: str | Path) -> Path:
        """The pipeline with the trained GPT (safetensors + JSON, atomic, checksummed)."""
        return save_pipeline(self.pipe, directory)


def converted_class(directory) -> str | None:
    """The pipeline class a saved directory names (None: not a saved mmgen pipeline)."""
    index = Path(directory) / "model_index.json" if directory is not None else None
    return pipeline_class_name(json.loads(index.read_text())) if index is not None and index.is_file() else None


def converted_trainer(paradigm: str, init_from) -> LlamaGenTrainer | None:
    """The trainer of a converted checkpoint directory `init_from`, None when it holds none; a converted family
    fine-tuning does not continue, or a `paradigm` that is not the family's, is refused naming init_from."""
    name = converted_class(init_from)
    if name in REFUSED:
        supported = ", ".join(FINETUNE_CONVERTED)
        raise ValueError(f"init_from {str(init_from)!r} is {REFUSED[name]}; fine-tuning continues next-token models: "
                         f"mmgen's own pipelines, converted {supported} directories (c2i) and Janus checkpoints "
                         f"(paradigm=janus)")
    if name not in FINETUNE_CONVERTED:
        return None
    if paradigm not in FINETUNE_CONVERTED[name]:
        raise ValueError(f"init_from {str(init_from)!r} is a converted {name} model, which fine-tunes as paradigm "
                         f"{' or '.join(FINETUNE_CONVERTED[name])}; got paradigm={paradigm!r}")
    return LlamaGenTrainer(load_pipeline(init_from))
