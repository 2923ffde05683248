"""Text tokenizer and the unified vocabulary (text ids, special tokens, image ids).

The text side is a real Hugging Face tokenizer (`tokenizers` WordLevel model, wrapped as a
`transformers.PreTrainedTokenizerFast` so it saves and loads as `tokenizer.json`). A word-level model suits
a closed caption vocabulary: an unknown word is reported by name instead of being silently split into
sub-words that the generator never saw. Users with open-vocabulary captions can pass any other
`PreTrainedTokenizerFast` (BPE, the CLIP vocabulary...); `UnifiedVocab` only needs its size.

Unified id layout, as in Chameleon / Lumina-mGPT style single-vocabulary models::

    [0, T)              text ids (the text tokenizer's own ids; 0 = [PAD], 1 = [UNK])
    [T, T + S)          special tokens: <boi>, <eoi>, <null>, <hybnext>, <eol>, then reserved slots
    [T + S, T + S + V)  image ids: image code c has id T + S + c
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

PAD_TOKEN = "[PAD]"
UNK_TOKEN = "[UNK]"

# Order matters: ids are T + index. New specials take a reserved slot so saved models keep their ids.
SPECIAL_TOKENS = ("<boi>", "<eoi>", "<null>", "<hybnext>", "<eol>")
NUM_SPECIAL_SLOTS = 16


def train_text_tokenizer(texts: Iterable[str], extra_words: Iterable[str] = ()) -> PreTrainedTokenizerFast:
    """Train a word-level tokenizer on captions (lower-cased, punctuation split off)."""
    tok = Tokenizer(models.WordLevel(unk_token=UNK_TOKEN))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase(), normalizers.Strip()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace()])
    trainer = trainers.WordLevelTrainer(special_tokens=[PAD_TOKEN, UNK_TOKEN], min_frequency=1)
    tok.train_from_iterator(list(texts) + [" ".join(extra_words)], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD_TOKEN, unk_token=UNK_TOKEN)


@dataclass(frozen=True)
class UnifiedVocab:
    """Id layout shared by the decoder's embedding table and its logits head."""

    text_vocab_size: int
    image_vocab_size: int
    num_special: int = NUM_SPECIAL_SLOTS

    def __post_init__(self):
        if self.num_special < len(SPECIAL_TOKENS):
            raise ValueError(f"num_special must be >= {len(SPECIAL_TOKENS)}, got {self.num_special}")

    @property
    def special_offset(self) -> int:
        return self.text_vocab_size

    @property
    def image_offset(self) -> int:
        return self.text_vocab_size + self.num_special

    @property
    def size(self) -> int:
        return self.image_offset + self.image_vocab_size

    def special(self, name: str) -> int:
        if name not in SPECIAL_TOKENS:
            raise ValueError(f"unknown special token {name!r}; accepted: {', '.join(SPECIAL_TOKENS)}")
        return self.special_offset + SPECIAL_TOKENS.index(name)

    @property
    def boi(self) -> int:
        return self.special("<boi>")

    @property
    def eoi(self) -> int:
        return self.special("<eoi>")

    @property
    def null(self) -> int:
        return self.special("<null>")

    @property
    def pad(self) -> int:
        return 0

    def image_to_unified(self, codes: torch.Tensor) -> torch.Tensor:
        return codes + self.image_offset

    def unified_to_image(self, ids: torch.Tensor) -> torch.Tensor:
        return ids - self.image_offset


def encode_prompts(tokenizer: PreTrainedTokenizerFast, prompts: Sequence[str], max_len: int) -> list[list[int]]:
    """Tokenize prompts, refusing empty prompts, unknown words and over-long prompts by name."""
    if isinstance(prompts, str):
        prompts = [prompts]
    out = []
    for p in prompts:
        if not isinstance(p, str) or not p.strip():
            raise ValueError(f"prompt must be a non-empty string, got {p!r}")
        ids = tokenizer(p, add_special_tokens=False)["input_ids"]
        if tokenizer.unk_token_id is not None and tokenizer.unk_token_id in ids:
            known = set(tokenizer.get_vocab())
            words = re.findall(r"\w+|[^\w\s]", p.lower())
            unknown = sorted({w for w in words if w not in known})
            raise ValueError(
                f"prompt {p!r} has words the text tokenizer does not know: {unknown}. "
                f"The model knows {len(known) - 2} words, e.g. {sorted(known - {PAD_TOKEN, UNK_TOKEN})[:12]}"
            )
        if len(ids) > max_len:
            raise ValueError(f"prompt {p!r} is {len(ids)} tokens long; the model accepts at most {max_len}")
        out.append(ids)
    return out
