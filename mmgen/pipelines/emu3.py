"""Emu3 text-to-image (Wang et al., 2024, "Emu3: Next-Token Prediction is All You Need", arXiv 2409.18869) from a
transformers checkpoint: `Emu3ForConditionalGeneration` + `Emu3Processor` saved side by side (the hub layout of
BAAI/Emu3-Gen-hf), sampled by mmgen's own loop instead of `generate`.

An Emu3 image is text in one vocabulary: `<bos> prompt <|image start|> h*w <|image token|>`, then h rows of w
visual tokens, each row closed by an end-of-line token, then end-of-frame / end-of-image. The row structure is
fixed, so the end-of-line tokens are forced here, never sampled (transformers' documented call forces them with
`prefix_allowed_tokens_fn`); only the h * w codes are drawn, from logits restricted to the visual vocabulary and
mapped to VQ codebook ids. Guidance follows transformers' `negative_prompt_ids`: the unconditional row is the
negative prompt as the processor tokenizes plain text, followed by the same image tokens.

`Emu3Backend` is the `mmgen.sampling.sjd.JacobiBackend` of this layout: drafts are codebook ids, and the backend
inserts each forced end-of-line after the draft that closes a row, so a window of T drafts spans up to
T + T / w + 1 positions of the LM, each row of the batch at its own cache offset (`RowOffsetCache`). Plain AR
decoding runs through the same backend one code per pass, the forced end-of-line fed in the same pass as the
code before it, so an image costs h * w decoder passes, the prompt pass included. The sampling loop is
`pipelines.backend.sample_codes` over that backend.

The default image size is the one the processor's own image-generation path makes when given none (its ratio and
image area, wherever they are configured); a processor that makes no usable size leaves height / width to the call.
"""

from __future__ import annotations

from collections.abc import Sequence

import PIL.Image
import torch
from diffusers.image_processor import VaeImageProcessor
from transformers import Emu3ForConditionalGeneration, Emu3Processor

from mmgen.options import OptionError
from mmgen.pipelines.backend import BackendPipeline
from mmgen.pipelines.base import WatermarkDetection, check_image_mode
from mmgen.pipelines.transformers_models import TransformersLayout
from mmgen.sampling.hf_backend import CausalLMBackend, RowOffsetCache, window_attention
from mmgen.sampling.logits import guide
from tokenizers_vis.protocol import Emu3VQTokenizer

# the negative prompt of transformers' Emu3 image-generation example (and of BAAI's own inference script)
DEFAULT_NEGATIVE_PROMPT = ("lowres, bad anatomy, bad hands, text, error, missing fingers, extra digit, fewer digits, "
                           "cropped, worst quality, low quality, normal quality, jpeg artifacts, signature, watermark, "
                           "username, blurry.")
DEFAULT_EMU3_GUIDANCE = 4.0  # when the checkpoint's generation_config.json sets no guidance_scale
# what a checkpoint directory needs beside config.json: one file of each group
CHECKPOINT_FILES = {"weights": ("model.safetensors", "model.safetensors.index.json"),
                    # 5.x writes the first, 4.x the second
                    "image processor config": ("processor_config.json", "preprocessor_config.json"),
                    "tokenizer config": ("tokenizer_config.json",),
                    # a fast tokenizer, or a BPE vocabulary (with merges.txt)
                    "tokenizer": ("tokenizer.json", "vocab.json")}


