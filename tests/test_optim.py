"""LR schedules, the `lr: auto` hook and gradient clipping."""

from __future__ import annotations

import json

import pytest
import torch

from common.config import ConfigError, load_config
from training.config import TrainConfig
from training.optim import OptimConfig, clip_grad_norm, lr_multiplier, resolve_lr


@pytest.mark.parametrize("schedule", ["cosine", "linear", "wsd"])
def test_schedules_warm_up_then_decay_to_the_floor(schedule):
    config = OptimConfig(schedule=schedule, warmup_steps=10, min_lr_ratio=0.1, decay_fraction=0.2)
    values = [lr_multiplier(s, 100, config) for s in range(101)]
    assert values[0] == pytest.approx(0.1) and values[9] == pytest.approx(1.0)
    assert values[100] == pytest.approx(0.1)
    assert all(a >= b - 1e-12 for a, b in zip(values[9:], values[10:], strict=False)), "never rises after warmup"
    if schedule == "wsd":
        assert values[79] == 1.0 and values[90] == pytest.approx(0.55)


def test_lr_auto_evaluates_the_law(tmp_path):
    law = tmp_path / "lr_law.json"
    law.write_text(json.dumps({"C": 2.0, "alpha": 0.1, "beta": 0.2}))
    lr, note = resolve_lr(OptimConfig(lr="auto", lr_law=str(law)), nparams=10**6, tokens=10**8)
    assert lr == pytest.approx(2.0 * 1e6**-0.1 * 1e8**-0.2)
    assert "lr=auto" in note and str(law) in note
    law.write_text(json.dumps({"B": 1.0, "beta": 0.5}))
    assert resolve_lr(OptimConfig(lr="auto", lr_law=str(law)), 1, 10_000)[0] == pytest.approx(0.01)
    with pytest.raises(ValueError, match="needs optim.lr_law"):
        resolve_lr(OptimConfig(lr="auto"), 1, 1)


def test_yaml_numbers_without_a_dot_are_numbers():
    config = load_config(TrainConfig, "configs/pretrain/tiny.yaml", ["optim.lr=3e-4", "optim.weight_decay=1e-2"])
    assert config.optim.lr == 3e-4 and config.optim.weight_decay == 0.01
    with pytest.raises(ConfigError, match="optim.weight_decay: expected a number"):
        load_config(TrainConfig, "configs/pretrain/tiny.yaml", ["optim.weight_decay=lots"])


def test_config_errors_name_the_key_and_where_it_was_written(tmp_path):
    """An override's mistake is blamed on the command line, the file's on the file; values PyTorch
    would refuse with its own words (a negative lr) are refused naming the key."""
    with pytest.raises(ConfigError, match=r"^command line 'optim.lr=-1e-3': optim: lr must be > 0"):
        load_config(TrainConfig, "configs/pretrain/tiny.yaml", ["optim.lr=-1e-3"])
    with pytest.raises(
        ConfigError, match=r"^command line 'parallel.tpp=2': unknown key 'parallel.tpp'; did you mean 'tp'"
    ):
        load_config(TrainConfig, "configs/pretrain/tiny.yaml", ["parallel.tpp=2"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\noptim: {beta2: 1.5}\n")
    with pytest.raises(ConfigError, match=rf"^{bad}: optim: beta2 must be in \[0, 1\)"):
        load_config(TrainConfig, bad, ["optim.lr=1e-3"])


def test_clip_grad_norm_matches_torch_single_process():
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(5, 3)) for _ in range(3)]
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    for p, t in zip(params, twins, strict=True):
        p.grad = torch.randn_like(p) * 3
        t.grad = p.grad.clone()
    want = torch.nn.utils.clip_grad_norm_(twins, 1.0)
    got = clip_grad_norm(params, 1.0)
    assert float(got) == pytest.approx(float(want))
    for p, t in zip(params, twins, strict=True):
        torch.testing.assert_close(p.grad, t.grad)
