"""What every mmgen pipeline shares, in one skeleton.

- `MMGenPipeline`: the base of every pipeline. Its `call_options` are read from its `__call__` signature
  (`mmgen.options.call_options`); `step_callback` is diffusers' `callback_on_step_end`; `output` turns decoded
  images into the `ARPipelineOutput`.
- `ParadigmPipeline`: the constructor of mmgen's own paradigm pipelines (components, conditioning, vocabulary,
  layout) and their call's door (`prepare`) and loop (`run_paradigm`). A pipeline declares only what differs:
  its paradigm module, its visual tokenizer's component name and its `__call__`.

Where the sampling loop is: mmgen's paradigm pipelines run their paradigm's `generate` (one file each in
`mmgen/paradigms/`: prefill, decode step, sample) or, for SJD, `paradigms.next_token.generate_sjd`; Janus, Emu3 and
LlamaGen run `pipelines.backend.sample_codes` (one token per pass, or `jacobi_sample`) over their backend; VAR's
loop is in its own `__call__`. Every call's arguments are checked once at its door by `mmgen.options`."""

from __future__ import annotations

import contextlib
import copy
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import PIL.Image
import torch
from diffusers import DiffusionPipeline
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils import BaseOutput
from huggingface_hub import create_repo
from safetensors.torch import load_file

from mmgen.atomic import atomic_dir
from mmgen.conditioning import Conditioning, make_conditioning
from mmgen.models.text_encoder import caption_prefix
from mmgen.options import OptionError, call_options, check_count, check_output_type, check_seed
from mmgen.safe_save import pipeline_class_name
from mmgen.sampling.config import DEFAULT_GUIDANCE_SCALE  # noqa: F401 (the pipelines' fallback)
from mmgen.sampling.sjd import SJDConfig, codebook_neighbours
from mmgen.text import UnifiedVocab
from mmgen.watermark import WatermarkConfig, cluster_codebook, detect_tokens, detect_tokens_combined
from tokenizers_vis.protocol import as_visual_tokenizer

WATERMARK_FILE = "watermark.json"
ENCODER_WEIGHTS = "encoder.safetensors"  # in a detection-encoder directory, beside its config.json


@dataclass
class ARPipelineOutput(BaseOutput):
    images: list[PIL.Image.Image] | torch.Tensor
    tokens: torch.Tensor  # image codes (N, h, w), per-scale codes concatenated (N, L), or latents (N, C, h, w)
    decoder_passes: int  # batched forward passes of the decoder's AR backbone (the prompt pass included)
    step_compression: float = 1.0  # image tokens / decoder passes (plain AR: 1)
    mean_accepted_length: float = 1.0  # tokens committed per pass, averaged over images (plain AR: 1)
    model_evals: int | None = None  # every decoder evaluation, where the decoder also integrates a flow (xAR)
    lossless: bool = True  # False when a lossy acceptance (sjd_lantern_delta) relaxed the sampling distribution

    @property
    def nfe(self) -> int:
        """Older name of `decoder_passes`, kept for callers written against it."""
        return self.decoder_passes


def sjd_config(sampler: str, window: int, init: str, coupled: bool, adaptive: bool, lantern_delta: float | None,
               lantern_k: int, tree_width: int = 0, tree_depth: int = 4, shared_noise: bool = False
               ) -> SJDConfig | None:
    """The `SJDConfig` of a call's sjd_* options (None for sampler "ar"); a lossy option without SJD is refused."""
    if sampler != "sjd":
        if lantern_delta is not None:
            raise OptionError("sjd_lantern_delta needs sampler='sjd' (it relaxes SJD's acceptance)")
        return None
    return SJDConfig(window, init, coupled, adaptive, lantern_delta=lantern_delta, lantern_k=lantern_k,
                     tree_width=tree_width, tree_depth=tree_depth, shared_noise=shared_noise)


def sjd_neighbours(visual_tokenizer, sjd: SJDConfig | None) -> torch.Tensor | None:
    """The codebook neighbour table a lossy SJD acceptance needs, else None."""
    if sjd is None or sjd.lossless:
        return None
    return codebook_neighbours(visual_tokenizer.codebook, sjd.lantern_k)


