"""The hang watchdog in one process: with no progress for its timeout it writes its report (the
collective its main thread waits in, every thread's stack), names the ranks whose heartbeats went
stale and those alive at another step, and exits with EXIT_HUNG; progress keeps it quiet."""

from __future__ import annotations

import json
import threading
import time

from training.watchdog import EXIT_HUNG, HangWatchdog, waiting_in


def heartbeat(run_dir, rank: int, step: int, age_s: float) -> None:
    (run_dir / "heartbeats").mkdir(parents=True, exist_ok=True)
    record = {"rank": rank, "pid": 1000 + rank, "host": "h", "step": step, "phase": "train step",
              "time": time.time() - age_s}  # fmt: skip
    (run_dir / "heartbeats" / f"rank_{rank}.json").write_text(json.dumps(record))


def test_no_progress_is_reported_naming_the_silent_rank_and_exits(tmp_path):
    exits = []
    done = threading.Event()
    dog = HangWatchdog(tmp_path, rank=0, world=4, timeout_s=2.0, exit=lambda code: (exits.append(code), done.set()))
    dog.progress(7, "train step")
    heartbeat(tmp_path, 1, 7, age_s=60)  # stopped: its heartbeat is a minute old
    heartbeat(tmp_path, 2, 6, age_s=0)  # alive, a step behind
    dog.start()
    for _ in range(30):  # peers' heartbeats keep coming, as their watchdog threads write them
        heartbeat(tmp_path, 2, 6, age_s=0)
        heartbeat(tmp_path, 3, 7, age_s=0)
        if done.wait(0.2):
            break
    assert exits == [EXIT_HUNG]
    report = (tmp_path / "hang" / "rank_0.txt").read_text()
    assert "rank 0: no progress for" in report and "at step 7 (train step)" in report
    assert "not responding: ranks [1]" in report and "at another step: ranks [2]" in report
    assert "--- thread" in report and "(main)" in report
    assert json.loads((tmp_path / "heartbeats" / "rank_0.json").read_text())["step"] == 7


def test_progress_keeps_it_quiet(tmp_path):
    exits = []
    dog = HangWatchdog(tmp_path, rank=0, world=1, timeout_s=1.0, exit=exits.append).start()
    for step in range(15):
        dog.progress(step, "train step")
        time.sleep(0.2)
    dog.stop()
    assert exits == [] and not (tmp_path / "hang").exists()


def test_the_collective_a_stack_waits_in_is_named():
    """A stack whose innermost frame is torch.distributed's all_reduce (compiled under its file name)."""
    import torch.distributed as dist

    namespace = {}
    source = "import sys\ndef all_reduce():\n    return sys._getframe()\n"
    exec(compile(source, dist.distributed_c10d.__file__, "exec"), namespace)
    assert waiting_in(namespace["all_reduce"]()).startswith("all_reduce (torch/distributed/distributed_c10d.py:")


def _hang_in_a_real_collective(run_dir):
    """Rank 1 arrives 4 s late at an all_reduce; rank 0's watchdog (1 s) reports while it waits."""
    import torch
    import torch.distributed as dist

    reports = []
    if dist.get_rank() == 0:
        dog = HangWatchdog(run_dir, rank=0, world=2, timeout_s=1.0, exit=reports.append).start()
        dog.progress(3, "train step")
    dist.all_reduce(torch.ones(4))  # #1: both arrive together
    if dist.get_rank() == 1:
        time.sleep(4)
    dist.all_reduce(torch.ones(4))  # #2: rank 0 waits here
    return reports and (run_dir / "hang" / "rank_0.txt").read_text().splitlines()[0]


def test_the_flight_recorder_names_the_group_and_sequence_number_of_the_collective(tmp_path, monkeypatch):
    from tests.distributed import run_ranks
    from training.parallel import flight_recorder

    monkeypatch.setenv("TORCH_FR_BUFFER_SIZE", str(flight_recorder.BUFFER_ENTRIES))
    summary = run_ranks(2, _hang_in_a_real_collective, tmp_path)[0]
    assert "waiting in all_reduce" in summary and "(unfinished: all_reduce #2 of group 0 (ranks [0, 1]))" in summary, (
        summary
    )
