"""Make the LlamaGen text-to-image parity fixtures in tests/fixtures/llamagen_t2i/ by running LlamaGen's own code,
its T5 embedder included.

Source: FoundationVision/LlamaGen at commit ce98ec41803a74a90ce68c40ababa9eaeffeb4ec (Sun et al. 2024, arXiv
2406.06525), as for scripts/make_llamagen_fixtures.py (whose VQ, tests/fixtures/llamagen/vq.pt, is reused).

    python scripts/make_llamagen_t2i_fixtures.py /path/to/LlamaGen [--out tests/fixtures/llamagen_t2i]

The checkout is imported from where it lies (`language.t5.T5Embedder`, `GPT_models`' Transformer, `generate`,
`VQ_models`; T5Embedder needs ftfy and beautifulsoup4); nothing of it is copied here. A tiny random T5 encoder with a
word-level tokenizer is built offline with transformers and saved with `save_pretrained` (`t5/`), a tiny random t2i
GPT whose caption width is that T5's (`gpt_t2i.pt`, float16, saved as LlamaGen's releases are). Prompts go through
T5Embedder exactly as `sample_t2i.py` sends them (its caption cleaning, padding to `cls_token_num`, truncation,
then the script's left padding), and `generate` samples greedily (top-k 1) at three guidance scales; the T5
features, tokens and uint8 pixels go to reference.npz, the settings to reference.json. tests/test_text_encoder.py
converts the files with `mmgen convert llamagen --text-encoder` and checks that prompts give the same tokens.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_llamagen_fixtures import GRID, VQ, pixels, randomize, to_half_and_back, vq_architecture  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SEED = 0
# the condition length, as released: LlamaGen's CaptionEmbedder draws a 120-row null caption whatever
# cls_token_num says, so guidance runs only at 120; the T5 embedder pads and cuts prompts to it
CLS_TOKEN_NUM = 120
T5_WIDTH = 32  # the caption width (FLAN-T5-XL: 2048)
GPT = dict(dim=32, n_layer=2, n_head=4, vocab_size=VQ["codebook_size"], block_size=GRID * GRID)
WORDS = ["a", "an", "the", "red", "blue", "green", "yellow", "cat", "dog", "bird", "on", "in", "under", "mat",
         "tree", "small", "big", "sitting", "next", "to", "house", "with", "hat"]
# three lengths: short, longer, and longer than CLS_TOKEN_NUM (128 words: the embedder cuts it); upper case and
# surrounding space as users type them (the embedder's cleaning lower-cases and strips them)
PROMPTS = ["A red cat", "  a small blue bird sitting on the big green tree  ",
           " ".join(["a big yellow dog with a red hat sitting under a small tree next to the green house"] * 8)]
CFG_SCALES = (1.0, 4.0, 7.5)


def tiny_t5(directory: Path) -> None:
    """A random T5 encoder (2 layers, d_model T5_WIDTH) and a word-level T5-style tokenizer (pad 0, </s> 1 appended,
    unknown words <unk> 2), saved as a FLAN-T5 directory is."""
    specials = ["<pad>", "</s>", "<unk>"]
    vocab = {w: i for i, w in enumerate(specials + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    torch.manual_seed(SEED)
    config = T5Config(vocab_size=len(vocab), d_model=T5_WIDTH, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                      feed_forward_proj="gated-gelu")  # FLAN-T5's feed-forward
    T5EncoderModel(config).save_pretrained(directory)
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                            model_max_length=512).save_pretrained(directory)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("llamagen", help="path of a LlamaGen checkout (or an export of its tree)")
    parser.add_argument("--out", default=str(ROOT / "tests/fixtures/llamagen_t2i"))
    parser.add_argument("--commit", default=None, help="the checkout's commit, where it is not a git checkout")
    args = parser.parse_args(argv)
    root = Path(args.llamagen).resolve()
    sys.path.insert(0, str(root))
    from autoregressive.models.generate import generate
    from autoregressive.models.gpt import ModelArgs, Transformer
    from language.t5 import T5Embedder
    from tokenizer.tokenizer_image.vq_model import VQ_models, Decoder, Encoder

    commit = args.commit
    if commit is None:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                check=True).stdout.strip()
    torch.set_num_threads(1)
    torch.set_grad_enabled(False)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tiny_t5(out / "t5")

    # sample_t2i.py's T5: T5Embedder(local_cache=True, cache_dir=<t5 path>, dir_or_name=<model dir>, ...)
    t5 = T5Embedder(device="cpu", local_cache=True, cache_dir=str(out), dir_or_name="t5", torch_dtype=torch.float32,
                    model_max_length=CLS_TOKEN_NUM)
    cleaned = [t5.text_preprocessing(p) for p in PROMPTS]
    # mmgen reproduces lower-casing and stripping, not the rest of the cleaning: these prompts must not need it
    assert cleaned == [p.lower().strip() for p in PROMPTS], cleaned
    caption_embs, emb_masks = t5.get_text_embeddings(PROMPTS)

    # the VQ of tests/fixtures/llamagen (its weights as saved there)
    vq = vq_architecture(VQ_models, Encoder, Decoder)
    vq_file = ROOT / "tests/fixtures/llamagen/vq.pt"
    vq.load_state_dict({k: v.float() for k, v in torch.load(vq_file, weights_only=True)["model"].items()})
    vq.eval()

    torch.manual_seed(SEED)  # the buffer LlamaGen draws itself (the null caption, uncond_embedding)
    gpt = Transformer(ModelArgs(**GPT, caption_dim=T5_WIDTH, model_type="t2i", cls_token_num=CLS_TOKEN_NUM)).eval()
    randomize(gpt, 2.0, torch.Generator().manual_seed(SEED))
    torch.save({"model": to_half_and_back(gpt)}, out / "gpt_t2i.pt")

    # sample_t2i.py's left padding: valid tokens moved to the end, the mask flipped, padding zeroed
    new_emb_masks = torch.flip(emb_masks, dims=[-1])
    new_caption_embs = torch.stack([torch.cat([e[int(m.sum()):], e[:int(m.sum())]])
                                    for e, m in zip(caption_embs, emb_masks)])
    c_indices = new_caption_embs * new_emb_masks[:, :, None]

    arrays = {"t5_features": caption_embs.numpy(), "t5_mask": emb_masks.numpy()}
    runs = []
    for cfg in CFG_SCALES:
        tokens = generate(gpt, c_indices, GRID * GRID, new_emb_masks, cfg_scale=cfg, temperature=1.0, top_k=1,
                          top_p=1.0, sample_logits=True)
        images = vq.decode_code(tokens, [len(PROMPTS), VQ["codebook_embed_dim"], GRID, GRID])
        key = f"greedy_cfg{cfg:g}"
        arrays[f"{key}_tokens"] = tokens.long().numpy()
        arrays[f"{key}_pixels"] = pixels(images)
        runs.append({"key": key, "cfg_scale": cfg, "top_k": 1})
        print(key, tokens.tolist())
    np.savez_compressed(out / "reference.npz", **arrays)
    meta = {"source": "FoundationVision/LlamaGen", "commit": commit, "image_size": GRID * 2 ** (len(VQ["ch_mult"]) - 1),
            "grid": GRID, "gpt": GPT, "caption_dim": T5_WIDTH, "cls_token_num": CLS_TOKEN_NUM, "prompts": PROMPTS,
            "prompt_tokens": emb_masks.sum(1).tolist(), "runs": runs,
            "files": {"gpt": "gpt_t2i.pt", "t5": "t5", "vq": vq_file.relative_to(ROOT).as_posix(),
                      "reference": "reference.npz"}}
    (out / "reference.json").write_text(json.dumps(meta, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
