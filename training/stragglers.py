"""Stragglers named: which rank makes every step wait.

A slow rank (a throttled GPU, a noisy neighbour) slows every step, and the step time is the same on
every rank, because the others wait for it in their collectives. What differs is when each rank
arrives at a collective: torch's flight recorder (training/parallel/flight_recorder.py) notes, per
rank, when it entered each collective. Every `check.stragglers_every` steps the ranks all-gather
the arrivals of that step; a rank's wait at a collective is the last member's arrival minus its
own, and its busy time is the step time minus its waits: what it spent computing. Percentiles of
each rank's busy time go to the metrics (and TensorBoard); a rank whose median busy time over the
last checks exceeds `check.straggler_factor` times its peers' (ranks at the same pipeline stage,
which do the same work) is named in the log, once, and again when it recovers.

Limits: point-to-point transfers are not timed (a pipeline stage's sender does not wait), so a
rank alone at its stage has no peer to compare with; on GPUs the arrival is the host's, which runs
ahead of the device unless the step synchronises.
"""

from __future__ import annotations

import os
import socket
import statistics
import time
from collections import deque

import torch.distributed as dist

from training.parallel import flight_recorder

SHOWN_RANKS = 64
Arrivals = dict[tuple[str, int], int]  # (group, sequence number) -> when the rank entered it (ns)


def busy_times(
    arrivals: list[Arrivals], step_s: list[float], members: dict[str, list[int]]
) -> tuple[list[float], list[float]]:
    """(busy seconds, late seconds) per rank for one step: busy is the step time less the time spent
    waiting for the last member at each collective; late sums how far behind the first member the
    rank arrived. Collectives not recorded by every member of their group are left out."""
    world = len(arrivals)
    wait, late = [0.0] * world, [0.0] * world
    for key in set().union(*arrivals):
        ranks = members.get(key[0], [])
        if not ranks or any(key not in arrivals[r] for r in ranks):
            continue
        entered = [arrivals[r][key] for r in ranks]
        first, last = min(entered), max(entered)
        for r, t in zip(ranks, entered, strict=True):
            wait[r] += (last - t) / 1e9
            late[r] += (t - first) / 1e9
    return [max(0.0, s - w) for s, w in zip(step_s, wait, strict=True)], late


def slow_ranks(busy_p50: list[float], stage: list[int], factor: float) -> dict[int, float]:
    """Ranks whose median busy time is over `factor` times the median of their peers' (same stage),
    with that ratio."""
    found = {}
    for r, mine in enumerate(busy_p50):
        peers = [busy_p50[p] for p in range(len(busy_p50)) if p != r and stage[p] == stage[r]]
        if peers and mine > factor * (baseline := max(statistics.median(peers), 1e-6)):
            found[r] = mine / baseline
    return found


def shown_ranks(recent: list[float], most: int = SHOWN_RANKS) -> list[int]:
    """Every rank up to `most`; beyond, the busiest `most` (the metrics of thousands of ranks would
    swamp the logs)."""
    ranks = range(len(recent))
    return list(ranks) if len(recent) <= most else sorted(sorted(ranks, key=lambda r: -recent[r])[:most])


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


class StragglerWatch:
    """Call `step_started()` before each step and `after_step(step, seconds)` after it, on every rank;
    the latter is collective on check steps and returns the metrics to log (main rank)."""

    def __init__(self, every: int, factor: float, pp_rank: int, note, window: int = 5, history: int = 20):
        self.every, self.factor, self.pp_rank, self.note, self.window = every, factor, pp_rank, note, window
        self.world = dist.get_world_size()
        self.busy: list[deque[float]] = [deque(maxlen=history) for _ in range(self.world)]
        self.named: dict[int, float] = {}
        self.started_ns = 0

    def step_started(self) -> None:
        self.started_ns = time.time_ns()

    def after_step(self, step: int, seconds: float) -> dict[str, float]:
        if not self.every or step % self.every:
            return {}
        mine = {(c.group, c.seq): c.entered_ns for c in flight_recorder.recorded() if c.entered_ns >= self.started_ns}
        report = (mine, seconds, self.pp_rank, flight_recorder.group_members(), socket.gethostname(), os.getpid())
        gathered: list = [None] * self.world
        dist.all_gather_object(gathered, report)
        members = {name: ranks for g in gathered for name, ranks in g[3].items()}
        busy, late = busy_times([g[0] for g in gathered], [g[1] for g in gathered], members)
        for r, b in enumerate(busy):
            self.busy[r].append(b)
        recent = [statistics.median(list(b)[-self.window :]) for b in self.busy]
        if len(self.busy[0]) >= min(3, self.window):
            self._name(step, slow_ranks(recent, [g[2] for g in gathered], self.factor), recent, late, gathered)
        metrics = {}
        for r in shown_ranks(recent):
            metrics[f"busy_s_p50/rank_{r}"] = percentile(list(self.busy[r]), 0.5)
            metrics[f"busy_s_p90/rank_{r}"] = percentile(list(self.busy[r]), 0.9)
            metrics[f"late_s/rank_{r}"] = late[r]
        return metrics

    def _name(self, step: int, slow: dict[int, float], recent: list[float], late: list[float], gathered: list) -> None:
        for r in sorted(slow.keys() - self.named.keys()):
            host, pid = gathered[r][4], gathered[r][5]
            self.note(
                f"straggler at step {step}: rank {r} ({host}, pid {pid}) is busy {recent[r]:.3f} s a step (median "
                f"of the last {self.window} checks), {slow[r]:.1f}x its peers at pipeline stage {gathered[r][2]}; "
                f"it arrived {late[r]:.3f} s behind the first at this step's collectives"
            )
        for r in sorted(self.named.keys() - slow.keys()):
            self.note(f"straggler at step {step}: rank {r} keeps pace again")
        self.named = slow
