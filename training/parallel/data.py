"""Data parallelism: sum gradients over data-parallel replicas in one flat all-reduce.

The loss is normalised by the global token count, so a sum (not a mean) gives the exact gradient of
the global batch whatever the DP size.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def allreduce_gradients(parameters, group: dist.ProcessGroup) -> None:
    grads = [_local(p.grad) for p in parameters if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, group=group)
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()