class StepCallback:
    """diffusers' `callback_on_step_end(pipe, step, timestep, callback_kwargs) -> dict`, called after every decoder
    pass (`__call__`): `step` counts the passes from 0 and `timestep` is None (autoregressive decoding has no noise
    schedule). `callback_kwargs` holds the tensors named in `callback_on_step_end_tensor_inputs`, drawn from those
    the pipeline hands out (`_callback_tensor_inputs`; empty where the loop lives in a paradigm's `generate`):
    "tokens" is every code drawn so far, (B, n). A returned "tokens" may change the codes drawn at this step (the
    decoder reads them next); the earlier ones are already in its KV cache, so a change to them is refused. Under
    SJD a pass commits a varying number of tokens inside `jacobi_sample`, which hands out none."""

    def __init__(self, pipe, callback, tensor_inputs, sampler: str = "ar"):
        if callback is not None and not callable(callback):
            raise OptionError(f"callback_on_step_end must be callable as f(pipe, step, timestep, callback_kwargs), "
                              f"got {callback!r}")
        offered, tensor_inputs = pipe._callback_tensor_inputs, list(tensor_inputs or ())
        bad = [name for name in tensor_inputs if name not in offered]
        if bad:
            raise OptionError(f"callback_on_step_end_tensor_inputs must be drawn from {list(offered)} for "
                              f"{type(pipe).__name__}, got {bad}" + ("" if offered else
                                                                     " (its loop hands out no tensors)"))
        if tensor_inputs and sampler != "ar":
            raise OptionError(f"callback_on_step_end_tensor_inputs needs sampler='ar', got {sampler!r}: an SJD pass "
                              f"commits a varying number of tokens inside the Jacobi sampler")
        self.pipe, self.callback, self.tensor_inputs, self.step = pipe, callback, tensor_inputs, 0

    def __call__(self, tokens_BN: torch.Tensor | None = None, new_from: int = 0) -> torch.Tensor | None:
        """After a pass: runs the callback; returns `tokens_BN` (codes drawn so far, the pass's own from column
        `new_from` on), as the callback changed them."""
        if self.callback is None:
            return tokens_BN
        kwargs = {name: tokens_BN.clone() for name in self.tensor_inputs}  # only "tokens" is offered
        out = self.callback(self.pipe, self.step, None, kwargs)
        self.step += 1
        if not isinstance(out, dict):
            raise ValueError(f"callback_on_step_end must return a dict (callback_kwargs, changed or not), got "
                             f"{type(out).__name__}")
        unknown = sorted(set(out) - set(self.tensor_inputs))
        if unknown:
            raise ValueError(f"callback_on_step_end returned {unknown}; it may return only the tensors asked for in "
                             f"callback_on_step_end_tensor_inputs ({self.tensor_inputs})")
        if "tokens" not in out:
            return tokens_BN
        new = out["tokens"]
        if not torch.is_tensor(new) or new.shape != tokens_BN.shape:
            raise ValueError(f"callback_on_step_end returned tokens of shape "
                             f"{tuple(new.shape) if torch.is_tensor(new) else type(new).__name__}; expected "
                             f"{tuple(tokens_BN.shape)}")
        if not torch.equal(new[:, :new_from].to(tokens_BN.device), tokens_BN[:, :new_from]):
            raise ValueError(f"callback_on_step_end changed tokens drawn before step {self.step - 1} (columns < "
                             f"{new_from}); those are already in the decoder's KV cache, only the step's own codes "
                             f"may change")
        return new.to(tokens_BN.device, tokens_BN.dtype)


def per_image_generators(generator, n: int, device="cpu") -> list[torch.Generator]:
    """One generator per image. A single generator seeds n fresh ones, so images stay reproducible
    and independent of batch composition; a list must have one per image (diffusers convention)."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != n:
            raise OptionError(f"generator list has {len(generator)} entries; expected one per image ({n})")
        return list(generator)
    if generator is None:
        seeds = torch.randint(0, 2**62, (n,)).tolist()
    elif isinstance(generator, torch.Generator):
        seeds = torch.randint(0, 2**62, (n,), generator=generator).tolist()
    else:
        raise OptionError(f"generator must be a torch.Generator, a list of them, or None; got {type(generator)}")
    return [torch.Generator(device).manual_seed(s) for s in seeds]


def generators_from_seed(seed: int, n: int) -> list[torch.Generator]:
    """Image i gets seed + i: the same seed gives the same images whatever the batch size."""
    check_seed(seed)
    return [torch.Generator().manual_seed(seed + i) for i in range(n)]


def unified_vocab(transformer, conditioning: Conditioning, image_vocab_size: int) -> UnifiedVocab:
    """The vocabulary a pipeline's parts imply (the conditioning's rows, the specials, the image codes), checked
    against the decoder's embedding size."""
    vocab = UnifiedVocab(text_vocab_size=conditioning.vocab_size, image_vocab_size=image_vocab_size)
    if transformer.config.vocab_size != vocab.size:
        what = "text" if conditioning.kind == "caption" else f"{conditioning.kind} conditioning"
        raise ValueError(f"transformer.vocab_size={transformer.config.vocab_size} does not match {what} "
                         f"({conditioning.vocab_size}) + special + image ({image_vocab_size}) = {vocab.size}")
    return vocab


