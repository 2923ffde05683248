"""Where a FlowAR pipeline loses the prompt: its VAE alone, the VAE under latent noise, each scale sampled from
the true coarser scales (teacher-forced), and free generation, scored by the compositional checker on the same
train-split scenes (`docs/diagnosis_continuous.md`, section 6).

    python scripts/diagnose_flowar.py runs/flowar_v2/pipeline --scenes 64 --json
"""

from __future__ import annotations

import argparse
import json

import torch
from tqdm import tqdm

from mmgen.data.shapes import prompt_scenes, render, to_tensor
from mmgen.eval.compositional import evaluate
from mmgen.options import positive_int
from mmgen.paradigms import flowar
from mmgen.pipelines import load_pipeline
from mmgen.pipelines.base import generators_from_seed
from mmgen.sampling.flow import sample_flow
from mmgen.text import encode_prompts


def _score(images, captions) -> dict:
    r = evaluate(images, captions)
    return {"accuracy": round(r["accuracy"], 4), "color": round(r["per_check"]["color"], 4)}


def _stats(x_BnC: torch.Tensor) -> dict:
    return {"mean": [round(v, 3) for v in x_BnC.mean((0, 1)).tolist()],
            "std": [round(v, 3) for v in x_BnC.std((0, 1)).tolist()]}


@torch.no_grad()
def diagnose(model_dir: str, scenes: int = 64, steps: int = 25, noise_levels=(0.1, 0.2, 0.3),
             guidance_scales=(1.0, 3.0), seed: int = 0) -> dict:
    pipe = load_pipeline(model_dir)
    if pipe.paradigm is not flowar:
        raise ValueError(f"model_dir must hold a FlowAR pipeline; {model_dir} is {type(pipe).__name__}")
    pipe.set_progress_bar_config(disable=True)
    tok, model, layout = pipe.visual_tokenizer, pipe.transformer, pipe.layout
    items = prompt_scenes("train", scenes, seed=seed)
    captions = [s.caption for s in items]
    images = torch.stack([to_tensor(render(s, tok.image_size)) for s in items])
    to_pil = lambda x: pipe.image_processor.postprocess(x, output_type="pil")  # noqa: E731
    bar = tqdm(total=2 + len(noise_levels) + len(layout.scales) + len(guidance_scales), desc="diagnose")
    latents = tok.encode_tokens(images)
    report = {"model": str(model_dir), "scenes": scenes, "flow_steps": steps,
              "vae": _score(to_pil(tok.decode_tokens(latents)), captions), "vae_noise": {}}
    bar.update()
    g = torch.Generator().manual_seed(seed)
    for sd in noise_levels:
        noisy = latents + sd * torch.randn(latents.shape, generator=g)
        report["vae_noise"][str(sd)] = _score(to_pil(tok.decode_tokens(noisy)), captions)
        bar.update()
    # teacher forcing: every scale's condition comes from the true coarser scales
    batch = flowar.build_batch(layout, encode_prompts(pipe.tokenizer, captions, layout.max_text_len), latents)
    hidden = model.forward_ar(batch.text, batch.inputs, batch.positions, batch.mask)
    report["teacher_forced"] = {}
    for k, s in enumerate(layout.scales):
        z = flowar.scale_condition(layout, hidden, k)
        noise = torch.randn(scenes, s * s, layout.token_dim, generator=g)
        x0, _ = sample_flow(flowar.flow_velocity_fn(model, z, s, 1.0, False), noise, steps)
        truth = flowar.to_tokens(batch.targets[k]).float()
        row = {"mse": round(((x0 - truth) ** 2).mean().item(), 4),
               "mse_of_mean": round(((truth - truth.mean((0, 1), keepdim=True)) ** 2).mean().item(), 4),
               "sampled": _stats(x0), "true": _stats(truth)}
        if k == len(layout.scales) - 1:
            row |= _score(to_pil(tok.decode_tokens(flowar.from_tokens(x0, s))), captions)
        report["teacher_forced"][f"scale_{s}"] = row
        bar.update()
    report["free"] = {}
    for gs in guidance_scales:
        out = pipe(captions, guidance_scale=gs, generator=generators_from_seed(seed, scenes))
        report["free"][f"guidance_{gs}"] = _score(out.images, captions)
        bar.update()
    bar.close()
    return report


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="saved FlowAR pipeline directory (or shipped model name, e.g. shapes-flowar)")
    p.add_argument("--scenes", type=positive_int("--scenes"), default=64, help="train-split scenes to score")
    p.add_argument("--steps", type=positive_int("--steps"), default=25, help="flow ODE steps per scale")
    p.add_argument("--seed", type=int, default=0, help="scene list and noise seed")
    p.add_argument("--json", action="store_true", help="print the JSON report")
    args = p.parse_args(argv)
    try:
        report = diagnose(args.model, args.scenes, args.steps, seed=args.seed)
    except (ValueError, OSError) as err:
        p.error(str(err))
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"VAE {report['vae']}; teacher-forced finest scale "
              f"{ {k: v for k, v in report['teacher_forced'].items() if 'accuracy' in v} }; free {report['free']}")


if __name__ == "__main__":
    main()
