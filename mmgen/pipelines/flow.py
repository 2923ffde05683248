"""Text-to-image on continuous tokens with a flow-matching head, as diffusers pipelines.

- `RasterFlowPipeline`: MAR-style raster AR (Li et al., 2024): one decoder pass per latent token, each token
  integrated by the per-token flow head.
- `FlowARPipeline`: FlowAR (Ren et al., 2024): one decoder pass per scale, each scale integrated by the
  Spatial-adaLN flow module.
- `NextXPipeline`: xAR (Ren et al., 2025): one AR step per entity (token, cell, subsample, scale or image, from
  the transformer's saved config), each entity integrated by the decoder itself.

All hold a diffusers `AutoencoderKL` as the continuous tokenizer (latents scaled by its `scaling_factor`). The
sampling loop is each paradigm's `generate` (`paradigms.flow_head`, `flowar`, `next_x`); these pipelines check
the call, run it and decode the latents with the VAE (`pipelines.base.ParadigmPipeline`).
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL
from transformers import PreTrainedTokenizerFast

from mmgen.models.text_encoder import CaptionProjection
from mmgen.paradigms import flow_head, flowar, next_x
from mmgen.pipelines.base import DEFAULT_GUIDANCE_SCALE, ParadigmPipeline
from mmgen.sampling.logits import SamplingConfig


class _LatentFlowPipeline(ParadigmPipeline):
    """What the flow pipelines share: the VAE as component `vae`, and the call; a subclass names its paradigm and
    how many decoder passes an image takes (`_steps_per_image`, for the progress bar)."""

    visual_component = "vae"

    def __init__(self, transformer, vae: AutoencoderKL, tokenizer: PreTrainedTokenizerFast | None,
                 max_text_len: int = 32, default_guidance_scale: float = DEFAULT_GUIDANCE_SCALE,
                 conditioning: dict | None = None, text_encoder=None,
                 text_projection: CaptionProjection | None = None):
        # diffusers names a pipeline's components by its constructor's arguments: here the visual tokenizer is `vae`
        super().__init__(transformer, vae, tokenizer, max_text_len, default_guidance_scale, conditioning,
                         text_encoder, text_projection)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        guidance_scale: float | None = None,
        temperature: float = 1.0,
        num_inference_steps: int = 25,
        flow_sampler: str = "euler",
        cfg_schedule: str | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end=None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
        class_labels: int | str | list[int | str] | None = None,
    ):
        """Generate images for `prompt` (a caption model) or `class_labels` (a class-conditional model: an int or
        a class name, or a list of them); an unconditional model takes neither. `callback_on_step_end(pipe, step,
        timestep, callback_kwargs)` runs after every decoder pass (`pipelines.base.StepCallback`), with no tensors.

        num_inference_steps: flow ODE steps per token (raster), per scale (FlowAR) or per entity (xAR);
        flow_sampler: "euler" or "heun"; temperature scales the initial noise; guidance acts on the velocity,
        constant or ramped linearly over tokens / scales / entities (`cfg_schedule`; FlowAR and xAR default to
        "linear"). `tokens` in the output are the sampled latents (N, C, h, w); `decoder_passes` counts AR steps and
        `model_evals` every decoder evaluation where the decoder integrates the flow itself (xAR)."""
        text_ids, guidance_scale, gens = self.prepare(prompt, class_labels, num_images_per_prompt, output_type,
                                                      guidance_scale, generator)
        sampling = SamplingConfig(guidance_scale, temperature, cfg_schedule=cfg_schedule,
                                  num_inference_steps=num_inference_steps, flow_sampler=flow_sampler)
        step = self.step_callback(callback_on_step_end, callback_on_step_end_tensor_inputs)
        latents, cost = self.run_paradigm(text_ids, sampling, gens, prompt, num_images_per_prompt,
                                          self._steps_per_image(), step)
        return self.output(self.visual_tokenizer.decode_tokens(latents), latents, output_type, return_dict,
                           cost.decoder_passes, self.layout.num_image_tokens / cost.decoder_passes,
                           model_evals=cost.model_evals)


class RasterFlowPipeline(_LatentFlowPipeline):
    paradigm = flow_head

    def _steps_per_image(self):
        return self.layout.num_image_tokens


class FlowARPipeline(_LatentFlowPipeline):
    paradigm = flowar

    def _steps_per_image(self):
        return len(self.layout.scales)


class NextXPipeline(_LatentFlowPipeline):
    paradigm = next_x

    def _steps_per_image(self):
        return self.layout.num_entities
