"""Text-to-image by raster next-token prediction (LlamaGen / Lumina-mGPT style), as a diffusers pipeline.

Components: a text tokenizer (`transformers`), the decoder, and a visual tokenizer giving codes (`VQGAN`, the
1-D `SEEDTokenizer`, or a diffusers `VQModel`, all through `tokenizers_vis.protocol`). The decoder's class picks
the paradigm (`DECODER_PARADIGMS`): the plain `Transformer` (one token per pass, `paradigms.next_token`), a
`TokenShuffleTransformer` (Token-Shuffle, Ma et al. 2025, arXiv 2504.17789: s x s tokens per pass,
`paradigms.token_shuffle`), an `NARTransformer` (NAR, arXiv 2503.10696: one anti-diagonal per pass,
`paradigms.next_neighbor`) or a `NextBlockTransformer` (next-block prediction, arXiv 2502.07737: one row per
pass, `paradigms.next_block`). The sampling loop is that paradigm's `generate` (prefill, decode step, sample), or
`paradigms.next_token.generate_sjd` for SJD; this pipeline checks the call, runs that loop under the call's stages
(guidance, watermark, compilation) and decodes the codes to images (`pipelines.base.ParadigmPipeline`).
"""

from __future__ import annotations

import math

import torch

from mmgen.models.shuffle import TokenShuffleTransformer
from mmgen.paradigms import next_block, next_neighbor, next_token, token_shuffle
from mmgen.paradigms.next_block import NextBlockTransformer
from mmgen.paradigms.next_neighbor import NARTransformer
from mmgen.options import SAMPLERS, OptionError, check_choice
from mmgen.pipelines.base import ParadigmPipeline, WatermarkDetection, condition_prefix, sjd_config, sjd_neighbours
from mmgen.sampling.logits import SamplingConfig
from mmgen.watermark import WatermarkProcessor

# the paradigm a decoder class runs (any other decoder: raster next-token) and, for those that decode several tokens
# per pass in another order than raster, what a pass decodes (SJD verifies a raster sequence one token per position)
DECODER_PARADIGMS = {TokenShuffleTransformer: token_shuffle, NARTransformer: next_neighbor,
                     NextBlockTransformer: next_block}
PARALLEL_PASSES = {next_neighbor: "NAR (next_neighbor) models decode a whole anti-diagonal per pass",
                   next_block: "next_block models decode a whole row per pass"}


