"""Hangs found and named: a watchdog thread on every rank.

A hung collective costs more than a crash: nothing exits, and after `dist_timeout_s` the backend's
error names neither the rank that stopped nor the collective. Each rank's watchdog thread writes a
heartbeat (`<run>/heartbeats/rank_N.json`: pid, host, step, phase, time) every few seconds while
the process lives; the training loop reports its progress (step and phase). When a rank makes no
progress for `hang_timeout_s`, its watchdog writes `<run>/hang/rank_N.txt` (the collective its main
thread waits in, read from its Python stack and named by torch's flight recorder with its process
group, members and sequence number, the step, the phase and every thread's stack), logs
which ranks stopped responding (their heartbeats went stale: a frozen host or a SIGSTOP stops the
thread too) or are stuck elsewhere, and ends the process with `EXIT_HUNG`, so a launcher sees a
failure and can restart the job. A rank stopped by a signal cannot report; its peers name it.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
import traceback
from pathlib import Path

from common.files import atomic_write_text
from training.parallel import flight_recorder

EXIT_HUNG = 75  # EX_TEMPFAIL: try again (a restart from the last checkpoint)
COLLECTIVES = ("all_reduce", "all_gather", "reduce_scatter", "broadcast", "barrier", "send", "recv", "isend",
               "irecv", "wait", "all_to_all", "batch_isend_irecv", "gather", "scatter", "reduce")  # fmt: skip


def waiting_in(frame) -> str:
    """The innermost torch.distributed call on a stack (e.g. 'all_reduce (torch/distributed/
    distributed_c10d.py:2800) from training/optim.py:41'), or where the stack is."""
    frames = traceback.extract_stack(frame)
    for i in range(len(frames) - 1, -1, -1):
        f = frames[i]
        if "torch/distributed" in f.filename and f.name in COLLECTIVES:
            caller = next((c for c in reversed(frames[:i]) if "torch/" not in c.filename), None)
            where = f" from {_short(caller.filename)}:{caller.lineno}" if caller else ""
            return f"{f.name} ({_short(f.filename)}:{f.lineno}){where}"
    top = frames[-1] if frames else None
    return f"no collective: {top.name} at {_short(top.filename)}:{top.lineno}" if top else "no Python frame"


def _short(path: str) -> str:
    """A path from its package down (torch/..., training/...)."""
    if "site-packages/" in path:
        return path.split("site-packages/", 1)[1]
    for package in ("training", "data_pipeline", "kernels"):
        if f"/{package}/" in path:
            return package + "/" + path.split(f"/{package}/", 1)[1]
    return path


class HangWatchdog:
    """Start with `start()`; call `progress(step, phase)` from the training loop; `stop()` at the end."""

    def __init__(self, run_dir: Path, rank: int, world: int, timeout_s: float, exit=os._exit):
        self.run_dir, self.rank, self.world, self.timeout_s = Path(run_dir), rank, world, timeout_s
        self.beat_s = max(0.5, min(5.0, timeout_s / 10))
        self.step, self.phase, self.since = 0, "starting", time.monotonic()
        self._stop = threading.Event()
        self._main = threading.main_thread().ident
        self._exit = exit
        self._thread = threading.Thread(target=self._run, name="hang-watchdog", daemon=True)

    def start(self) -> HangWatchdog:
        (self.run_dir / "heartbeats").mkdir(parents=True, exist_ok=True)
        self._beat()
        self._thread.start()
        return self

    def progress(self, step: int, phase: str) -> None:
        self.step, self.phase, self.since = step, phase, time.monotonic()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2 * self.beat_s)

    def _beat(self) -> None:
        record = {"rank": self.rank, "pid": os.getpid(), "host": socket.gethostname(), "step": self.step,
                  "phase": self.phase, "time": time.time()}  # fmt: skip
        atomic_write_text(self.run_dir / "heartbeats" / f"rank_{self.rank}.json", json.dumps(record))

    def _run(self) -> None:
        while not self._stop.wait(self.beat_s):
            try:
                self._beat()
            except OSError:
                pass  # a full disk must not stop the watch
            if time.monotonic() - self.since > self.timeout_s:
                self._report_and_exit()
                return

    def peers(self) -> tuple[list[int], list[int]]:
        """(ranks whose heartbeat is stale or missing: not responding; live ranks at another step)."""
        now, silent, elsewhere = time.time(), [], []
        for rank in range(self.world):
            if rank == self.rank:
                continue
            path = self.run_dir / "heartbeats" / f"rank_{rank}.json"
            try:
                beat = json.loads(path.read_text())
            except (OSError, ValueError):
                silent.append(rank)
                continue
            if now - beat["time"] > max(3 * self.beat_s, self.timeout_s / 2):
                silent.append(rank)
            elif beat["step"] != self.step:
                elsewhere.append(rank)
        return silent, elsewhere

    def _report_and_exit(self) -> None:
        frame = sys._current_frames().get(self._main)
        collective = waiting_in(frame) if frame is not None else "main thread gone"
        unfinished = flight_recorder.pending()
        if unfinished:
            collective += f" (unfinished: {', '.join(unfinished)})"
        silent, elsewhere = self.peers()
        waited = time.monotonic() - self.since
        summary = (f"rank {self.rank}: no progress for {waited:.0f} s at step {self.step} ({self.phase}), waiting in "
                   f"{collective}; not responding: ranks {silent or 'none'}; at another step: ranks "
                   f"{elsewhere or 'none'}")  # fmt: skip
        stacks = "\n".join(
            f"--- thread {ident}{' (main)' if ident == self._main else ''}\n" + "".join(traceback.format_stack(f))
            for ident, f in sys._current_frames().items()
        )
        try:
            hang = self.run_dir / "hang"
            hang.mkdir(parents=True, exist_ok=True)
            atomic_write_text(hang / f"rank_{self.rank}.txt", summary + "\n\n" + stacks)
            where = f"; stacks in {hang}"
        except OSError as err:
            where = f"; stacks not written: {err}"
        print(f"hang: {summary}{where}", file=sys.stderr, flush=True)
        self._exit(EXIT_HUNG)
