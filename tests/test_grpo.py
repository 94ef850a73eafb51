"""GRPO: its advantages and loss against hand-computed values, every layout against one process on a
fixed rollout batch, and a run that samples, scores and learns from its own rollouts."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch.distributed.tensor import DTensor

from data_pipeline.loader import IGNORE_INDEX
from tests.distributed import run_ranks
from tests.test_parallel import assert_same_training, small_config
from training.components import build_trainer
from training.objectives import trainer_for
from training.objectives.grpo import GRPO, GRPOConfig, group_advantages, grpo_token_loss, rollout_batch


def test_advantages_are_standardised_within_each_group():
    adv = group_advantages(torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0]), group_size=4)
    std = math.sqrt(0.1875)  # rewards 1, 0, 0, 0: mean 0.25
    torch.testing.assert_close(adv[:4], torch.tensor([0.75, -0.25, -0.25, -0.25]) / (std + 1e-4))
    assert adv[4:].abs().max() == 0, "a group all right teaches nothing"
    with pytest.raises(ValueError, match="do not form groups of 3"):
        group_advantages(torch.ones(4), 3)


def test_token_loss_clips_the_ratio_and_penalises_distance_to_the_reference():
    logp = torch.log(torch.tensor([0.5, 0.5, 0.5, 0.5]))
    old = torch.log(torch.tensor([0.25, 0.25, 0.5, 0.5]))  # ratios 2, 2, 1, 1
    ref = torch.log(torch.tensor([0.5, 0.5, 0.5, 0.25]))
    adv = torch.tensor([1.0, -1.0, 1.0, 1.0])
    loss, kl, clipped = grpo_token_loss(logp, old, ref, adv, clip=0.2, kl_beta=0.5)
    # ratio 2 > 1.2 with A > 0: the clipped 1.2 A counts; with A < 0 the unclipped 2 A (the minimum)
    expected_kl = torch.tensor([0.0, 0.0, 0.0, 0.5 - math.log(0.5) - 1])
    torch.testing.assert_close(kl, expected_kl)
    torch.testing.assert_close(loss, torch.tensor([-1.2, 2.0, -1.0, -1.0]) + 0.5 * expected_kl)
    assert clipped.tolist() == [True, True, False, False]


def test_rollout_rows_target_only_the_completion():
    batch = rollout_batch([[5, 6, 7, 8, 9], [1, 2, 3]], prompt_lengths=[2, 1], seq_len=6, pad_id=0)
    assert batch.tokens.tolist() == [[5, 6, 7, 8, 9, 0], [1, 2, 3, 0, 0, 0]]
    i = IGNORE_INDEX
    assert batch.labels.tolist() == [[i, 7, 8, 9, i, i], [2, 3, i, i, i, i]]
    with pytest.raises(ValueError, match="rollout 0: prompt of 9 tokens leaves no completion"):
        rollout_batch([[1] * 9], [9], seq_len=6, pad_id=0)


def fixed_rollouts(vocab: int, seq_len: int, groups: int = 2, group_size: int = 4):
    from training.objectives.grpo import Rollouts

    g = torch.Generator().manual_seed(7)
    sequences, prompts = [], []
    for _ in range(groups):
        prompt = torch.randint(3, vocab, (int(torch.randint(4, 10, (1,), generator=g)),), generator=g).tolist()
        for _ in range(group_size):
            length = int(torch.randint(4, seq_len + 1 - len(prompt), (1,), generator=g))
            sequences.append(prompt + torch.randint(3, vocab, (length,), generator=g).tolist())
            prompts.append(len(prompt))
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0])[: groups * group_size]
    return Rollouts(sequences, prompts, rewards)


def grpo_config(data, out, **layout):
    config = small_config(data, out, **layout)
    grpo = GRPOConfig(group_size=4, updates_per_rollout=2, kl_beta=0.1)
    return dataclasses.replace(config, objective="grpo", optim=dataclasses.replace(config.optim, lr=3e-2)), grpo


class FixedRolloutsGRPO(GRPO):
    """GRPO's loss on given rollout batches: it samples nothing, so pipeline stages may hold the model."""

    def check_sampling(self, run) -> None:
        pass


def grpo_grads_and_history(config_and_section, rollouts):
    config, grpo = config_and_section
    objective = FixedRolloutsGRPO(grpo)
    trainer = build_trainer(config, objective)
    objective._prepared = objective.prepare(rollouts)
    trainer.forward_backward(objective._prepared.batch)
    grads = {}
    for name, p in trainer.model.named_parameters():
        g = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
        grads[name] = g.detach().clone()
    trainer.optimizer.zero_grad(set_to_none=True)
    # Three updates on one rollout batch: the second and third see the ratio leave 1 (and clip at
    # this learning rate) and the policy leave the reference (the KL term's gradient is no longer 0).
    history = [trainer.train_step(objective._prepared.batch) for _ in range(3)] + [{}]
    keep = trainer.tp_rank == 0 and trainer.dp_rank == 0
    return (grads if keep else {}), history


@pytest.fixture(scope="module")
def grpo_reference(small_dataset, tmp_path_factory):
    from tests.conftest import SMALL_SEQ_LEN, SMALL_VOCAB

    rollouts = fixed_rollouts(SMALL_VOCAB, SMALL_SEQ_LEN)
    return rollouts, grpo_grads_and_history(grpo_config(small_dataset, tmp_path_factory.mktemp("grpo")), rollouts)


