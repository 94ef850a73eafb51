"""Mixed precision, loss scaling, activation checkpointing: same training, less memory or bits."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tests.distributed import run_ranks
from tests.test_parallel import grads_and_history, small_config
from training.objectives import trainer_for
from training.precision import LossScaler


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_activation_checkpointing_gives_identical_gradients(mode, small_dataset, tmp_path):
    plain_grads, plain_history = grads_and_history(small_config(small_dataset, tmp_path / "a"))
    config = dataclasses.replace(small_config(small_dataset, tmp_path / "b"), activation_checkpointing=mode)
    grads, history = grads_and_history(config)
    assert set(grads) == set(plain_grads), "parameter names unchanged"
    for name, g in grads.items():
        torch.testing.assert_close(g, plain_grads[name], atol=1e-6, rtol=1e-5)
    assert [h["loss"] for h in history[:-1]] == pytest.approx([h["loss"] for h in plain_history[:-1]], rel=1e-6)


@pytest.mark.parametrize("precision,tolerance", [("bf16", 0.03), ("fp16", 0.01)])
def test_low_precision_tracks_fp32(precision, tolerance, small_dataset, tmp_path):
    ref = [h["loss"] for h in grads_and_history(small_config(small_dataset, tmp_path / "a"))[1][:-1]]
    config = dataclasses.replace(small_config(small_dataset, tmp_path / "b"), precision=precision)
    got = [h["loss"] for h in grads_and_history(config)[1][:-1]]
    assert got == pytest.approx(ref, rel=tolerance)
    trainer = trainer_for(config)
    assert next(trainer.model.parameters()).dtype == torch.float32, "master weights stay fp32"


@pytest.mark.slow  # fp16 loss scaling in one process stays in the default suite (test_low_precision_tracks_fp32)
def test_fp16_under_tensor_and_pipeline_parallel(small_dataset, tmp_path):
    ref = [h["loss"] for h in grads_and_history(small_config(small_dataset, tmp_path / "a"))[1][:-1]]
    config = dataclasses.replace(small_config(small_dataset, tmp_path / "b", tp=2, pp=2), precision="fp16")
    got = [h["loss"] for h in run_ranks(4, grads_and_history, config)[0][1][:-1]]
    assert got == pytest.approx(ref, rel=0.01)


def test_loss_scaler_skips_overflow_and_adapts():
    scaler = LossScaler(enabled=True, init_scale=1024.0, growth_interval=2)
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.tensor([1024.0, 2048.0, float("inf")])
    assert scaler.unscale_and_check([p]) is True
    scaler.update(True)
    assert scaler.scale == 512.0
    p.grad = torch.tensor([512.0, 1024.0, 0.0])
    assert scaler.unscale_and_check([p]) is False
    torch.testing.assert_close(p.grad, torch.tensor([1.0, 2.0, 0.0]))
    scaler.update(False)
    scaler.update(False)
    assert scaler.scale == 1024.0, "doubles after growth_interval clean steps"


@pytest.mark.slow
def test_compiled_blocks_train_like_eager(small_dataset, tmp_path):
    eager = [h["loss"] for h in grads_and_history(small_config(small_dataset, tmp_path / "a"))[1][:-1]]
    config = dataclasses.replace(small_config(small_dataset, tmp_path / "b"), compile=True)
    compiled = [h["loss"] for h in grads_and_history(config)[1][:-1]]
    assert compiled == pytest.approx(eager, rel=1e-4)
