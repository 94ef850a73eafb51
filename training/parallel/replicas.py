"""Replica groups that survive a lost peer (torchft): data parallelism over whole copies of the model,
each copy a launch of its own with any TP/PP/CP/FSDP layout inside, summed by a fault-tolerant
process group that is rebuilt whenever the set of live copies changes.

Every step the replicas meet in a quorum at a lighthouse (`torchft_lighthouse`), then sum their token
counts and gradients and vote to commit. A replica that dies drops out of the next quorum and the
others go on without a restart: its slice of the global batch is not trained on while it is missing,
and the gradient is the exact mean over the live replicas' tokens. A replica that (re)starts joins
at the next quorum and, before its first step, receives the current weights, optimizer state,
schedule and step from a live peer (each rank from the same rank of the peer, over HTTP). A step
during which a peer is lost fails the vote on every replica and the survivors take it again.
"""

from __future__ import annotations

import logging
import os
import socket
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from common.config import ConfigError, check_fields
from training.parallel.data import local_tensor


@dataclass
class FaultToleranceConfig:
    enable: bool = False
    replicas: int = 1  # replica groups the global batch is split over, each a launch of its own
    replica_id: int = 0  # this launch's group: 0 .. replicas - 1
    min_replicas: int = 1  # a step commits only while at least this many replicas are live
    lighthouse: str = ""  # the lighthouse's address, http://HOST:29510; empty: $TORCHFT_LIGHTHOUSE
    timeout_s: float = 60.0  # sums, votes and state transfers; a quorum may take twice as long

    def __post_init__(self):
        check_fields(self, replicas=">= 1", replica_id=">= 0", min_replicas=">= 1", timeout_s="> 0")
        if self.replica_id >= self.replicas:
            raise ConfigError(
                f"replica_id must be below replicas ({self.replicas}), got {self.replica_id}",
                "replica_id",
            )
        if self.min_replicas > self.replicas:
            raise ConfigError(
                f"min_replicas must be at most replicas ({self.replicas}), got {self.min_replicas}",
                "min_replicas",
            )


def lighthouse_address(config: FaultToleranceConfig) -> str:
    address = config.lighthouse or os.environ.get("TORCHFT_LIGHTHOUSE", "")
    if not address:
        raise ValueError(
            "fault_tolerance.enable needs a lighthouse: set fault_tolerance.lighthouse=http://HOST:29510 or "
            "TORCHFT_LIGHTHOUSE (start one with `torchft_lighthouse --min_replicas 1`)"
        )
    return address


class _QuietOnCpu(logging.Filter):
    """torchft warns at every new quorum that it cannot reset NCCL's flight recorder: true, and beside
    the point, on a gloo run."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Unable to reset NCCL flight recorder" not in record.getMessage()


def _group_store() -> tuple[str, int, dist.TCPStore | None]:
    """A store of this replica group's own for torchft's manager, hosted by its rank 0: the launcher's
    store may hold a previous attempt's keys after a restart."""
    if not dist.is_initialized():
        store = dist.TCPStore("localhost", 0, is_master=True, wait_for_workers=False)
        return "localhost", store.port, store
    host = socket.gethostname()
    store = dist.TCPStore(host, 0, is_master=True, wait_for_workers=False) if dist.get_rank() == 0 else None
    where = [(host, store.port) if store else None]
    dist.broadcast_object_list(where, src=0)
    return *where[0], store


class ReplicaGroups:
    """This launch's membership of the fault-tolerant replica groups. `state` and `load` give and take
    what a joining replica receives (`training.run_state.replica_state`)."""

    def __init__(self, config: FaultToleranceConfig, device: torch.device, state: Callable[[], dict],
                 load: Callable[[dict], None]):  # fmt: skip
        # torchft's servers log each quorum and vote at INFO (five lines a step); RUST_LOG=info shows them.
        os.environ.setdefault("RUST_LOG", "warn")
        from torchft import Manager, ProcessGroupGloo, ProcessGroupNCCL

        lighthouse = lighthouse_address(config)
        timeout = timedelta(seconds=config.timeout_s)
        host, port, self._store = _group_store()
        group = ProcessGroupNCCL(timeout=timeout) if device.type == "cuda" else ProcessGroupGloo(timeout=timeout)
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        logging.getLogger("torchft.manager").addFilter(_QuietOnCpu())
        # torchft reads a peer's state from a read-only buffer, and copies it into ours.
        warnings.filterwarnings("ignore", message="The given buffer is not writable")
        self.manager = Manager(
            pg=group,
            load_state_dict=load,
            state_dict=state,
            min_replica_size=config.min_replicas,
            use_async_quorum=False,  # a joining replica takes its peers' state before it computes anything
            timeout=timeout,
            quorum_timeout=2 * timeout,
            connect_timeout=timeout,
            rank=rank,
            world_size=world,
            store_addr=host,
            store_port=port,
            lighthouse_addr=lighthouse,
            replica_id=f"replica_{config.replica_id}",
        )
        self.total = config.replicas
        self._live = config.replicas

    def resumed_at(self, step: int) -> None:
        """After a resume from a checkpoint: the step this replica brings to the quorum (the lighthouse
        has replicas behind the furthest one take its state)."""
        self.manager.load_state_dict({"step": step, "batches_committed": self.manager.batches_committed()})

    def begin_step(self) -> str | None:
        """Join this step's quorum (a replica behind its peers receives their state first); a note when
        the number of live replicas changed."""
        self.manager.start_quorum()
        live, before = self.manager.num_participants(), self._live
        self._live = live
        if live == before:
            return None
        return f"{live} of {self.total} replicas train step {self.manager.current_step() + 1}"

    @property
    def live(self) -> int:
        return self._live

    def sum_(self, tensor: torch.Tensor) -> None:
        """Sum over the live replicas in place. A lost peer makes it a no-op that fails the vote."""
        self.manager.allreduce(tensor, reduce_op=dist.ReduceOp.SUM).wait()

    def commit(self) -> bool:
        """Every live replica's vote that this step's sums completed: step the optimizer only then."""
        return self.manager.should_commit()

    def close(self) -> None:
        self.manager.shutdown(wait=False)


def local_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """This rank's weights and optimizer state as plain tensors (a DTensor's local shard): what the same
    rank of a joining replica, laid out alike, receives."""
    optim = optimizer.state_dict()
    optim["state"] = {i: {k: local_tensor(v) for k, v in s.items()} for i, s in optim["state"].items()}
    return {"weights": {n: local_tensor(p.detach()) for n, p in model.named_parameters()}, "optimizer": optim}


def load_local_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Take `local_state` of a peer: weights copied in place, optimizer state shards wrapped as this
    rank's parameters are."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            local_tensor(param).copy_(state["weights"][name])
    params = [p for group in optimizer.param_groups for p in group["params"]]

    def like(value: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
        if isinstance(param, DTensor) and value.shape == param.to_local().shape and value.dim() > 0:
            return DTensor.from_local(value, param.device_mesh, param.placements, run_check=False,
                                      shape=param.shape, stride=param.stride())  # fmt: skip
        return value

    optim = state["optimizer"]
    optim["state"] = {i: {k: like(v, params[i]) for k, v in s.items()} for i, s in optim["state"].items()}
    optimizer.load_state_dict(optim)
