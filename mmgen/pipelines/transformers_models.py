"""Public AR image models saved in the transformers layout (`save_pretrained` of the model + its processor, as
the hub checkpoints are): which pipeline class serves which `config.json` `model_type`, and the loading and saving
those pipelines share (`TransformersLayout`)."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import torch

# model_type -> "module:class"; imported on use (loading transformers' model code is not free)
TRANSFORMERS_PIPELINES = {"janus": "mmgen.pipelines.janus:JanusPipeline",
                          "emu3": "mmgen.pipelines.emu3:Emu3Pipeline"}


def transformers_model_type(model_dir: str | Path) -> str | None:
    """`model_type` of a transformers directory's config.json, or None when the directory has none."""
    config = Path(model_dir) / "config.json"
    if not config.is_file():
        return None
    try:
        return json.loads(config.read_text()).get("model_type")
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{str(config)!r} is not valid JSON: {e}") from None


def transformers_pipeline_class(model_type: str | None, model_dir: str | Path):
    if model_type not in TRANSFORMERS_PIPELINES:
        raise ValueError(f"{str(model_dir)!r} holds a transformers model of type {model_type!r}, which cannot "
                         f"generate images here; supported model types: {', '.join(TRANSFORMERS_PIPELINES)}")
    module, name = TRANSFORMERS_PIPELINES[model_type].split(":")
    return getattr(importlib.import_module(module), name)


def load_transformers_pipeline(model_dir: str | Path, dtype=None):
    """The pipeline for a transformers checkpoint directory (model + processor), chosen by `model_type`."""
    cls = transformers_pipeline_class(transformers_model_type(model_dir), model_dir)
    return cls.from_pretrained(model_dir) if dtype is None else cls.from_pretrained(model_dir, dtype=dtype)


class TransformersLayout:
    """Loading and saving in the transformers layout (mixed in before `DiffusionPipeline`): the model's and its
    processor's `save_pretrained` in one directory, no model_index.json. A pipeline names its `model_class`,
    `processor_class` and `checkpoint_files` (what a directory needs -> the file names that give it, one of each)."""

    model_class: type
    processor_class: type
    checkpoint_files: dict[str, tuple[str, ...]]

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, dtype: torch.dtype = torch.float32, **kwargs):
        path = Path(pretrained_model_name_or_path)
        missing = [f"{what} ({' or '.join(names)})" for what, names in cls.checkpoint_files.items()
                   if not any((path / name).is_file() for name in names)]
        if missing:
            raise FileNotFoundError(f"{str(path)!r} is not a complete {cls.model_class.__name__} checkpoint: missing "
                                    f"{'; '.join(missing)} (save the model and its {cls.processor_class.__name__} "
                                    f"with save_pretrained into one directory)")
        model = cls.model_class.from_pretrained(str(path), dtype=dtype, **kwargs).eval().requires_grad_(False)
        pipe = cls(model=model, processor=cls.processor_class.from_pretrained(str(path)))
        pipe.register_to_config(_name_or_path=str(path))  # where watermark.json is read from, as diffusers records it
        return pipe

    def save_pretrained(self, save_directory, **kwargs):
        self.model.save_pretrained(save_directory, **kwargs)
        self.processor.save_pretrained(save_directory)
