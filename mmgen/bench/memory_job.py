"""One job of the memory suite (`mmgen.bench.memory`), run by path in a fresh interpreter: `python memory_job.py
JOB_JSON` does the job and prints {"peak_rss_mb": ...}. The baseline job imports torch and nothing else, so the
project's imports sit inside `workload`, and the script is run by path, not with -m (that would import the
`mmgen.bench` package and every suite).

On Linux the peak is VmHWM from /proc/self/status: the high-water mark of this process image alone. ru_maxrss
would not do: Linux carries it across exec, so a child forked from a large parent (a test runner with torch
loaded) reports the parent's size. Elsewhere ru_maxrss (bytes on macOS)."""

import json
import resource
import sys

import torch


def peak_rss_bytes() -> int:
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) * 1024
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def workload(job: dict) -> None:
    """Generate `batch` images, or `steps` AdamW steps of the pipeline's decoder on random codes (batch `batch`,
    captions from the shapes prompts)."""
    from mmgen.data.shapes import heldout_prompts
    from mmgen.paradigms import next_token
    from mmgen.pipelines import load_pipeline, paradigm_name
    from mmgen.pipelines.base import generators_from_seed
    from mmgen.text import encode_prompts

    pipe = load_pipeline(job["model"])
    pipe.set_progress_bar_config(disable=True)
    b = job["batch"]
    prompts = heldout_prompts(b, seed=0)
    if job["kind"] == "generate":
        pipe(prompt=prompts, generator=generators_from_seed(0, b))
        return
    if paradigm_name(pipe) != "next_token":
        raise ValueError(f"the memory suite trains a plain next-token decoder; {job['model']!r} holds paradigm "
                         f"{paradigm_name(pipe)!r}")
    model, layout = pipe.transformer.train().requires_grad_(True), pipe.layout
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(0)
    text_ids = encode_prompts(pipe.tokenizer, prompts, layout.max_text_len)
    for _ in range(job["steps"]):
        codes = torch.randint(0, layout.vocab.image_vocab_size, (b, *layout.grid), generator=g)
        loss = next_token.loss_fn(model, next_token.build_batch(layout, text_ids, codes, cond_drop_prob=0.1,
                                                                generator=g), layout)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


if __name__ == "__main__":
    job = json.loads(sys.argv[1])
    torch.set_num_threads(job["threads"])
    if job["kind"] != "baseline":
        workload(job)
    print(json.dumps({"peak_rss_mb": peak_rss_bytes() / 2**20}))
