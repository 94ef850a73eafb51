"""GRPO on the pretraining machinery: the same layouts (TP, PP, DP, FSDP), step, metrics and checkpoints.

Each rollout batch: generated math problems (seeded by the step), `group_size` completions per prompt
sampled from the current policy under the training layout (`generate` on the sharded model; every
data-parallel replica samples its own prompts), rewards from the verifier, advantages within each
group. The frozen reference is the starting policy: its local shards are kept when the trainer is
built, before any checkpoint is resumed, and swapped in for one forward-only pass per rollout batch
that records its per-token log-probabilities (no second model is built). With
`updates_per_rollout` > 1 the policy's own log-probabilities are recorded the same way first, and
later updates on the batch see the ratio leave 1 and clip.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.distributed as dist

from data_pipeline.loader import IGNORE_INDEX, Batch
from data_pipeline.shards import read_manifest
from data_pipeline.synthetic.math_problems import generate_problems, verify_solution
from data_pipeline.tokenizer import load_tokenizer
from training.posttrain.chat import chat_format
from training.posttrain.evaluate import Policy, prompt_ids, stop_sequences
from training.posttrain.generate import generate
from training.posttrain.grpo import group_advantages, grpo_token_loss, rollout_batch
from training.trainer import Trainer

# Per micro-batch sums: loss, completion tokens, KL estimate, clipped tokens.
STATS = ("loss", "tokens", "kl", "clipped")


@dataclass
class Rollouts:
    """One global rollout batch, group after group: prompt + completion token ids, prompt lengths, rewards."""

    sequences: list[list[int]]
    prompt_lengths: list[int]
    rewards: torch.Tensor


@dataclass
class Prepared:
    """This replica's rows of a rollout batch with what its loss needs per token."""

    batch: Batch
    advantages: torch.Tensor  # [rows]
    reference: torch.Tensor  # [rows, seq] reference log-probs of the targets
    old: torch.Tensor | None  # [rows, seq] the policy's at rollout time (updates_per_rollout > 1)
    reward: float  # mean reward of the global batch


def check_rollout_layout(parallel) -> None:
    """Rollouts are sampled with every layer on each rank (TP shards within a layer are fine)."""
    if parallel.pp > 1:
        raise ValueError("objective=grpo samples rollouts with the whole model on each rank: parallel.pp must be 1")


