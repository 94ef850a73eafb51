"""Parallelism applied to a plain model from outside, always in one order (torchtitan's): pipeline
stages -> tensor (and sequence) parallel -> context parallel -> activation checkpointing ->
torch.compile -> vocabulary over DP -> FSDP2. The model is still on the meta device; memory and
weights come after (`training.model_setup.materialize`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from training.models.phi import PhiModel
from training.parallel.context import apply_context_parallel
from training.parallel.data import apply_fsdp
from training.parallel.mesh import LayoutError, ParallelConfig, ParallelDims
from training.parallel.pipeline import keep_stages, stages_of_rank, tied_embedding_group
from training.parallel.tensor import apply_tensor_parallel
from training.parallel.transforms import apply_activation_checkpointing, apply_compile
from training.parallel.vocab import VocabOverDP, apply_vocab_over_dp


@dataclass
class ParallelModel:
    """This rank's part of the model and what the training step needs to know about its layout."""

    model: PhiModel
    stages: list[int]  # pipeline stages this rank runs
    num_stages: int
    tied_group: dist.ProcessGroup | None  # first and last stage holding copies of tied embeddings
    cp_positions: torch.Tensor | None  # this rank's share of every sequence under context parallel
    vocab_shards: VocabOverDP | None  # the embedding and head split over DP x TP (parallel.vocab_over_dp)
    fsdp: bool

    @property
    def is_first_stage(self) -> bool:
        return 0 in self.stages

    @property
    def is_last_stage(self) -> bool:
        return self.num_stages - 1 in self.stages


def check_vocab_over_dp(pc: ParallelConfig, dims: ParallelDims) -> None:
    fsdp = dims.dp > 1 and pc.dp_mode == "fsdp"
    if pc.vocab_over_dp and (not fsdp or dims.cp > 1):
        raise LayoutError(
            "parallel.vocab_over_dp splits the vocabulary over FSDP's ranks: it needs parallel.dp_mode=fsdp "
            f"with dp > 1 (got dp_mode={pc.dp_mode}, dp={dims.dp}) and no context parallel (cp={pc.cp})"
        )


def parallelize(
    model: PhiModel,
    pc: ParallelConfig,
    dims: ParallelDims,
    mesh: DeviceMesh,
    device: torch.device,
    seq_len: int,
    activation_checkpointing: str = "none",
    compile: bool = False,
    param_dtype: torch.dtype | None = None,
) -> ParallelModel:
    """Shard `model` (on the meta device) for this rank of `mesh`, in place."""
    check_vocab_over_dp(pc, dims)
    pp_rank = dims.coordinates(mesh)[0]
    stages = stages_of_rank(pp_rank, dims.pp, pc.virtual_stages, pc.pp_schedule)
    num_stages = dims.pp * pc.virtual_stages
    if dims.pp > 1:
        keep_stages(model, stages, num_stages, pc.pp_layers)
    tied_group = None
    if model.config.tie_embeddings:
        tied_group = tied_embedding_group(mesh, dims, stages, num_stages, pc)
    if dims.tp > 1:
        apply_tensor_parallel(model, mesh["tp"], pc.sequence_parallel, vocab=not pc.vocab_over_dp)
    cp_positions = None
    if dims.cp > 1:
        cp_positions = apply_context_parallel(model, mesh["cp"].get_group(), seq_len, device)
    apply_activation_checkpointing(model, activation_checkpointing)
    if compile:
        apply_compile(model)
    fsdp = dims.dp > 1 and pc.dp_mode == "fsdp"
    vocab_shards = apply_vocab_over_dp(model, mesh, pc.sequence_parallel) if pc.vocab_over_dp else None
    if fsdp:
        if len(stages) > 1:
            raise ValueError("parallel.dp_mode=fsdp with virtual pipeline stages is not supported yet")
        # Pipelines run many micro-batches per step: keep gathered weights between them.
        ignored = set(vocab_shards.parameters(model)) if vocab_shards else set()
        apply_fsdp(model, mesh["dp"], dims.pp == 1, param_dtype, pc.fsdp_unit, ignored)
    return ParallelModel(model, stages, num_stages, tied_group, cp_positions, vocab_shards, fsdp)
