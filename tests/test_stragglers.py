"""Stragglers named: busy time is the step time less the waits at collectives (from the flight
recorder's arrival times); a rank much busier than its peers at the same pipeline stage is named.
A real 2-rank run where rank 1 computes four times as long per step is named within three checks;
tests/test_launch.py throttles a rank of a real job from outside (`make chaos`)."""

from __future__ import annotations

import time

import pytest

from tests.distributed import run_ranks
from training.parallel import flight_recorder
from training.stragglers import busy_times, shown_ranks, slow_ranks


def test_busy_time_is_the_step_less_the_waits_for_the_last_member():
    ms = 1_000_000
    # group "a" holds ranks 0-2, "b" ranks 0-1; rank 2 arrives 300 ms after the others at a's collective
    arrivals = [{("a", 1): 100 * ms, ("b", 1): 500 * ms}, {("a", 1): 100 * ms, ("b", 1): 600 * ms},
                {("a", 1): 400 * ms, ("a", 2): 0}]  # fmt: skip
    busy, late = busy_times(arrivals, [1.0, 1.0, 1.0], {"a": [0, 1, 2], "b": [0, 1]})
    assert busy == pytest.approx([1.0 - 0.3 - 0.1, 1.0 - 0.3, 1.0])  # ("a", 2) is not seen by every member: left out
    assert late == pytest.approx([0.0, 0.1, 0.3])


def test_a_rank_is_named_against_its_peers_at_the_same_stage_only():
    assert slow_ranks([0.3, 0.31, 0.62, 0.3], stage=[0, 0, 0, 0], factor=1.25) == {2: pytest.approx(0.62 / 0.3)}
    assert slow_ranks([0.3, 0.3, 0.9, 0.9], stage=[0, 0, 1, 1], factor=1.25) == {}, "a busier stage is not a straggler"
    assert slow_ranks([0.3, 0.9], stage=[0, 1], factor=1.25) == {}, "alone at its stage: nobody to compare with"


def _steps_with_one_slow_rank(checks: int):
    import torch
    import torch.distributed as dist

    from training.stragglers import StragglerWatch

    notes = []
    watch = StragglerWatch(every=1, factor=1.25, pp_rank=0, note=notes.append, window=3)
    metrics = {}
    for step in range(1, checks + 1):
        watch.step_started()
        t0 = time.perf_counter()
        for _ in range(3):  # three compute sections, each followed by a collective
            time.sleep(0.08 if dist.get_rank() == 1 else 0.02)
            dist.all_reduce(torch.ones(8))
        metrics = watch.after_step(step, time.perf_counter() - t0)
        if notes:
            return step, notes, metrics
    return None, notes, metrics


def test_a_slow_rank_is_named_by_its_arrivals_in_a_real_run(monkeypatch):
    monkeypatch.setenv("TORCH_FR_BUFFER_SIZE", str(flight_recorder.BUFFER_ENTRIES))
    step, notes, metrics = run_ranks(2, _steps_with_one_slow_rank, 6)[0]
    assert step == 3, f"named at the third check (the window's minimum), not {step}: {notes}"
    assert notes[0].startswith("straggler at step 3: rank 1 (") and "x its peers at pipeline stage 0" in notes[0]
    assert metrics["busy_s_p50/rank_1"] == pytest.approx(0.24, abs=0.06)
    assert metrics["busy_s_p50/rank_0"] < 0.1 and metrics["late_s/rank_1"] > 0.15


def test_beyond_sixty_four_ranks_only_the_busiest_are_logged():
    recent = [0.1] * 100
    recent[7], recent[93] = 0.5, 0.4
    shown = shown_ranks(recent, most=3)
    assert len(shown) == 3 and 7 in shown and 93 in shown
    assert shown_ranks(recent[:3], most=3) == [0, 1, 2]