class Emu3Backend:
    """`JacobiBackend` for Emu3 image codes: the draft vocabulary is the VQ codebook (ids 0..V-1).

    prompts / uncond_prompts: LM token id lists (the conditional prompts end with the image wrapper token, which
    starts generation; the unconditional rows, used when guidance_scale != 1, are the negative prompts). grid:
    (h, w) codes. code_ids: (V,) LM id of each codebook id. Rows are left-padded together; positions skip the
    pads, as `generate()` counts them."""

    supports_leaves = False  # chains only: forward takes no token-tree leaves

    def __init__(self, model, prompts: Sequence[Sequence[int]], grid: tuple[int, int], code_ids: torch.Tensor,
                 eol_id: int, pad_id: int, window: int = 1, guidance_scale: float = 1.0,
                 uncond_prompts: Sequence[Sequence[int]] | None = None):
        self.model, self.guidance_scale = model, guidance_scale
        self.num_samples, self.vocab_size = len(prompts), len(code_ids)
        self.h, self.w = grid
        self.eol_id, self.pad_id = eol_id, pad_id
        self.use_cfg = guidance_scale != 1.0
        if self.use_cfg:
            if uncond_prompts is None or len(uncond_prompts) != len(prompts):
                raise ValueError("guidance_scale != 1 needs one unconditional prompt per prompt")
            prompts = list(prompts) + list(uncond_prompts)
        if any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        self.device = model.device
        self.code_ids = code_ids.to(self.device)
        P = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), P), pad_id, dtype=torch.long)
        valid = torch.zeros(len(prompts), P, dtype=torch.bool)
        for r, p in enumerate(prompts):
            ids[r, P - len(p):] = torch.tensor(list(p))
            valid[r, P - len(p):] = True
        self.ids, self.prefix = ids.to(self.device), P - 1  # slots before the start token
        n = self.h * self.w
        # prompt, codes with their end-of-lines, and a window's overrun (its drafts, their end-of-lines, one spare)
        self.capacity = P + n + self.h + window + window // self.w + 2
        self.key_valid = torch.ones(len(prompts), self.capacity, dtype=torch.bool, device=self.device)
        self.key_valid[:, :P] = valid.to(self.device)
        self.pads = (~valid).sum(1).to(self.device)
        self.cache = RowOffsetCache(model.config.get_text_config().num_hidden_layers, self.capacity)
        self.prefilled = False

    def forward(self, window_AT: torch.Tensor, n_A: torch.Tensor) -> torch.Tensor:
        A, T = window_AT.shape
        codes, n = window_AT, n_A
        if self.use_cfg:
            codes, n = torch.cat([codes, codes]), torch.cat([n, n])  # rows: [cond; uncond]
        R, w = len(codes), self.w
        c = n[:, None] - 1 + torch.arange(T, device=self.device)  # code index of each window slot; -1: start
        tokens = self.code_ids[codes]
        tokens[:, 0] = torch.where(n == 0, self.ids[:, -1], tokens[:, 0])
        eol = (c >= 0) & ((c + 1) % w == 0)  # this code closes a row: the forced end-of-line follows it
        last = (1 + eol.long()).cumsum(1) - 1  # index of each slot's last LM token (the code, or its end-of-line)
        L = int(last[:, -1].max()) + 1
        ids = torch.full((R, L), self.pad_id, dtype=torch.long, device=self.device)  # short rows end in pads
        ids.scatter_(1, last, torch.where(eol, torch.full_like(tokens, self.eol_id), tokens))
        ids.scatter_(1, last - eol.long(), tokens)
        cm1 = (n - 1).clamp_min(0)
        start = self.prefix + torch.where(n > 0, cm1 + cm1 // w + 1, 0)  # cache slot of window slot 0
        if not self.prefilled:  # the first pass carries the prompt: no separate prefill pass
            ids, start = torch.cat([self.ids[:, : self.prefix], ids], 1), torch.zeros_like(start)
            self.prefilled = True
        mask, positions = window_attention(self.cache, start, ids.shape[1], self.key_valid, self.pads,
                                           self.model.dtype)
        logits = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=self.cache,
                            use_cache=True, logits_to_keep=L).logits  # (R, L, vocab): the window's positions
        logits = logits[..., self.code_ids].float().gather(1, last[..., None].expand(R, T, self.vocab_size))
        return guide(logits, self.guidance_scale, self.use_cfg)

    keep = CausalLMBackend.keep  # the same rows (cond, then uncond), cache and prompt state


