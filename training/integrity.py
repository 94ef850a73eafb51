"""Silent corruption caught: copies that must be bit-identical, compared by exact fingerprints.

Replicas of the same shard (DP ranks with the same TP/PP/CP coordinates, `dp_mode: allreduce`)
must hold bit-identical weights and optimizer states after every step, and so must the tensors every
tensor-parallel rank holds whole (the norms' weights, their AdamW states; under FSDP each rank's
shard of them). The TP ranks' loss and gradient norm are all-reduced values, equal by construction,
so comparing them would find nothing; a tensor sharded over TP, with no data-parallel replica, has
no copy to compare with. Every `check.replicas_every`
steps each rank computes, per tensor, an exact integer fingerprint (the sum of its bit patterns as
int64: order-free, so replicas agree exactly, and any flipped bit changes it), the group
all-gathers them, and a replica that differs from the others is named with the tensor and the step
(with two replicas neither can be called the odd one: both are named). `check.on_divergence`: stop
(exit with the report) or restore (every rank reloads the newest intact checkpoint and goes on).
`POLYGLOT_FLIP_BIT=rank:step:tensor` flips one bit of that tensor on that rank after that step:
the test hook that stands for a bit flipped in memory.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from common.config import check_fields


@dataclass
class CheckConfig:
    replicas_every: int = 0  # steps between replica comparisons; 0: never
    on_divergence: str = "stop"  # stop | restore (reload the newest intact checkpoint on every rank)
    stragglers_every: int = 10  # steps between straggler checks (training/stragglers.py); 0: never
    straggler_factor: float = 1.25  # named when its median busy time exceeds its peers' by this factor

    def __post_init__(self):
        check_fields(self, replicas_every=">= 0", on_divergence=("stop", "restore"), stragglers_every=">= 0",
                     straggler_factor="> 1")  # fmt: skip


class ReplicaDivergence(RuntimeError):
    """Replicas of one shard hold different weights or optimizer states."""


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def fingerprint(t: torch.Tensor) -> int:
    """The sum of the tensor's bit patterns (as signed integers of its element size), in int64."""
    flat = _local(t).detach().contiguous().view(-1)
    ints = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[flat.element_size()]
    total = 0
    for chunk in flat.view(ints).split(1 << 22):  # bounded extra memory for large tensors
        total += int(chunk.long().sum())
    return total


def state_tensors(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) of every parameter and its optimizer state, in a fixed order."""
    named = []
    for name, p in model.named_parameters():
        named.append((name, p))
        for key, value in sorted(optimizer.state.get(p, {}).items()):
            if torch.is_tensor(value) and value.numel() > 1:
                named.append((f"{name} ({key})", value))
    return named


def odd_replicas(prints: torch.Tensor) -> list[int]:
    """Indices of the rows of `prints` [replicas, tensors] that differ from the most common row."""
    rows = [tuple(r) for r in prints.tolist()]
    common = max(set(rows), key=rows.count)
    if rows.count(common) == 1 and len(rows) == 2:
        return [0, 1]  # two replicas that disagree: no majority
    return [i for i, r in enumerate(rows) if r != common]


def replicated_over(t: torch.Tensor, mesh_dim: str) -> bool:
    """Whether every rank along `mesh_dim` holds the same copy of `t` (a plain tensor, or a DTensor
    replicated on that dimension of its mesh)."""
    names = getattr(t, "device_mesh", None) and t.device_mesh.mesh_dim_names
    if not names or mesh_dim not in names:
        return True
    return t.placements[names.index(mesh_dim)].is_replicate()


def compare_replicas(model, optimizer, group, step: int, kind: str = "data-parallel",
                     only: str | None = None) -> str | None:  # fmt: skip
    """None when every replica in `group` agrees, else what differs (rank, tensor, step). `only`: a
    mesh dimension; then only the tensors replicated over it are compared."""
    named = [(n, t) for n, t in state_tensors(model, optimizer) if only is None or replicated_over(t, only)]
    mine = torch.tensor([fingerprint(t) for _, t in named], dtype=torch.int64)
    everyone = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(everyone, mine, group=group)
    prints = torch.stack(everyone)
    if (prints == prints[0]).all():
        return None
    odd = odd_replicas(prints)
    ranks = [dist.get_global_rank(group, i) for i in odd]
    reference = 1 if odd == [0] else 0
    tensors = [named[j][0] for j in range(len(named)) if any(prints[i, j] != prints[reference, j] for i in odd)]
    shown = ", ".join(tensors[:3]) + (f" and {len(tensors) - 3} more" if len(tensors) > 3 else "")
    return (f"replicas diverged at step {step}: rank {' and '.join(map(str, ranks))} of the {kind} group "
            f"{dist.get_process_group_ranks(group)} differ{'s' if len(ranks) == 1 else ''} in {shown}")  # fmt: skip


_FLIPPED: set[str] = set()  # a fault strikes once per process, not again when restored steps are replayed


def maybe_flip_bit(model: torch.nn.Module, step: int, rank: int) -> None:
    """The test hook: POLYGLOT_FLIP_BIT=rank:step:tensor flips bit 10 of the tensor's first element, once."""
    spec = os.environ.get("POLYGLOT_FLIP_BIT")
    if not spec or spec in _FLIPPED:
        return
    want_rank, want_step, name = spec.split(":", 2)
    if int(want_rank) != rank or int(want_step) != step:
        return
    _FLIPPED.add(spec)
    param = dict(model.named_parameters())[name]
    with torch.no_grad():
        local = _local(param).view(-1)
        bits = local[:1].view(torch.int32)
        bits ^= 1 << 10
