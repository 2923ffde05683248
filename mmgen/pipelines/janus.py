"""Janus / Janus-Pro text-to-image (Wu et al. 2024, arXiv 2410.13848; Chen et al. 2025, Janus-Pro, arXiv
2501.17811) from a transformers checkpoint directory, sampled by mmgen's own loop.

The directory is what `JanusForConditionalGeneration.save_pretrained` and `JanusProcessor.save_pretrained`
write (the hub layout). Generation follows transformers' `generate(generation_mode="image")`: the prompt ends
in the begin-of-image token; the unconditional rows of classifier-free guidance are the prompt with every token
but BOS and begin-of-image replaced by pad; image tokens enter through the generation embeddings and aligner,
logits come from the generation head over the VQ codebook. What is mmgen's: the sampling stages (CFG,
temperature, top-k/top-p, the watermark), one generator per image, and speculative Jacobi decoding, all
through one `JanusBackend` whose KV cache (`RowOffsetCache`) lets each row sit at its own length. The sampling
loop is `pipelines.backend.sample_codes` over that backend.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from diffusers.image_processor import VaeImageProcessor
from transformers import JanusForConditionalGeneration, JanusProcessor

from mmgen.options import OptionError
from mmgen.pipelines.backend import BackendPipeline
from mmgen.pipelines.base import WatermarkDetection
from mmgen.pipelines.transformers_models import TransformersLayout
from mmgen.sampling.hf_backend import CausalLMBackend, window_attention
from mmgen.sampling.logits import guide
from tokenizers_vis.protocol import JanusVQTokenizer

JANUS_GUIDANCE_SCALE = 5.0  # transformers' Janus generate uses 5 when the generation config sets none
# what a saved directory needs beside config.json: one file of each group
CHECKPOINT_FILES = {"weights": ("model.safetensors", "model.safetensors.index.json"),
                    "tokenizer": ("tokenizer.json", "tokenizer.model"),
                    "image processor config": ("preprocessor_config.json", "processor_config.json")}


class JanusBackend(CausalLMBackend):
    """`mmgen.sampling.sjd.JacobiBackend` for `JanusForConditionalGeneration`. Draft ids are VQ codebook ids.

    prompts / uncond_prompts: token id lists ending in begin-of-image (the uncond ones as Janus builds them).
    The prompt layout, cache, row dropping and left-pad positions are `CausalLMBackend`'s over the language
    model; only the way in (text embeddings for the prompt, generation embeddings + aligner for image ids) and
    the way out (the generation head) differ."""

    def __init__(self, janus, prompts: Sequence[Sequence[int]], uncond_prompts: Sequence[Sequence[int]] | None,
                 num_tokens: int, window: int, guidance_scale: float, pad_token_id: int):
        super().__init__(janus.model.language_model, prompts, vocab_offset=0,
                         vocab_size=janus.config.vq_config.num_embeddings, num_tokens=num_tokens, window=window,
                         guidance_scale=guidance_scale, uncond_prompts=uncond_prompts, pad_token_id=pad_token_id)
        self.janus = janus

    def forward(self, window_AT: torch.Tensor, n_A: torch.Tensor) -> torch.Tensor:
        A, T = window_AT.shape
        codes, n = (torch.cat([window_AT, window_AT]), torch.cat([n_A, n_A])) if self.use_cfg else (window_AT, n_A)
        embed = self.model.get_input_embeddings()
        x_RTD = self.janus.prepare_embeddings_for_image_generation(codes)
        boi_RD = embed(self.ids[:, -1])
        first = (n == 0)[:, None, None] & (torch.arange(T, device=self.device) == 0)[None, :, None]
        x_RTD = torch.where(first, boi_RD[:, None].to(x_RTD.dtype), x_RTD)  # row's first pass: start at <boi>
        start = self.prefix + n
        if not self.prefilled:  # the first pass carries the prompt: no separate prefill pass
            x_RTD = torch.cat([embed(self.ids[:, : self.prefix]).to(x_RTD.dtype), x_RTD], 1)
            start = torch.zeros_like(start)
            self.prefilled = True
        mask, positions = window_attention(self.cache, start, x_RTD.shape[1], self.key_valid, self.pads,
                                           self.model.dtype)
        h_RTD = self.model(inputs_embeds=x_RTD, attention_mask=mask, position_ids=positions, cache=self.cache,
                           use_cache=True).last_hidden_state[:, -T:]
        logits = self.janus.model.generation_head(h_RTD).float()
        return guide(logits, self.guidance_scale, self.use_cfg)


class JanusPipeline(WatermarkDetection, TransformersLayout, BackendPipeline):
    model_class, processor_class, checkpoint_files = JanusForConditionalGeneration, JanusProcessor, CHECKPOINT_FILES

    def __init__(self, model, processor):
        super().__init__()
        self.register_modules(model=model, processor=processor)
        ip = processor.image_processor
        self.visual_tokenizer = JanusVQTokenizer(model.model.vqmodel, ip.image_mean, ip.image_std)
        self.image_processor = VaeImageProcessor(do_resize=False, do_normalize=True)
        h, w = self.visual_tokenizer.token_shape
        if model.config.vision_config.num_image_tokens != h * w:  # generate() makes that many, the VQ decodes h*w
            raise ValueError(f"vision_config.num_image_tokens={model.config.vision_config.num_image_tokens} does not "
                             f"match the {h}x{w} token grid of vq_config")
        tokenizer, gen = processor.tokenizer, model.generation_config
        # the ids generate() reads from the generation config, else the tokenizer's
        self.boi_token_id = tokenizer.convert_tokens_to_ids(processor.image_start_token)
        self.bos_token_id = gen.bos_token_id if gen.bos_token_id is not None else tokenizer.bos_token_id
        self.pad_token_id = gen.pad_token_id if gen.pad_token_id is not None else tokenizer.pad_token_id
        if self.pad_token_id is None:
            raise ValueError("the Janus checkpoint sets no pad token (generation_config.json or the tokenizer): "
                             "classifier-free guidance needs it for its unconditional prompt")

    @property
    def default_guidance_scale(self) -> float:
        scale = self.model.generation_config.guidance_scale
        return JANUS_GUIDANCE_SCALE if scale is None else float(scale)

    def encode_prompts(self, prompts: Sequence[str]) -> tuple[list[list[int]], list[list[int]]]:
        """Conditional and unconditional token ids, as `processor(text=..., generation_mode="image")` gives them
        (after the processor's chat template, when it has one) and as transformers' Janus `generate` masks them."""
        if self.processor.chat_template is not None:
            prompts = [self.processor.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": p}]}],
                                                          add_generation_prompt=True) for p in prompts]
        batch = self.processor(text=list(prompts), generation_mode="image", padding=True)
        cond = [ids[mask.bool()].tolist() for ids, mask in zip(batch["input_ids"], batch["attention_mask"])]
        keep = (self.bos_token_id, self.boi_token_id)
        uncond = [[t if t in keep else self.pad_token_id for t in ids] for ids in cond]
        return cond, uncond

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        num_images_per_prompt: int = 1,
        guidance_scale: float | None = None,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end=None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
        sampler: str = "ar",
        sjd_window: int = 16,
        sjd_init: str = "random",
        sjd_coupled: bool = False,
        sjd_adaptive: bool = False,
        sjd_lantern_delta: float | None = None,
        sjd_lantern_k: int = 8,
        watermark_key: str | None = None,
        height: int | None = None,
        width: int | None = None,
    ):
        """Generate images for `prompt` (see `NextTokenPipeline.__call__` for the shared options).

        guidance_scale: default the checkpoint's generation config, else 5 (as transformers' Janus `generate`).
        temperature 0 is greedy. height / width: Janus generates at its one trained size only; another raises.
        `callback_on_step_end` runs after every decoder pass; with sampler "ar" it may ask for "tokens" (the
        codes drawn so far) and change the pass's own code (`pipelines.base.StepCallback`)."""
        prompts = self.prepare_prompts(prompt, num_images_per_prompt, output_type)
        size = self.visual_tokenizer.image_size
        for name, value in (("height", height), ("width", width)):
            if value is not None and value != size:
                raise OptionError(f"{name}={value}: this Janus checkpoint generates {size}x{size} images only")
        sampling, sjd, processor, step = self.stages(
            guidance_scale, temperature, top_k, top_p, sampler, (sjd_window, sjd_init, sjd_coupled, sjd_adaptive,
                                                                 sjd_lantern_delta, sjd_lantern_k),
            watermark_key, callback_on_step_end, callback_on_step_end_tensor_inputs)
        cond, uncond = (self.repeat(rows, num_images_per_prompt) for rows in self.encode_prompts(prompts))
        h, w = self.visual_tokenizer.token_shape
        backend = JanusBackend(self.model, cond, uncond if sampling.guidance_scale != 1.0 else None, h * w,
                               1 if sjd is None else sjd.window, sampling.guidance_scale, self.pad_token_id)
        return self.sample(backend, (h, w), sampling, sjd, generator, step, processor, output_type, return_dict)
