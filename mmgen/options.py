"""The options layer: every argument a generation call takes, with its one check and one set of limits, and the
command-line flags that set them.

- Limits: `MAX_IMAGES_PER_CALL`, `MAX_SEED`, `OUTPUT_TYPES`, `SAMPLERS`.
- Checks (`check_prompts`, `check_count`, `check_output_type`, `check_choice`, `check_seed`, `refuse_options`), each
  raising an `OptionError` that names the argument as its caller spells it (`prompt` or PROMPT, `seed` or --seed)
  and what it accepts. They run where a value enters: a pipeline's `__call__` (the Python door, as diffusers'
  `check_inputs`), `generators_from_seed` for seeds, and the argparse types and commands of `mmgen generate` /
  `mmgen eval`, the demo and the eval harness, so every door accepts the same values and the code behind them
  (paradigm loops, backends) trusts them. The numbers of `SamplingConfig` (guidance, temperature, top-k/-p, flow
  steps) keep their one check there; the argparse types of their flags run it.
- `call_options(cls)`: the keyword options of a pipeline's `__call__`, read from its signature (name -> default).
  A flag whose option the model's pipeline does not take is refused with an error that names the flag and the
  flags the model does take, never passed on or silently dropped.

This module sits below the pipelines (they import its checks) and imports none of them.
"""

from __future__ import annotations

import argparse
import inspect
import math
import os

from mmgen.sampling.config import CFG_SCHEDULES, FLOW_SAMPLERS, SamplingConfig
from mmgen.watermark import METHODS

# images per pipeline call (prompts x num_images_per_prompt), for every caller: far beyond what fits in memory at
# once on CPU; more is a mistake (e.g. a seed typed into the count) that would otherwise run for hours
MAX_IMAGES_PER_CALL = 256
MAX_SEED = 2**63 - 1  # seed + image index must stay below 2**64, torch.Generator's range
OUTPUT_TYPES = ("pil", "pt", "np")
SAMPLERS = ("ar", "sjd")  # one token per pass, or speculative Jacobi decoding
# what every pipeline call takes beside its options: the condition, the count, the randomness, the output, callbacks
CALL_ARGUMENTS = ("self", "prompt", "class_labels", "num_images_per_prompt", "generator", "output_type",
                  "return_dict", "callback_on_step_end", "callback_on_step_end_tensor_inputs")


class OptionError(ValueError):
    """A call argument or flag that does not fit; the commands print it on one line and exit with code 2."""


def call_options(cls: type) -> dict:
    """The keyword options a pipeline class's `__call__` takes beyond `CALL_ARGUMENTS`, with their defaults, read
    from its signature (what the CLI, the demo and the eval harness route by)."""
    params = inspect.signature(cls.__call__).parameters
    return {k: p.default for k, p in params.items() if k not in CALL_ARGUMENTS and p.kind == p.POSITIONAL_OR_KEYWORD}


def check_prompts(prompt, name: str = "prompt") -> list[str]:
    """A call's prompt(s) as a list: a non-empty string or a non-empty list of them."""
    prompts = [prompt] if isinstance(prompt, str) else list(prompt) if isinstance(prompt, (list, tuple)) else None
    if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
        raise OptionError(f"{name} must be a non-empty string or a non-empty list of non-empty strings, got "
                          f"{prompt!r}")
    return prompts


def check_count(num_images_per_prompt, conditions: int, what: str = "prompt(s)",
                name: str = "num_images_per_prompt") -> None:
    """Images per condition: an integer >= 1, with at most `MAX_IMAGES_PER_CALL` images over all `conditions`."""
    if isinstance(num_images_per_prompt, bool) or not isinstance(num_images_per_prompt, int) \
            or not 1 <= num_images_per_prompt * conditions <= MAX_IMAGES_PER_CALL:
        raise OptionError(f"{name} must be an integer >= 1 with at most {MAX_IMAGES_PER_CALL} images per call, got "
                          f"{num_images_per_prompt} for {conditions} {what}")


