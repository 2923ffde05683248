"""Text-to-image on continuous tokens with a flow-matching head, as diffusers pipelines.

- `RasterFlowPipeline`: MAR-style raster AR (Li et al., 2024): one decoder pass per latent token, each token
  integrated by the per-token flow head.
- `FlowARPipeline`: FlowAR (Ren et al., 2024): one decoder pass per scale, each scale integrated by the
  Spatial-adaLN flow module.
- `NextXPipeline`: xAR (Ren et al., 2025): one AR step per entity (token, cell, subsample, scale or image, from
  the transformer's saved config), each entity integrated by the decoder itself.

All hold a diffusers `AutoencoderKL` as the continuous tokenizer (latents scaled by its `scaling_factor`).
The visible loop: tokenize prompts, sample latents with the paradigm, decode with the VAE.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, DiffusionPipeline
from diffusers.image_processor import VaeImageProcessor
from transformers import PreTrainedTokenizerFast

from mmgen.paradigms import flow_head, flowar, next_x
from mmgen.models.text_encoder import CaptionProjection
from mmgen.pipelines.base import (ARPipelineOutput, call_guidance, condition_prefix, condition_rows,
                                  per_image_generators, pipeline_conditioning, unified_vocab)
from mmgen.pipelines.base import DEFAULT_GUIDANCE_SCALE, SavedDirectory, step_hook
from mmgen.sampling.logits import SamplingConfig
from tokenizers_vis.protocol import as_visual_tokenizer


class _LatentFlowPipeline(SavedDirectory, DiffusionPipeline):
    """The loop the flow pipelines share; a subclass names its paradigm module and builds its layout."""

    paradigm = None
    # the keyword options of `__call__` beyond prompt, count, generator and output, with their defaults
    call_options = {"guidance_scale": None, "temperature": 1.0, "num_inference_steps": 25, "flow_sampler": "euler",
                    "cfg_schedule": None}

    # class-conditional and unconditional models have no text tokenizer; only text_encoder models have the rest
    _optional_components = ["tokenizer", "text_encoder", "text_projection"]

    def __init__(self, transformer, vae: AutoencoderKL, tokenizer: PreTrainedTokenizerFast | None,
                 max_text_len: int = 32, default_guidance_scale: float = DEFAULT_GUIDANCE_SCALE,
                 conditioning: dict | None = None, text_encoder=None,
                 text_projection: CaptionProjection | None = None):
        super().__init__()
        self.register_modules(transformer=transformer, vae=vae, tokenizer=tokenizer, text_encoder=text_encoder,
                              text_projection=text_projection)
        # the model's own guidance scale, used when a call passes none (model_index.json keeps it)
        self.register_to_config(max_text_len=max_text_len, default_guidance_scale=default_guidance_scale)
        if conditioning:  # `mmgen.conditioning`: captions (None, the default), class labels or unconditional
            self.register_to_config(conditioning=conditioning)
        self.condition = pipeline_conditioning(tokenizer, conditioning, max_text_len, text_encoder, text_projection)
        self.visual_tokenizer = as_visual_tokenizer(vae)
        self.vocab = unified_vocab(transformer, self.condition, 0)
        self.layout = self.paradigm.layout_from_model(transformer, self.visual_tokenizer, self.vocab, max_text_len)
        self.image_processor = VaeImageProcessor(do_resize=False, do_normalize=True)

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
        class_labels: int | str | list[int | str] | None = None,
    ):
        """Generate images for `prompt` (a caption model) or `class_labels` (a class-conditional model: an int or
        a class name, or a list of them); an unconditional model takes neither. `callback_on_step_end(pipe, step,
        timestep, callback_kwargs)` runs after every decoder pass (`pipelines.base.step_hook`).

        num_inference_steps: flow ODE steps per token (raster), per scale (FlowAR) or per entity (xAR);
        flow_sampler: "euler" or "heun"; temperature scales the initial noise; guidance acts on the velocity,
        constant or ramped linearly over tokens / scales / entities (`cfg_schedule`; FlowAR and xAR default to
        "linear"). `tokens` in the output are the sampled latents (N, C, h, w); `decoder_passes` counts AR steps and
        `model_evals` every decoder evaluation where the decoder integrates the flow itself (xAR)."""
        text_ids = condition_rows(self.condition, prompt, class_labels, num_images_per_prompt, output_type)
        guidance_scale = call_guidance(self.condition, guidance_scale, self.config.default_guidance_scale)
        sampling = SamplingConfig(guidance_scale, temperature, cfg_schedule=cfg_schedule,
                                  num_inference_steps=num_inference_steps, flow_sampler=flow_sampler)
        gens = per_image_generators(generator, len(text_ids))
        hook = step_hook(self, callback_on_step_end)
        with self.progress_bar(total=self._steps_per_image()) as bar, \
                condition_prefix(self, prompt, num_images_per_prompt):
            latents, cost = self.paradigm.generate(self.transformer, self.layout, text_ids, sampling, gens,
                                                   callback=lambda i: (bar.update(), hook()))
        passes = cost.decoder_passes
        images = self.visual_tokenizer.decode_tokens(latents)
        images = self.image_processor.postprocess(images, output_type=output_type)  # "pt": [0, 1], as diffusers
        compression = self.layout.num_image_tokens / passes
        if not return_dict:
            return images, latents, passes
        return ARPipelineOutput(images=images, tokens=latents, decoder_passes=passes, step_compression=compression,
                                mean_accepted_length=compression, model_evals=cost.model_evals)


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
