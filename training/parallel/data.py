"""Data parallelism, two ways: replicas that sum gradients in one flat all-reduce (`allreduce`), or
FSDP2 sharding of parameters, gradients and optimizer state (`fsdp`).

The loss is normalised by the global token count, so a sum (not a mean) gives the exact gradient of
the global batch whatever the DP size.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def allreduce_gradients(parameters, group: dist.ProcessGroup) -> None:
    grads = [local_tensor(p.grad) for p in parameters if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, group=group)
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def apply_fsdp(model: torch.nn.Module, dp_mesh, reshard_after_forward: bool) -> None:
    """FSDP2 over the data-parallel mesh: parameters, gradients and optimizer state sharded (ZeRO-3).

    Units as in torchtitan: the embedding, each block, and the final norm with the head are gathered
    only while in use (the embedding and head are a large share of a billion-parameter model); the
    root keeps what is left. Tied embeddings on one rank stay in the root (one parameter, one unit).
    FSDP averages gradients over replicas; the trainer multiplies its loss by the DP size to get the
    sum (gloo has no pre-multiplied reduction to ask FSDP for a sum directly). Composes with tensor
    parallel (2-D DTensors) and pipeline stages."""
    from torch.distributed.fsdp import fully_shard

    tied_here = model.tok_embeddings is not None and model.output is not None and model.config.tie_embeddings
    if model.tok_embeddings is not None and not tied_here:
        fully_shard(model.tok_embeddings, mesh=dp_mesh, reshard_after_forward=reshard_after_forward)
    for block in model.layers.values():
        fully_shard(block, mesh=dp_mesh, reshard_after_forward=reshard_after_forward)
    if model.output is not None and not tied_here:
        # The backward pass starts with the head: keep it gathered from forward to backward.
        fully_shard([model.norm, model.output], mesh=dp_mesh, reshard_after_forward=False)
    fully_shard(model, mesh=dp_mesh, reshard_after_forward=reshard_after_forward)
