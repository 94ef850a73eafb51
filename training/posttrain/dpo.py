"""DPO and LN-DPO losses from sequence log-probabilities.

DPO: -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))), with pi/ref the summed log-probabilities
of the chosen (c) and rejected (r) responses under the policy and the frozen reference. LN-DPO
divides each response's log-likelihood ratio by its length (token count) first, which the seed paper
finds more robust to hyperparameters out of distribution.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class DPOConfig:
    beta: float = 0.1
    length_normalized: bool = False  # LN-DPO: divide each log-likelihood ratio by the response length
    # RPO (Pang et al. 2024): add this weight x the chosen responses' per-token NLL, which keeps DPO
    # from lowering the likelihood of correct solutions along with the wrong ones
    sft_weight: float = 0.0


def sequence_logprobs(
    logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probability of `labels` where `mask` is true, and the number of such tokens, per row."""
    logps = torch.log_softmax(logits.float(), dim=-1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    mask = mask.to(logps.dtype)
    return (logps * mask).sum(-1), mask.sum(-1)


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
