"""Text-to-image by next-scale prediction (VAR, Tian et al., 2024), as a diffusers pipeline.

Components: a text tokenizer, the `NextScaleModel` decoder and a `MultiScaleVQGAN`. The visible loop:
tokenize prompts, sample the token maps coarse to fine with `paradigms.next_scale` (one decoder pass per
scale), sum the scales' code maps and decode them to pixels.
"""

from __future__ import annotations

import torch
from diffusers import DiffusionPipeline
from diffusers.image_processor import VaeImageProcessor
from transformers import PreTrainedTokenizerFast

from mmgen.paradigms import next_scale
from mmgen.paradigms.next_scale import NextScaleModel
from mmgen.models.text_encoder import CaptionProjection
from mmgen.pipelines.base import (ARPipelineOutput, call_guidance, condition_prefix, condition_rows,
                                  per_image_generators, pipeline_conditioning, unified_vocab)
from mmgen.pipelines.base import DEFAULT_GUIDANCE_SCALE, SavedDirectory, step_hook
from mmgen.sampling.logits import SamplingConfig
from tokenizers_vis.multiscale import MultiScaleVQGAN
from tokenizers_vis.protocol import as_visual_tokenizer


class NextScalePipeline(SavedDirectory, DiffusionPipeline):
    paradigm = next_scale

    # the keyword options of `__call__` beyond prompt, count, generator and output, with their defaults
    call_options = {"guidance_scale": None, "temperature": 1.0, "top_k": None, "top_p": None,
                    "cfg_schedule": "constant"}

    # class-conditional and unconditional models have no text tokenizer; only text_encoder models have the rest
    _optional_components = ["tokenizer", "text_encoder", "text_projection"]

    def __init__(self, transformer: NextScaleModel, vq_model: MultiScaleVQGAN,
                 tokenizer: PreTrainedTokenizerFast | None, max_text_len: int = 32,
                 default_guidance_scale: float = DEFAULT_GUIDANCE_SCALE, conditioning: dict | None = None,
                 text_encoder=None, text_projection: CaptionProjection | None = None):
        super().__init__()
        self.register_modules(transformer=transformer, vq_model=vq_model, tokenizer=tokenizer,
                              text_encoder=text_encoder, text_projection=text_projection)
        # the model's own guidance scale, used when a call passes none (model_index.json keeps it)
        self.register_to_config(max_text_len=max_text_len, default_guidance_scale=default_guidance_scale)
        if conditioning:  # `mmgen.conditioning`: captions (None, the default), class labels or unconditional
            self.register_to_config(conditioning=conditioning)
        self.condition = pipeline_conditioning(tokenizer, conditioning, max_text_len, text_encoder, text_projection)
        self.visual_tokenizer = as_visual_tokenizer(vq_model)
        self.vocab = unified_vocab(transformer, self.condition, self.visual_tokenizer.vocab_size)
        self.layout = next_scale.layout_from_model(transformer, self.visual_tokenizer, self.vocab, max_text_len)
        self.image_processor = VaeImageProcessor(do_resize=False, do_normalize=True)

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
        class_labels: int | str | list[int | str] | None = None,
    ):
        """Generate images for `prompt` (a caption model) or `class_labels` (a class-conditional model: an int or
        a class name, or a list of them), one decoder pass per scale; an unconditional model takes neither.

        cfg_schedule: "constant" (guidance_scale at every scale) or "linear" (VAR's ramp from 1 at the
        first scale to guidance_scale at the last). `tokens` in the output are all scales' codes, flattened
        raster and concatenated coarse to fine (N, sum of s_k^2). `callback_on_step_end(pipe, step, timestep,
        callback_kwargs)` runs after every decoder pass (`pipelines.base.step_hook`)."""
        text_ids = condition_rows(self.condition, prompt, class_labels, num_images_per_prompt, output_type)
        guidance_scale = call_guidance(self.condition, guidance_scale, self.config.default_guidance_scale)
        sampling = SamplingConfig(guidance_scale, temperature, top_k, top_p, cfg_schedule=cfg_schedule)
        gens = per_image_generators(generator, len(text_ids))
        hook = step_hook(self, callback_on_step_end)
        with self.progress_bar(total=len(self.layout.scales)) as bar, \
                condition_prefix(self, prompt, num_images_per_prompt):
            tokens, cost = next_scale.generate(self.transformer, self.layout, text_ids, sampling, gens,
                                               tokenizer=self.visual_tokenizer, callback=lambda k: (bar.update(), hook()))
        passes = cost.decoder_passes
        images = self.visual_tokenizer.decode_tokens(tokens)
        images = self.image_processor.postprocess(images, output_type=output_type)  # "pt": [0, 1], as diffusers
        compression = self.layout.num_image_tokens / passes
        if not return_dict:
            return images, tokens, passes
        return ARPipelineOutput(images=images, tokens=tokens, decoder_passes=passes, step_compression=compression,
                                mean_accepted_length=compression)