def check_choice(value, choices, name: str) -> None:
    if value not in choices:
        raise OptionError(f"{name} must be one of {', '.join(map(str, choices))}; got {value!r}")


def check_output_type(output_type) -> None:
    if output_type not in OUTPUT_TYPES:
        raise OptionError(f"output_type must be one of {', '.join(map(repr, OUTPUT_TYPES))}; got {output_type!r}")


def check_seed(seed, name: str = "seed") -> int:
    """A seed: an integer in [0, MAX_SEED] (image i of a call gets seed + i)."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise OptionError(f"{name} must be an integer in [0, 2**63 - 1], got {seed!r}")
    return seed


def refuse_options(pipeline, given, spell=None, model=None) -> None:
    """Refuse options that `pipeline` (an instance or a class) does not take, naming the first one, the pipeline
    (and `model`, as the user typed it) and what it takes; `spell` maps a call option to how the caller names it
    (a flag), None where the caller has no name for it."""
    cls = pipeline if isinstance(pipeline, type) else type(pipeline)
    accepted, spell = cls.call_options, spell or (lambda name: name)
    for name in given:
        if name not in accepted:
            takes = [spell(n) for n in accepted if spell(n) is not None]
            where = f" (model {str(model)!r})" if model is not None else ""
            raise OptionError(f"{spell(name)} does not apply to {cls.__name__}{where}; its options: "
                              f"{', '.join(takes) or 'none'}")


def _integer(name: str, s: str) -> int:
    try:
        return int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{name} must be an integer, got {s!r}") from None


def positive_int(name: str, maximum: int | None = None):
    """An argparse type: an integer >= 1 (and <= maximum), its error naming `name`."""
    def parse(s):
        v = _integer(name, s)
        if v < 1 or (maximum is not None and v > maximum):
            raise argparse.ArgumentTypeError(f"{name} must be >= 1{f' and <= {maximum}' if maximum else ''}, "
                                             f"got {v}")
        return v
    return parse


def nonnegative_int(name: str):
    """An argparse type: an integer >= 0, its error naming `name`."""
    def parse(s):
        v = _integer(name, s)
        if v < 0:
            raise argparse.ArgumentTypeError(f"{name} must be an integer >= 0, got {v}")
        return v
    return parse


def nonnegative_float(name: str):
    """An argparse type: a finite number >= 0, its error naming `name`."""
    def parse(s):
        try:
            v = float(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a number, got {s!r}") from None
        if not math.isfinite(v) or v < 0:  # float() accepts "nan" and "inf"
            raise argparse.ArgumentTypeError(f"{name} must be a finite number >= 0, got {s!r}")
        return v
    return parse


def positive_float(name: str):
    """An argparse type: a finite number > 0, its error naming `name`."""
    def parse(s):
        v = nonnegative_float(name)(s)
        if v == 0:
            raise argparse.ArgumentTypeError(f"{name} must be a finite number > 0, got {s!r}")
        return v
    return parse


def unit_interval(name: str):
    """An argparse type: a number strictly between 0 and 1, its error naming `name`."""
    def parse(s):
        v = nonnegative_float(name)(s)
        if not 0 < v < 1:
            raise argparse.ArgumentTypeError(f"{name} must be a number in (0, 1), got {s!r}")
        return v
    return parse


def seed(s):
    """An argparse type for --seed: an integer in [0, MAX_SEED] (`check_seed`)."""
    try:
        return check_seed(int(s), "--seed")
    except ValueError as e:  # int("seven"), or the check
        raise argparse.ArgumentTypeError(str(e) if isinstance(e, OptionError) else f"--seed must be an integer, "
                                         f"got {s!r}") from None


def sampling_number(flag: str, field: str, parse=float):
    """An argparse type for a `SamplingConfig` number (guidance_scale, temperature, top_k, top_p,
    num_inference_steps): the text parsed by `parse`, then that field's own check, its error naming `flag`."""
    def convert(s):
        try:
            v = parse(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} must be {'an integer' if parse is int else 'a number'}, got "
                                             f"{s!r}") from None
        try:
            SamplingConfig(**{field: v})
        except ValueError as e:  # the check's message starts with the field's name
            raise argparse.ArgumentTypeError(flag + str(e).removeprefix(field)) from None
        return v
    return convert


