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

The null class of class-conditional CFG (LlamaGen's extra embedding row, VAR's class `num_classes`) is the
shared <null> special. A pipeline saves its conditioning as `conditioning` in model_index.json
(`Conditioning.config()`); a caption model saves none, so models saved before this module load unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from mmgen.text import encode_prompts

KINDS = ("caption", "class", "unconditional")


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


def make_conditioning(config: dict | None, tokenizer=None, max_text_len: int | None = None) -> Conditioning:
    """The conditioning a pipeline's saved `conditioning` config describes (None or {}: captions through
    `tokenizer`)."""
    kind = (config or {}).get("kind", "caption")
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

    kind: str = "caption"  # caption (the data's captions) | class (the data's labels) | unconditional


def dataset_classes(dataset) -> tuple[list[int], tuple[str, ...]]:
    """(label per item, class names) of a labelled data set: one with `labels` and `classes` (`ImageClassFolder`,
    `FashionMNIST`)."""
    labels, classes = getattr(dataset, "labels", None), getattr(dataset, "classes", None)
    if labels is None or classes is None:
        raise ValueError(f"condition.kind=class needs a labelled data set (data.name imagefolder or fashion_mnist); "
                         f"{type(dataset).__name__} has no class labels")
    return [int(c) for c in labels], tuple(classes)


def check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise ValueError(f"condition.kind must be one of {', '.join(KINDS)}; got {kind!r}")
    return kind


def run_conditioning(cfg: ConditionConfig, dataset, captions: Sequence[str] | None = None, text_tokenizer=None,
                     max_text_len: int | None = None) -> tuple[Conditioning, list[list[int]]]:
    """A training run's conditioning and the condition ids of every item of `dataset` (caption: `captions` through
    the run's word-level `text_tokenizer`; class: the data set's labels; unconditional: none)."""
    if check_kind(cfg.kind) == "caption":
        cond = CaptionConditioning(text_tokenizer, max_text_len)
        return cond, encode_prompts(text_tokenizer, list(captions), max_text_len)
    if cfg.kind == "class":
        labels, classes = dataset_classes(dataset)
        cond = ClassConditioning(len(classes), classes)
        return cond, cond.ids(labels)
    return Unconditional(), [[] for _ in range(len(dataset))]
