"""Class-conditional next-scale sampling with VAR's released models (Tian et al., 2024, arXiv 2404.02905), as a
diffusers pipeline: `VARTransformer` + `VARVQVAE`, usually written by `mmgen convert var`.

The loop is VAR's `autoregressive_infer_cfg`, step for step: the class embeddings (conditional rows, then the null
class) start the sequence; per scale k of K one cached pass gives logits, guided as (1 + t) c - t u with
t = (guidance_scale - 1) k / (K - 1) (VAR's ramp; its `cfg` is guidance_scale - 1), filtered by top-k then top-p,
sampled; the chosen codes' embeddings enter the VQ's f_hat (bicubic upsampling, phi) and f_hat at the next
scale's size is the next input. f_hat is decoded at the end. That loop is this pipeline's `__call__`.

Draws: VAR's `torch.multinomial` over the filtered probabilities is, for one sample per row, the race
argmax(p / E) with E ~ Exp(1) from its generator; here each image races with its own generator, so an image does
not depend on its batch, and `generator=[torch.Generator().manual_seed(s)]` for one image draws exactly what VAR
draws with `g_seed=s` (`mmgen generate --seed s`: image i is VAR's batch of one with seed s + i). Greedy and
seeded samples equal VAR's own code token for token (`tests/test_var_convert.py`).

It is not the `next_scale` paradigm: VAR conditions on classes through AdaLN with absolute positions, where that
paradigm's decoder reads text through RoPE.
"""

from __future__ import annotations

import torch
from diffusers.image_processor import VaeImageProcessor

from mmgen.conditioning import ClassConditioning
from mmgen.models.var import VARTransformer
from mmgen.options import check_count, check_output_type
from mmgen.pipelines.base import MMGenPipeline, SavedDirectory, per_image_generators
from mmgen.sampling.logits import SamplingConfig, guidance_at, guide, sample, top_k_filter
from tokenizers_vis.var_vqvae import VARVQVAE

VAR_GUIDANCE_SCALE = 2.5  # VAR's FID setting cfg 1.5, in mmgen's convention (1 = no guidance)


