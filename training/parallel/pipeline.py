"""Pipeline parallelism: cut the model into stages and run a torch.distributed.pipelining schedule.

A rank owns one stage (1F1B, GPipe) or several virtual stages (Interleaved1F1B, LoopedBFS,
InterleavedZeroBubble: stages rank, rank + pp, ...; ZBVZeroBubble: the V shape rank, 2 pp - 1 - rank).
The rank keeps one `PhiModel` holding all its layers under their full-model names (what the
optimizer and checkpoints see), and each stage runs a view of it that shares those modules.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.pipelining import PipelineStage, schedules

from training.models.phi import PhiModel
from training.parallel.data import local_tensor

V_SHAPE_SCHEDULES = ("ZBVZeroBubble", "DualPipeV")


def schedule_class(name: str) -> type:
    cls = getattr(schedules, f"Schedule{name}", None)
    if cls is None or not issubclass(cls, (schedules.PipelineScheduleSingle, schedules.PipelineScheduleMulti)):
        raise ValueError(
            f"parallel.pp_schedule {name!r} is not a torch.distributed.pipelining schedule "
            "(1F1B, GPipe, Interleaved1F1B, LoopedBFS, InterleavedZeroBubble, ZBVZeroBubble)"
        )
    return cls


def stages_of_rank(pp_rank: int, pp: int, virtual_stages: int, schedule: str) -> list[int]:
    cls = schedule_class(schedule)
    if issubclass(cls, schedules.PipelineScheduleSingle):
        if virtual_stages != 1:
            raise ValueError(f"parallel.pp_schedule {schedule} runs one stage per rank; set virtual_stages=1")
        return [pp_rank]
    if schedule in V_SHAPE_SCHEDULES:
        if virtual_stages != 2:
            raise ValueError(f"parallel.pp_schedule {schedule} needs virtual_stages=2 (a V of two stages per rank)")
        return [pp_rank, 2 * pp - 1 - pp_rank]
    return [pp_rank + k * pp for k in range(virtual_stages)]


def stage_layers(n_layers: int, num_stages: int, sizes: list[int] | None = None) -> list[list[int]]:
    """Layers of each stage: `sizes` when given (uneven splits, e.g. fewer layers next to the
    embedding and head), otherwise even, the first stages taking one extra when it does not divide."""
    if sizes:
        if len(sizes) != num_stages or sum(sizes) != n_layers or min(sizes) < 1:
            raise ValueError(f"parallel.pp_layers {sizes} must give {num_stages} stages >= 1 layer summing to "
                             f"n_layers={n_layers}")  # fmt: skip
    elif n_layers < num_stages:
        raise ValueError(f"{num_stages} pipeline stages need at least as many layers, the model has {n_layers}")
    else:
        base, extra = divmod(n_layers, num_stages)
        sizes = [base + (stage < extra) for stage in range(num_stages)]
    bounds, start = [], 0
    for size in sizes:
        bounds.append(list(range(start, start + size)))
        start += size
    return bounds


def keep_stages(model: PhiModel, stages: list[int], num_stages: int, sizes: list[int] | None = None) -> PhiModel:
    """Remove, in place, what other ranks' stages own: the embedding lives on stage 0, norm and head on
    the last stage. Remaining parameters keep their full-model names. Tied embeddings: a last stage
    without stage 0 keeps the shared weight as `output.weight`, its own copy (see `tied_embedding_group`)."""
    split = stage_layers(model.config.n_layers, num_stages, sizes)
    keep = {str(i) for s in stages for i in split[s]}
    for name in list(model.layers):
        if name not in keep:
            del model.layers[name]
    if 0 not in stages:
        model.tok_embeddings = None
    if num_stages - 1 not in stages:
        model.norm = None
        model.output = None
    return model


def stage_owner(stage: int, pp: int, virtual_stages: int, schedule: str) -> int:
    return next(r for r in range(pp) if stage in stages_of_rank(r, pp, virtual_stages, schedule))


def tied_embedding_group(mesh, dims, stages: list[int], num_stages: int, config) -> dist.ProcessGroup | None:
    """Tied embeddings across pipeline stages, as Megatron does it: the first stage's embedding and the
    last stage's head are copies of one weight that start equal and get the sum of both gradients, so
    they stay equal. Returns this rank's pair group (first-stage rank, last-stage rank at the same DP
    and TP coordinates), or None when one rank holds both ends or neither."""
    if dims.pp == 1:
        return None
    first = stage_owner(0, dims.pp, config.virtual_stages, config.pp_schedule)
    last = stage_owner(num_stages - 1, dims.pp, config.virtual_stages, config.pp_schedule)
    if first == last:
        return None
    mine = None
    ranks = mesh.mesh  # [pp, dp, tp] -> global rank
    for d in range(dims.dp):  # every rank creates every group, in the same order
        for t in range(dims.tp):
            pair = [int(ranks[first, d, t]), int(ranks[last, d, t])]
            group = dist.new_group(pair)
            if dist.get_rank() in pair:
                mine = group
    holds_one = (0 in stages) != (num_stages - 1 in stages)
    return mine if holds_one else None


def sync_tied_embedding_grads(model: PhiModel, group: dist.ProcessGroup) -> None:
    """Sum the shared weight's gradient over its two copies (first and last stage)."""
    param = model.tok_embeddings.weight if model.tok_embeddings is not None else model.output.weight
    if param.grad is not None:  # both copies' gradients are sharded like their weights (vocab-parallel)
        dist.all_reduce(local_tensor(param.grad), group=group)


def stage_view(model: PhiModel, stage: int, num_stages: int, sizes: list[int] | None = None) -> PhiModel:
    """The same model restricted to one stage's layers, sharing every module with `model`."""
    view = copy.copy(model)
    view._modules = dict(model._modules)
    layers = stage_layers(model.config.n_layers, num_stages, sizes)[stage]
    view.layers = nn.ModuleDict({str(i): model.layers[str(i)] for i in layers})
    if stage != 0:
        view.tok_embeddings = None
    if stage != num_stages - 1:
        view.norm = None
        view.output = None
    return view


def build_schedule(
    model: PhiModel,
    stages: list[int],
    num_stages: int,
    group: dist.ProcessGroup,
    device: torch.device,
    n_microbatches: int,
    loss_fn: Callable,
    schedule: str = "1F1B",
    sizes: list[int] | None = None,
):
    cls = schedule_class(schedule)
    pipeline_stages = [
        PipelineStage(
            stage_view(model, s, num_stages, sizes) if len(stages) > 1 else model, s, num_stages, device, group=group
        )
        for s in stages
    ]
    # The loss is already normalised by the global token count: no extra 1/n_microbatches scaling.
    first = pipeline_stages[0] if issubclass(cls, schedules.PipelineScheduleSingle) else pipeline_stages
    return cls(first, n_microbatches=n_microbatches, loss_fn=loss_fn, scale_grads=False)
