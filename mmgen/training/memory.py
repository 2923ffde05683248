"""Memory for compute and communication: activation (gradient) checkpointing (Chen et al. 2016, "Training Deep
Nets with Sublinear Memory Cost") and the FSDP units of each model family.

Both use the names diffusers and transformers give them, so one rule covers mmgen's decoders and public
checkpoints alike: a model turns checkpointing on by its own `enable_gradient_checkpointing()` (diffusers) or
`gradient_checkpointing_enable()` (transformers), and names the block class FSDP should wrap in
`_no_split_modules` (what Accelerate's FSDP plugin reads for its auto-wrap too): mmgen's `Transformer` names
`Block`, Token-Shuffle adds its `ResidualMLP`, a transformers language model its decoder layer.
"""

from __future__ import annotations

import torch


def enable_gradient_checkpointing(module: torch.nn.Module) -> list[str]:
    """Turn activation checkpointing on in every model inside `module` that supports it (outermost first; a
    model's own call covers its submodules). Returns the class names of the models it was turned on in; a module
    with none is a ValueError."""
    done, covered = [], set()
    for sub in module.modules():
        if id(sub) in covered:
            continue
        if getattr(sub, "supports_gradient_checkpointing", False) and hasattr(sub, "gradient_checkpointing_enable"):
            # transformers (named activation_checkpointing_enable from v5 on)
            getattr(sub, "activation_checkpointing_enable", sub.gradient_checkpointing_enable)()
        elif getattr(sub, "_supports_gradient_checkpointing", False) and hasattr(sub, "enable_gradient_checkpointing"):
            sub.enable_gradient_checkpointing()  # diffusers ModelMixin (mmgen's decoders)
        else:
            continue
        covered |= {id(m) for m in sub.modules()}
        done.append(type(sub).__name__)
    if not done:
        raise ValueError(f"train.gradient_checkpointing=true: {type(module).__name__} holds no model that supports "
                         f"gradient checkpointing")
    return done


def shard_classes(module: torch.nn.Module) -> tuple[str, ...]:
    """The block class names FSDP wraps one unit each in `module`: the `_no_split_modules` of the outermost
    modules that declare it (a model's own declaration covers its submodules)."""
    names, covered = [], set()
    for sub in module.modules():
        declared = getattr(sub, "_no_split_modules", None)
        if id(sub) in covered or not declared:
            continue
        names += [n for n in declared if n not in names]
        covered |= {id(m) for m in sub.modules()}
    return tuple(names)
