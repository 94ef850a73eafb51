"""Mixed precision: bf16/fp16 autocast over fp32 master weights, and dynamic loss scaling for fp16."""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(precision: str, device_type: str):
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is not one of {list(PRECISIONS)}")
    dtype = PRECISIONS[precision]
    return contextlib.nullcontext() if dtype is None else torch.autocast(device_type, dtype=dtype)


class LossScaler:
    """Dynamic loss scaling (as Megatron-LM and apex do for fp16): the loss is multiplied by `scale`
    before backward; gradients are divided by it before clipping; a step whose gradients overflow
    on any rank is skipped and the scale halved; after `growth_interval` clean steps it doubles."""

    def __init__(self, enabled: bool, init_scale: float = 2.0**16, growth_interval: int = 1000):
        self.enabled, self.scale, self.growth_interval = enabled, init_scale if enabled else 1.0, growth_interval
        self.clean_steps = 0

    def unscale_and_check(self, parameters) -> bool:
        """Divide grads by the scale; True when any rank saw inf/nan (the step must be skipped)."""
        if not self.enabled:
            return False
        grads = [p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad for p in parameters if p.grad is not None]
        overflow = torch.zeros((), device=grads[0].device if grads else "cpu")
        for g in grads:
            g.mul_(1.0 / self.scale)
            overflow = torch.maximum(overflow, (~torch.isfinite(g)).any().float())
        if dist.is_initialized():
            dist.all_reduce(overflow, op=dist.ReduceOp.MAX)
        return bool(overflow)

    def update(self, overflow: bool) -> None:
        if not self.enabled:
            return
        if overflow:
            self.scale, self.clean_steps = max(self.scale / 2, 1.0), 0
        else:
            self.clean_steps += 1
            if self.clean_steps % self.growth_interval == 0:
                self.scale *= 2

    def state_dict(self) -> dict:
        return {"scale": self.scale, "clean_steps": self.clean_steps}

    def load_state_dict(self, state: dict) -> None:
        self.scale, self.clean_steps = state["scale"], state["clean_steps"]