def pipeline_conditioning(tokenizer, conditioning: dict | None, max_text_len: int, text_encoder=None,
                          text_projection=None) -> Conditioning:
    """A pipeline's `Conditioning` from its constructor arguments, its prefix length checked; a text_encoder model's
    `text_projection` checked to take its encoder's features."""
    cond = make_conditioning(conditioning, tokenizer, max_text_len, text_encoder)
    if (cond.kind == "text_encoder") != (text_projection is not None):
        raise ValueError(f"text_projection (encoder features -> decoder width) comes with a text_encoder model, and "
                         f"only with one; this is a {cond.kind} model"
                         f"{' without one' if text_projection is None else ''}")
    if text_projection is not None and text_projection.config.feature_dim != cond.feature_dim:
        raise ValueError(f"text_projection takes features of width {text_projection.config.feature_dim}, but the "
                         f"text encoder gives {cond.feature_dim}")
    if cond.max_len != max_text_len:
        raise ValueError(f"max_text_len={max_text_len} does not fit a {cond.kind} model (one prefix token); "
                         f"pass max_text_len={cond.max_len}")
    return cond


def condition_rows(conditioning: Conditioning, prompt, class_labels, num_images_per_prompt) -> list[list[int]]:
    """The condition ids of every image, each condition `num_images_per_prompt` times; the conditioning checks the
    call's `prompt=` / `class_labels=` (whichever its kind takes), `mmgen.options.check_count` the count."""
    ids = conditioning.condition_ids(prompt, class_labels)
    what = {"class": "class label(s)", "unconditional": "condition(s)"}.get(conditioning.kind, "prompt(s)")
    check_count(num_images_per_prompt, len(ids), what)
    return [row for row in ids for _ in range(num_images_per_prompt)]


def condition_prefix(pipe, prompt, num_images_per_prompt: int):
    """The decoder's condition prefix for one call, as a context for its sampling loop: a text_encoder model's
    prompts through its encoder and `text_projection`, each `num_images_per_prompt` times, in the decoder's text
    embedding (`mmgen.models.text_encoder.caption_prefix`); nothing for the kinds whose ids are the condition. Call
    after `condition_rows`, which checked the prompts."""
    if pipe.condition.kind != "text_encoder":
        return contextlib.nullcontext()
    features, _ = pipe.condition.features([prompt] if isinstance(prompt, str) else list(prompt))
    prefix = pipe.text_projection(features.to(pipe.text_projection.device))
    return caption_prefix(pipe.transformer, prefix.repeat_interleave(num_images_per_prompt, 0))


def call_guidance(conditioning: Conditioning, guidance_scale: float | None, default: float) -> float:
    """The guidance scale of a call: the model's own default when None; an unconditional model has nothing to
    guide by and takes only 1."""
    if conditioning.kind == "unconditional":
        if guidance_scale is not None and guidance_scale != 1:
            raise OptionError(f"guidance_scale must be 1 (or None) for an unconditional model: it has no condition "
                              f"to guide by; got {guidance_scale}")
        return 1.0
    return default if guidance_scale is None else guidance_scale


# 8-bit modes that convert to RGB without loss of meaning; 16-bit / float / CMYK would be clipped or recoloured
IMAGE_MODES = ("1", "L", "LA", "P", "PA", "RGB", "RGBA")


def check_image_mode(image, what: str = "image") -> None:
    if image.mode not in IMAGE_MODES:
        raise ValueError(f"{what} has mode {image.mode}; accepted: {', '.join(IMAGE_MODES)} (convert it to 8-bit "
                         f"RGB first)")


