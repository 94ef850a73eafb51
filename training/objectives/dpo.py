"""DPO and LN-DPO: preference pairs on the pretraining machinery (every layout, step and checkpoint).

DPO: -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))), with pi/ref the summed log-probabilities
of the chosen (c) and rejected (r) responses under the policy and the frozen reference. LN-DPO
divides each response's log-likelihood ratio by its length (token count) first, which the seed paper
finds more robust to hyperparameters out of distribution.

The dataset holds pairs as consecutive rows (chosen, rejected) with a loss mask on the responses.
The frozen reference is the starting policy itself (`init_from`): when the trainer is built, before
any checkpoint is resumed, one forward-only pass records every row's reference log-probability, so
no second model is kept in memory. The values are cached in the run folder for resumed runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from common.files import atomic_write
from data_pipeline.loader import IGNORE_INDEX, Batch, PackedDataset
from training.config import TrainConfig
from training.objective import Objective

REFERENCE_FILE = "reference_logps.pt"
# Per micro-batch sums: loss, pairs, pairs ranked right, reward margin, chosen and rejected rewards,
# chosen responses' per-token NLL, response tokens.
STATS = ("loss", "pairs", "correct", "margin", "chosen", "rejected", "chosen_nll", "tokens")


@dataclass
class DPOConfig:
    beta: float = 0.1
    length_normalized: bool = False  # LN-DPO: divide each log-likelihood ratio by the response length
    # RPO (Pang et al. 2024): add this weight x the chosen responses' per-token NLL, which keeps DPO
    # from lowering the likelihood of correct solutions along with the wrong ones
    sft_weight: float = 0.0


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float = 0.1,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
    length_normalized: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean loss and the per-pair implicit rewards (chosen, rejected)."""
    chosen_ratio = policy_chosen - ref_chosen
    rejected_ratio = policy_rejected - ref_rejected
    if length_normalized:
        if chosen_lengths is None or rejected_lengths is None:
            raise ValueError("LN-DPO needs the chosen and rejected response lengths")
        chosen_ratio = chosen_ratio / chosen_lengths
        rejected_ratio = rejected_ratio / rejected_lengths
    loss = -F.logsigmoid(beta * (chosen_ratio - rejected_ratio)).mean()
    return loss, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


class DPO(Objective):
    name = "dpo"
    config_class = DPOConfig
    rows_per_sample = 2
    console_metrics = ("reward_accuracy", "reward_margin")

    def __init__(self, config: DPOConfig | None = None):
        super().__init__(config or DPOConfig())

    def check(self, run: TrainConfig) -> None:
        if run.parallel.cp > 1:  # a sequence's log-probability would be summed across ranks
            raise ValueError("objective=dpo with parallel.cp > 1 is not supported yet")
        if run.parallel.micro_batch_size % 2:
            raise ValueError(f"objective=dpo: parallel.micro_batch_size ({run.parallel.micro_batch_size}) must be even")

    def attach(self, trainer) -> None:
        if not trainer.loader.dataset.has_loss_mask:
            raise ValueError(
                f"{trainer.config.data.path}: objective=dpo needs pair shards with loss masks (training.posttrain data)"
            )
        self.reference = reference_logps(trainer)

    def targets(self, batch: Batch, split: str) -> torch.Tensor:
        reference = self.reference[split][batch.rows]
        labels = batch.labels.double()
        return torch.stack([labels, reference[:, None].double().expand_as(labels)], dim=-1)

    def denominator(self, batch: Batch) -> torch.Tensor:
        return torch.tensor(len(batch.rows) / 2, device=batch.labels.device)

    def stats_shape(self) -> tuple[int, ...]:
        return (len(STATS),)

    def record(self, nll: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Each row's summed log-probability of its targets."""
        return -nll.view(target.shape[:2]).sum(-1).detach()

    def loss(self, nll: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        labels = target[..., 0]
        logps = -nll.view(labels.shape).sum(-1)
        lengths = (labels != IGNORE_INDEX).sum(-1).to(logps.dtype)
        reference = target[:, 0, 1].to(logps.dtype)
        dpo = self.config
        loss, chosen, rejected = dpo_loss(
            logps[0::2],
            logps[1::2],
            reference[0::2],
            reference[1::2],
            beta=dpo.beta,
            chosen_lengths=lengths[0::2],
            rejected_lengths=lengths[1::2],
            length_normalized=dpo.length_normalized,
        )
        pairs = len(chosen)
        chosen_nll = -logps[0::2] / lengths[0::2]
        if dpo.sft_weight:
            loss = loss + dpo.sft_weight * chosen_nll.mean()
        stats = torch.stack(
            [
                loss.detach() * pairs,
                torch.tensor(float(pairs), device=loss.device),
                (chosen > rejected).float().sum(),
                (chosen - rejected).sum(),
                chosen.sum(),
                rejected.sum(),
                chosen_nll.detach().sum(),
                lengths.sum(),
            ]
        ).float()
        return loss * pairs, stats

    def summarize(self, stats: torch.Tensor, prefix: str = "") -> dict[str, float]:
        s = dict(zip(STATS, stats.cpu().tolist(), strict=True))
        pairs = max(s["pairs"], 1.0)
        return {
            f"{prefix}loss": s["loss"] / pairs,
            f"{prefix}reward_accuracy": s["correct"] / pairs,
            f"{prefix}reward_margin": s["margin"] / pairs,
            f"{prefix}chosen_reward": s["chosen"] / pairs,
            f"{prefix}rejected_reward": s["rejected"] / pairs,
            f"{prefix}chosen_nll": s["chosen_nll"] / pairs,
            f"{prefix}tokens": s["tokens"],
        }


def reference_logps(trainer) -> dict[str, torch.Tensor]:
    """Every row's log-probability under the starting weights, per split, cached in the run folder."""
    path = trainer.config.run_dir / REFERENCE_FILE
    loaders = {"train": trainer.loader, "valid": trainer.valid_loader}
    sizes = {split: len(loader.dataset) for split, loader in loaders.items() if loader is not None}
    if path.is_file():
        saved = torch.load(path, weights_only=True)
        if {k: len(v) for k, v in saved.items()} == sizes:
            trainer.metrics.note(f"reference log-probs from {path}")
            return {k: v.to(trainer.device) for k, v in saved.items()}
    reference = {split: _record_logps(trainer, loaders[split].dataset) for split in sizes}
    if trainer.is_main:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp: torch.save({k: v.cpu() for k, v in reference.items()}, tmp))
    trainer.metrics.note(f"recorded reference log-probs of {sizes} rows")
    return reference


def _record_logps(trainer, dataset: PackedDataset) -> torch.Tensor:
    """Summed log-probability of every row's targets under the current model, on every rank."""
    n, batch = len(dataset), trainer.config.data.global_batch_size
    local = batch // trainer.dims.dp
    device = trainer.device
    values = torch.zeros(n, device=device, dtype=torch.float64)
    counts = torch.zeros(n, device=device, dtype=torch.float64)
    for start in range(0, n, batch):
        rows = np.sort(np.arange(start, start + batch)[trainer.dp_rank * local : (trainer.dp_rank + 1) * local] % n)
        recorded = trainer.record(dataset.get(rows))
        if recorded is not None and trainer.tp_rank == 0:
            index = torch.from_numpy(rows).to(device)
            values.index_add_(0, index, recorded.double())
            counts.index_add_(0, index, torch.ones(len(rows), device=device, dtype=torch.float64))
    if dist.is_initialized():
        dist.all_reduce(values)
        dist.all_reduce(counts)
    return (values / counts).float()
