"""`mmgen serve`: a Gradio web demo over saved pipelines.

Two tabs. Generate: prompt, model (its paradigm is its pipeline class), sampler (AR, or speculative Jacobi
decoding where the pipeline offers it), seed, guidance scale, number of images and the distortion-free
watermark, then a gallery of the images and one status line (seconds, decoder passes). Detect: upload images,
pick the model and type the key; per image the p-value and verdict, and optionally one pooled test for the set
(`mmgen watermark detect ... --combine`). A class-conditional model (a converted LlamaGen c2i or VAR model, one trained
with `condition.kind=class`) draws the class typed in the class-label box instead of the prompt. It calls pipelines
exactly as
`mmgen generate` does: `load_pipeline` once per model (lazily, then cached) and `generators_from_seed`, so the
same settings give the same images on the page and on the command line.

Options a paradigm does not take (its pipeline class's `call_options`) are switched off in the page when its
model is picked, and refused with a message naming the model, never passed on (the CLI's rule,
`mmgen.options.sampling_kwargs`). The page's values are checked once, where every call is (`mmgen.options`, run by
the pipeline and `generators_from_seed`): their errors are shown as they are; the page's own components keep the
seed >= 0 and the number of images in 1..8.
"""

from __future__ import annotations

import inspect
import json
import threading
import time
from pathlib import Path

import gradio as gr

from mmgen.pipelines import PIPELINES, load_pipeline
from mmgen.pipelines.base import DEFAULT_GUIDANCE_SCALE, generators_from_seed
from mmgen.safe_save import pipeline_class_name
from mmgen.zoo import DEFAULT_MODEL, conditioning_kind, default_guidance_scale, zoo_models

SAMPLER_CHOICES = [("AR", "ar"), ("SJD", "sjd")]  # (label, value): values are the pipeline's `sampler`
MAX_IMAGES = 8
# The shipped models draw 64x64 images; scale them up as blocks rather than blurs.
CSS = "#output img { image-rendering: pixelated; }"


def pipeline_class(model_dir: Path) -> type:
    """The pipeline class a saved directory names, read from `model_index.json` without loading weights."""
    index = Path(model_dir) / "model_index.json"
    if not index.is_file():
        raise ValueError(f"model directory {str(model_dir)!r} is not a saved pipeline: it has no model_index.json")
    name = pipeline_class_name(json.loads(index.read_text()))
    if name not in PIPELINES:
        raise ValueError(f"{str(index)!r} names pipeline {name!r}; accepted: {', '.join(PIPELINES)}")
    return PIPELINES[name]


