"""The pipelines that drive a model through a `mmgen.sampling.sjd.JacobiBackend` (Janus, Emu3, LlamaGen): their
sampling loop, plain AR one token per decoder pass (`sample_ar`, gpt-fast's decode loop: forward, process, draw) or
speculative Jacobi decoding through the same backend (`jacobi_sample`), and the call they share
(`BackendPipeline`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from mmgen.options import SAMPLERS, check_choice, check_count, check_output_type, check_prompts
from mmgen.pipelines.base import MMGenPipeline, StepCallback, per_image_generators, sjd_config, sjd_neighbours
from mmgen.sampling.logits import SamplingConfig, process_logits, sample
from mmgen.sampling.sjd import SJDConfig, jacobi_sample
from mmgen.watermark import WatermarkProcessor


@torch.no_grad()
def sample_ar(backend, num_tokens: int, sampling: SamplingConfig, generators: Sequence[torch.Generator] | None = None,
              processor: Callable | None = None, draw: Callable = sample,
              on_step: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """(num_samples, num_tokens) codes, one per decoder pass (the first pass carries the prompt): the backend's
    guided logits, temperature / top-k / top-p, the optional `processor` stage (a watermark), then `draw` with one
    generator per image (the exponential race; LlamaGen's multinomial). `on_step(codes drawn so far)` runs after
    every pass and returns them, the pass's own code possibly changed (`StepCallback`)."""
    B, device = backend.num_samples, backend.device
    codes = torch.zeros(B, num_tokens, dtype=torch.long, device=device)
    for i in range(num_tokens):
        n = torch.full((B,), i, dtype=torch.long, device=device)
        logits = process_logits(backend.forward(codes[:, max(i - 1, 0), None], n)[:, 0], sampling)
        if processor is not None:
            logits = processor(logits, codes, n)
        codes[:, i] = draw(logits, generators, greedy=sampling.temperature == 0)
        if on_step is not None:
            codes[:, i] = on_step(codes[:, : i + 1])[:, i]
    return codes


def sample_codes(pipe, backend, num_tokens: int, sampling: SamplingConfig, sjd: SJDConfig | None, generators,
                 grid_width: int, step: StepCallback, processor: Callable | None = None,
                 draw: Callable = sample) -> tuple[torch.Tensor, int, float, float]:
    """A call's codes (num_samples, num_tokens) under `pipe`'s progress bar, by `sample_ar` (`sjd` None) or
    `jacobi_sample`, and (decoder passes, tokens per pass, mean accepted length); `step` runs after every pass."""
    with pipe.progress_bar(total=num_tokens) as bar:
        if sjd is None:
            def on_step(codes_Bn: torch.Tensor) -> torch.Tensor:
                bar.update()
                return step(codes_Bn, codes_Bn.shape[1] - 1)

            return sample_ar(backend, num_tokens, sampling, generators, processor, draw, on_step), num_tokens, 1.0, 1.0
        codes, stats = jacobi_sample(backend, num_tokens, sampling, sjd, generators, grid_width=grid_width,
                                     callback=lambda done: (bar.update(done - bar.n), step()), processor=processor,
                                     neighbours=sjd_neighbours(pipe.visual_tokenizer, sjd))
    return codes, stats.decoder_passes, stats.step_compression, stats.mean_accepted_length


class BackendPipeline(MMGenPipeline):
    """The call of a pipeline that drives its model through a backend (Janus, Emu3, LlamaGen): the door
    (`prepare_prompts`, `stages`) and the loop with its output (`sample`). A subclass builds its backend from the
    checked call and sets `visual_tokenizer`, `image_processor` and `default_guidance_scale`."""

    _callback_tensor_inputs = ("tokens",)  # the codes drawn so far, (B, n): sampler "ar" only

    @staticmethod
    def repeat(rows: list, num_images_per_prompt: int) -> list:
        """Each condition's rows `num_images_per_prompt` times, in order."""
        return [row for row in rows for _ in range(num_images_per_prompt)]

    def prepare_prompts(self, prompt, num_images_per_prompt: int, output_type: str) -> list[str]:
        """The door of a text-conditioned call: its prompts as a list, the count and the output type checked."""
        prompts = check_prompts(prompt)
        check_count(num_images_per_prompt, len(prompts))
        check_output_type(output_type)
        return prompts

    def stages(self, guidance_scale, temperature, top_k, top_p, sampler: str, sjd_options: tuple, watermark_key,
               callback_on_step_end, tensor_inputs) -> tuple[SamplingConfig, SJDConfig | None, Callable | None,
                                                             StepCallback]:
        """The call's `SamplingConfig` (the model's own guidance scale when None), `SJDConfig` (None for "ar"; the
        sjd_* options in `sjd_config`'s order), watermark processor (None without a key) and step callback."""
        check_choice(sampler, SAMPLERS, "sampler")
        guidance_scale = self.default_guidance_scale if guidance_scale is None else guidance_scale
        sampling = SamplingConfig(guidance_scale, temperature, top_k, top_p)
        sjd = sjd_config(sampler, *sjd_options)
        processor = None if watermark_key is None else WatermarkProcessor(self.watermark_config(), watermark_key)
        return sampling, sjd, processor, self.step_callback(callback_on_step_end, tensor_inputs, sampler)

    def sample(self, backend, grid: tuple[int, int], sampling: SamplingConfig, sjd: SJDConfig | None, generator,
               step: StepCallback, processor: Callable | None, output_type: str, return_dict: bool,
               draw: Callable = sample):
        """Codes on a (h, w) `grid` for every backend row (`sample_codes`), decoded, as the call's output."""
        h, w = grid
        gens = per_image_generators(generator, backend.num_samples)
        codes, passes, compression, accepted = sample_codes(self, backend, h * w, sampling, sjd, gens, w, step,
                                                            processor, draw)
        codes = codes.view(-1, h, w)
        return self.output(self.visual_tokenizer.decode_tokens(codes), codes, output_type, return_dict, passes,
                           compression, accepted, lossless=sjd is None or sjd.lossless)
