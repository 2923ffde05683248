"""LlamaGen class-to-image and text-to-image (Sun et al. 2024, arXiv 2406.06525) from a converted checkpoint
(`mmgen convert llamagen`), sampled as LlamaGen's own `generate` samples.

Classifier-free guidance doubles the batch, conditional rows first, null condition second (the null class, or
the learned null caption under the caption's own padding mask); with guidance_scale > 1 the logits are
u + (c - u) * scale, otherwise the conditional logits alone and no doubled batch. `cfg_interval` >= 0 keeps
guidance up to token cfg_interval + 1 and uses the conditional logits after it, as LlamaGen counts.
Then temperature, top-k, top-p and a multinomial draw per image from that image's own generator: for one
image, `generator=[torch.Generator().manual_seed(s)]` draws what LlamaGen draws after `torch.manual_seed(s)`.

t2i prompts go through the frozen T5 encoder saved with the pipeline (`text_encoder`, `tokenizer`, the shared
`mmgen.conditioning.TextEncoderConditioning` with LlamaGen's settings): lower-cased and stripped (LlamaGen's further
caption cleaning is not reproduced), padded and truncated to the condition length `cls_token_num`, and left-padded as
LlamaGen's sample scripts do (valid tokens moved to the end, padding zeroed and masked as keys); the null caption is
the model's learned `uncond_embedding` under the same mask.
`prompt_embeds` / `prompt_attention_mask` take T5 features directly, right-padded as T5 returns them.

The loop is `pipelines.backend.sample_codes` over `LlamaGenBackend`, a `mmgen.sampling.sjd.JacobiBackend`: plain AR
is the one-token window (the first pass carries the condition prefix), and speculative Jacobi decoding runs through
the same backend. `watermark_key` embeds the distortion-free watermark over clusters of the converted VQ's own
codebook (`pipelines.base.WatermarkDetection`); `detect_watermark` re-encodes images with that VQ's encoder.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from diffusers.image_processor import VaeImageProcessor

from mmgen.conditioning import ClassConditioning, TextEncoderConditioning
from mmgen.models.llamagen import LlamaGenGPT
from mmgen.options import OptionError, check_count, check_output_type, check_prompts
from mmgen.pipelines.backend import BackendPipeline
from mmgen.pipelines.base import WatermarkDetection
from mmgen.sampling.logits import guide
from mmgen.sampling.sjd import window_mask
from tokenizers_vis.llamagen_vq import LlamaGenVQ

# LlamaGen's sample scripts: c2i cfg 4.0 top-k 2000, t2i cfg 7.5 top-k 1000 (temperature 1, top-p 1)
DEFAULTS = {"c2i": {"guidance_scale": 4.0, "top_k": 2000}, "t2i": {"guidance_scale": 7.5, "top_k": 1000}}


class LlamaGenBackend:
    """`mmgen.sampling.sjd.JacobiBackend` over a `LlamaGenGPT`. Draft ids are codebook ids.

    cond_RTC: the condition prefix embeddings of every backend row (R = 2A with guidance: conditional rows, then
    null rows); cond_valid_RT: which condition slots are real (False: caption padding, masked as keys). The
    last condition slot plays the start token: a row's first window starts there."""

    supports_leaves = False  # chains only: forward takes no token-tree leaves

    def __init__(self, model: LlamaGenGPT, cond_RTC: torch.Tensor, cond_valid_RT: torch.Tensor,
                 guidance_scale: float, cfg_interval: int = -1, window: int = 1):
        self.model, self.guidance_scale, self.cfg_interval = model, guidance_scale, cfg_interval
        self.use_cfg = guidance_scale > 1.0
        R, T_cond, _ = cond_RTC.shape
        self.num_samples = R // 2 if self.use_cfg else R
        self.vocab_size, self.device = model.config.vocab_size, cond_RTC.device
        self.cond, self.prefix = cond_RTC, T_cond - 1
        capacity = T_cond + model.num_image_tokens + window  # a row near the end still writes a whole window
        self.key_valid = torch.ones(R, capacity, dtype=torch.bool, device=self.device)
        self.key_valid[:, :T_cond] = cond_valid_RT
        self.cache = model.new_cache(R, capacity)
        self.prefilled = False

    def forward(self, window_AT: torch.Tensor, n_A: torch.Tensor) -> torch.Tensor:
        A, T = window_AT.shape
        ids, n = (torch.cat([window_AT, window_AT]), torch.cat([n_A, n_A])) if self.use_cfg else (window_AT, n_A)
        x_RTC = self.model.tok_embeddings(ids)
        first = (n == 0)[:, None, None] & (torch.arange(T, device=self.device) == 0)[None, :, None]
        x_RTC = torch.where(first, self.cond[:, -1:].to(x_RTC.dtype), x_RTC)  # a row's first window: the start
        start = self.prefix + n
        if not self.prefilled:  # the first pass carries the condition prefix: no separate prefill pass
            x_RTC, start = torch.cat([self.cond[:, : self.prefix], x_RTC], 1), torch.zeros_like(start)
            self.prefilled = True
        slots = start[:, None] + torch.arange(x_RTC.shape[1], device=self.device)
        mask = window_mask(slots, self.key_valid[:, : int(slots.max()) + 1]).unsqueeze(1)
        logits = self.model(x_RTC, slots, mask, self.cache, start)[:, -T:]
        scale = self.guidance_scale
        if self.use_cfg and self.cfg_interval >= 0:  # no guidance (w = 1) after token cfg_interval + 1
            index = n_A[:, None] + torch.arange(T, device=self.device)  # token index of each output
            scale = torch.where(index > self.cfg_interval + 1, 1.0, scale).to(logits.dtype)[..., None]
        return guide(logits, scale, self.use_cfg)

    def keep(self, keep_A: torch.Tensor) -> None:
        rows = keep_A.nonzero().squeeze(-1)
        if self.use_cfg:
            rows = torch.cat([rows, rows + len(keep_A)])
        self.cache.reorder(rows)
        self.key_valid, self.cond = self.key_valid[rows], self.cond[rows]