class WatermarkDetection:
    """The watermark side every token pipeline shares: its cluster table (`watermark.json` beside the saved
    pipeline, or k-means of the codebook) and detection by re-encoding images with `self.visual_tokenizer`.
    A pipeline using it sets `visual_tokenizer` (codes kind, with `codebook` and `device`) and an
    `image_processor` (a diffusers `VaeImageProcessor` with normalisation to [-1, 1])."""

    _watermark: WatermarkConfig | None = None
    _detection_tokenizer = None
    _watermark_read_from = None  # the directory watermark.json was read from (or the caller's choice stands)
    _default_watermark: WatermarkConfig | None = None  # k-means table of a model saved without one (never saved)

    def _source(self) -> str | None:
        return getattr(self.config, "_name_or_path", None) if hasattr(self, "config") else None

    def _read_saved_watermark(self) -> None:
        """watermark.json (and the detection encoder it names) of the directory this pipeline was loaded from, read
        on first use. Lazy, so every loader gets it: `load_pipeline`, `DiffusionPipeline.from_pretrained`,
        `custom_pipeline=` (diffusers records the directory as `name_or_path` after building any pipeline)."""
        source = self._source()
        if source is None or self._watermark_read_from == source:
            return
        self._watermark_read_from = source
        path = Path(source) / WATERMARK_FILE
        if self._watermark is None and path.is_file():
            self._watermark = WatermarkConfig.load(path)
            if self._watermark.encoder is not None:
                self._detection_tokenizer = load_detection_encoder(self.visual_tokenizer,
                                                                   Path(source) / self._watermark.encoder)

    @property
    def watermark(self) -> WatermarkConfig | None:
        """The model's own watermark config: its directory's watermark.json, or one the caller set; None when
        neither (calls then use the k-means default of `watermark_config`, which is never saved)."""
        self._read_saved_watermark()
        return self._watermark

    @watermark.setter
    def watermark(self, value: WatermarkConfig | None) -> None:
        self._read_saved_watermark()
        self._watermark = value

    @property
    def detection_tokenizer(self):
        """The tokenizer with its tuned detection encoder, when watermark.json names one (else None)."""
        self._read_saved_watermark()
        return self._detection_tokenizer

    @detection_tokenizer.setter
    def detection_tokenizer(self, value) -> None:
        self._read_saved_watermark()
        self._detection_tokenizer = value

    def watermark_config(self, method: str | None = None, delta: float | None = None) -> WatermarkConfig:
        """The saved watermark config (`watermark.json`), or the default C-reweight clustering of this
        tokenizer's codebook (deterministic k-means) when the model was saved without one; `method` / `delta`
        choose another method or KGW strength over the same cluster table (`WatermarkConfig.variant`)."""
        if self.watermark is not None:
            return self.watermark.variant(method, delta)
        if self._default_watermark is None:
            self._default_watermark = WatermarkConfig(clusters=cluster_codebook(self.visual_tokenizer.codebook, 16))
        return self._default_watermark.variant(method, delta)

    def save_extras(self, save_directory) -> None:
        """watermark.json, only when the pipeline was loaded or built with one (a k-means default is recomputed
        from the codebook, never written), with the detection encoder directory it names."""
        if self.watermark is None:
            return
        self.watermark.save(Path(save_directory) / WATERMARK_FILE)
        if self.watermark.encoder is not None and self._watermark_read_from is not None:
            source, target = Path(self._watermark_read_from) / self.watermark.encoder, \
                Path(save_directory) / self.watermark.encoder
            if source.is_dir() and source.resolve() != target.resolve():
                shutil.copytree(source, target, dirs_exist_ok=True)

    def save_pretrained(self, save_directory, **kwargs):
        super().save_pretrained(save_directory, **kwargs)
        if not isinstance(self, SavedDirectory):  # SavedDirectory calls save_extras before any upload
            self.save_extras(save_directory)

    def watermark_key_order(self):
        """Where the watermark keys each position (`mmgen.watermark.KeyOrder`); None: raster order, each token keyed
        by the tokens before it. Pipelines whose paradigm decodes out of raster order override it."""
        return None

    @torch.no_grad()
    def retokenize(self, images) -> torch.Tensor:
        """PIL images -> their codes (B, h*w) in raster order, as the tokenizer reads them back (through the
        detection encoder when watermark.json names one: `scripts/train_rcc.py`). Images of
        another size are resized (bicubic) to the tokenizer's resolution; 8-bit modes other than RGB are converted,
        16-bit, float and CMYK images are refused (a plain conversion would clip or recolour them)."""
        tokenizer = self.detection_tokenizer or self.visual_tokenizer
        size = tokenizer.image_size
        batch = []
        for i, image in enumerate(images):
            check_image_mode(image, f"images[{i}]")
            image = image.convert("RGB")
            if image.size != (size, size):
                image = image.resize((size, size), PIL.Image.BICUBIC)
            batch.append(self.image_processor.preprocess(image))
        return tokenizer.encode_tokens(torch.cat(batch).to(tokenizer.device)).flatten(1)

    @torch.no_grad()
    def detect_watermark(self, images, key: str, fpr: float = 0.01, combine: bool = False,
                         method: str | None = None) -> list[dict] | dict[str, list[dict] | dict]:
        """Re-encode images with the tokenizer and test for the watermark under `key`: per image the statistic
        (rank sum or green count, as the config says), scored positions, z-score, p-value (exact under no
        watermark) and the verdict at `fpr`. Images of another size are resized (bicubic) to the tokenizer's
        resolution first. `combine=True`: also one test for the whole set (images made with one key), its scored
        positions pooled (`mmgen.watermark.detect_tokens_combined`), from the same re-encoding; returns
        {"images": per-image list, "combined": that test}. `method`: the method the images were made with, when
        not the saved one (`watermark_method` at generation)."""
        if not 0 < fpr < 1:
            raise ValueError(f"fpr must be in (0, 1), got {fpr}")
        tokens, config, order = self.retokenize(images), self.watermark_config(method), self.watermark_key_order()
        per_image = [d.as_dict(fpr) for d in detect_tokens(tokens, config, key, order)]
        if not combine:
            return per_image
        return {"images": per_image,
                "combined": {"images": len(tokens), **detect_tokens_combined(tokens, config, key, order).as_dict(fpr)}}