@pytest.mark.parametrize(
    "layout",
    [dict(tp=2), dict(pp=2), dict(dp=2), dict(dp=2, dp_mode="fsdp")],
    ids=["tp2", "pp2", "dp2", "dp2-fsdp"],
)  # fmt: skip
def test_grpo_layouts_match_one_process_on_a_fixed_rollout_batch(layout, grpo_reference, small_dataset, tmp_path):
    rollouts, (ref_grads, ref_history) = grpo_reference
    assert ref_history[1]["clipped"] > 0 and ref_history[1]["kl"] > 0, "the clip and the KL are exercised"
    world = layout.get("tp", 1) * layout.get("pp", 1) * layout.get("dp", 1)
    results = run_ranks(world, grpo_grads_and_history, grpo_config(small_dataset, tmp_path, **layout), rollouts)
    assert_same_training(results, ref_grads, ref_history)
    for _, history in results:
        for got, want in zip(history[:-1], ref_history[:-1], strict=True):
            assert got["kl"] == pytest.approx(want["kl"], rel=1e-4, abs=1e-9)
            assert got["clipped"] == pytest.approx(want["clipped"])


def test_report_pools_seeds_and_gives_intervals_and_paired_gains(tmp_path, capsys):
    """Accuracy with its Wilson interval per stage (evaluations at two problem seeds pooled) and the
    paired gain over the stage before on the same problems, whose interval may or may not exclude 0,
    and "no variation" where no problem changed its score."""
    import json

    from training.posttrain.__main__ import main
    from training.posttrain.evaluate import paired_difference, stage_summary, wilson_interval

    low, high = wilson_interval(50, 100)
    assert (round(low, 4), round(high, 4)) == (0.4038, 0.5962)
    assert paired_difference([1, 0, 1, 1], [1, 0, 1, 1]) == (0.0, None, None)  # no variation, not [0, 0]
    mean, lo, hi = paired_difference([1, 1, 0, 1], [0, 1, 0, 0])
    assert mean == 0.5 and lo < 0.5 < hi

    def result(stage, seed, correct):
        return {"stage": stage, "format": "chat", "seed": seed, "problems": len(correct), "correct": correct,
                "accuracy": sum(correct) / len(correct), "answered": 1.0}  # fmt: skip

    before = [[0] * 100, [0] * 100]  # 0 right: the interval's low end is 0 (the plot's error bar too)
    after = [[0] * 20 + [1] * 80, [0] * 25 + [1] * 75]
    files = []
    for stage, per_seed in (("sft", before), ("rl", after)):
        for seed, correct in zip((99, 100), per_seed, strict=True):
            files.append(tmp_path / f"eval_{stage}_{seed}.json")
            files[-1].write_text(json.dumps(result(stage, seed, correct)))
    rows = stage_summary([json.loads(f.read_text()) for f in files])
    assert [r["problems"] for r in rows] == [200, 200] and rows[0]["accuracy"] == 0.0
    assert rows[1]["gain"] == pytest.approx(0.775) and rows[1]["gain_low"] > 0
    assert main(["report", *map(str, files), "--out", str(tmp_path / "acc.png")]) == 0
    assert json.loads((tmp_path / "acc.json").read_text())[1]["seeds"] == 2
    same = [tmp_path / "eval_a.json", tmp_path / "eval_b.json"]
    for stage, path in zip(("a", "b"), same, strict=True):
        path.write_text(json.dumps(result(stage, 99, [1, 0, 1, 0])))
    capsys.readouterr()
    assert main(["report", *map(str, same), "--out", str(tmp_path / "same.png")]) == 0
    assert "+0.000 no variation" in capsys.readouterr().out


def test_rollouts_under_pipeline_parallel_are_refused_at_start(small_dataset, tmp_path):
    """Sampling needs every layer on each rank: the launch says so before any rank builds a model."""
    config, grpo = grpo_config(small_dataset, tmp_path, pp=2)
    with pytest.raises(ValueError, match="parallel.pp must be 1"):
        trainer_for(config, grpo=grpo)  # one process: a trainer under PP2 would need 2 ranks before it could refuse


def test_a_rollout_batch_without_reward_variation_is_said(small_dataset, tmp_path, capsys):
    """A batch in which every problem's samples scored alike (here: none rewarded, as an untrained
    policy's) trains on the KL term alone; the run says so, with what to change."""
    from tests.conftest import SMALL_SEQ_LEN, SMALL_VOCAB

    rollouts = fixed_rollouts(SMALL_VOCAB, SMALL_SEQ_LEN)
    unrewarded = dataclasses.replace(rollouts, rewards=torch.zeros_like(rollouts.rewards))

    class Sampled(FixedRolloutsGRPO):
        def rollouts(self, step):
            return unrewarded if step == 0 else rollouts

    config, grpo = grpo_config(small_dataset, tmp_path)
    objective = Sampled(grpo)
    build_trainer(config, objective)
    capsys.readouterr()
    objective.batch_at(0)
    said = capsys.readouterr()
    assert "step 0: no reward variation in any of the" in said.out + said.err
    assert "no sample was rewarded" in said.out + said.err and "grpo.temperature" in said.out + said.err
    objective.batch_at(2)  # the next rollout batch has rewarded samples: nothing said
    said = capsys.readouterr()
    assert "no reward variation" not in said.out + said.err