# sampling flag -> the pipeline call option it sets (None on the command line = not given: the model's default)
SAMPLING_FLAGS = {"--guidance-scale": "guidance_scale", "--temperature": "temperature", "--top-k": "top_k",
                  "--top-p": "top_p", "--sampler": "sampler", "--sjd-window": "sjd_window", "--sjd-init": "sjd_init",
                  "--sjd-coupled": "sjd_coupled", "--sjd-adaptive": "sjd_adaptive",
                  "--sjd-lantern-delta": "sjd_lantern_delta", "--sjd-lantern-k": "sjd_lantern_k",
                  "--sjd-tree-width": "sjd_tree_width", "--sjd-tree-depth": "sjd_tree_depth",
                  "--sjd-shared-noise": "sjd_shared_noise",
                  "--watermark-key": "watermark_key",
                  "--watermark-method": "watermark_method", "--watermark-delta": "watermark_delta",
                  "--height": "height", "--width": "width", "--steps": "num_inference_steps",
                  "--flow-sampler": "flow_sampler", "--cfg-schedule": "cfg_schedule",
                  "--compile": "compile_decode"}
FLAG_OF = {name: flag for flag, name in SAMPLING_FLAGS.items()}


def add_sampling_args(parser: argparse.ArgumentParser, watermark: bool = False) -> None:
    """Add the sampling flags to `parser`; `watermark`: also --watermark-key/-method/-delta (generation that writes
    images)."""
    parser.add_argument("--guidance-scale", type=sampling_number("--guidance-scale", "guidance_scale"), default=None,
                        help="classifier-free guidance scale (>= 0; 1 = off; default: the model's own, see "
                             "`mmgen models`)")
    parser.add_argument("--temperature", type=sampling_number("--temperature", "temperature"), default=1.0,
                        help="sampling temperature (> 0; 0 = greedy); flow models: scale of the initial noise")
    discrete = parser.add_argument_group("discrete tokens (next-token, next-scale)")
    discrete.add_argument("--top-k", type=sampling_number("--top-k", "top_k", int), default=None,
                          help="keep the k most likely tokens (>= 1)")
    discrete.add_argument("--top-p", type=sampling_number("--top-p", "top_p"), default=None,
                          help="nucleus sampling mass in (0, 1]")
    nexttok = parser.add_argument_group("next-token models only")
    nexttok.add_argument("--sampler", choices=SAMPLERS, default=None,
                         help="ar (default): one token per forward pass; sjd: speculative Jacobi decoding (same "
                              "distribution, fewer passes)")
    nexttok.add_argument("--compile", action="store_true", default=None,
                         help="decode through torch.compile'd steps: sampler ar's one-token step, sampler sjd's "
                              "verify passes (compiles once per batch size and width, tens of seconds each)")
    nexttok.add_argument("--sjd-window", type=positive_int("--sjd-window"), default=None,
                         help="SJD draft tokens per pass (default 16)")
    nexttok.add_argument("--sjd-init", choices=("random", "repeat", "sample_left", "above"), default=None,
                         help="SJD draft initialization (default random; above: the token one image row up)")
    nexttok.add_argument("--sjd-coupled", action="store_true", default=None,
                         help="SJD: form the next drafts by maximal coupling with the old ones (lossless; drafts "
                              "stop churning where successive passes agree)")
    nexttok.add_argument("--sjd-adaptive", action="store_true", default=None,
                         help="SJD: choose each pass's window width (at most --sjd-window) from the images' "
                              "acceptance rates and a pass-cost model (lossless; for batches)")
    nexttok.add_argument("--sjd-tree-width", type=nonnegative_int("--sjd-tree-width"), default=None,
                         help="SJD: other candidates scored per window position as leaves of a token tree and tried "
                              "by recursive rejection sampling (lossless; default 0: a chain)")
    nexttok.add_argument("--sjd-tree-depth", type=positive_int("--sjd-tree-depth"), default=None,
                         help="SJD: window positions that get --sjd-tree-width candidates (default 4)")
    nexttok.add_argument("--sjd-shared-noise", action="store_true", default=None,
                         help="SJD: each position's token is the race of its distribution with that position's own "
                              "noise, and a draft is accepted when it equals it (lossless: the tokens are plain AR's "
                              "for the same --seed; not with --sjd-coupled, trees or LANTERN)")
    nexttok.add_argument("--sjd-lantern-delta", type=unit_interval("--sjd-lantern-delta"), default=None,
                         help="LOSSY SJD (off by default): LANTERN's relaxed acceptance, a draft also takes the "
                              "probability of its nearest codebook neighbours up to this total variation per token "
                              "(0 < delta < 1); outputs say lossless: false")
    nexttok.add_argument("--sjd-lantern-k", type=positive_int("--sjd-lantern-k"), default=None,
                         help="codebook neighbours per draft for --sjd-lantern-delta (default 8)")
    if watermark:
        nexttok.add_argument("--watermark-key", default=None,
                             help="embed the distortion-free watermark under this secret key (detect with "
                                  "mmgen watermark detect)")
        nexttok.add_argument("--watermark-key-file", default=None, metavar="FILE",
                             help="read the watermark key from FILE instead (kept out of ps and shell history)")
        nexttok.add_argument("--watermark-method", choices=METHODS, default=None,
                             help="watermark method instead of the model's own (watermark.json; c-reweight): "
                                  "kgw-cluster / kgw-token bias the sampling by --watermark-delta, which a single "
                                  "image's test detects far more often (detect with --method)")
        nexttok.add_argument("--watermark-delta", type=positive_float("--watermark-delta"), default=None,
                             help="strength of the kgw methods: logit bias of the green list (> 0)")
    size = parser.add_argument_group("models that take an output size (Emu3)")
    size.add_argument("--height", type=positive_int("--height"), default=None,
                      help="image height in pixels, a multiple of the VQ factor (default: the processor's own)")
    size.add_argument("--width", type=positive_int("--width"), default=None, help="image width in pixels")
    flow = parser.add_argument_group("continuous tokens (flow-head raster, FlowAR, next-X)")
    flow.add_argument("--steps", type=sampling_number("--steps", "num_inference_steps", int), default=None,
                      help="flow ODE steps per token or scale (default 25)")
    flow.add_argument("--flow-sampler", choices=FLOW_SAMPLERS, default=None,
                      help="flow ODE solver (default euler)")
    parser.add_argument("--cfg-schedule", choices=CFG_SCHEDULES, default=None,
                        help="next-scale and flow models: guidance constant, or ramped linearly from 1 over the "
                             "scales/tokens (default: constant; FlowAR, next-X: linear)")


