"""Train N steps, stop, resume, train M more == N+M steps in one go (exactly, on CPU)."""

from __future__ import annotations

import dataclasses
import json

import pytest

from tests.distributed import run_ranks
from tests.test_parallel import small_config
from training.checkpoint import LATEST
from training.config import CheckpointConfig
from training.objectives import trainer_for

TOTAL, STOP = 6, 3


def fit_losses(config) -> list[float]:
    return [m["loss"] for m in trainer_for(config).fit()]


@pytest.mark.parametrize(
    "layout,async_save",
    [(dict(), False), pytest.param(dict(tp=2, pp=2), True, marks=pytest.mark.slow)],  # multi-rank: cp2-to-single
    ids=["single", "tp2-pp2-async-save"],
)
def test_resume_reproduces_uninterrupted_run(layout, async_save, small_dataset, tmp_path):
    world = layout.get("tp", 1) * layout.get("pp", 1)
    base = dataclasses.replace(small_config(small_dataset, tmp_path / "a", **layout), steps=TOTAL)
    # A save every 2 steps, so with async_save the step-2 save is still in flight when step 3 trains.
    checkpoint = CheckpointConfig(resume="auto", save_every=2, async_save=async_save)
    split = dataclasses.replace(base, out_dir=str(tmp_path / "b"), checkpoint=checkpoint)

    uninterrupted = run_ranks(world, fit_losses, base)[0]
    first = run_ranks(world, fit_losses, dataclasses.replace(split, stop_after=STOP))[0]
    assert (split.run_dir / "checkpoints" / LATEST).read_text().strip() == f"step_{STOP:08d}"
    second = run_ranks(world, fit_losses, split)[0]

    assert len(first) == STOP and len(second) == TOTAL - STOP
    assert first + second == uninterrupted


def world(layout: dict) -> int:
    return layout.get("tp", 1) * layout.get("pp", 1) * layout.get("dp", 1) * layout.get("cp", 1)


@pytest.mark.parametrize(
    "save,load",
    [
        # TP2 x PP2 resumes exactly in test_resume_reproduces_uninterrupted_run; its reshards run in the slow suite
        pytest.param(dict(tp=2, pp=2), dict(), marks=pytest.mark.slow),
        pytest.param(dict(), dict(tp=2, pp=2), marks=pytest.mark.slow),
        pytest.param(dict(dp=2, tp=2, dp_mode="fsdp"), dict(pp=2), marks=pytest.mark.slow),
        (dict(cp=2), dict()),
        # the vocabulary split over DP (x TP) is stored as the whole table: one process (TP2) reads it
        pytest.param(
            dict(dp=2, dp_mode="fsdp", fsdp_unit="linear", vocab_over_dp=True), dict(), marks=pytest.mark.slow
        ),
        pytest.param(
            dict(dp=2, tp=2, dp_mode="fsdp", fsdp_unit="linear", vocab_over_dp=True), dict(tp=2), marks=pytest.mark.slow
        ),
    ],
    ids=[
        "tp2pp2-to-single",
        "single-to-tp2pp2",
        "fsdp-dp2tp2-to-pp2",
        "cp2-to-single",
        "fsdp-lean-dp2-to-single",
        "fsdp-lean-dp2tp2-to-tp2",
    ],
)
def test_resume_under_another_layout(save, load, small_dataset, tmp_path):
    """Checkpoints are keyed by full-model names, so any layout loads any other's."""
    base = dataclasses.replace(small_config(small_dataset, tmp_path / "a", **save), steps=TOTAL)
    uninterrupted = run_ranks(world(save), fit_losses, base)[0]
    first = dataclasses.replace(
        base, out_dir=str(tmp_path / "b"), stop_after=STOP, checkpoint=CheckpointConfig(resume="auto")
    )
    run_ranks(world(save), fit_losses, first)
    checkpoint = first.run_dir / "checkpoints" / f"step_{STOP:08d}"
    resumed = dataclasses.replace(
        small_config(small_dataset, tmp_path / "c", **load),
        steps=TOTAL,
        checkpoint=CheckpointConfig(resume=str(checkpoint)),
    )
    second = run_ranks(world(load), fit_losses, resumed)[0]
    assert second == pytest.approx(uninterrupted[STOP:], rel=1e-5)


def test_resume_refuses_a_different_data_order(small_dataset, tmp_path):
    config = dataclasses.replace(
        small_config(small_dataset, tmp_path), steps=4, stop_after=2, checkpoint=CheckpointConfig(resume="auto")
    )
    trainer_for(config).fit()
    state = json.loads((config.run_dir / "checkpoints" / "step_00000002" / "trainer_state.json").read_text())
    assert state["data"] == {"step": 2, "epoch": 0, "position": 2, "seed": 0, "global_batch_size": 8, "dp_size": 1}
    reseeded = dataclasses.replace(config, data=dataclasses.replace(config.data, seed=7))
    with pytest.raises(ValueError, match="saved with data seed=0, this config has 7"):
        trainer_for(reseeded).fit()
