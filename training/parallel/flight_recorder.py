"""The collectives this process took part in, as torch's flight recorder saw them.

torch keeps per process a ring buffer of its last `TORCH_FR_BUFFER_SIZE` collectives (NCCL, and
gloo since 2.8): the process group, the group's sequence number, the operation, when this rank
entered it (wall clock) and whether it completed. The hang watchdog names the collective a rank
waits in from it (group, members, sequence number), and the straggler check compares when each
rank arrived at the same collective. The buffer must be sized before the process group starts
(`enable`, called by `init_distributed`); 20,000 entries is torchtitan's default.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch.distributed as dist

BUFFER_ENTRIES = 20_000


def enable(entries: int = BUFFER_ENTRIES) -> None:
    """Turn the recorder on for the process groups created after this (an explicit setting wins)."""
    os.environ.setdefault("TORCH_FR_BUFFER_SIZE", str(entries))


@dataclass(frozen=True)
class Collective:
    group: str  # the process group's name, the same on every member
    seq: int  # its sequence number in that group: the same collective has the same number on every member
    op: str  # all_reduce, _allgather_base, ...
    entered_ns: int  # wall clock, when this rank called it
    completed: bool


def recorded() -> list[Collective]:
    """The collectives in the buffer, oldest first ([] when the recorder is off); point-to-point
    sends and receives are left out (a sender does not wait for its peer)."""
    try:
        from torch._C._distributed_c10d import _dump_fr_trace_json

        trace = json.loads(_dump_fr_trace_json(True, False))
    except (ImportError, RuntimeError, ValueError):
        return []
    return [
        Collective(
            e["process_group"][0],
            int(e["collective_seq_id"]),
            e["profiling_name"].split(":")[-1],
            int(e["time_created_ns"]),
            bool(e["retired"]),
        )  # fmt: skip
        for e in trace.get("entries", [])
        if not e.get("is_p2p")
    ]


def group_members() -> dict[str, list[int]]:
    """Each process group this rank belongs to, by name: its global ranks."""
    world = dist.distributed_c10d._world
    return {name: dist.get_process_group_ranks(pg) for pg, name in world.pg_names.items()}


def describe(collective: Collective, members: dict[str, list[int]]) -> str:
    """E.g. 'all_reduce #17 of group 3 (ranks [0, 2])'."""
    ranks = members.get(collective.group)
    return f"{collective.op} #{collective.seq} of group {collective.group}" + (f" (ranks {ranks})" if ranks else "")


def pending() -> list[str]:
    """The collectives entered and not completed, described."""
    members = group_members() if dist.is_initialized() else {}
    return [describe(c, members) for c in recorded() if not c.completed]
