"""The prompt front door (`mmgen.text.encode_prompts`) for word-level models: case and the punctuation around a
prompt do not change the tokens or the image; an unknown word is named with the closest known words."""

import numpy as np
import pytest
from transformers import PreTrainedTokenizerFast

from mmgen.pipelines import load_pipeline
from mmgen.zoo import ZOO_DIR as ZOO
from mmgen.pipelines.base import generators_from_seed
from mmgen.text import encode_prompts, train_text_tokenizer

SHOUTED, PLAIN = "A RED Circle.", "a red circle"


@pytest.fixture(scope="module")
def zoo_tokenizer():
    return PreTrainedTokenizerFast.from_pretrained(ZOO / "shapes-nexttoken" / "tokenizer")


def test_case_and_surrounding_punctuation_give_the_same_tokens(zoo_tokenizer):
    plain = encode_prompts(zoo_tokenizer, [PLAIN], 16)[0]
    for variant in [SHOUTED, '"a red circle"', "  (A red circle!)  ", "\u00aba red circle\u2026\u00bb"]:
        assert encode_prompts(zoo_tokenizer, [variant], 16)[0] == plain, variant
    # the saved tokenizer alone does not do it: its "." is an unknown token, so the normalisation is needed
    raw = zoo_tokenizer(SHOUTED, add_special_tokens=False)["input_ids"]
    assert raw != plain and zoo_tokenizer.unk_token_id in raw
    # a comma between objects is a trained word and stays
    assert encode_prompts(zoo_tokenizer, ["a red circle, a blue star"], 16)[0][3] == zoo_tokenizer.convert_tokens_to_ids(",")


def test_shouted_prompt_gives_the_same_image():
    pipe = load_pipeline("shapes-nexttoken")
    pipe.set_progress_bar_config(disable=True)
    a, b = (np.asarray(pipe(prompt=p, generator=generators_from_seed(0, 1)).images[0]) for p in (SHOUTED, PLAIN))
    assert np.array_equal(a, b)


def test_unknown_word_is_named_with_the_closest_words(zoo_tokenizer):
    with pytest.raises(ValueError) as exc:
        encode_prompts(zoo_tokenizer, ["a purple circel."], 16)
    msg = str(exc.value)
    assert "does not know: 'circel' (closest known: 'circle'" in msg
    assert "','" not in msg and "[PAD]" not in msg  # suggestions and examples are words, not marks or specials
    with pytest.raises(ValueError, match=r"'zzzz'\. The model knows 34 words, e\.g\. a, above"):
        encode_prompts(zoo_tokenizer, ["a zzzz"], 16)
    with pytest.raises(ValueError, match="must contain a word"):
        encode_prompts(zoo_tokenizer, ["?!"], 16)


def test_other_tokenizers_get_the_prompt_unchanged():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([SHOUTED, PLAIN], trainers.BpeTrainer(special_tokens=["[UNK]"]))
    bpe = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")
    assert encode_prompts(bpe, [SHOUTED], 16)[0] != encode_prompts(bpe, [PLAIN], 16)[0]
    # and the project's own word-level training lower-cases
    word = train_text_tokenizer(["a red circle"])
    assert encode_prompts(word, [SHOUTED], 16) == encode_prompts(word, [PLAIN], 16)
