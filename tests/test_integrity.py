"""Silent corruption caught: a bit flipped in one data-parallel replica's weights (the test hook
POLYGLOT_FLIP_BIT) is found at the next replica check, naming the rank, the tensor and the step;
`on_divergence: restore` reloads the newest checkpoint on every rank and the run ends with the
uninterrupted run's losses."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tests.distributed import run_ranks
from tests.test_parallel import small_config
from training.config import CheckpointConfig
from training.integrity import CheckConfig, fingerprint, odd_replicas
from training.objectives import trainer_for

TENSOR = "layers.0.attention.wq.weight"


def test_fingerprints_are_exact_and_see_one_flipped_bit():
    t = torch.randn(1000)
    flipped = t.clone()
    flipped.view(torch.int32)[123] ^= 1 << 3
    assert fingerprint(t) == fingerprint(t.clone()) != fingerprint(flipped)
    assert fingerprint(t) == fingerprint(t.flip(0)), "order-free: summing order does not matter"
    assert odd_replicas(torch.tensor([[1, 2], [1, 3], [1, 2]])) == [1]
    assert odd_replicas(torch.tensor([[1, 2], [1, 3]])) == [0, 1], "two replicas: no majority"


def losses(config):
    trainer = trainer_for(config)
    return [(row["step"], row["loss"]) for row in trainer.fit()]


def dp3(data, out, **check):
    config = small_config(data, out, dp=3, global_batch_size=6)
    return dataclasses.replace(config, steps=6, check=CheckConfig(**check),
                               checkpoint=CheckpointConfig(save_every=2, resume="none"))  # fmt: skip


def test_a_flipped_bit_is_named_and_the_run_stops(small_dataset, tmp_path, monkeypatch):
    monkeypatch.setenv("POLYGLOT_FLIP_BIT", f"1:3:{TENSOR}")
    with pytest.raises(RuntimeError) as failed:
        run_ranks(3, losses, dp3(small_dataset, tmp_path, replicas_every=2))
    message = str(failed.value)
    assert f"replicas diverged at step 4: rank 1 of the data-parallel group [0, 1, 2] differs in {TENSOR}" in message


def test_restore_reloads_the_newest_checkpoint_and_ends_as_the_uninterrupted_run(small_dataset, tmp_path, monkeypatch):
    want = run_ranks(3, losses, dp3(small_dataset, tmp_path / "clean"))[0]
    monkeypatch.setenv("POLYGLOT_FLIP_BIT", f"1:3:{TENSOR}")
    got = run_ranks(3, losses, dp3(small_dataset, tmp_path / "flipped", replicas_every=2, on_divergence="restore"))[0]
    assert [s for s, _ in got] == [1, 2, 3, 4, 3, 4, 5, 6], "steps 3-4 ran again after the restore"
    assert dict(got) == dict(want), "the last run of every step equals the uninterrupted run's"


def test_a_flipped_bit_in_a_tensor_every_tp_rank_holds_whole_is_named(small_dataset, tmp_path, monkeypatch):
    """TP2 x DP2: the final norm's weight is whole on both TP ranks. A bit flipped in it on rank 3 is
    found by its tensor-parallel group and its data-parallel group, and every rank stops, also those
    whose own groups agree (rank 0)."""
    monkeypatch.setenv("POLYGLOT_FLIP_BIT", "3:3:norm.weight")
    config = small_config(small_dataset, tmp_path, tp=2, dp=2, global_batch_size=4)
    config = dataclasses.replace(config, steps=6, check=CheckConfig(replicas_every=2),
                                 checkpoint=CheckpointConfig(save_every=0, resume="none"))  # fmt: skip
    with pytest.raises(RuntimeError) as failed:
        run_ranks(4, losses, config)
    message = str(failed.value)
    # Two copies in each group, so neither group alone can tell which is wrong; together they name rank 3.
    assert (
        "replicas diverged at step 4: rank 1 and 3 of the data-parallel group [1, 3] differ in norm.weight" in message
    )
    assert "step 4: rank 2 and 3 of the tensor-parallel group [2, 3] differ in norm.weight" in message
