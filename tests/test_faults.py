"""Faults: NaN/inf steps, failed checkpoint writes. Nothing lost, nothing half-written."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tests.test_parallel import small_config
from training import checkpoint as checkpoint_module
from training.checkpoint import LATEST, TRAINER_STATE, CheckpointError
from training.trainer import CheckpointConfig, NonFiniteLossError, Trainer


def poison(trainer: Trainer, at_step: int) -> None:
    """Make the gradients of step `at_step` (0-based) NaN, as a bad batch or an overflow would."""
    original = trainer.forward_backward

    def forward_backward(batch):
        original(batch)
        if trainer.step == at_step:
            next(trainer.model.parameters()).grad.view(-1)[0] = float("nan")

    trainer.forward_backward = forward_backward


def test_nonfinite_step_is_skipped_and_counted(small_dataset, tmp_path):
    trainer = Trainer(dataclasses.replace(small_config(small_dataset, tmp_path), steps=4, nonfinite="skip"))
    poison(trainer, at_step=1)
    history = []
    for step in range(4):
        before = [p.detach().clone() for p in trainer.model.parameters()]
        history.append(trainer.train_step(trainer.loader.batch_at(step)))
        trainer.step += 1
        changed = any(not torch.equal(b, p) for b, p in zip(before, trainer.model.parameters(), strict=True))
        assert changed == (step != 1), f"step {step}: only the poisoned step leaves the weights alone"
    assert [h["skipped"] for h in history] == [0, 1, 0, 0]
    assert history[-1]["skipped_total"] == 1
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_nonfinite_step_stops_with_a_report(small_dataset, tmp_path):
    trainer = Trainer(dataclasses.replace(small_config(small_dataset, tmp_path), steps=4, nonfinite="stop"))
    poison(trainer, at_step=2)
    with pytest.raises(NonFiniteLossError, match=r"at step 3 \(global batch rows \[\d+"):
        trainer.fit()


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"), OSError(13, "Permission denied")])
def test_failed_save_keeps_the_previous_checkpoint(error, small_dataset, tmp_path, monkeypatch):
    config = dataclasses.replace(
        small_config(small_dataset, tmp_path), steps=4, checkpoint=CheckpointConfig(resume="auto", save_every=2)
    )
    ckpt_dir = config.run_dir / "checkpoints"
    Trainer(dataclasses.replace(config, stop_after=2)).fit()
    assert (ckpt_dir / LATEST).read_text().strip() == "step_00000002"

    real_save = checkpoint_module.dcp.save

    def failing_save(state, checkpoint_id):
        real_save(state, checkpoint_id=checkpoint_id)  # shards written, then the disk gives out
        raise error

    monkeypatch.setattr(checkpoint_module.dcp, "save", failing_save)
    with pytest.raises(CheckpointError, match=r"step_00000004.*previous checkpoint \(step_00000002\)"):
        Trainer(config).fit()
    monkeypatch.undo()

    assert (ckpt_dir / LATEST).read_text().strip() == "step_00000002"
    assert not (ckpt_dir / "step_00000004").exists(), "no half-written checkpoint left behind"
    resumed = Trainer(config)
    resumed.maybe_resume()
    assert resumed.step == 2 and (ckpt_dir / "step_00000002" / TRAINER_STATE).is_file()
