"""Language modelling: next-token cross-entropy averaged over target tokens (pretraining, CoT
mid-training, SFT with loss masks), with loss and token counts per language family, and on the
validation split each family's loss per character too: a tokenizer cuts languages into tokens of
different lengths, so per-token losses of two families are not comparable, per-character ones are."""

from __future__ import annotations

import torch

from data_pipeline.loader import IGNORE_INDEX, Batch
from training.objective import Objective


class LanguageModeling(Objective):
    name = "lm"

    def attach(self, trainer) -> None:
        self.families = trainer.families
        valid = trainer.valid_loader.dataset.manifest if trainer.valid_loader is not None else {}
        self.valid_tokens_per_char = valid_tokens_per_char(valid)

    def targets(self, batch: Batch, split: str) -> torch.Tensor:
        return torch.stack([batch.labels, batch.family_ids], dim=-1)

    def denominator(self, batch: Batch) -> torch.Tensor:
        return (batch.labels != IGNORE_INDEX).sum().float()

    def stats_shape(self) -> tuple[int, ...]:
        """Per-family [loss sum, token count], plus a column for ignored tokens."""
        return (2, len(self.families) + 1)

    def loss(self, nll: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        labels, family_ids = target[..., 0], target[..., 1]
        valid = labels.flatten() != IGNORE_INDEX
        family = torch.where(valid, family_ids.flatten(), len(self.families))
        stats = torch.zeros(self.stats_shape(), device=nll.device)
        stats[0].index_add_(0, family, nll.detach().float())
        stats[1].index_add_(0, family, valid.float())
        return nll.sum(), stats

    def summarize(self, stats: torch.Tensor, prefix: str = "") -> dict[str, float]:
        sums, counts = stats[0, :-1].cpu(), stats[1, :-1].cpu()
        out = {f"{prefix}loss": float(sums.sum() / counts.sum()), f"{prefix}tokens": float(counts.sum())}
        for i, family in enumerate(self.families):
            if counts[i] > 0:
                out[f"{prefix}loss/{family}"] = float(sums[i] / counts[i])
                if prefix == "val/" and family in self.valid_tokens_per_char:
                    per_char = sums[i] / counts[i] * self.valid_tokens_per_char[family]
                    out[f"{prefix}loss_per_char/{family}"] = float(per_char)
        return out


def valid_tokens_per_char(manifest: dict) -> dict[str, float]:
    """Per family, the validation split's tokens (an end-of-text per document included: the model
    predicts them too) per character of its documents, from the data's manifest: the mean loss per
    token times it is the loss per character (exact when every validation sequence is evaluated)."""
    return {
        family: stats["valid_tokens"] / stats["valid_characters"]
        for family, stats in manifest.get("family_stats", {}).items()
        if stats.get("valid_characters")
    }
