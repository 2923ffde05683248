"""The paradigm protocol: the few functions every module in `mmgen/paradigms/` provides, so that training, the
pipelines, the CLI, the demo, the eval harness and the benchmarks call any paradigm the same way.

    TOKENS                   the visual-tokenizer kind it reads ("codes", "scale_codes" or "latents")
    DEFAULT_CFG_SCHEDULE     the guidance schedule a SamplingConfig with cfg_schedule=None gets
    make_layout(tokenizer, vocab, max_text_len, model, flow) -> layout     from a run's decoder config
    layout_from_model(decoder, tokenizer, vocab, max_text_len) -> layout   from a saved decoder (pipelines)
    make_model(layout, model, flow) -> decoder (a diffusers ModelMixin)
    build_batch(layout, text_ids, tokens, cond_drop_prob=0.0, generator=None, *, tokenizer=None) -> batch
    loss_fn(model, batch, layout) -> scalar loss
    generate(model, layout, text_ids, sampling, generators=None, *, tokenizer=None, callback=None)
        -> (tokens, GenerationCost)

`tokens` are what the visual tokenizer's `encode_tokens` gives and `decode_tokens` takes. Discrete paradigms
that can be aligned (REPA / ARRA) also provide `loss_and_image_hidden(model, batch, layout, layer)`.
`ModelConfig` and `FlowConfig` are the decoder sections (`model:`, `flow:`) of a training run's YAML.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch


@dataclass
class ModelConfig:
    """The decoder backbone (every paradigm)."""

    dim: int = 256
    n_layers: int = 6
    n_heads: int = 8
    n_kv_heads: int | None = None
    mlp_hidden: int | None = None
    rope_2d: bool = True  # next_token and flow_head (scale-wise paradigms place tokens by their own rule)
    shuffle_window: int = 1  # token_shuffle: window s (s x s codes per position)

    def backbone(self) -> dict:
        return dict(dim=self.dim, n_layers=self.n_layers, n_heads=self.n_heads, n_kv_heads=self.n_kv_heads,
                    mlp_hidden=self.mlp_hidden)


@dataclass
class FlowConfig:
    """Continuous paradigms only."""

    head_width: int = 256  # flow_head: width of the per-token MLP head (MAR)
    head_depth: int = 3
    flow_batch_mul: int = 4  # flow_head: (time, noise) draws per token and step, MAR's diffusion_batch_mul
    flow_width: int = 128  # flowar: the Spatial-adaLN flow module
    flow_depth: int = 2
    flow_heads: int = 4
    scales: tuple | None = None  # flowar: doubling scales ending at the latent grid side; default 1, 2, 4, ..., G
    entity: str = "cell"  # next_x: token | cell | subsample | scale | image
    entity_size: int = 0  # next_x: cell side or subsample stride; 0 = default (half the latent side, stride 2)


@dataclass(frozen=True)
class GenerationCost:
    """What one `generate` call cost per image batch. `decoder_passes` counts batched forward passes of the
    decoder's AR backbone, the prompt pass included (plain raster AR over N tokens: N). `model_evals` counts
    every evaluation of the decoder where it also integrates a flow itself (xAR); None elsewhere."""

    decoder_passes: int
    model_evals: int | None = None


class Paradigm(Protocol):
    """Structural type of a paradigm module (modules satisfy protocols, PEP 544)."""

    TOKENS: str
    DEFAULT_CFG_SCHEDULE: str

    def make_layout(self, tokenizer, vocab, max_text_len: int, model: ModelConfig, flow: FlowConfig) -> Any: ...

    def layout_from_model(self, decoder, tokenizer, vocab, max_text_len: int) -> Any: ...

    def make_model(self, layout, model: ModelConfig, flow: FlowConfig) -> torch.nn.Module: ...

    def build_batch(self, layout, text_ids, tokens: torch.Tensor, cond_drop_prob: float = 0.0,
                    generator: torch.Generator | None = None, *, tokenizer=None) -> Any: ...

    def loss_fn(self, model, batch, layout) -> torch.Tensor: ...

    def generate(self, model, layout, text_ids: Sequence[Sequence[int]], sampling,
                 generators: Sequence[torch.Generator] | None = None, *, tokenizer=None,
                 callback: Callable[[int], None] | None = None) -> tuple[torch.Tensor, GenerationCost]: ...
