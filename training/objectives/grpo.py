"""GRPO (Shao et al. 2024, DeepSeekMath): RL with verifiable rewards, no value model.

For each prompt, `group_size` completions are sampled from the current policy and scored by the
verifier (1 right, 0 wrong). A completion's advantage is its reward standardised within its group,
so a group all right or all wrong teaches nothing. Every completion token carries its sequence's
advantage through PPO's clipped ratio, plus a KL penalty to the frozen reference (the k3 estimator
exp(ref - logp) - (ref - logp) - 1, unbiased and never negative).

On the pretraining machinery: the same layouts (TP, PP, DP, FSDP), step, metrics and checkpoints.

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
from training.config import TrainConfig
from training.objective import Objective
from training.posttrain.chat import chat_format
from training.posttrain.evaluate import Policy, prompt_ids, stop_sequences
from training.posttrain.generate import generate


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


# Per micro-batch sums: loss, completion tokens, KL estimate, clipped tokens.
STATS = ("loss", "tokens", "kl", "clipped")


@dataclass
class Rollouts:
    """One global rollout batch, group after group: prompt + completion token ids, prompt lengths, rewards."""

    sequences: list[list[int]]
    prompt_lengths: list[int]
    rewards: torch.Tensor


def no_variation_warning(step: int, rewards: torch.Tensor, grpo: GRPOConfig) -> str:
    """Every group scored alike (all right or all wrong): the policy-gradient term is zero for the
    whole batch, so the step moves the weights by the KL term alone."""
    what = "no sample was rewarded" if not bool(rewards.any()) else "every sample of each problem scored alike"
    return (
        f"warning: step {step}: no reward variation in any of the {len(rewards) // grpo.group_size} groups ({what}): "
        "the step learns nothing from rewards; start from a stronger policy (more SFT steps), raise "
        "grpo.temperature or grpo.group_size, or use easier problems (grpo.max_steps)"
    )


@dataclass
class Prepared:
    """This replica's rows of a rollout batch with what its loss needs per token."""

    batch: Batch
    advantages: torch.Tensor  # [rows]
    reference: torch.Tensor  # [rows, seq] reference log-probs of the targets
    old: torch.Tensor | None  # [rows, seq] the policy's at rollout time (updates_per_rollout > 1)
    reward: float  # mean reward of the global batch


