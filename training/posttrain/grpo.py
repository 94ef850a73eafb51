"""GRPO (Shao et al. 2024, DeepSeekMath): RL with verifiable rewards, no value model.

For each prompt, `group_size` completions are sampled from the current policy and scored by the
verifier (1 right, 0 wrong). A completion's advantage is its reward standardised within its group,
so a group all right or all wrong teaches nothing. Every completion token carries its sequence's
advantage through PPO's clipped ratio, plus a KL penalty to the frozen reference (the k3 estimator
exp(ref - logp) - (ref - logp) - 1, unbiased and never negative).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from data_pipeline.loader import IGNORE_INDEX, Batch


@dataclass
class GRPOConfig:
    group_size: int = 8  # completions sampled per prompt
    clip: float = 0.2  # PPO's clip of the policy ratio to [1 - clip, 1 + clip]
    kl_beta: float = 0.04  # weight of the KL estimate to the frozen reference (the starting policy)
    temperature: float = 1.0  # sampling temperature of the rollouts
    max_new_tokens: int = 96
    updates_per_rollout: int = 1  # optimizer steps on each rollout batch (> 1: the ratio leaves 1 and clips)
    problem_seed: int = 10_000  # generated problems of step t use seed problem_seed + t
    max_steps: int = 3  # reasoning steps of the generated problems


def group_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """(r - group mean) / (group std + 1e-4), for rewards laid out group after group."""
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not form groups of {group_size}")
    groups = rewards.float().view(-1, group_size)
    mean, std = groups.mean(1, keepdim=True), groups.std(1, unbiased=False, keepdim=True)
    return ((groups - mean) / (std + 1e-4)).flatten()


def grpo_token_loss(
    logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor, advantages: torch.Tensor, clip: float,
    kl_beta: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """Per-token loss, KL estimate and whether the ratio was clipped (all shaped like `logp`)."""
    ratio = torch.exp(logp - old_logp)
    clipped_ratio = ratio.clamp(1 - clip, 1 + clip)
    surrogate = torch.minimum(ratio * advantages, clipped_ratio * advantages)
    log_ref_ratio = ref_logp - logp
    kl = torch.exp(log_ref_ratio) - log_ref_ratio - 1
    return -surrogate + kl_beta * kl, kl.detach(), (ratio != clipped_ratio).detach()


def rollout_batch(sequences: list[list[int]], prompt_lengths: list[int], seq_len: int, pad_id: int) -> Batch:
    """Rows of prompt + completion, padded to `seq_len`; only completion tokens are targets. A sequence
    longer than seq_len + 1 tokens keeps its first seq_len + 1."""
    rows = len(sequences)
    tokens = torch.full((rows, seq_len + 1), pad_id, dtype=torch.long)
    labels = torch.full((rows, seq_len), IGNORE_INDEX, dtype=torch.long)
    doc_ids = torch.full((rows, seq_len), -1, dtype=torch.int32)
    for row, (sequence, prompt) in enumerate(zip(sequences, prompt_lengths, strict=True)):
        sequence = sequence[: seq_len + 1]
        if prompt >= len(sequence):
            raise ValueError(f"rollout {row}: prompt of {prompt} tokens leaves no completion in seq_len {seq_len}")
        tokens[row, : len(sequence)] = torch.tensor(sequence)
        labels[row, prompt - 1 : len(sequence) - 1] = tokens[row, prompt : len(sequence)]
        doc_ids[row, : len(sequence) - 1] = 0
    family_ids = torch.where(doc_ids >= 0, 0, -1).long()
    return Batch(tokens[:, :-1], labels, doc_ids, family_ids, torch.arange(rows))
