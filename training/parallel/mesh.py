"""One object that owns the device mesh and answers layout questions.

Rank order is TP innermost (fastest links), then CP, then DP, then PP: mesh dims ("pp", "dp", "tp"),
with ("pp", "dp", "cp", "tp") when context parallel is on.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from common.config import ConfigError, check_fields

DP_MODES = ("allreduce", "fsdp")
FSDP_UNITS = ("block", "linear")


@dataclass
class ParallelConfig:
    tp: int = 1
    pp: int = 1
    cp: int = 1  # context parallel: every sequence split over cp ranks (training/parallel/context.py)
    dp: int = -1  # -1: whatever the world size leaves after tp * cp * pp
    pp_schedule: str = "1F1B"  # 1F1B, GPipe, Interleaved1F1B, LoopedBFS, InterleavedZeroBubble, ZBVZeroBubble
    virtual_stages: int = 1  # pipeline stages per rank (interleaved and zero-bubble schedules)
    pp_layers: list[int] | None = None  # layers per stage, e.g. [3, 5]; default an even split
    micro_batch_size: int = 4  # sequences per forward; the local batch is split into these
    dp_mode: str = "allreduce"  # allreduce (replicated, DDP-like) | fsdp (FSDP2: params, grads, optimizer sharded)
    # fsdp: what is gathered at once: a block (torchtitan's units, fewest collectives) or each linear
    # layer (a matrix's gathered weight and unsharded gradient instead of a block's: less memory)
    fsdp_unit: str = "block"
    # fsdp: the embedding and head split over the vocabulary across DP x TP ranks and never gathered
    # (large vocabularies); each micro-batch all-gathers token ids and final hidden states over DP instead
    vocab_over_dp: bool = False
    sequence_parallel: bool = False  # with tp > 1: shard norms and the residual stream over the sequence
    # `parallel: auto`: every size above chosen by the planner (training/plan) for the world size
    # the run is launched with; the choice and its prediction are logged
    auto: bool = False

    def __post_init__(self):
        check_fields(self, tp=">= 1", pp=">= 1", cp=">= 1", virtual_stages=">= 1", micro_batch_size=">= 1",
                     dp_mode=DP_MODES, fsdp_unit=FSDP_UNITS)  # fmt: skip
        if self.dp != -1 and self.dp < 1:
            raise ConfigError(f"dp must be >= 1 (or -1: what the world size leaves), got {self.dp}", "dp")


class LayoutError(ValueError):
    """A parallel layout that does not fit the world size or the model; the message says which."""


@dataclass
class ParallelDims:
    dp: int
    tp: int
    pp: int
    cp: int = 1

    @classmethod
    def from_config(cls, config: ParallelConfig, world_size: int) -> ParallelDims:
        for name in ("tp", "pp", "cp"):
            if getattr(config, name) < 1:
                raise LayoutError(f"parallel.{name} must be >= 1, got {getattr(config, name)}")
        dp = config.dp if config.dp != -1 else world_size // (config.tp * config.pp * config.cp)
        if dp < 1 or dp * config.tp * config.pp * config.cp != world_size:
            cp = f" x cp={config.cp}" if config.cp > 1 else ""
            raise LayoutError(
                f"parallel layout tp={config.tp} x pp={config.pp}{cp} x dp={config.dp} does not match "
                f"the world size {world_size}: start tp*pp*cp*dp ranks (deepspeed --num_gpus N, "
                f"torchrun --nproc_per_node N; on CPU deepspeed starts one rank per NUMA node "
                f"unless given --num_gpus) or override parallel.tp / parallel.pp"
            )
        if config.cp > 1 and config.sequence_parallel:
            raise LayoutError("parallel.cp > 1 with parallel.sequence_parallel is not supported yet")
        return cls(dp=dp, tp=config.tp, pp=config.pp, cp=config.cp)

    @property
    def world_size(self) -> int:
        return self.dp * self.tp * self.pp * self.cp

    def check_model(self, n_heads: int, n_kv_heads: int, n_layers: int, vocab_size: int) -> None:
        if n_heads % self.tp:
            raise LayoutError(f"tensor parallel size {self.tp} does not divide n_heads={n_heads}")
        if n_kv_heads % self.tp:
            raise LayoutError(f"tensor parallel size {self.tp} does not divide n_kv_heads={n_kv_heads}")
        if vocab_size % self.tp:
            raise LayoutError(f"tensor parallel size {self.tp} does not divide vocab_size={vocab_size}")
        if n_layers < self.pp:
            raise LayoutError(f"pipeline parallel size {self.pp} exceeds n_layers={n_layers}")

    def build_mesh(self, device_type: str) -> DeviceMesh | None:
        if self.world_size == 1:
            return None
        if self.cp > 1:
            shape, names = (self.pp, self.dp, self.cp, self.tp), ("pp", "dp", "cp", "tp")
            return init_device_mesh(device_type, shape, mesh_dim_names=names)
        return init_device_mesh(device_type, (self.pp, self.dp, self.tp), mesh_dim_names=("pp", "dp", "tp"))

    def coordinates(self, mesh: DeviceMesh | None) -> tuple[int, int, int, int]:
        """This rank's (pp, dp, cp, tp) coordinates."""
        if mesh is None:
            return 0, 0, 0, 0
        coords = mesh.get_coordinate()
        return tuple(coords) if self.cp > 1 else (coords[0], coords[1], 0, coords[2])


def device_type() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"