def multinomial(logits_BV: torch.Tensor, generators: Sequence[torch.Generator], greedy: bool) -> torch.Tensor:
    """One token per row, row r drawn by `torch.multinomial` with its own generator (LlamaGen's draw, so one
    image with a seeded generator reproduces LlamaGen's tokens under the same global seed)."""
    if greedy:
        return logits_BV.argmax(-1)
    probs = logits_BV.float().softmax(-1)
    # each draw on its generator's device (CPU generators drive GPU sampling too: a seed draws the same anywhere)
    return torch.cat([torch.multinomial(probs[r:r + 1].to(g.device), 1, generator=g)[:, 0].to(probs.device)
                      for r, g in enumerate(generators)])


class LlamaGenPipeline(WatermarkDetection, BackendPipeline):
    _optional_components = ["text_encoder", "tokenizer"]  # t2i only

    def __init__(self, transformer: LlamaGenGPT, vq_model: LlamaGenVQ, text_encoder=None, tokenizer=None,
                 default_guidance_scale: float | None = None, default_top_k: int | None = None,
                 conditioning: dict | None = None):
        super().__init__()
        self.register_modules(transformer=transformer, vq_model=vq_model, text_encoder=text_encoder,
                              tokenizer=tokenizer)
        kind = transformer.config.model_type
        defaults = DEFAULTS[kind]
        self.register_to_config(
            default_guidance_scale=defaults["guidance_scale"] if default_guidance_scale is None
            else default_guidance_scale,
            default_top_k=defaults["top_k"] if default_top_k is None else default_top_k)
        check_parts(transformer, vq_model, text_encoder, tokenizer)
        # the shared conditioning kinds (they check labels and prompts, tell `mmgen generate` and the card what the
        # model takes): c2i class labels; t2i captions through T5, one prefix slot per T5 token. A t2i model
        # converted without its T5 takes prompt_embeds only.
        if kind == "c2i":
            self.condition = ClassConditioning(transformer.config.num_classes)
        elif text_encoder is not None:
            self.condition = TextEncoderConditioning(text_encoder, tokenizer, transformer.config.cls_token_num)
        else:
            self.condition = None
        if self.condition is not None:
            saved = self.condition.config()
            if conditioning is not None and conditioning.get("kind") != saved["kind"]:
                raise ValueError(f"conditioning kind {conditioning.get('kind')!r} does not fit a {kind} LlamaGen "
                                 f"model ({saved['kind']})")
            self.register_to_config(conditioning=saved)
        self.visual_tokenizer = vq_model
        self.image_processor = VaeImageProcessor(do_resize=False, do_normalize=True)

    @property
    def model_type(self) -> str:
        return self.transformer.config.model_type

    @property
    def default_guidance_scale(self) -> float:
        return self.config.default_guidance_scale

    @torch.no_grad()
    def encode_prompt(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """T5 features (B, cls_token_num, caption_dim) and their mask (B, cls_token_num), right-padded."""
        if self.text_encoder is None or self.tokenizer is None:
            raise ValueError("prompt= needs a text encoder: this t2i pipeline was converted without one "
                             "(mmgen convert llamagen --text-encoder DIR); pass prompt_embeds= instead")
        feats, mask = self.condition.features([p.strip().lower() for p in prompts], truncate=True)  # T5Embedder's
        return feats.to(self.transformer.dtype), mask.to(feats.device)

    def caption_condition(self, embeds: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded features and mask -> LlamaGen's left-padded features (padding zeroed) and mask."""
        c = self.transformer.config
        if not torch.is_tensor(embeds) or embeds.dim() != 3 or embeds.shape[1:] != (c.cls_token_num, c.caption_dim):
            raise ValueError(f"prompt_embeds must be a tensor of shape (B, {c.cls_token_num}, {c.caption_dim}), got "
                             f"{tuple(embeds.shape) if torch.is_tensor(embeds) else type(embeds).__name__}")
        embeds = embeds.to(self.transformer.device, self.transformer.dtype)
        if mask is None:
            mask = torch.ones(embeds.shape[:2], dtype=torch.long)
        if not torch.is_tensor(mask) or mask.shape != embeds.shape[:2]:
            raise ValueError(f"prompt_attention_mask must be a tensor of shape {tuple(embeds.shape[:2])}, got "
                             f"{tuple(mask.shape) if torch.is_tensor(mask) else type(mask).__name__}")
        mask = mask.to(embeds.device).long()
        valid = mask.sum(1)
        # row b: the last valid[b] slots hold the valid features, in order
        T = c.cls_token_num
        src = (torch.arange(T, device=embeds.device)[None, :] + valid[:, None]) % T
        left = embeds.gather(1, src[..., None].expand_as(embeds))
        left_mask = mask.flip(-1)
        return left * left_mask[..., None], left_mask.bool()

    def condition_rows(self, class_labels, prompt, prompt_embeds, prompt_attention_mask, k: int, guided: bool):
        """The condition of every backend row (labels (R,) or caption features (R, T, E); R = 2B when guided:
        conditional rows, then null rows), which condition slots are real (R, T), and the image count B."""
        model = self.transformer
        if self.model_type == "c2i":
            if prompt is not None or prompt_embeds is not None:
                raise ValueError("prompt / prompt_embeds: this LlamaGen model is class-conditional (c2i); pass "
                                 "class_labels= instead")
            labels = self.condition.labels(class_labels)
            check_count(k, len(labels), "class label(s)")
            cond = torch.tensor(labels, device=model.device).repeat_interleave(k)
            null, valid = torch.full_like(cond, model.null_class), torch.ones(len(cond), 1, dtype=torch.bool)
        else:
            if class_labels is not None:
                raise ValueError("class_labels: this LlamaGen model is text-conditional (t2i); pass prompt= or "
                                 "prompt_embeds= instead")
            if (prompt is None) == (prompt_embeds is None):
                raise ValueError("pass exactly one of prompt= and prompt_embeds= to a text-conditional (t2i) model")
            if prompt is not None:
                prompts = check_prompts(prompt)
                prompt_embeds, prompt_attention_mask = self.encode_prompt(prompts)
            feats, valid = self.caption_condition(prompt_embeds, prompt_attention_mask)
            check_count(k, len(feats), "caption(s)")
            cond, valid = feats.repeat_interleave(k, 0), valid.repeat_interleave(k, 0)
            null = model.cls_embedding.uncond_embedding.expand_as(cond)  # unmasked; keys masked as the caption's
        valid = valid.to(model.device)
        if not guided:
            return cond, valid, len(cond)
        return torch.cat([cond, null]), torch.cat([valid, valid]), len(cond)

    @torch.no_grad()
    def __call__(
        self,
        class_labels: int | list[int] | None = None,
        prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        guidance_scale: float | None = None,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        cfg_interval: int = -1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end=None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
        prompt_embeds: torch.Tensor | None = None,
        prompt_attention_mask: torch.Tensor | None = None,
        sampler: str = "ar",
        sjd_window: int = 16,
        sjd_init: str = "random",
        sjd_coupled: bool = False,
        sjd_adaptive: bool = False,
        watermark_key: str | None = None,
    ):
        """Generate images for `class_labels` (c2i) or `prompt` / `prompt_embeds` (t2i).

        guidance_scale: default the converted model's (LlamaGen's sample scripts: 4.0 c2i, 7.5 t2i); <= 1 means no
        guidance. top_k: default the model's (2000 c2i, 1000 t2i); temperature 0 is greedy. generator: one per
        image, or one that seeds them. sampler "sjd": speculative Jacobi decoding (exact in distribution).
        `callback_on_step_end` runs after every decoder pass; with sampler "ar" it may ask for "tokens" (the codes
        drawn so far, (B, n)) and change the pass's own code (`pipelines.base.StepCallback`). `watermark_key`: embed
        the distortion-free watermark (clusters of this model's VQ codebook by default); detect it with
        `detect_watermark`."""
        model = self.transformer
        if isinstance(cfg_interval, bool) or not isinstance(cfg_interval, int) or cfg_interval < -1:
            raise OptionError(f"cfg_interval must be -1 (guidance on every token) or an integer >= 0, got "
                              f"{cfg_interval!r}")
        check_output_type(output_type)
        top_k = self.config.default_top_k if top_k is None else top_k
        sampling, sjd, processor, step = self.stages(guidance_scale, temperature, top_k, top_p, sampler,
                                                     (sjd_window, sjd_init, sjd_coupled, sjd_adaptive, None, 8),
                                                     watermark_key, callback_on_step_end,
                                                     callback_on_step_end_tensor_inputs)
        rows, cond_valid, _ = self.condition_rows(class_labels, prompt, prompt_embeds, prompt_attention_mask,
                                                  num_images_per_prompt, guided=sampling.guidance_scale > 1)
        backend = LlamaGenBackend(model, model.embed_condition(rows), cond_valid, sampling.guidance_scale,
                                  cfg_interval, window=1 if sjd is None else sjd.window)
        return self.sample(backend, self.vq_model.token_shape, sampling, sjd, generator, step, processor,
                           output_type, return_dict, draw=multinomial)


def check_parts(transformer: LlamaGenGPT, vq_model: LlamaGenVQ, text_encoder, tokenizer) -> None:
    """The components fit each other: codebook size, token grid, and a T5 of the caption width (t2i)."""
    c = transformer.config
    if vq_model.vocab_size != c.vocab_size:
        raise ValueError(f"the VQ codebook has {vq_model.vocab_size} entries but the GPT predicts {c.vocab_size} codes")
    if vq_model.token_shape != (c.grid_size, c.grid_size):
        raise ValueError(f"the VQ's token grid {vq_model.token_shape} at {vq_model.image_size} px does not match the "
                         f"GPT's {c.grid_size}x{c.grid_size} grid")
    if c.model_type == "c2i" and (text_encoder is not None or tokenizer is not None):
        raise ValueError("a class-conditional (c2i) LlamaGen model takes no text encoder")
    if (text_encoder is None) != (tokenizer is None):
        raise ValueError("text_encoder and tokenizer come together (a T5 encoder directory holds both)")
    if text_encoder is not None and text_encoder.config.hidden_size != c.caption_dim:
        raise ValueError(f"the text encoder's width {text_encoder.config.hidden_size} does not match the GPT's "
                         f"caption width {c.caption_dim} (LlamaGen t2i uses FLAN-T5-XL, 2048)")