def _check_side(name: str, value, factor: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < factor or value % factor:
        raise OptionError(f"{name} must be a positive multiple of {factor} (the VQ-VAE's downsampling factor: the "
                         f"image is tiled by {factor} x {factor} pixel codes), got {value!r}")
    return value


class Emu3Pipeline(WatermarkDetection, TransformersLayout, BackendPipeline):
    model_class, processor_class, checkpoint_files = Emu3ForConditionalGeneration, Emu3Processor, CHECKPOINT_FILES

    def __init__(self, model, processor, default_guidance_scale: float | None = None):
        super().__init__()
        if not isinstance(model, Emu3ForConditionalGeneration) or not isinstance(processor, Emu3Processor):
            raise TypeError(f"Emu3Pipeline takes an Emu3ForConditionalGeneration and an Emu3Processor, got "
                            f"{type(model).__name__} and {type(processor).__name__}")
        self.register_modules(model=model, processor=processor)
        # default: the checkpoint's own guidance scale (generation_config.json), as generate() would use it; an
        # argument of the constructor, as diffusers expects of every config entry
        guidance = model.generation_config.guidance_scale if default_guidance_scale is None else default_guidance_scale
        self.register_to_config(default_guidance_scale=DEFAULT_EMU3_GUIDANCE if guidance is None else guidance)
        vq, mapping = model.model.vqmodel, model.vocabulary_mapping
        self.vq_factor = vq.vision_spatial_factor
        img2bpe = mapping.img2bpe
        if sorted(img2bpe) != list(range(vq.config.codebook_size)):
            raise ValueError(f"the model's vocabulary_map has {len(img2bpe)} visual tokens; its VQ-VAE codebook has "
                             f"{vq.config.codebook_size} codes")
        self.code_ids = torch.tensor([img2bpe[k] for k in range(len(img2bpe))])  # codebook id -> LM id
        self.eol_id = mapping.eol_token_id
        self.default_size, self.no_default_size = self.processor_size()
        image_processor = processor.image_processor
        # the tokenizer's own size only matters to detection, which re-encodes an image at its own size
        self.visual_tokenizer = Emu3VQTokenizer(vq, (self.default_size or (self.vq_factor,))[0],
                                                image_processor.image_mean, image_processor.image_std)
        self.image_processor = VaeImageProcessor(do_resize=False, do_normalize=True)

    @property
    def default_guidance_scale(self) -> float:
        return self.config.default_guidance_scale

    def processor_size(self) -> tuple[tuple[int, int] | None, str]:
        """The default (height, width) in pixels: the code grid the processor's image-generation path makes for a
        prompt given no size, times the VQ-VAE's factor; (None, why) where that path makes no usable grid."""
        try:
            (h, w), = self.processor(text=[""], return_for_image_generation=True)["image_sizes"]
        except (ValueError, TypeError, ZeroDivisionError) as e:  # e.g. a ratio that is not "w:h"
            return None, f"its image-generation path fails ({type(e).__name__}: {e})"
        if h < 1 or w < 1:
            return None, f"its image-generation path makes a {h} x {w} code grid"
        return (h * self.vq_factor, w * self.vq_factor), ""

    def prompt_ids(self, prompts: list[str], grid: tuple[int, int]) -> list[list[int]]:
        """Token ids of `prompts` for an image of grid (h, w) codes: the prompt the processor's
        `return_for_image_generation` path writes (`<|image start|>h*w<|image token|>` after the text), tokenized
        by the processor's text path, so the grid is exactly (h, w) whatever size rule the processor is set to."""
        h, w = grid
        image = f"{self.processor.image_start_token}{h}*{w}{self.processor.fake_token_around_image}"
        return [list(ids) for ids in self.processor(text=[f"{p}{image}" for p in prompts])["input_ids"]]

    def negative_ids(self, negative: list[str]) -> list[list[int]]:
        """The unconditional rows: negative prompts tokenized as plain text (transformers' negative_prompt_ids)."""
        return [list(ids) for ids in self.processor(text=negative)["input_ids"]]

    def negative_prompts(self, negative_prompt, n: int) -> list[str]:
        """One negative prompt per prompt (default: Emu3's documented one)."""
        negative = DEFAULT_NEGATIVE_PROMPT if negative_prompt is None else negative_prompt
        negatives = [negative] * n if isinstance(negative, str) else negative
        if not isinstance(negatives, (list, tuple)) or len(negatives) != n or not all(isinstance(p, str)
                                                                                   for p in negatives):
            raise OptionError(f"negative_prompt must be a string or a list of one string per prompt ({n}), got "
                              f"{negative_prompt!r}")
        return list(negatives)

    def _grid(self, height, width, image_size) -> tuple[int, int]:
        if image_size is not None:
            if height is not None or width is not None:
                raise OptionError("pass either image_size or height/width, not both")
            height = width = image_size
        if self.default_size is None and (height is None or width is None):
            raise OptionError(f"height and width are required: this model's Emu3Processor gives no default image size "
                              f"({self.no_default_size})")
        height = self.default_size[0] if height is None else height
        width = self.default_size[1] if width is None else width
        f = self.vq_factor
        return _check_side("height", height, f) // f, _check_side("width", width, f) // f

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        num_images_per_prompt: int = 1,
        guidance_scale: float | None = None,
        negative_prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        image_size: int | None = None,
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
    ):
        """Generate images for `prompt`.

        guidance_scale: None = the checkpoint's (generation_config.json), else 4.0. negative_prompt: the
        unconditional row of guidance (default: Emu3's documented negative prompt), one string or one per prompt.
        height / width (or image_size for both): pixels, multiples of the VQ-VAE factor (default: the size the
        processor's image-generation path makes, 720 x 720 for Emu3-Gen). sampler "ar" (one code per pass) or
        "sjd" (speculative Jacobi decoding, the same distribution in fewer passes; `sjd_window`, `sjd_init`,
        `sjd_coupled` as in `NextTokenPipeline`). `watermark_key`: embed the distortion-free watermark (clusters of
        this model's VQ codebook by default); detect it with `detect_watermark`. Image i uses its own generator.
        `callback_on_step_end` runs after every decoder pass; with sampler "ar" it may ask for "tokens" (the codes
        drawn so far, (B, n)) and change the pass's own code (`pipelines.base.StepCallback`)."""
        prompts = self.prepare_prompts(prompt, num_images_per_prompt, output_type)
        negatives = self.negative_prompts(negative_prompt, len(prompts))
        h, w = self._grid(height, width, image_size)
        sampling, sjd, processor, step = self.stages(
            guidance_scale, temperature, top_k, top_p, sampler, (sjd_window, sjd_init, sjd_coupled, sjd_adaptive,
                                                                 sjd_lantern_delta, sjd_lantern_k),
            watermark_key, callback_on_step_end, callback_on_step_end_tensor_inputs)
        cond = self.repeat(self.prompt_ids(prompts, (h, w)), num_images_per_prompt)
        uncond = self.repeat(self.negative_ids(negatives), num_images_per_prompt)
        backend = Emu3Backend(self.model, cond, (h, w), self.code_ids, self.eol_id,
                              self.processor.tokenizer.pad_token_id or 0, window=1 if sjd is None else sjd.window,
                              guidance_scale=sampling.guidance_scale, uncond_prompts=uncond)
        return self.sample(backend, (h, w), sampling, sjd, generator, step, processor, output_type, return_dict)

    @torch.no_grad()
    def retokenize(self, images) -> torch.Tensor:
        """PIL images -> their codes (B, h*w). Emu3 reads any size its VQ-VAE tiles, so an image is encoded at its
        own size when both sides are multiples of the factor (the size it was generated at), else resized (bicubic)
        to the default size (without one, to the multiples of the factor below its sides); the images of one call
        must come out at one size."""
        f, batch = self.vq_factor, []
        for i, image in enumerate(images):
            check_image_mode(image, f"images[{i}]")
            image = image.convert("RGB")
            if image.width % f or image.height % f:  # to the default size, else to the nearest multiples below
                size = self.default_size or (max(f, image.height // f * f), max(f, image.width // f * f))
                image = image.resize(size[::-1], PIL.Image.BICUBIC)
            batch.append(self.image_processor.preprocess(image))
        sizes = sorted({tuple(x.shape[-2:]) for x in batch})
        if len(sizes) > 1:
            raise ValueError(f"images must share one size to be tested together (their code grids differ); got "
                             f"(height, width) {sizes}")
        return self.visual_tokenizer.encode_tokens(torch.cat(batch).to(self.visual_tokenizer.device)).flatten(1)

