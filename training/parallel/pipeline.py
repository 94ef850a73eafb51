"""Pipeline parallelism: cut the model into stages and run a torch.distributed.pipelining schedule."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch.distributed.pipelining import PipelineStage, schedules

from training.models.phi import PhiModel


def stage_layers(n_layers: int, num_stages: int) -> list[list[int]]:
    """Even split; the first stages take one extra layer each when it does not divide."""
    base, extra = divmod(n_layers, num_stages)
    bounds, start = [], 0
    for stage in range(num_stages):
        size = base + (stage < extra)
        bounds.append(list(range(start, start + size)))
        start += size
    return bounds


def keep_stage(model: PhiModel, stage: int, num_stages: int) -> PhiModel:
    """Remove what other stages own, in place: the embedding lives on the first stage, norm and head on
    the last. Remaining parameters keep their full-model names."""
    if model.config.tie_embeddings and num_stages > 1:
        raise ValueError(
            "tie_embeddings=true with pipeline parallel is not supported yet: the embedding "
            "and the head live on different stages"
        )
    keep = {str(i) for i in stage_layers(model.config.n_layers, num_stages)[stage]}
    for name in list(model.layers):
        if name not in keep:
            del model.layers[name]
    if stage != 0:
        model.tok_embeddings = None
    if stage != num_stages - 1:
        model.norm = None
        model.output = None
    return model


def build_schedule(
    stage_module: PhiModel,
    stage: int,
    num_stages: int,
    group: dist.ProcessGroup,
    device: torch.device,
    n_microbatches: int,
    loss_fn: Callable,
    schedule: str = "1F1B",
):
    schedule_cls = getattr(schedules, f"Schedule{schedule}", None)
    if schedule_cls is None or not issubclass(schedule_cls, schedules.PipelineScheduleSingle):
        raise ValueError(
            f"parallel.pp_schedule {schedule!r} is not a single-stage pipelining schedule (e.g. 1F1B, GPipe)"
        )
    pipeline_stage = PipelineStage(stage_module, stage, num_stages, device, group=group)
    # The loss is already normalised by the global token count: no extra 1/n_microbatches scaling.
    return schedule_cls(pipeline_stage, n_microbatches=n_microbatches, loss_fn=loss_fn, scale_grads=False)
