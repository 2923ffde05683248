"""Text-to-image by next-scale prediction (VAR, Tian et al., 2024), as a diffusers pipeline.

Components: a text tokenizer, the `NextScaleModel` decoder and a `MultiScaleVQGAN`. The sampling loop is
`paradigms.next_scale.generate` (one decoder pass per scale, coarse to fine); this pipeline checks the call, runs
it and decodes the summed scales to pixels (`pipelines.base.ParadigmPipeline`).
"""

from __future__ import annotations

import torch

from mmgen.paradigms import next_scale
from mmgen.pipelines.base import ParadigmPipeline
from mmgen.sampling.logits import SamplingConfig


class NextScalePipeline(ParadigmPipeline):
    """transformer: a `NextScaleModel`; vq_model: a `MultiScaleVQGAN`; the rest as `ParadigmPipeline`."""

    paradigm = next_scale

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        guidance_scale: float | None = None,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        cfg_schedule: str = "constant",
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end=None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
        class_labels: int | str | list[int | str] | None = None,
    ):
        """Generate images for `prompt` (a caption model) or `class_labels` (a class-conditional model: an int or
        a class name, or a list of them), one decoder pass per scale; an unconditional model takes neither.

        cfg_schedule: "constant" (guidance_scale at every scale) or "linear" (VAR's ramp from 1 at the
        first scale to guidance_scale at the last). `tokens` in the output are all scales' codes, flattened
        raster and concatenated coarse to fine (N, sum of s_k^2). `callback_on_step_end(pipe, step, timestep,
        callback_kwargs)` runs after every decoder pass (`pipelines.base.StepCallback`), with no tensors (the loop
        is the paradigm's `generate`)."""
        text_ids, guidance_scale, gens = self.prepare(prompt, class_labels, num_images_per_prompt, output_type,
                                                      guidance_scale, generator)
        sampling = SamplingConfig(guidance_scale, temperature, top_k, top_p, cfg_schedule=cfg_schedule)
        step = self.step_callback(callback_on_step_end, callback_on_step_end_tensor_inputs)
        tokens, cost = self.run_paradigm(text_ids, sampling, gens, prompt, num_images_per_prompt,
                                         len(self.layout.scales), step)
        return self.output(self.visual_tokenizer.decode_tokens(tokens), tokens, output_type, return_dict,
                           cost.decoder_passes, self.layout.num_image_tokens / cost.decoder_passes)
