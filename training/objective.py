"""What the training loop optimises, as a plug-in. The loop knows this interface and nothing of any
particular objective: language modelling, DPO and GRPO live in `training.objectives`, each with its
own config section, chosen by name (`objective: dpo`).

The loop computes per-token negative log-likelihoods (under tensor parallel, from vocab-sharded
logits without gathering them) and hands them to the objective with the targets it asked for; the
objective returns a loss and a vector of statistics, which the loop sums over micro-batches and
replicas and the objective turns into metrics. Objectives hold no parallel code.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from data_pipeline.loader import Batch
from training.config import TrainConfig


class Objective:
    name: ClassVar[str]
    config_class: ClassVar[type | None] = None  # its section of the run config (`dpo:`), if it has one
    rows_per_sample: ClassVar[int] = 1  # rows a micro-batch keeps together (DPO: a chosen and a rejected row)
    evaluates: ClassVar[bool] = True  # whether its loss on the `valid` split means something
    watches_spikes: ClassVar[bool] = True  # whether "loss far above its running mean" means trouble (a positive loss)
    console_metrics: ClassVar[tuple[str, ...]] = ()  # shown on the console next to the loss

    def __init__(self, config: Any = None):
        self.config = config

    def check(self, run: TrainConfig) -> None:
        """Refuse a run config this objective cannot train, before any rank builds a model."""

    def attach(self, trainer) -> None:
        """Called with the `Trainer` once it is built, before a checkpoint is resumed (a reference
        policy is recorded here: the starting weights)."""

    def batch_at(self, step: int) -> Batch | None:
        """The global batch of `step` when the objective makes its own (RL rollouts); None: the loader's."""
        return None

    def targets(self, batch: Batch, split: str) -> torch.Tensor:
        """What the loss needs besides the logits, one tensor [rows, seq, k] whose [..., 0] are the
        labels; pipeline schedules split it into micro-batches with the inputs."""
        raise NotImplementedError

    def denominator(self, batch: Batch) -> torch.Tensor:
        """This replica's share of what the global-batch loss is averaged over (summed over replicas)."""
        raise NotImplementedError

    def stats_shape(self) -> tuple[int, ...]:
        raise NotImplementedError

    def loss(self, nll: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A micro-batch's loss summed over what `denominator` counts, and its statistics.
        `nll`: per-token negative log-likelihood of the labels, flat, 0 where a label is ignored."""
        raise NotImplementedError

    def record(self, nll: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """What a forward-only recording pass (`Trainer.record`) keeps per row of a micro-batch."""
        raise NotImplementedError

    def summarize(self, stats: torch.Tensor, prefix: str = "") -> dict[str, float]:
        """Metrics from the statistics summed over a global batch (or a whole evaluation)."""
        raise NotImplementedError
