"""Model transformations applied from outside, after tensor parallelism: activation checkpointing
and torch.compile. Both replace `forward` on the instances they touch, so parameter names (and
therefore checkpoints) stay exactly those of the plain model."""

from __future__ import annotations

import functools

import torch
from torch.utils.checkpoint import checkpoint

from training.models.phi import PhiModel

AC_MODES = ("none", "full", "selective")


def apply_activation_checkpointing(model: PhiModel, mode: str) -> None:
    """`full`: recompute every block in the backward pass (keep only block inputs). `selective`:
    recompute only the core attention (scores, softmax, weighted sum), Megatron's selective recompute."""
    if mode not in AC_MODES:
        raise ValueError(f"activation_checkpointing {mode!r} is not one of {AC_MODES}")
    if mode == "none":
        return
    for block in model.layers.values():
        target = block if mode == "full" else block.attention
        name = "forward" if mode == "full" else "core_attention"
        original = getattr(target, name)
        setattr(target, name, functools.partial(checkpoint, original, use_reentrant=False))


def apply_compile(model: PhiModel) -> None:
    """Compile each block on its own (identical blocks share one compiled graph)."""
    for block in model.layers.values():
        block.forward = torch.compile(block.forward)
