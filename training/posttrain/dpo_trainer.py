"""DPO / LN-DPO training on the pretraining machinery: same layouts (TP, PP, DP), step and checkpoints.

The dataset holds pairs as consecutive rows (chosen, rejected) with a loss mask on the responses.
The frozen reference is the starting policy itself (`init_from`): when the trainer is built, before
any checkpoint is resumed, one forward-only pass records every row's reference log-probability, so
no second model is kept in memory. The values are cached in the run folder for resumed runs.
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.distributed as dist

from data_pipeline.loader import IGNORE_INDEX, Batch, PackedDataset
from training.posttrain.dpo import dpo_loss
from training.trainer import Trainer

REFERENCE_FILE = "reference_logps.pt"
# Per micro-batch sums: loss, pairs, pairs ranked right, reward margin, chosen and rejected rewards,
# chosen responses' per-token NLL, response tokens.
STATS = ("loss", "pairs", "correct", "margin", "chosen", "rejected", "chosen_nll", "tokens")


class DPOTrainer(Trainer):
    rows_per_sample = 2

    def __init__(self, config):
        if config.parallel.cp > 1:  # a sequence's log-probability would be summed across ranks
            raise ValueError("objective=dpo with parallel.cp > 1 is not supported yet")
        if config.parallel.micro_batch_size % 2:
            raise ValueError(
                f"objective=dpo: parallel.micro_batch_size ({config.parallel.micro_batch_size}) must be even"
            )
        super().__init__(config)
        if not self.loader.dataset.has_loss_mask:
            raise ValueError(
                f"{config.data.path}: objective=dpo needs pair shards with loss masks (training.posttrain data)"
            )
        self._recorded: list[torch.Tensor] | None = None
        self._split = "train"
        self.reference = self._reference_logps()

    # ---- reference log-probs ----------------------------------------------------------------
    def _reference_logps(self) -> dict[str, torch.Tensor]:
        path = self.config.run_dir / REFERENCE_FILE
        loaders = {"train": self.loader, "valid": self.valid_loader}
        sizes = {split: len(loader.dataset) for split, loader in loaders.items() if loader is not None}
        if path.is_file():
            saved = torch.load(path, weights_only=True)
            if {k: len(v) for k, v in saved.items()} == sizes:
                self.metrics.note(f"reference log-probs from {path}")
                return {k: v.to(self.device) for k, v in saved.items()}
        reference = {split: self._record_logps(loaders[split].dataset) for split in sizes}
        if self.is_main:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".tmp")
            torch.save({k: v.cpu() for k, v in reference.items()}, tmp)
            os.replace(tmp, path)
        self.metrics.note(f"recorded reference log-probs of {sizes} rows")
        return reference

    def _record_logps(self, dataset: PackedDataset) -> torch.Tensor:
        """Summed log-probability of every row's targets under the current model, on every rank."""
        n, batch = len(dataset), self.config.data.global_batch_size
        local = batch // self.dims.dp
        values = torch.zeros(n, device=self.device, dtype=torch.float64)
        counts = torch.zeros(n, device=self.device, dtype=torch.float64)
        self._recorded = []
        for start in range(0, n, batch):
            rows = np.sort(np.arange(start, start + batch)[self.dp_rank * local : (self.dp_rank + 1) * local] % n)
            self._run_batch(dataset.get(rows), backward=False)
            if self.is_last_stage and self.tp_rank == 0:
                index = torch.from_numpy(rows).to(self.device)
                values.index_add_(0, index, torch.cat(self._recorded[-self.n_microbatches :]).double())
                counts.index_add_(0, index, torch.ones(len(rows), device=self.device, dtype=torch.float64))
            self._recorded.clear()
        self._recorded = None
        if dist.is_initialized():
            dist.all_reduce(values)
            dist.all_reduce(counts)
        return (values / counts).float()

    # ---- loss -------------------------------------------------------------------------------
    def _targets(self, batch: Batch) -> torch.Tensor:
        reference = torch.zeros(len(batch.rows), device=self.device)
        if self._recorded is None:
            reference = self.reference[self._split][batch.rows]
        labels = batch.labels.double()
        return torch.stack([labels, reference[:, None].double().expand_as(labels)], dim=-1)

    def _loss_denominator(self, batch: Batch) -> torch.Tensor:
        return torch.tensor(len(batch.rows) / 2, device=self.device)

    def _loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        labels = target[..., 0]
        logps = -self._token_nll(logits, labels).view(labels.shape).sum(-1)
        if self._recorded is not None:
            self._recorded.append(logps.detach())
            return logps.sum() * 0
        lengths = (labels != IGNORE_INDEX).sum(-1).to(logps.dtype)
        reference = target[:, 0, 1].to(logps.dtype)
        dpo = self.config.dpo
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
        self._microbatch_stats.append(stats)
        return loss * pairs * self.scaler.scale * self._replica_factor / self._denominator

    def _stats_shape(self) -> tuple[int, ...]:
        return (len(STATS),)

    def _summarize(self, stats: torch.Tensor, prefix: str = "") -> dict[str, float]:
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

    def evaluate(self) -> dict[str, float]:
        self._split = "valid"
        try:
            return super().evaluate()
        finally:
            self._split = "train"