class GRPOTrainer(Trainer):
    def __init__(self, config):
        grpo = config.grpo
        if config.parallel.cp > 1:
            raise ValueError("objective=grpo with parallel.cp > 1 is not supported yet")
        if config.parallel.vocab_over_dp:  # each replica samples on its own: no per-token exchange over DP
            raise ValueError("objective=grpo with parallel.vocab_over_dp is not supported: each replica samples alone")
        if config.data.global_batch_size % grpo.group_size:
            raise ValueError(
                f"objective=grpo: data.global_batch_size ({config.data.global_batch_size}) must be a multiple "
                f"of grpo.group_size ({grpo.group_size}): it counts completions, group_size per prompt"
            )
        super().__init__(config)
        # The reference: this rank's shards of the starting weights (before any resume replaces them).
        self._reference_weights = [p.detach().clone() for p in self.model.parameters()]
        self._recording: list[torch.Tensor] | None = None
        self._prepared: Prepared | None = None
        tokenizer = load_tokenizer(config.data.path)
        template = read_manifest(config.data.path).get("config", {}).get("chat_template")
        self.policy = Policy(self.model, tokenizer, chat_format(tokenizer, template, config.data.path))

    # ---- rollouts ---------------------------------------------------------------------------
    def next_batch(self, step: int) -> Batch:
        if self._prepared is None or step % self.config.grpo.updates_per_rollout == 0:
            self._prepared = self.prepare(self.rollouts(step))
        return self._prepared.batch

    def rollouts(self, step: int) -> Rollouts:
        """This step's rollout batch, sampled by every replica for its own prompts and gathered."""
        check_rollout_layout(self.config.parallel)
        grpo = self.config.grpo
        prompts_per_replica = self.config.data.global_batch_size // grpo.group_size // self.dims.dp
        if prompts_per_replica == 0:
            raise ValueError(
                f"objective=grpo: {self.config.data.global_batch_size // grpo.group_size} prompts per step "
                f"cannot be shared by {self.dims.dp} data-parallel replicas"
            )
        problems = generate_problems(prompts_per_replica * self.dims.dp, grpo.problem_seed + step, grpo.max_steps)
        mine = problems[self.dp_rank * prompts_per_replica : (self.dp_rank + 1) * prompts_per_replica]
        grouped = [p for p in mine for _ in range(grpo.group_size)]  # each problem group_size times
        prompts = [prompt_ids(self.policy, p.question, "chat") for p in grouped]
        stops = stop_sequences(self.policy, "chat")
        budget = min(grpo.max_new_tokens, self.loader.dataset.manifest["seq_len"] + 1 - max(map(len, prompts)))
        seed = (self.config.seed * 1_000_003 + step) * 1_009 + self.dp_rank
        completions = generate(self.model, prompts, budget, stops, grpo.temperature, seed=seed)
        decode = self.policy.tokenizer.decode
        rewards = [float(verify_solution(decode(c), p.answer)) for c, p in zip(completions, grouped, strict=True)]
        # A completion that stopped is trained to stop: its stop sequence is part of it.
        finished = [c + stops[0] if len(c) < budget else c for c in completions]
        local = Rollouts([p + c for p, c in zip(prompts, finished, strict=True)], [len(p) for p in prompts],
                         torch.tensor(rewards))  # fmt: skip
        return self._gather(local)

    def _gather(self, local: Rollouts) -> Rollouts:
        if self.dims.dp == 1:
            return local
        parts = [None] * self.dims.dp
        dist.all_gather_object(parts, (local.sequences, local.prompt_lengths, local.rewards.tolist()),
                               group=self.mesh["dp"].get_group())  # fmt: skip
        return Rollouts([s for p in parts for s in p[0]], [n for p in parts for n in p[1]],
                        torch.tensor([r for p in parts for r in p[2]]))  # fmt: skip

    def prepare(self, rollouts: Rollouts) -> Prepared:
        """This replica's rows of a global rollout batch, their advantages and recorded log-probs."""
        n, dp = len(rollouts.sequences), self.dims.dp
        if n != self.config.data.global_batch_size:
            raise ValueError(f"a rollout batch has {n} completions; data.global_batch_size is "
                             f"{self.config.data.global_batch_size}")  # fmt: skip
        advantages = group_advantages(rollouts.rewards, self.config.grpo.group_size)
        rows = slice(self.dp_rank * n // dp, (self.dp_rank + 1) * n // dp)
        seq_len = self.loader.dataset.manifest["seq_len"]
        pad = self.loader.dataset.manifest["pad_id"]
        batch = rollout_batch(rollouts.sequences[rows], rollouts.prompt_lengths[rows], seq_len, pad)
        with self._weights(self._reference_weights):
            reference = self._record(batch)
        old = self._record(batch) if self.config.grpo.updates_per_rollout > 1 else None
        reward = float(rollouts.rewards.float().mean())
        return Prepared(batch, advantages[rows].to(self.device), reference, old, reward)

    @contextlib.contextmanager
    def _weights(self, weights: list[torch.Tensor]):
        """The model with `weights` (this rank's shards) in place of its own, restored after."""
        params = list(self.model.parameters())
        own = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, w in zip(params, weights, strict=True):
                p.copy_(w)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, w in zip(params, own, strict=True):
                    p.copy_(w)

    def _record(self, batch: Batch) -> torch.Tensor:
        """Per-token log-probabilities of the batch's targets under the current weights ([rows, seq];
        zeros on pipeline stages without the head)."""
        self._recording = []
        try:
            self._run_batch(batch, backward=False)
            recorded = self._recording[-self.n_microbatches :]
        finally:
            self._recording = None
        if self.is_last_stage:
            return torch.cat(recorded).float()
        return torch.zeros(batch.labels.shape, device=self.device)

    # ---- loss -------------------------------------------------------------------------------
    def _targets(self, batch: Batch) -> torch.Tensor:
        labels = batch.labels.double()
        if self._recording is not None:
            return labels[..., None]
        prepared = self._prepared
        advantages = prepared.advantages[:, None].double().expand_as(labels)
        old = prepared.old if prepared.old is not None else torch.full_like(prepared.reference, float("nan"))
        return torch.stack([labels, advantages, prepared.reference.double(), old.double()], dim=-1)

    def _loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        labels = target[..., 0].long()
        logp = -self._token_nll(logits, labels).view(labels.shape)
        if self._recording is not None:
            self._recording.append(logp.detach())
            return logp.sum() * 0
        advantages, reference, old = target[..., 1].float(), target[..., 2].float(), target[..., 3].float()
        old = torch.where(torch.isnan(old), logp.detach(), old)  # one update per rollout: the ratio is 1
        grpo = self.config.grpo
        per_token, kl, clipped = grpo_token_loss(logp, old, reference, advantages, grpo.clip, grpo.kl_beta)
        mask = (labels != IGNORE_INDEX).float()
        loss = (per_token * mask).sum()
        stats = torch.stack([loss.detach(), mask.sum(), (kl * mask).sum(), (clipped.float() * mask).sum()])
        self._microbatch_stats.append(stats.float())
        return loss * self.scaler.scale * self._replica_factor / self._denominator

    def _stats_shape(self) -> tuple[int, ...]:
        return (len(STATS),)

    def _summarize(self, stats: torch.Tensor, prefix: str = "") -> dict[str, float]:
        s = dict(zip(STATS, stats.cpu().tolist(), strict=True))
        tokens = max(s["tokens"], 1.0)
        out = {f"{prefix}loss": s["loss"] / tokens, f"{prefix}kl": s["kl"] / tokens,
               f"{prefix}clipped": s["clipped"] / tokens, f"{prefix}tokens": s["tokens"]}  # fmt: skip
        if self._prepared is not None and not prefix:
            out["reward"] = self._prepared.reward
        return out

    def evaluate(self) -> dict[str, float]:
        """Rewards are the measure of an RL stage; the reasoning report evaluates held-out problems."""
        return {}