class DemoModels:
    """The models a demo offers (name -> saved directory) and the generate callback behind its button.

    Pipelines load on a model's first generation and stay cached; what each model accepts is read from its
    pipeline class, so picking a model costs nothing until it is used.
    """

    def __init__(self, models: dict[str, Path], device: str = "cpu"):
        self.device = device
        if not models:
            raise ValueError("models must name at least one saved pipeline directory")
        self.dirs = {name: Path(d) for name, d in models.items()}
        self.classes = {name: pipeline_class(d) for name, d in self.dirs.items()}
        self._pipes = {}
        self._lock = threading.Lock()  # Gradio runs callbacks on worker threads

    def accepts(self, name: str) -> set[str]:
        """The call options the model's pipeline class declares."""
        return set(self.classes[name].call_options)

    def default_guidance(self, name: str) -> float:
        """The model's own guidance scale, read without loading it."""
        return default_guidance_scale(self.dirs[name])

    def condition_kind(self, name: str) -> str:
        """What the model is conditioned on (`mmgen.conditioning` kinds), read without loading it: its
        model_index.json, or its pipeline class when that takes class labels and no prompt (VAR)."""
        params = inspect.signature(self.classes[name].__call__).parameters
        if "prompt" not in params:
            return "class" if "class_labels" in params else "unconditional"
        return conditioning_kind(json.loads((self.dirs[name] / "model_index.json").read_text()))

    def describe(self, name: str) -> str:
        """One line for the page: the model's paradigm and the optional stages it takes."""
        accepted = self.accepts(name)
        stages = [label for arg, label in (("sampler", "SJD sampler"), ("watermark_key", "watermark"))
                  if arg in accepted]
        extra = (f"Takes: {', '.join(stages)}." if stages
                 else "SJD and the watermark are next-token stages; this model samples with AR only.")
        if self.condition_kind(name) == "class":
            extra += " Class-conditional: it draws the class label, not the prompt."
        return f"**{name}**: `{self.classes[name].__name__}`. {extra}"

    def pipeline(self, name: str):
        with self._lock:
            if name not in self._pipes:
                pipe = load_pipeline(self.dirs[name], device=self.device)
                pipe.set_progress_bar_config(disable=True)
                self._pipes[name] = pipe
            return self._pipes[name]

    def generate(self, prompt: str, model: str, sampler: str = "ar", seed: int = 0,
                 guidance_scale: float = DEFAULT_GUIDANCE_SCALE, num_images: int = 1, watermark: bool = False,
                 watermark_key: str = "", class_label: str = "") -> tuple[list[tuple], str]:
        """The Generate button: ([(image, caption), ...], status line). Bad input raises `gr.Error`, which the
        page shows as a message. The page always sends a guidance scale (its slider opens at the model's own).
        `class_label` (an integer or a class name) is what a class-conditional model draws; it takes no prompt."""
        if model not in self.dirs:
            raise _error(f"model must be one of {', '.join(self.dirs)}; got {model!r}")
        accepted, kind = self.accepts(model), self.classes[model].__name__
        kwargs = {}
        if sampler != "ar":  # AR is every pipeline's default
            if "sampler" not in accepted:
                raise _error(f"SJD (speculative Jacobi decoding) needs a next-token model; {model} is a {kind}. "
                             f"Pick AR.")
            kwargs["sampler"] = sampler
        if watermark:
            if "watermark_key" not in accepted:
                raise _error(f"The watermark needs a next-token model; {model} is a {kind}. Switch it off.")
            if not watermark_key:
                raise _error("Enter a watermark key (the secret that detection needs) or switch the watermark off.")
            kwargs["watermark_key"] = watermark_key

        # the one check of every value (`mmgen.options`, in the pipeline and `generators_from_seed`: empty prompt,
        # unknown words, seed, count, guidance, a corrupt model file) names the problem
        try:
            generators = generators_from_seed(seed, num_images)
            pipe = self.pipeline(model)
        except ValueError as e:
            raise _error(str(e)) from None
        condition = self.condition(pipe, model, prompt, class_label)
        try:
            t0 = time.perf_counter()
            out = pipe(**condition, num_images_per_prompt=num_images, guidance_scale=guidance_scale,
                       generator=generators, **kwargs)
        except ValueError as e:
            raise _error(str(e)) from None
        seconds = time.perf_counter() - t0
        n, (w, h) = len(out.images), out.images[0].size
        status = (f"{n} image{'s' if n > 1 else ''} ({w}x{h}) in {seconds:.2f} s with {kind}, "
                  f"{out.decoder_passes} decoder passes per image")
        if out.model_evals is not None:
            status += f" ({out.model_evals} decoder evaluations with the flow steps)"
        if kwargs.get("sampler") == "sjd":
            status += f"; SJD: {out.step_compression:.2f} tokens per pass"
        if watermark:
            status += "; watermarked"
        return [(image, f"seed {seed + i}") for i, image in enumerate(out.images)], status + "."

    @staticmethod
    def condition(pipe, model: str, prompt: str, class_label) -> dict:
        """The call's condition: {"class_labels": [label]} for a class-conditional model (checked by the pipeline),
        else {"prompt": prompt}; a class label given to a model that takes none is refused."""
        cond = getattr(pipe, "condition", None)
        label = "" if class_label is None else str(class_label).strip()
        if cond is not None and cond.kind == "class":
            if not label:
                raise _error(f"Enter a class label: {model} is class-conditional; it takes {cond.accepted()}.")
            return {"class_labels": [int(label) if label.lstrip("-").isdigit() else label]}
        if label:
            raise _error(f"The class label does not apply to {model}: it is not class-conditional. Clear it.")
        return {"prompt": prompt}

    def detect(self, files, model: str, key: str, combine: bool = False, fpr: float = 0.01) -> str:
        """The Detect tab's callback: uploaded image files -> a Markdown table of per-image p-values and verdicts
        at `fpr` (and the pooled test of the set with `combine`), as `mmgen watermark detect` reports them."""
        from PIL import Image, UnidentifiedImageError

        if model not in self.dirs:
            raise _error(f"model must be one of {', '.join(self.dirs)}; got {model!r}")
        if "watermark_key" not in self.accepts(model):
            raise _error(f"Watermark detection needs a next-token model; {model} is a "
                         f"{self.classes[model].__name__}.")
        paths = [getattr(f, "name", f) for f in (files or [])]
        if not paths:
            raise _error("Upload at least one image.")
        if not key:
            raise _error("Enter the watermark key the images were generated with.")
        images = []
        for path in paths:
            try:
                with Image.open(path) as im:
                    im.load()
                    images.append(im.copy())
            except (UnidentifiedImageError, OSError):
                raise _error(f"{Path(path).name} is not a readable image.") from None
        try:
            pipe = self.pipeline(model)
            results = pipe.detect_watermark(images, key, fpr=fpr, combine=combine)
            results, pooled = (results["images"], results["combined"]) if combine else (results, None)
        except ValueError as e:
            raise _error(str(e)) from None
        verdict = {True: "watermarked", False: "not detected"}
        lines = [f"| image | p-value | verdict at {fpr:g} |", "|---|---|---|"]
        lines += [f"| {Path(p).name} | {r['p_value']:.3g} | {verdict[r['watermarked']]} |"
                  for p, r in zip(paths, results)]
        if pooled is not None:
            lines.append(f"| all {pooled['images']} together | {pooled['p_value']:.3g} | "
                         f"{verdict[pooled['watermarked']]} |")
        return "\n".join(lines)

    def controls(self, model: str):
        """Updates for the sampler and watermark controls when `model` is picked (off where they have no use), its
        description, and the guidance slider set to the model's own scale."""
        accepted = self.accepts(model)
        sjd, wm = "sampler" in accepted, "watermark_key" in accepted
        return (gr.update(interactive=sjd, **({} if sjd else {"value": "ar"})),
                gr.update(interactive=wm, **({} if wm else {"value": False})),
                gr.update(interactive=wm),
                self.describe(model),
                gr.update(value=self.default_guidance(model)))


