"""What every mmgen pipeline shares: the output object, per-image generators and the checks on a call's
common arguments. Each paradigm's pipeline (one file each) owns its own visible sampling loop."""

from __future__ import annotations

from dataclasses import dataclass

import PIL.Image
import torch
from diffusers.utils import BaseOutput

from mmgen.sampling.config import DEFAULT_GUIDANCE_SCALE  # noqa: F401 (the pipelines' fallback)
from mmgen.text import UnifiedVocab

# images per pipeline call (prompts x num_images_per_prompt): far beyond what fits in memory at once on CPU;
# more is a mistake (e.g. a seed typed into the count) that would otherwise run for hours, so it is refused
MAX_IMAGES_PER_CALL = 256
MAX_SEED = 2**63 - 1  # seed + image index must stay below 2**64, torch.Generator's range
OUTPUT_TYPES = ("pil", "pt", "np")


@dataclass
class ARPipelineOutput(BaseOutput):
    images: list[PIL.Image.Image] | torch.Tensor
    tokens: torch.Tensor  # image codes (N, h, w), per-scale codes concatenated (N, L), or latents (N, C, h, w)
    decoder_passes: int  # batched forward passes of the decoder's AR backbone (the prompt pass included)
    step_compression: float = 1.0  # image tokens / decoder passes (plain AR: 1)
    mean_accepted_length: float = 1.0  # tokens committed per pass, averaged over images (plain AR: 1)
    model_evals: int | None = None  # every decoder evaluation, where the decoder also integrates a flow (xAR)

    @property
    def nfe(self) -> int:
        """Older name of `decoder_passes`, kept for callers written against it."""
        return self.decoder_passes


def per_image_generators(generator, n: int, device="cpu") -> list[torch.Generator]:
    """One generator per image. A single generator seeds n fresh ones, so images stay reproducible
    and independent of batch composition; a list must have one per image (diffusers convention)."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != n:
            raise ValueError(f"generator list has {len(generator)} entries; expected one per image ({n})")
        return list(generator)
    if generator is None:
        seeds = torch.randint(0, 2**62, (n,)).tolist()
    elif isinstance(generator, torch.Generator):
        seeds = torch.randint(0, 2**62, (n,), generator=generator).tolist()
    else:
        raise ValueError(f"generator must be a torch.Generator, a list of them, or None; got {type(generator)}")
    return [torch.Generator(device).manual_seed(s) for s in seeds]


def generators_from_seed(seed: int, n: int) -> list[torch.Generator]:
    """Image i gets seed + i: the same seed gives the same images whatever the batch size."""
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed <= MAX_SEED:
        raise ValueError(f"seed must be an integer in [0, 2**63 - 1], got {seed!r}")
    return [torch.Generator().manual_seed(seed + i) for i in range(n)]


def unified_vocab(transformer, tokenizer, image_vocab_size: int) -> UnifiedVocab:
    """The vocabulary a pipeline's parts imply, checked against the decoder's embedding size."""
    vocab = UnifiedVocab(text_vocab_size=len(tokenizer), image_vocab_size=image_vocab_size)
    if transformer.config.vocab_size != vocab.size:
        raise ValueError(f"transformer.vocab_size={transformer.config.vocab_size} does not match text "
                         f"({len(tokenizer)}) + special + image ({image_vocab_size}) = {vocab.size}")
    return vocab


def check_call(prompt, num_images_per_prompt, output_type) -> list[str]:
    """Validate the arguments every pipeline call takes; returns the prompts as a list."""
    prompts = [prompt] if isinstance(prompt, str) else list(prompt) if isinstance(prompt, (list, tuple)) else None
    if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
        raise ValueError(f"prompt must be a non-empty string or a non-empty list of non-empty strings, got "
                         f"{prompt!r}")
    if isinstance(num_images_per_prompt, bool) or not isinstance(num_images_per_prompt, int) \
            or not 1 <= num_images_per_prompt * len(prompts) <= MAX_IMAGES_PER_CALL:
        raise ValueError(f"num_images_per_prompt must be an integer >= 1 with at most {MAX_IMAGES_PER_CALL} "
                         f"images per call, got {num_images_per_prompt} for {len(prompts)} prompt(s)")
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type must be one of {', '.join(map(repr, OUTPUT_TYPES))}; got {output_type!r}")
    return prompts


# 8-bit modes that convert to RGB without loss of meaning; 16-bit / float / CMYK would be clipped or recoloured
IMAGE_MODES = ("1", "L", "LA", "P", "PA", "RGB", "RGBA")


def check_image_mode(image, what: str = "image") -> None:
    if image.mode not in IMAGE_MODES:
        raise ValueError(f"{what} has mode {image.mode}; accepted: {', '.join(IMAGE_MODES)} (convert it to 8-bit "
                         f"RGB first)")