class GRPO(Objective):
    name = "grpo"
    config_class = GRPOConfig
    evaluates = False  # rewards are the measure of an RL stage; the reasoning report evaluates held-out problems
    watches_spikes = False  # a policy-gradient loss sits near zero, of either sign: a ratio to its mean means nothing

    def __init__(self, config: GRPOConfig | None = None):
        super().__init__(config or GRPOConfig())
        self._prepared: Prepared | None = None

    def check(self, run: TrainConfig) -> None:
        self.check_sampling(run)
        if run.parallel.cp > 1:
            raise ValueError("objective=grpo with parallel.cp > 1 is not supported yet")
        if run.parallel.vocab_over_dp:  # each replica samples on its own: no per-token exchange over DP
            raise ValueError("objective=grpo with parallel.vocab_over_dp is not supported: each replica samples alone")
        if run.data.global_batch_size % self.config.group_size:
            raise ValueError(
                f"objective=grpo: data.global_batch_size ({run.data.global_batch_size}) must be a multiple "
                f"of grpo.group_size ({self.config.group_size}): it counts completions, group_size per prompt"
            )

    def check_sampling(self, run: TrainConfig) -> None:
        """Rollouts are sampled with every layer on each rank (TP shards within a layer are fine)."""
        if run.parallel.pp > 1:
            raise ValueError("objective=grpo samples rollouts with the whole model on each rank: parallel.pp must be 1")

    def attach(self, trainer) -> None:
        self.trainer = trainer
        # The reference: this rank's shards of the starting weights (before any resume replaces them).
        self._reference_weights = [p.detach().clone() for p in trainer.model.parameters()]
        data = trainer.config.data.path
        tokenizer = load_tokenizer(data)
        template = read_manifest(data).get("config", {}).get("chat_template")
        self.policy = Policy(trainer.model, tokenizer, chat_format(tokenizer, template, data))

    # ---- rollouts ---------------------------------------------------------------------------
    def batch_at(self, step: int) -> Batch:
        if self._prepared is None or step % self.config.updates_per_rollout == 0:
            rollouts = self.rollouts(step)
            self._prepared = self.prepare(rollouts)
            if not bool(group_advantages(rollouts.rewards, self.config.group_size).any()):
                self.trainer.metrics.note(no_variation_warning(step, rollouts.rewards, self.config))
        return self._prepared.batch

    def rollouts(self, step: int) -> Rollouts:
        """This step's rollout batch, sampled by every replica for its own prompts and gathered."""
        trainer, grpo = self.trainer, self.config
        dp, dp_rank = trainer.dims.dp, trainer.dp_rank
        prompts_per_replica = trainer.config.data.global_batch_size // grpo.group_size // dp
        if prompts_per_replica == 0:
            raise ValueError(
                f"objective=grpo: {trainer.config.data.global_batch_size // grpo.group_size} prompts per step "
                f"cannot be shared by {dp} data-parallel replicas"
            )
        problems = generate_problems(prompts_per_replica * dp, grpo.problem_seed + step, grpo.max_steps)
        mine = problems[dp_rank * prompts_per_replica : (dp_rank + 1) * prompts_per_replica]
        grouped = [p for p in mine for _ in range(grpo.group_size)]  # each problem group_size times
        prompts = [prompt_ids(self.policy, p.question, "chat") for p in grouped]
        stops = stop_sequences(self.policy, "chat")
        budget = min(grpo.max_new_tokens, trainer.loader.dataset.manifest["seq_len"] + 1 - max(map(len, prompts)))
        seed = (trainer.config.seed * 1_000_003 + step) * 1_009 + dp_rank
        completions = generate(trainer.model, prompts, budget, stops, grpo.temperature, seed=seed)
        decode = self.policy.tokenizer.decode
        rewards = [float(verify_solution(decode(c), p.answer)) for c, p in zip(completions, grouped, strict=True)]
        # A completion that stopped is trained to stop: its stop sequence is part of it.
        finished = [c + stops[0] if len(c) < budget else c for c in completions]
        local = Rollouts([p + c for p, c in zip(prompts, finished, strict=True)], [len(p) for p in prompts],
                         torch.tensor(rewards))  # fmt: skip
        return self._gather(local)

    def _gather(self, local: Rollouts) -> Rollouts:
        dp = self.trainer.dims.dp
        if dp == 1:
            return local
        parts = [None] * dp
        dist.all_gather_object(parts, (local.sequences, local.prompt_lengths, local.rewards.tolist()),
                               group=self.trainer.mesh["dp"].get_group())  # fmt: skip
        return Rollouts([s for p in parts for s in p[0]], [n for p in parts for n in p[1]],
                        torch.tensor([r for p in parts for r in p[2]]))  # fmt: skip

    def prepare(self, rollouts: Rollouts) -> Prepared:
        """This replica's rows of a global rollout batch, their advantages and recorded log-probs."""
        trainer = self.trainer
        n, dp, dp_rank = len(rollouts.sequences), trainer.dims.dp, trainer.dp_rank
        if n != trainer.config.data.global_batch_size:
            raise ValueError(f"a rollout batch has {n} completions; data.global_batch_size is "
                             f"{trainer.config.data.global_batch_size}")  # fmt: skip
        advantages = group_advantages(rollouts.rewards, self.config.group_size)
        rows = slice(dp_rank * n // dp, (dp_rank + 1) * n // dp)
        manifest = trainer.loader.dataset.manifest
        batch = rollout_batch(rollouts.sequences[rows], rollouts.prompt_lengths[rows], manifest["seq_len"],
                              manifest["pad_id"])  # fmt: skip
        with self._weights(self._reference_weights):
            reference = self._record(batch)
        old = self._record(batch) if self.config.updates_per_rollout > 1 else None
        reward = float(rollouts.rewards.float().mean())
        return Prepared(batch, advantages[rows].to(trainer.device), reference, old, reward)

    @contextlib.contextmanager
    def _weights(self, weights: list[torch.Tensor]):
        """The model with `weights` (this rank's shards) in place of its own, restored after."""
        params = list(self.trainer.model.parameters())
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
        recorded = self.trainer.record(batch)
        if recorded is not None:
            return recorded.float()
        return torch.zeros(batch.labels.shape, device=self.trainer.device)

    # ---- loss -------------------------------------------------------------------------------
    def targets(self, batch: Batch, split: str) -> torch.Tensor:
        labels = batch.labels.double()
        prepared = self._prepared
        advantages = prepared.advantages[:, None].double().expand_as(labels)
        old = prepared.old if prepared.old is not None else torch.full_like(prepared.reference, float("nan"))
        return torch.stack([labels, advantages, prepared.reference.double(), old.double()], dim=-1)

    def denominator(self, batch: Batch) -> torch.Tensor:
        return (batch.labels != IGNORE_INDEX).sum().float()

    def record(self, nll: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return -nll.view(target.shape[:2]).detach()

    def loss(self, nll: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        labels = target[..., 0].long()
        logp = -nll.view(labels.shape)
        advantages, reference, old = target[..., 1].float(), target[..., 2].float(), target[..., 3].float()
        old = torch.where(torch.isnan(old), logp.detach(), old)  # one update per rollout: the ratio is 1
        grpo = self.config
        per_token, kl, clipped = grpo_token_loss(logp, old, reference, advantages, grpo.clip, grpo.kl_beta)
        mask = (labels != IGNORE_INDEX).float()
        loss = (per_token * mask).sum()
        stats = torch.stack([loss.detach(), mask.sum(), (kl * mask).sum(), (clipped.float() * mask).sum()])
        return loss, stats.float()

    def stats_shape(self) -> tuple[int, ...]:
        return (len(STATS),)

    def summarize(self, stats: torch.Tensor, prefix: str = "") -> dict[str, float]:
        s = dict(zip(STATS, stats.cpu().tolist(), strict=True))
        tokens = max(s["tokens"], 1.0)
        out = {f"{prefix}loss": s["loss"] / tokens, f"{prefix}kl": s["kl"] / tokens,
               f"{prefix}clipped": s["clipped"] / tokens, f"{prefix}tokens": s["tokens"]}  # fmt: skip
        if self._prepared is not None and not prefix:
            out["reward"] = self._prepared.reward
        return out