def sampling_kwargs(pipeline, args: argparse.Namespace, model=None) -> dict:
    """The pipeline call options the parsed `args` give (flags left at None are left out, so the pipeline keeps
    its own defaults), checked against what `pipeline` (an instance or a class) takes (`refuse_options`: a given
    flag it does not take raises `OptionError` naming the flag, the pipeline, `model` as the user typed it, and the
    flags it takes)."""
    if getattr(args, "watermark_key_file", None) is not None:  # --watermark-key-file: the key, as if typed
        args.watermark_key = secret_key(getattr(args, "watermark_key", None), args.watermark_key_file,
                                        "--watermark-key")
    kwargs = {name: getattr(args, flag[2:].replace("-", "_"), None) for flag, name in SAMPLING_FLAGS.items()}
    kwargs = {name: value for name, value in kwargs.items() if value is not None}
    refuse_options(pipeline, kwargs, spell=FLAG_OF.get, model=model)
    return kwargs


def device(s: str) -> str:
    """An argparse type for --device: a torch device string (cpu, cuda, cuda:1, mps, ...)."""
    import torch

    try:
        torch.device(s)
    except (RuntimeError, TypeError):
        raise argparse.ArgumentTypeError(f"--device must be a torch device such as cpu, cuda or cuda:1, got {s!r}") \
            from None
    return s