def var_top_p_filter(logits_BlV: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filtering in VAR's arithmetic: a token goes when the probability mass of the tokens at or below it
    (an ascending cumulative sum) is at most 1 - p; the most likely token always stays. The same rule as
    `mmgen.sampling.logits.top_p_filter`, summed from the other end, so the boundary rounds as in VAR."""
    sorted_logits, order = logits_BlV.sort(dim=-1, descending=False)
    drop = sorted_logits.softmax(-1).cumsum(-1) <= 1 - p
    drop[..., -1] = False
    return logits_BlV.masked_fill(drop.scatter(-1, order, drop), float("-inf"))


class VARPipeline(SavedDirectory, MMGenPipeline):
    _callback_tensor_inputs = ("tokens",)  # every scale's codes drawn so far, (B, sum of s_k^2 up to this scale)

    def __init__(self, transformer: VARTransformer, vq_model: VARVQVAE,
                 default_guidance_scale: float = VAR_GUIDANCE_SCALE):
        super().__init__()
        if tuple(transformer.config.patch_nums) != tuple(vq_model.config.patch_nums):
            raise ValueError(f"transformer patch_nums {tuple(transformer.config.patch_nums)} differ from the VQVAE's "
                             f"{tuple(vq_model.config.patch_nums)}")
        if (transformer.config.vocab_size, transformer.config.vae_dim) != (vq_model.vocab_size,
                                                                           vq_model.feature_dim):
            raise ValueError(f"transformer (vocab {transformer.config.vocab_size}, code width "
                             f"{transformer.config.vae_dim}) does not fit the VQVAE (vocab {vq_model.vocab_size}, "
                             f"code width {vq_model.feature_dim})")
        self.register_modules(transformer=transformer, vq_model=vq_model)
        self.register_to_config(default_guidance_scale=default_guidance_scale)
        self.condition = ClassConditioning(transformer.config.num_classes)  # VAR's null class is num_classes
        self.image_processor = VaeImageProcessor(do_resize=False, do_normalize=True)

    @property
    def visual_tokenizer(self) -> VARVQVAE:
        return self.vq_model

    def check_labels(self, class_labels, num_images_per_prompt: int) -> list[int]:
        labels = self.condition.labels(class_labels.tolist() if torch.is_tensor(class_labels) else class_labels)
        check_count(num_images_per_prompt, len(labels), "class label(s)")
        return [c for c in labels for _ in range(num_images_per_prompt)]

    def sample_scale(self, logits_BlV: torch.Tensor, sampling: SamplingConfig, generators) -> torch.Tensor:
        """One scale's ids (B, l): temperature (VAR has none: 1), top-k, top-p, then one Exp(1) race per image
        from its own generator; temperature 0 is greedy."""
        B, l, V = logits_BlV.shape
        if sampling.temperature == 0:
            return logits_BlV.argmax(-1)
        logits = logits_BlV if sampling.temperature == 1 else logits_BlV / sampling.temperature
        if sampling.top_k is not None:
            logits = top_k_filter(logits, sampling.top_k)
        if sampling.top_p is not None:
            logits = var_top_p_filter(logits, sampling.top_p)
        noise = torch.stack([torch.empty(l, V, device=g.device).exponential_(generator=g) for g in generators])
        return sample(logits.reshape(B * l, V), None, noise_BV=noise.to(logits.device).reshape(B * l, V)).view(B, l)

    @torch.no_grad()
    def __call__(
        self,
        class_labels: int | list[int],
        num_images_per_prompt: int = 1,
        guidance_scale: float | None = None,
        temperature: float = 1.0,
        top_k: int | None = 900,
        top_p: float | None = 0.96,
        cfg_schedule: str = "linear",
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end=None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
    ):
        """Generate images of `class_labels` (ints in [0, num_classes)), one decoder pass per scale.

        guidance_scale: 1 is no guidance; VAR's `cfg` c is guidance_scale = 1 + c (default: the saved
        `default_guidance_scale`, 2.5 = VAR's cfg 1.5). cfg_schedule "linear" is VAR's ramp over the scales,
        "constant" guides every scale fully. top_k / top_p default to VAR's FID settings (900, 0.96); None turns
        one off. `tokens` in the output are all scales' codes, raster, concatenated coarse to fine (N, L).
        `callback_on_step_end` runs after every scale; it may ask for "tokens" (every scale's codes so far) and
        change the codes of the scale just drawn before they enter f_hat (`pipelines.base.StepCallback`)."""
        labels = self.check_labels(class_labels, num_images_per_prompt)
        check_output_type(output_type)
        guidance_scale = self.config.default_guidance_scale if guidance_scale is None else guidance_scale
        sampling = SamplingConfig(guidance_scale, temperature, top_k, top_p, cfg_schedule=cfg_schedule)
        schedule = sampling.schedule("linear")
        step = self.step_callback(callback_on_step_end, callback_on_step_end_tensor_inputs)
        B, model, vq = len(labels), self.transformer, self.vq_model
        gens = per_image_generators(generator, B)
        guided = guidance_scale != 1
        label_R = torch.tensor(labels + [model.null_class] * B * guided, device=model.device)
        cond_RD = model.class_emb(label_R)
        x_RlC, cache, f_hat, tokens = model.start_input(cond_RD), model.new_cache(), None, []
        K, drawn = len(model.patch_nums), 0
        with self.progress_bar(total=K) as bar:
            for k, s in enumerate(model.patch_nums):
                logits_RlV = model(x_RlC, cond_RD, cache=cache)
                # VAR's own arithmetic, (1 + t) c - t u with t = w - 1, so greedy ties fall as in its code
                logits_BlV = guide(logits_RlV, guidance_at(guidance_scale, k, K, schedule), guided, form="var")
                ids_Bl = self.sample_scale(logits_BlV, sampling, gens)
                ids_Bl = step(torch.cat([*tokens, ids_Bl], 1), drawn)[:, drawn:]  # the callback may change them
                tokens.append(ids_Bl)
                drawn += s * s
                f_hat, f_next = vq.next_input(f_hat, ids_Bl.view(B, s, s), k)
                if f_next is not None:
                    x_RlC = model.scale_input(f_next, k + 1).repeat(1 + guided, 1, 1)
                bar.update()
        tokens = torch.cat(tokens, 1)
        return self.output(vq.fhat_to_img(f_hat), tokens, output_type, return_dict, K, tokens.shape[1] / K)