def save_detection_encoder(tokenizer, directory: str | Path, prefixes: tuple[str, ...], info: dict) -> None:
    """The parameters of `tokenizer` under `prefixes` (the tuned encoder; the rest is the pipeline's own
    tokenizer) as safetensors + config.json, written atomically."""
    state = {k: v.detach().cpu().contiguous() for k, v in tokenizer.state_dict().items() if k.startswith(prefixes)}
    if not state:
        raise ValueError(f"no parameters of {type(tokenizer).__name__} start with {prefixes}")
    from safetensors.torch import save_file

    with atomic_dir(directory) as tmp:
        save_file(state, str(Path(tmp) / ENCODER_WEIGHTS))
        (Path(tmp) / "config.json").write_text(json.dumps({"tokenizer_class": type(tokenizer).__name__,
                                                           "prefixes": list(prefixes), **info}, indent=1))


def load_detection_encoder(tokenizer, directory: str | Path):
    """A copy of `tokenizer` (a pipeline's visual tokenizer) with the tuned tensors of `directory`
    (`save_detection_encoder`) loaded over it: the encoder detection reads images with."""
    directory = Path(directory)
    config_path, weights = directory / "config.json", directory / ENCODER_WEIGHTS
    for path in (config_path, weights):
        if not path.is_file():
            raise FileNotFoundError(f"detection encoder file {str(path)!r} is missing (watermark.json names "
                                    f"{directory.name!r} as the detection encoder)")
    config = json.loads(config_path.read_text())
    if config.get("tokenizer_class") != type(tokenizer).__name__:
        raise ValueError(f"detection encoder {str(directory)!r} was tuned from a {config.get('tokenizer_class')}, "
                         f"but this pipeline's tokenizer is a {type(tokenizer).__name__}")
    tuned = copy.deepcopy(tokenizer)
    state = tuned.state_dict()
    tensors = load_file(weights)
    bad = [k for k, v in tensors.items() if k not in state or state[k].shape != v.shape]
    if bad:
        raise ValueError(f"detection encoder {str(weights)!r} does not fit this tokenizer: {bad[:5]}")
    tuned.load_state_dict({k: v.to(state[k].dtype) for k, v in tensors.items()}, strict=False)
    return tuned.eval().requires_grad_(False)