class NextTokenPipeline(WatermarkDetection, ParadigmPipeline):
    """transformer: a `Transformer`, `TokenShuffleTransformer`, `NARTransformer` or `NextBlockTransformer`;
    vq_model: a `VQGAN`, `SEEDTokenizer` or diffusers `VQModel`; tokenizer: the caption tokenizer
    (`PreTrainedTokenizerFast`; None for class-conditional and unconditional models); the rest as
    `ParadigmPipeline`."""

    paradigm = next_token  # a plain decoder's; `paradigm_of` picks the others by the decoder's class

    @classmethod
    def paradigm_of(cls, transformer):
        return DECODER_PARADIGMS.get(type(transformer), next_token)

    @property
    def shuffle(self) -> bool:
        """True for a Token-Shuffle decoder (s x s codes per pass)."""
        return isinstance(self.transformer, TokenShuffleTransformer)

    def watermark_key_order(self):
        """Where the watermark keys each position (`mmgen.watermark.KeyOrder`): the paradigm's own decoding order
        (next_neighbor, next_block, token_shuffle), or None for raster order."""
        key_order = getattr(self.paradigm, "watermark_key_order", None)
        return None if key_order is None else key_order(self.layout)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
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
        sjd_tree_width: int = 0,
        sjd_tree_depth: int = 4,
        sjd_shared_noise: bool = False,
        watermark_key: str | None = None,
        watermark_method: str | None = None,
        watermark_delta: float | None = None,
        cfg_schedule: str = "constant",
        compile_decode: bool = False,
        class_labels: int | str | list[int | str] | None = None,
    ):
        """Generate images for `prompt` (a caption model) or `class_labels` (a class-conditional model: an int or
        a class name, or a list of them; `num_images_per_prompt` images each); an unconditional model takes
        neither (`mmgen.conditioning`). `callback_on_step_end(pipe, step, timestep, callback_kwargs)` runs after every
        decoder pass, AR or SJD (`pipelines.base.StepCallback`), with empty `callback_kwargs` (the paradigm's loop
        hands out no tensors).

        sampler: "ar" (one token per forward pass) or "sjd" (speculative Jacobi decoding: the same
        distribution in fewer passes; `sjd_window` drafts per pass, `sjd_init` one of random / repeat / sample_left /
        above; `sjd_coupled`: next drafts by maximal coupling with the old ones; `sjd_adaptive`: each pass's width
        (at most `sjd_window`) from the images' acceptance rates and a pass-cost model; `sjd_tree_width` c > 0: the
        first `sjd_tree_depth` window positions also score c other candidates (recursive rejection sampling);
        `sjd_shared_noise`: each position's token is the race of its distribution with that position's own noise
        and a draft is accepted when it equals it, so the tokens are plain AR's for the same seeds; all exact).
        `sjd_lantern_delta` (LOSSY, off by default): LANTERN's relaxed acceptance, a draft also takes the
        probability of its `sjd_lantern_k` nearest codebook neighbours up to total variation delta per token; the
        output then says `lossless=False`. Image i uses its own generator: the batch size changes no image.
        `watermark_key`: embed the distortion-free watermark (`self.watermark`, C-reweight by default) under this
        secret key; detect it with `detect_watermark`. `watermark_method` / `watermark_delta`: another method of
        `mmgen.watermark.METHODS` over the same cluster table, e.g. the distorting "kgw-cluster" (detect with it).

        cfg_schedule: "constant" or "linear" (guidance ramped from 1 at the first token / window to
        guidance_scale at the last; sampler "ar" only). Token-Shuffle (s x s codes per pass), NAR (an anti-diagonal)
        and next-block (a row) decoders take sampler "ar" only; they key the watermark by tokens decoded at earlier
        passes (`watermark_key_order`: NAR and Token-Shuffle the left neighbour, next-block the token above).

        compile_decode: sampler "ar" through a `torch.compile`d one-token step (`mmgen.models.compiled_decode`),
        compiled once per batch size (tens of seconds); the same tokens up to float rounding, 2-4x faster on CPU. Sampler "sjd": its verify passes through the compiled window step
        (a graph per batch size and width 1, 2, 4, ... up to `sjd_window` on a CPU, the window alone on a GPU); with
        `sjd_adaptive` a batch for which no width pays is sampled by the compiled AR step instead. Falls back to
        eager, with a warning, where compilation fails.
        """
        text_ids, guidance_scale, gens = self.prepare(prompt, class_labels, num_images_per_prompt, output_type,
                                                      guidance_scale, generator)
        self.check_stages(sampler, cfg_schedule, compile_decode, sjd_tree_width)
        sampling = SamplingConfig(guidance_scale, temperature, top_k, top_p, cfg_schedule=cfg_schedule)
        sjd = sjd_config(sampler, sjd_window, sjd_init, sjd_coupled, sjd_adaptive, sjd_lantern_delta, sjd_lantern_k,
                         sjd_tree_width, sjd_tree_depth, sjd_shared_noise)
        processor = self.watermark_processor(watermark_key, watermark_method, watermark_delta)
        step = self.step_callback(callback_on_step_end, callback_on_step_end_tensor_inputs, sampler)
        if sjd is None:
            codes, passes, compression, accepted = self.sample_ar(text_ids, sampling, gens, prompt,
                                                                  num_images_per_prompt, step, processor,
                                                                  compile_decode)
        else:
            codes, passes, compression, accepted = self.sample_sjd(text_ids, sampling, sjd, gens, prompt,
                                                                   num_images_per_prompt, step, processor,
                                                                   compile_decode)
        return self.output(self.visual_tokenizer.decode_tokens(codes), codes, output_type, return_dict, passes,
                           compression, accepted, lossless=sjd is None or sjd.lossless)

    def watermark_processor(self, key: str | None, method: str | None, delta: float | None):
        """The call's watermark stage: None without a key."""
        if key is not None:
            return WatermarkProcessor(self.watermark_config(method, delta), key)
        if method is not None or delta is not None:
            raise OptionError("watermark_method and watermark_delta need a watermark_key")
        return None

    def sample_ar(self, text_ids, sampling, gens, prompt, num_images_per_prompt, step, processor, compile_decode):
        """The paradigm's own loop: (codes, decoder passes, step compression, tokens per pass)."""
        stages = {} if processor is None else {"processor": processor}
        if compile_decode:
            stages["compile"] = True
        passes = getattr(self.layout, "num_steps", self.layout.num_image_tokens)  # NAR / next-block: fewer
        codes, cost = self.run_paradigm(text_ids, sampling, gens, prompt, num_images_per_prompt, passes, step,
                                        **stages)
        compression = math.prod(self.visual_tokenizer.token_shape) / cost.decoder_passes  # Token-Shuffle: s^2
        return codes, cost.decoder_passes, compression, compression

    def sample_sjd(self, text_ids, sampling, sjd, gens, prompt, num_images_per_prompt, step, processor,
                   compile_decode):
        """Speculative Jacobi decoding: (codes, decoder passes, step compression, mean accepted length)."""
        with self.progress_bar(total=self.layout.num_image_tokens) as bar, \
                condition_prefix(self, prompt, num_images_per_prompt):
            codes, stats = next_token.generate_sjd(self.transformer, self.layout, text_ids, sampling, sjd, gens,
                                                   callback=lambda done: (bar.update(done - bar.n), step()),
                                                   processor=processor, compile=compile_decode,
                                                   neighbours=sjd_neighbours(self.visual_tokenizer, sjd))
        return codes, stats.decoder_passes, stats.step_compression, stats.mean_accepted_length

    def check_stages(self, sampler: str, cfg_schedule: str, compile_decode: bool, sjd_tree_width: int) -> None:
        """The sampler and the stages this decoder takes (`mmgen.options` checks the values)."""
        check_choice(sampler, SAMPLERS, "sampler")
        if self.shuffle and sampler != "ar":
            raise OptionError(f"sampler={sampler!r} is not available for Token-Shuffle models (speculative Jacobi "
                              f"decoding verifies one token per position); use sampler='ar'")
        if self.paradigm in PARALLEL_PASSES and sampler != "ar":
            raise OptionError(f"sampler must be 'ar' for this model; got {sampler!r}: "
                              f"{PARALLEL_PASSES[self.paradigm]}, speculative Jacobi decoding verifies a raster "
                              f"sequence one token per position")
        if sampler == "sjd" and cfg_schedule != "constant":
            raise OptionError(f"cfg_schedule={cfg_schedule!r} is not available with sampler='sjd' (a Jacobi window "
                              f"spans many positions); use cfg_schedule='constant'")
        if compile_decode and self.paradigm is not next_token:
            on = {token_shuffle: "a Token-Shuffle decoder"}.get(self.paradigm, f"a {type(self.transformer).__name__} "
                                                                                f"decoder")
            raise OptionError(f"compile_decode (--compile) applies to a plain next-token decoder; got {on}")
        if compile_decode and sampler == "sjd" and sjd_tree_width:
            raise OptionError("compile_decode (--compile) with sampler='sjd' compiles chains; token trees "
                              "(sjd_tree_width > 0) run eagerly: leave out one of them")
