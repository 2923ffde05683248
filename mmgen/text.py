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

import difflib
import re
import unicodedata
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


def is_word_level(tokenizer) -> bool:
    """Is `tokenizer` backed by a `tokenizers` WordLevel model (the project's own text tokenizers)?"""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return backend is not None and isinstance(backend.model, models.WordLevel)


# Sentence punctuation that may surround a prompt: ASCII marks here, plus every opening/closing bracket and
# quotation mark (Unicode categories Ps, Pe, Pi, Pf). Symbols that captions use as words ("*", "#", "-") are not
# in it. Only the ends of the prompt are stripped: a comma between two objects is a word the models were trained on.
_SURROUNDING = set(".,;:!?\"'`\u00a1\u00bf\u3002")  # and inverted !, ?; ideographic full stop


def _is_surrounding(ch: str) -> bool:
    return ch.isspace() or ch in _SURROUNDING or unicodedata.category(ch) in ("Ps", "Pe", "Pi", "Pf")


def normalize_prompt(tokenizer: PreTrainedTokenizerFast, prompt: str) -> str:
    """The prompt as a word-level tokenizer should see it: its own normalizer (NFKC, lower case) applied, then
    sentence punctuation and white space stripped from both ends, so `"A RED Circle."` reads `a red circle`.

    This lives here rather than in the saved tokenizer.json so that models already saved (the zoo) get it too.
    Other tokenizers (BPE, CLIP...) get the prompt unchanged: their case and punctuation may carry meaning."""
    if not is_word_level(tokenizer):
        return prompt
    normalizer = tokenizer.backend_tokenizer.normalizer
    text = normalizer.normalize_str(prompt) if normalizer is not None else prompt
    start, end = 0, len(text)
    while start < end and _is_surrounding(text[start]):
        start += 1
    while end > start and _is_surrounding(text[end - 1]):
        end -= 1
    return text[start:end]


def _vocabulary_words(tokenizer: PreTrainedTokenizerFast) -> list[str]:
    """The words of the vocabulary: no special tokens, no punctuation or other symbols."""
    specials = set(tokenizer.all_special_tokens) | {PAD_TOKEN, UNK_TOKEN}
    return sorted(w for w in tokenizer.get_vocab() if w not in specials and any(c.isalnum() for c in w))


def _unknown_words_message(tokenizer: PreTrainedTokenizerFast, prompt: str, text: str) -> str:
    """Name each word of `text` (already normalised) that the vocabulary lacks, with its closest known words."""
    vocab = tokenizer.get_vocab()
    backend = tokenizer.backend_tokenizer
    if backend.pre_tokenizer is not None:
        pieces = [w for w, _ in backend.pre_tokenizer.pre_tokenize_str(text)]
    else:
        pieces = re.findall(r"\w+|[^\w\s]+", text)
    unknown = list(dict.fromkeys(w for w in pieces if w not in vocab))
    words = _vocabulary_words(tokenizer)
    parts, unmatched = [], False
    for w in unknown:
        close = difflib.get_close_matches(w, words, n=3)
        unmatched |= not close
        parts.append(f"{w!r} (closest known: {', '.join(repr(c) for c in close)})" if close else repr(w))
    msg = f"prompt {prompt!r} has {'a word' if len(unknown) == 1 else 'words'} the text tokenizer does not know: "
    msg += "; ".join(parts)
    if unmatched:
        msg += f". The model knows {len(words)} words, e.g. {', '.join(words[:12])}"
    return msg


def encode_prompts(tokenizer: PreTrainedTokenizerFast, prompts: Sequence[str], max_len: int) -> list[list[int]]:
    """Tokenize prompts, refusing empty prompts, unknown words and over-long prompts by name.

    With a word-level tokenizer, case and the punctuation around a prompt do not matter (`normalize_prompt`),
    and an unknown word is named with the closest words the model knows."""
    if isinstance(prompts, str):
        prompts = [prompts]
    out = []
    for p in prompts:
        if not isinstance(p, str) or not p.strip():
            raise ValueError(f"prompt must be a non-empty string, got {p!r}")
        text = normalize_prompt(tokenizer, p)
        if not text:
            raise ValueError(f"prompt must contain a word, got {p!r}")
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if tokenizer.unk_token_id is not None and tokenizer.unk_token_id in ids:
            if is_word_level(tokenizer):
                raise ValueError(_unknown_words_message(tokenizer, p, text))
            raise ValueError(f"prompt {p!r} has text the text tokenizer does not know (it maps to "
                             f"{tokenizer.unk_token!r})")
        if len(ids) > max_len:
            raise ValueError(f"prompt {p!r} is {len(ids)} tokens long; the model accepts at most {max_len}")
        out.append(ids)
    return out