def secret_key(key: str | None, key_file: str | None, flag: str, env: str | None = None) -> str | None:
    """A watermark key from its flag, its file flag (the file's text without the trailing newline: kept out of
    `ps` and shell history) or, where `env` names one, that environment variable; at most one of the flags."""
    if key is not None and key_file is not None:
        raise OptionError(f"{flag} and {flag}-file both give the key; use one")
    if key_file is not None:
        try:
            key = open(key_file, encoding="utf-8").read().rstrip("\r\n")
        except OSError as e:
            raise OptionError(f"{flag}-file {key_file!r} cannot be read ({e.strerror})") from None
        if not key:
            raise OptionError(f"{flag}-file {key_file!r} is empty; it must hold the secret key")
    elif key is None and env is not None:
        key = os.environ.get(env) or None
    return key


def class_label(s: str) -> int | str:
    """An argparse type for --class-label: an integer, else a class name (checked against the model later)."""
    try:
        return int(s)
    except ValueError:
        if not s.strip():
            raise argparse.ArgumentTypeError("--class-label must be an integer or a class name, got ''") from None
        return s


def add_condition_args(parser: argparse.ArgumentParser) -> None:
    """--class-label, for class-conditional models (the positional PROMPT serves caption models)."""
    parser.add_argument("--class-label", dest="class_label", action="append", type=class_label, default=None,
                        metavar="N_OR_NAME",
                        help="class-conditional models: the class to draw, an integer or a class name (repeatable: "
                             "--num-images images of each); `mmgen models` shows each model's conditioning")


def condition_kwargs(pipeline, prompt: str | None, class_labels: list | None, model=None) -> dict:
    """The condition a `mmgen generate` call passes: {"prompt": ...} or {"class_labels": [...]}, checked against
    the model's conditioning (`pipeline.condition`, `mmgen.conditioning`) or, for pipelines without one, against
    whether its `__call__` takes `class_labels`. Misuse raises `OptionError` naming the argument."""
    cls = type(pipeline)
    where = f" (model {str(model)!r})" if model is not None else ""
    params = inspect.signature(cls.__call__).parameters
    cond = getattr(pipeline, "condition", None)
    kind = cond.kind if cond is not None else ("class" if "prompt" not in params else "caption")
    if class_labels is not None:
        if "class_labels" not in params or (cond is not None and kind != "class"):
            on = ("text; give a PROMPT" if kind in ("caption", "text_encoder")
                  else "nothing; give neither PROMPT nor --class-label")
            raise OptionError(f"--class-label does not apply to {cls.__name__}{where}: it is conditioned on {on}")
        if prompt is not None:
            raise OptionError(f"PROMPT does not apply with --class-label: {cls.__name__}{where} is class-conditional")
        if cond is not None:
            try:
                cond.labels(class_labels)
            except ValueError as e:
                raise OptionError(f"--class-label: {e}") from None
        return {"class_labels": list(class_labels)}
    if kind == "class":
        accepted = f"; it takes {cond.accepted()}" if cond is not None else ""
        raise OptionError(f"--class-label is required: {cls.__name__}{where} is class-conditional, PROMPT does not "
                          f"apply{accepted}")
    if kind == "unconditional":
        if prompt is not None:
            raise OptionError(f"PROMPT does not apply: {cls.__name__}{where} is unconditional (give no PROMPT)")
        return {}
    return {"prompt": check_prompts(prompt, "PROMPT")[0]}