PIPELINE_SHIM = "pipeline.py"  # makes a saved directory loadable by DiffusionPipeline.from_pretrained
HUB_KWARGS = ("commit_message", "private", "create_pr", "token", "repo_id")


class SavedDirectory:
    """The directory layout every mmgen pipeline saves (mixed in before `DiffusionPipeline`): diffusers'
    components + `model_index.json`, plus the pipeline's extras (`save_extras`, e.g. watermark.json), no machine
    paths in any config, and diffusers' mechanism for pipelines defined outside diffusers: `_class_name` names
    `["pipeline", "<Class>"]` and `pipeline.py` imports the class from mmgen, so
    `DiffusionPipeline.from_pretrained(dir, trust_remote_code=True)` builds the mmgen class. With
    `push_to_hub=True` the finished directory, extras included, is what gets uploaded."""

    @classmethod
    def load_config(cls, *args, **kwargs):
        """diffusers' config loading, with `["pipeline", "<Class>"]` read as the class itself: loading through an
        mmgen class never runs the directory's `pipeline.py` (only `DiffusionPipeline` needs it)."""
        out = super().load_config(*args, **kwargs)
        config = out[0] if isinstance(out, tuple) else out
        config["_class_name"] = pipeline_class_name(config)
        return out

    def save_extras(self, save_directory) -> None:
        """Files beside the components that the pipeline needs (none by default)."""

    def enable_model_cpu_offload(self, *args, **kwargs):
        """Refused: accelerate's offload hooks move a component when its `forward` runs, but the sampling loops
        call components through other methods (the tokenizer's `decode_tokens`, the KV-cached decode step), so
        a component would be used where it does not sit. Keep the pipeline on one device (`.to("cuda")`)."""
        raise NotImplementedError(
            f"{type(self).__name__} does not support enable_model_cpu_offload: the sampling loop calls its components "
            f"through methods other than forward (decode_tokens, the cached decode step), which accelerate's offload "
            f"hooks do not see; move the whole pipeline with .to(device) instead")

    enable_sequential_cpu_offload = enable_model_cpu_offload

    def save_pretrained(self, save_directory, push_to_hub: bool = False, **kwargs):
        hub = {k: kwargs.pop(k) for k in HUB_KWARGS if k in kwargs}
        super().save_pretrained(save_directory, **kwargs)
        directory = Path(save_directory)
        self.save_extras(directory)
        _finish_directory(type(self), directory)
        if push_to_hub:
            repo_id = create_repo(hub.get("repo_id", directory.name), exist_ok=True, private=hub.get("private"),
                                  token=hub.get("token")).repo_id
            self._upload_folder(str(directory), repo_id, token=hub.get("token"),
                                commit_message=hub.get("commit_message"), create_pr=hub.get("create_pr", False))


def _finish_directory(cls: type, directory: Path) -> None:
    index_path = directory / "model_index.json"
    index = json.loads(index_path.read_text())
    index.pop("_name_or_path", None)
    index["_class_name"] = [Path(PIPELINE_SHIM).stem, cls.__name__]
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    for config_path in directory.glob("*/config.json"):
        config = json.loads(config_path.read_text())
        if config.pop("_name_or_path", None) is not None:
            config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (directory / PIPELINE_SHIM).write_text(
        f'"""Loads this directory with diffusers: DiffusionPipeline.from_pretrained(dir, trust_remote_code=True)."""\n\n'
        f"from {cls.__module__} import {cls.__name__}  # noqa: F401\n")



class MMGenPipeline(DiffusionPipeline):
    """The skeleton of every mmgen pipeline: a subclass writes its `__call__` (the options it takes are read from
    that signature into `call_options`) and, where its own loop can hand tensors to `callback_on_step_end`, names
    them in `_callback_tensor_inputs` (diffusers' attribute)."""

    _callback_tensor_inputs: tuple[str, ...] = ()
    call_options: dict = {}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls.call_options = call_options(cls)  # name -> default, from `__call__`: nothing to keep in step by hand

    def step_callback(self, callback_on_step_end, tensor_inputs=None, sampler: str = "ar") -> StepCallback:
        """The call's `callback_on_step_end`, checked, as the loop calls it after every decoder pass."""
        return StepCallback(self, callback_on_step_end, tensor_inputs, sampler)

    def output(self, images_BCHW: torch.Tensor, tokens: torch.Tensor, output_type: str, return_dict: bool,
               passes: int, compression: float = 1.0, accepted: float | None = None, lossless: bool = True,
               model_evals: int | None = None):
        """Decoded images in [-1, 1] -> the call's output (`output_type` "pt" in [0, 1], as diffusers)."""
        images = self.image_processor.postprocess(images_BCHW, output_type=output_type)
        if not return_dict:
            return images, tokens, passes
        return ARPipelineOutput(images=images, tokens=tokens, decoder_passes=passes, step_compression=compression,
                                mean_accepted_length=compression if accepted is None else accepted,
                                lossless=lossless, model_evals=model_evals)


