"""The decode suite (`mmgen bench --suite decode`): mmgen's AR decode loop, eager and through the compiled one-token
step, against transformers' `LlamaForCausalLM.generate()` holding the same weights (the baseline)."""

from __future__ import annotations

import statistics
import time

import torch

from mmgen.bench.common import distinct_prompts
from mmgen.data.shapes import heldout_prompts
from mmgen.models.hf_llama import to_llama
from mmgen.paradigms import next_token
from mmgen.pipelines.base import generators_from_seed
from mmgen.sampling.logits import SamplingConfig
from mmgen.text import encode_prompts


def bench_hf_generate(pipe, batch_sizes=(1, 8), repeats: int = 5, seed: int = 0) -> dict:
    """mmgen's AR decode, eager and compiled (`compile=True`), vs `LlamaForCausalLM.generate()` holding the same
    weights, without CFG (transformers' own CFG runs a separate unconditional pass). The compile itself is timed
    apart (`compile_seconds`: once per batch size, less where inductor's disk cache has the kernels). Each timed
    repeat takes the next held-out prompt (a batch holds b images of it: the decode's cost does not depend on the
    words), the three interleaved; greedy tokens are compared on two prompts; latency is for sampling, the median
    over repeats."""
    layout, vocab = pipe.layout, pipe.vocab
    hf = to_llama(pipe.transformer, grid_width=layout.grid[1])
    prompts = distinct_prompts(heldout_prompts, repeats + 1, seed)
    texts = encode_prompts(pipe.tokenizer, prompts, layout.max_text_len)
    off, n_img = vocab.image_offset, layout.num_image_tokens
    suppress = [i for i in range(vocab.size) if not off <= i < off + vocab.image_vocab_size]

    def hf_call(text, b, r, greedy=False):
        ids = torch.tensor([text + [vocab.boi]] * b, device=hf.device)
        if hasattr(hf.model.rotary_emb, "prefix_len"):
            hf.model.rotary_emb.prefix_len = len(text) + 1
        torch.manual_seed(seed + r)
        with torch.no_grad():
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n_img,
                              min_new_tokens=n_img, do_sample=not greedy, top_k=0, top_p=1.0, temperature=1.0,
                              suppress_tokens=suppress, pad_token_id=vocab.pad)
        return out[:, ids.shape[1]:] - off

    def ours(text, b, r, greedy=False, compile=False):
        sampling = SamplingConfig(guidance_scale=1.0, temperature=0 if greedy else 1.0)
        codes, _ = next_token.generate(pipe.transformer, layout, [text] * b, sampling,
                                       generators_from_seed(seed + r, b), compile=compile)
        return codes.flatten(1)

    def compiled(text, b, r, greedy=False):
        return ours(text, b, r, greedy, compile=True)

    report = {"prompts": prompts[1:]}
    for b in batch_sizes:
        t0 = time.perf_counter()
        compiled(texts[0], b, 0)  # compiles the step for this batch size (kept on the model)
        compile_seconds = time.perf_counter() - t0
        same = {name: all(torch.equal(hf_call(t, b, 0, True), fn(t, b, 0, True)) for t in (texts[1], texts[-1]))
                for name, fn in (("eager", ours), ("compiled", compiled))}
        hf_call(texts[0], b, 0), ours(texts[0], b, 0)  # warm-up
        times = {hf_call: [], ours: [], compiled: []}
        for r, text in enumerate(texts[1:]):
            for fn, t in times.items():
                t0 = time.perf_counter()
                fn(text, b, r)
                t.append(time.perf_counter() - t0)
        t_hf, t_ours, t_comp = (statistics.median(t) for t in times.values())
        report[f"batch_{b}"] = {"greedy_tokens_identical": same["eager"],
                                "compiled_greedy_tokens_identical": same["compiled"],
                                "mmgen_seconds": round(t_ours, 4), "mmgen_compiled_seconds": round(t_comp, 4),
                                "compile_seconds": round(compile_seconds, 1),
                                "transformers_generate_seconds": round(t_hf, 4),
                                "generate_over_mmgen": round(t_hf / t_ours, 3),
                                "generate_over_mmgen_compiled": round(t_hf / t_comp, 3)}
    return report
