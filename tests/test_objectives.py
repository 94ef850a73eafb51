"""Objectives are plug-ins: one defined here, outside the package, is chosen by name with its own
config section and trained by the unchanged loop; the run config names each objective's section."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import pytest
import torch

from common.config import ConfigError
from tests.test_parallel import small_config
from training import objectives
from training.objectives import load_run_config, trainer_for
from training.objectives.lm import LanguageModeling


@dataclass
class ScaledConfig:
    factor: float = 1.0


class ScaledLM(LanguageModeling):
    """Language modelling with the loss multiplied by a factor: a plug-in the core has never seen."""

    name = "scaled_lm"
    config_class = ScaledConfig

    def loss(self, nll, target):
        loss, stats = super().loss(nll, target)
        stats[0] *= self.config.factor
        return loss * self.config.factor, stats


def first_step(trainer) -> tuple[dict, dict]:
    trainer.forward_backward(trainer.loader.batch_at(0))
    grads = {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.optimizer.zero_grad(set_to_none=True)
    return grads, trainer.train_step(trainer.loader.batch_at(0))


def test_a_new_objective_is_chosen_by_name_and_trained_by_the_loop(small_dataset, tmp_path, monkeypatch):
    monkeypatch.setitem(objectives.OBJECTIVES, ScaledLM.name, ScaledLM)
    config = small_config(small_dataset, tmp_path / "lm")
    lm_grads, lm_metrics = first_step(trainer_for(config))
    scaled = dataclasses.replace(config, objective="scaled_lm", out_dir=str(tmp_path / "scaled"))
    grads, metrics = first_step(trainer_for(scaled, scaled_lm=ScaledConfig(factor=2.0)))
    for name, grad in grads.items():
        torch.testing.assert_close(grad, 2 * lm_grads[name], msg=name)
    assert metrics["loss"] == pytest.approx(2 * lm_metrics["loss"], rel=1e-6)


def test_each_objective_reads_its_own_section(tmp_path, monkeypatch):
    monkeypatch.setitem(objectives.OBJECTIVES, ScaledLM.name, ScaledLM)
    path = tmp_path / "run.yaml"
    path.write_text("objective: dpo\ndpo: {beta: 0.3}\nscaled_lm: {factor: 3}\n")
    config, objective = load_run_config(path, ["dpo.length_normalized=true"])
    assert config.objective == "dpo" and objective.name == "dpo"
    assert objective.config.beta == 0.3 and objective.config.length_normalized
    _, scaled = load_run_config(path, ["objective=scaled_lm"])
    assert scaled.config.factor == 3.0
    _, lm = load_run_config(path, ["objective=lm"])  # the language model has no section of its own
    assert isinstance(lm, LanguageModeling) and lm.config is None


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["objective=dpx"], r"command line 'objective=dpx': objective 'dpx' is not one of .*did you mean 'dpo'"),
        (["dpo.bta=0.2"], r"command line 'dpo.bta=0.2': unknown key 'dpo.bta'; did you mean 'beta'"),
        (["grpo.group_size=many"], r"command line 'grpo.group_size=many': grpo.group_size: expected an integer"),
    ],
)
def test_objective_refusals_name_the_key_and_where_it_was_written(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_run_config("configs/pretrain/tiny.yaml", overrides)


def test_validation_losses_per_character_use_the_manifest_counts(small_dataset, tmp_path):
    """Per-token losses of families whose tokens differ in length are not comparable; the evaluation
    reports each family's loss per character too, from the validation split's counts."""
    trainer = trainer_for(small_config(small_dataset, tmp_path))
    stats = trainer.valid_loader.dataset.manifest["family_stats"]
    evaluation = trainer.evaluate()
    per_char = {k.split("/")[-1]: v for k, v in evaluation.items() if k.startswith("val/loss_per_char/")}
    assert per_char and set(per_char) == {k.split("/")[-1] for k in evaluation if k.startswith("val/loss/")}
    for family, value in per_char.items():
        tokens_per_char = stats[family]["valid_tokens"] / stats[family]["valid_characters"]
        assert value == pytest.approx(evaluation[f"val/loss/{family}"] * tokens_per_char, rel=1e-6)
    assert not any(k.startswith("loss_per_char") for k in trainer.train_step(trainer.loader.batch_at(0)))