class ParadigmPipeline(SavedDirectory, MMGenPipeline):
    """An mmgen paradigm's pipeline: a decoder, a visual tokenizer (component `vq_model`, or what
    `visual_component` names) and a conditioning (`mmgen.conditioning`: a caption tokenizer, class labels, none, or
    a frozen text encoder with its `text_projection`). A subclass names its `paradigm` module (or picks it from the
    decoder in `paradigm_of`) and writes its `__call__`: `prepare` (the door), `run_paradigm` (the paradigm's loop)
    and `output`."""

    paradigm = None  # the paradigm module (`mmgen.paradigms.protocol`)
    visual_component = "vq_model"
    # class-conditional and unconditional models have no text tokenizer; only text_encoder models have the rest
    _optional_components = ["tokenizer", "text_encoder", "text_projection"]

    def __init__(self, transformer, vq_model, tokenizer, max_text_len: int = 32,
                 default_guidance_scale: float = DEFAULT_GUIDANCE_SCALE, conditioning: dict | None = None,
                 text_encoder=None, text_projection=None):
        super().__init__()
        self.register_modules(transformer=transformer, **{self.visual_component: vq_model}, tokenizer=tokenizer,
                              text_encoder=text_encoder, text_projection=text_projection)
        # the model's own guidance scale, used when a call passes none (model_index.json keeps it)
        self.register_to_config(max_text_len=max_text_len, default_guidance_scale=default_guidance_scale)
        if conditioning:  # `mmgen.conditioning`: captions (None, the default), class labels or unconditional
            self.register_to_config(conditioning=conditioning)
        self.condition = pipeline_conditioning(tokenizer, conditioning, max_text_len, text_encoder, text_projection)
        self.visual_tokenizer = as_visual_tokenizer(vq_model)
        self.vocab = unified_vocab(transformer, self.condition, self.visual_tokenizer.vocab_size)
        self.paradigm = self.paradigm_of(transformer)
        self.layout = self.paradigm.layout_from_model(transformer, self.visual_tokenizer, self.vocab, max_text_len)
        self.image_processor = VaeImageProcessor(do_resize=False, do_normalize=True)

    @classmethod
    def paradigm_of(cls, transformer):
        return cls.paradigm

    def prepare(self, prompt, class_labels, num_images_per_prompt: int, output_type: str, guidance_scale,
                generator) -> tuple[list[list[int]], float, list[torch.Generator]]:
        """The door of a call (its common arguments checked once, `mmgen.options`): the condition ids of every image,
        the guidance scale (the model's own when None) and one generator per image."""
        text_ids = condition_rows(self.condition, prompt, class_labels, num_images_per_prompt)
        check_output_type(output_type)
        guidance_scale = call_guidance(self.condition, guidance_scale, self.config.default_guidance_scale)
        return text_ids, guidance_scale, per_image_generators(generator, len(text_ids))

    def run_paradigm(self, text_ids, sampling, generators, prompt, num_images_per_prompt: int, passes: int,
                     step: StepCallback, **stages):
        """The paradigm's sampling loop (`self.paradigm.generate`: prefill, decode steps, sample), under a progress
        bar of `passes` and the call's condition prefix; `step` runs after every decoder pass. Returns (tokens,
        `GenerationCost`)."""
        with self.progress_bar(total=passes) as bar, condition_prefix(self, prompt, num_images_per_prompt):
            return self.paradigm.generate(self.transformer, self.layout, text_ids, sampling, generators,
                                          tokenizer=self.visual_tokenizer, callback=lambda i: (bar.update(), step()),
                                          **stages)
