"""The paradigm registry: one plain dict from a paradigm's name to its module (the paradigm protocol,
`mmgen.paradigms.protocol`), its pipeline class (which names its visual tokenizer component) and the
conditioning kinds it takes (`mmgen.conditioning`: every paradigm reads condition ids through the shared text
block, so each takes word-level captions, class labels, a frozen text encoder's caption features and none).
Training, the pipelines, the CLI, the demo, the eval harness and the benchmarks look paradigms up here."""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

from mmgen.conditioning import KINDS as CONDITION_KINDS
from mmgen.paradigms import (flow_head, flowar, next_block, next_neighbor, next_scale, next_token, next_x,
                             token_shuffle)
from mmgen.pipelines.flow import FlowARPipeline, NextXPipeline, RasterFlowPipeline
from mmgen.pipelines.next_scale import NextScalePipeline
from mmgen.pipelines.next_token import NextTokenPipeline
from tokenizers_vis.protocol import CLASS_KINDS, load_tokenizer_component, tokenizer_class_name


@dataclass(frozen=True)
class ParadigmEntry:
    module: ModuleType  # implements the paradigm protocol
    pipeline: type
    alignable: bool = False  # provides loss_and_image_hidden (REPA / ARRA alignment losses)
    conditions: tuple[str, ...] = CONDITION_KINDS  # the `mmgen.conditioning` kinds its pipeline and training take

    @property
    def component(self) -> str:
        """The pipeline's visual tokenizer argument: "vq_model" or "vae" (`ParadigmPipeline.visual_component`)."""
        return self.pipeline.visual_component


PARADIGMS = {
    "next_token": ParadigmEntry(next_token, NextTokenPipeline, alignable=True),
    "token_shuffle": ParadigmEntry(token_shuffle, NextTokenPipeline),
    "next_scale": ParadigmEntry(next_scale, NextScalePipeline, alignable=True),
    "flow_head": ParadigmEntry(flow_head, RasterFlowPipeline),
    "flowar": ParadigmEntry(flowar, FlowARPipeline),
    "next_x": ParadigmEntry(next_x, NextXPipeline),
    "next_neighbor": ParadigmEntry(next_neighbor, NextTokenPipeline),  # NAR, an NARTransformer decoder
    "next_block": ParadigmEntry(next_block, NextTokenPipeline),  # a NextBlockTransformer decoder
}


def get_paradigm(name: str) -> ParadigmEntry:
    if name not in PARADIGMS:
        raise ValueError(f"paradigm must be one of {', '.join(PARADIGMS)}; got {name!r}")
    return PARADIGMS[name]


def check_condition(paradigm: str, kind: str) -> None:
    """Refuse a conditioning kind the paradigm does not take, naming those it does."""
    takes = get_paradigm(paradigm).conditions
    if kind not in takes:
        raise ValueError(f"condition.kind must be one of {', '.join(takes)} for paradigm {paradigm!r}; got {kind!r}")


def paradigm_name(pipe) -> str:
    """The registry name of a loaded pipeline's paradigm (Token-Shuffle, NAR and next-block decoders run in
    NextTokenPipeline)."""
    for name, entry in PARADIGMS.items():
        if entry.module is pipe.paradigm:
            return name
    raise ValueError(f"{type(pipe).__name__} runs no registered paradigm")


def resolve_paradigm(name: str, shuffle_window: int = 1) -> str:
    """A run config's paradigm as a registry name: `next_token` with a Token-Shuffle window (`model.shuffle_window`
    > 1, as older configs say) is `token_shuffle`."""
    get_paradigm(name)
    if shuffle_window != 1 and name not in ("next_token", "token_shuffle"):
        raise ValueError(f"model.shuffle_window={shuffle_window} needs paradigm token_shuffle; paradigm is {name!r}")
    if name == "token_shuffle" and shuffle_window == 1:
        raise ValueError("paradigm token_shuffle needs model.shuffle_window >= 2 (the window side s)")
    return "token_shuffle" if shuffle_window != 1 else name


def load_visual_tokenizer(paradigm: str, directory: str):
    """The saved visual tokenizer in `directory` (the module a pipeline stores), checked to give the tokens the
    paradigm reads."""
    wanted = get_paradigm(paradigm).module.TOKENS
    name = tokenizer_class_name(directory)
    if CLASS_KINDS[name] != wanted:
        names = " or ".join(c for c, kind in CLASS_KINDS.items() if kind == wanted)
        raise ValueError(f"paradigm {paradigm!r} needs tokenizer class {names}; {directory!r} holds {name}")
    return load_tokenizer_component(directory)