def _error(message: str) -> gr.Error:
    # a user mistake, not a server fault: no traceback in the server log
    return gr.Error(message, print_exception=False)


def build_demo(models: dict[str, Path] | None = None, device: str = "cpu") -> gr.Blocks:
    """The demo page over `models` (name -> saved pipeline directory; default: the shipped zoo).

    Components carry stable `elem_id`s (prompt, class-label, model, sampler, seed, guidance, num-images, watermark,
    watermark-key, generate, output, status, model-info; detect-files, detect-model, detect-key, detect-combine,
    detect, detect-result) for browser tests. The `DemoModels` behind the page
    is `demo.models`.
    """
    if models is None:
        # the default model first: the page opens on it
        models = dict(sorted(zoo_models().items(), key=lambda item: item[1] != DEFAULT_MODEL))
    backend = DemoModels(models, device)
    first = next(iter(backend.dirs))
    sjd, wm = ("sampler" in backend.accepts(first)), ("watermark_key" in backend.accepts(first))
    with gr.Blocks(title="mmgen", analytics_enabled=False) as demo:
        gr.Markdown("# mmgen: autoregressive text-to-image")
        with gr.Tab("Generate", elem_id="tab-generate"), gr.Row():
            with gr.Column():
                prompt = gr.Textbox(label="Prompt", placeholder="a red circle above a blue square", elem_id="prompt")
                class_label = gr.Textbox(label="Class label (class-conditional models)",
                                         placeholder="an integer, e.g. 207, or a class name", elem_id="class-label")
                model = gr.Dropdown(choices=[(f"{name} ({backend.classes[name].__name__})", name)
                                             for name in backend.dirs],
                                    value=first, label="Model (paradigm)", elem_id="model")
                info = gr.Markdown(backend.describe(first), elem_id="model-info")
                sampler = gr.Radio(SAMPLER_CHOICES, value="ar", label="Sampler", interactive=sjd,
                                   info="SJD: speculative Jacobi decoding, the same distribution in fewer passes",
                                   elem_id="sampler")
                with gr.Row():
                    seed = gr.Number(value=0, precision=0, minimum=0, label="Seed (image i uses seed + i)",
                                     elem_id="seed")
                    num_images = gr.Slider(1, MAX_IMAGES, value=1, step=1, precision=0, label="Number of images",
                                           elem_id="num-images")
                guidance = gr.Slider(0.0, 10.0, value=backend.default_guidance(first), step=0.25,
                                     label="Guidance scale (1 = off)",
                                     elem_id="guidance")
                with gr.Row():
                    watermark = gr.Checkbox(value=False, label="Watermark", interactive=wm, elem_id="watermark")
                    key = gr.Textbox(label="Watermark key", type="password", interactive=wm,
                                     elem_id="watermark-key")
                button = gr.Button("Generate", variant="primary", elem_id="generate")
            with gr.Column():
                gallery = gr.Gallery(label="Images", format="png", columns=4, object_fit="contain",
                                     elem_id="output")
                status = gr.Markdown(elem_id="status")
        detectable = [name for name in backend.dirs if "watermark_key" in backend.accepts(name)]
        with gr.Tab("Detect", elem_id="tab-detect"), gr.Row():
            with gr.Column():
                files = gr.File(file_count="multiple", file_types=["image"], label="Images",
                                elem_id="detect-files")
                detect_model = gr.Dropdown(choices=detectable, value=detectable[0] if detectable else None,
                                           label="Model the images came from", elem_id="detect-model")
                detect_key = gr.Textbox(label="Watermark key", type="password", elem_id="detect-key")
                combine = gr.Checkbox(value=False, label="Also test them as one set (one pooled p-value)",
                                      elem_id="detect-combine")
                detect_button = gr.Button("Detect", variant="primary", elem_id="detect")
            with gr.Column():
                detect_result = gr.Markdown(elem_id="detect-result")
        detect_button.click(backend.detect, inputs=[files, detect_model, detect_key, combine],
                            outputs=detect_result)
        model.change(backend.controls, inputs=model, outputs=[sampler, watermark, key, info, guidance])
        gr.on([button.click, prompt.submit, class_label.submit], backend.generate,
              inputs=[prompt, model, sampler, seed, guidance, num_images, watermark, key, class_label],
              outputs=[gallery, status])
    demo.models = backend
    return demo


def serve(models: dict[str, Path] | None = None, host: str = "127.0.0.1", port: int = 7860, share: bool = False,
          block: bool = True, device: str = "cpu") -> gr.Blocks:
    """Build the demo and serve it at http://host:port (`share`: also through a Gradio share link).
    With `block=False` the server runs on a background thread; stop it with `demo.close()`."""
    if not 0 < port < 65536:
        raise ValueError(f"port must be in 1..65535, got {port}")
    demo = build_demo(models, device)
    demo.queue(default_concurrency_limit=1)  # one generation at a time: they share the CPU and the cached pipes
    demo.launch(server_name=host, server_port=port, share=share, prevent_thread_lock=not block, quiet=not block,
                css=CSS, footer_links=[])
    return demo
