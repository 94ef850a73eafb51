"""The training loop: wires data, model, parallelism, optimizer, checkpoints and metrics together."""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import loss_parallel

from data_pipeline.config import to_dict
from data_pipeline.loader import IGNORE_INDEX, Batch, DataLoader, PackedDataset
from data_pipeline.shards import atomic_write_text
from data_pipeline.tokenizer import load_tokenizer, tokenizer_hash
from training import run_lock
from training.checkpoint import Checkpointer, load_checkpoint, remove_unfinished_saves, resolve_checkpoint
from training.metrics import MetricsLogger
from training.model_setup import check_fits_dataset, materialize, meta_model, resolve_model_config
from training.models.phi import PhiConfig, count_params_and_flops
from training.optim import OptimConfig, build_optimizer, build_scheduler, clip_grad_norm, resolve_lr
from training.parallel.context import apply_context_parallel, shard_sequence
from training.parallel.data import allreduce_gradients, apply_fsdp
from training.parallel.mesh import LayoutError, ParallelConfig, ParallelDims, device_type
from training.parallel.pipeline import (
    V_SHAPE_SCHEDULES,
    build_schedule,
    keep_stages,
    stages_of_rank,
    sync_tied_embedding_grads,
    tied_embedding_group,
)
from training.parallel.tensor import apply_tensor_parallel, reduce_partial_grads
from training.parallel.vocab import apply_vocab_over_dp
from training.posttrain.dpo import DPOConfig
from training.posttrain.grpo import GRPOConfig
from training.precision import PRECISIONS, LossScaler, autocast
from training.transforms import apply_activation_checkpointing, apply_compile


@dataclass
class DataConfig:
    path: str = "data/default"  # a folder written by `python -m data_pipeline build`
    global_batch_size: int = 16  # sequences per optimizer step, over all data-parallel replicas
    seed: int = 0


@dataclass
class CheckpointConfig:
    save_every: int = 0  # steps between saves; 0 saves only at the end
    keep_last: int = 2
    resume: str = "auto"  # auto (latest in this run's folder, if any) | none | a step_* folder
    async_save: bool = False  # write in the background while training continues (multi-rank runs)


@dataclass
class TrainConfig:
    name: str = "tiny"
    out_dir: str = "runs"
    steps: int = 300  # length of the LR schedule and of the run
    stop_after: int | None = None  # stop (and save) at this step, e.g. to split a run into jobs
    seed: int = 0
    log_every: int = 10
    eval_every: int = 0  # steps between evaluations on the `valid` split; 0: only at the end
    eval_batches: int = 0  # global batches per evaluation; 0: the whole split
    dist_timeout_s: int = 600
    init_from: str | None = None  # start from weights: a checkpoint (or run's checkpoints/), HF Phi3 folder or .pt
    precision: str = "fp32"  # fp32 | bf16 | fp16 (autocast over fp32 master weights; fp16 adds loss scaling)
    activation_checkpointing: str = "none"  # none | full (every block) | selective (core attention)
    compile: bool = False  # torch.compile each block
    nonfinite: str = "stop"  # on a NaN/inf loss or gradient: stop (report step and batch) | skip (and count)
    loss_spike_factor: float = 3.0  # log a spike when the loss exceeds this multiple of its running mean
    objective: str = "lm"  # lm (pretraining, CoT mid-training, SFT) | dpo (pairs) | grpo (RL, verifier rewards)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    model: PhiConfig = field(default_factory=PhiConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir) / self.name


class NonFiniteLossError(RuntimeError):
    """A step produced NaN/inf under `nonfinite: stop`; the message names the step and the batch."""


def take_run_lock(run_dir: Path, is_main: bool) -> None:
    """Rank 0 takes the run folder's lock; every rank of a refused job raises with its message."""
    refusal = [None]
    if is_main:
        try:
            run_lock.acquire(run_dir)
        except run_lock.RunLockedError as err:
            refusal[0] = str(err)
    if dist.is_initialized():
        dist.broadcast_object_list(refusal, src=0)
    if refusal[0] is not None:
        raise run_lock.RunLockedError(refusal[0])


class Trainer:
    """Language-model training (pretraining, CoT mid-training, SFT); `DPOTrainer` changes the loss."""

    rows_per_sample = 1  # DPO: 2 (chosen, rejected) rows that stay together

    def __init__(self, config: TrainConfig):
        self.config = config
        world = dist.get_world_size() if dist.is_initialized() else 1
        rank = dist.get_rank() if dist.is_initialized() else 0
        self.dims = ParallelDims.from_config(config.parallel, world)
        data_dir = Path(config.data.path)
        dataset = PackedDataset(data_dir, "train", tokenizer_hash=tokenizer_hash(load_tokenizer(data_dir)))
        data_vocab, data_seq_len = dataset.manifest["vocab_size"], dataset.manifest["seq_len"]
        mc = config.model = resolve_model_config(config.model, config.init_from, data_vocab, data_seq_len)
        check_fits_dataset(mc, data_dir, data_vocab, data_seq_len)
        self.dims.check_model(mc.n_heads, mc.n_kv_heads, mc.n_layers, mc.vocab_size)
        self.device = torch.device(device_type(), int(os.environ.get("LOCAL_RANK", 0)))
        self.mesh = self.dims.build_mesh(self.device.type)
        self.pp_rank, self.dp_rank, self.cp_rank, self.tp_rank = self.dims.coordinates(self.mesh)
        self.is_main = rank == 0

        local_batch, rem = divmod(config.data.global_batch_size, self.dims.dp)
        self.n_microbatches, rem2 = divmod(local_batch, config.parallel.micro_batch_size)
        if rem or rem2 or self.n_microbatches == 0:
            raise ValueError(
                f"data.global_batch_size={config.data.global_batch_size} must be a multiple of "
                f"dp ({self.dims.dp}) x parallel.micro_batch_size ({config.parallel.micro_batch_size})"
            )

        self.families = dataset.families
        batch_size, group = config.data.global_batch_size, self.rows_per_sample
        self.loader = DataLoader(dataset, batch_size, self.dp_rank, self.dims.dp, config.data.seed, group)
        valid = PackedDataset(data_dir, "valid", tokenizer_hash=dataset.manifest["tokenizer_hash"])
        self.valid_loader = None  # a split smaller than one global batch is not evaluated
        if len(valid) >= batch_size:
            self.valid_loader = DataLoader(valid, batch_size, self.dp_rank, self.dims.dp, 0, group)
        self._valid_rows = len(valid)

        # No rank ever holds the whole model: structure on `meta`, sharding, then local memory and weights.
        model = meta_model(mc)
        pc = config.parallel
        self.stages = stages_of_rank(self.pp_rank, self.dims.pp, pc.virtual_stages, pc.pp_schedule)
        num_stages = self.dims.pp * pc.virtual_stages
        self.is_first_stage, self.is_last_stage = 0 in self.stages, num_stages - 1 in self.stages
        if self.dims.pp > 1:
            keep_stages(model, self.stages, num_stages, pc.pp_layers)
        self.tied_group = (
            tied_embedding_group(self.mesh, self.dims, self.stages, num_stages, pc) if mc.tie_embeddings else None
        )
        if self.dims.tp > 1:
            apply_tensor_parallel(model, self.mesh["tp"], pc.sequence_parallel, vocab=not pc.vocab_over_dp)
        self.cp_positions = None  # this rank's share of every sequence under context parallel
        if self.dims.cp > 1:
            self.cp_positions = apply_context_parallel(model, self.mesh["cp"].get_group(), data_seq_len, self.device)
        apply_activation_checkpointing(model, config.activation_checkpointing)
        if config.compile:
            apply_compile(model)
        self.fsdp = self.dims.dp > 1 and pc.dp_mode == "fsdp"
        if pc.dp_mode not in ("allreduce", "fsdp"):
            raise ValueError(f"parallel.dp_mode {pc.dp_mode!r} is not one of allreduce, fsdp")
        self.vocab_shards = None  # the embedding and head split over DP x TP (parallel.vocab_over_dp)
        if pc.vocab_over_dp:
            if not self.fsdp or self.dims.cp > 1:
                raise LayoutError(
                    "parallel.vocab_over_dp splits the vocabulary over FSDP's ranks: it needs parallel.dp_mode=fsdp "
                    f"with dp > 1 (got dp_mode={pc.dp_mode}, dp={self.dims.dp}) and no context parallel (cp={pc.cp})"
                )
            self.vocab_shards = apply_vocab_over_dp(model, self.mesh, pc.sequence_parallel)
        self._replica_factor = self.dims.dp if self.fsdp else 1  # FSDP averages over replicas; we need the sum
        if self.fsdp:
            if len(self.stages) > 1:
                raise ValueError("parallel.dp_mode=fsdp with virtual pipeline stages is not supported yet")
            # Pipelines run many micro-batches per step: keep gathered weights between them.
            param_dtype = PRECISIONS.get(config.precision)
            ignored = set(self.vocab_shards.parameters(model)) if self.vocab_shards else set()
            apply_fsdp(model, self.mesh["dp"], self.dims.pp == 1, param_dtype, pc.fsdp_unit, ignored)
        materialize(model, self.device, config.seed, config.init_from)
        autocast(config.precision, self.device.type)  # refuses an unknown precision before training
        self.scaler = LossScaler(enabled=config.precision == "fp16")
        self.model = model
        self.nparams, self.flops_per_token = count_params_and_flops(mc, data_seq_len)
        tokens = config.steps * config.data.global_batch_size * data_seq_len
        peak_lr, lr_note = resolve_lr(config.optim, self.nparams, tokens)
        self.optimizer = build_optimizer(self.model, config.optim, peak_lr)
        self.scheduler = build_scheduler(self.optimizer, config.steps, config.optim)
        self.schedule = None
        if self.dims.pp > 1:
            self.schedule = build_schedule(
                self.model,
                self.stages,
                num_stages,
                self.mesh["pp"].get_group(),
                self.device,
                self.n_microbatches,
                self._loss,
                config.parallel.pp_schedule,
                config.parallel.pp_layers,
            )
        self._denominator = torch.ones((), device=self.device)
        self._microbatch_stats: list[torch.Tensor] = []
        if config.nonfinite not in ("stop", "skip"):
            raise ValueError(f"nonfinite {config.nonfinite!r} is not one of stop, skip")
        self.step = 0
        self.skipped_steps = 0
        self.loss_ema: float | None = None
        ckpt = config.checkpoint
        self.checkpointer = Checkpointer(config.run_dir / "checkpoints", ckpt.keep_last, ckpt.async_save)
        self.metrics = MetricsLogger(config.run_dir, self.families, self.flops_per_token, enabled=self.is_main)
        if lr_note:
            self.metrics.note(lr_note)
        if self.valid_loader is None:
            self.metrics.note(
                f"no evaluation: {data_dir} has {self._valid_rows} valid rows, fewer than one global batch"
            )

    # ---- loss -------------------------------------------------------------------------------
    # Subclasses with another objective (DPO) override the four methods below; the step, the
    # pipeline schedule and the metric reduction are shared.
    def _targets(self, batch: Batch) -> torch.Tensor:
        """What the loss needs besides the logits, as one tensor [b, s, k] that pipeline schedules
        split into micro-batches with the inputs."""
        return torch.stack([batch.labels, batch.family_ids], dim=-1)

    def _loss_denominator(self, batch: Batch) -> torch.Tensor:
        """This replica's share of what the global-batch loss is averaged over: target tokens."""
        return (batch.labels != IGNORE_INDEX).sum().float()

    def _loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Sum of token cross-entropies / tokens in the global batch; also accumulates per-family sums.
        Under TP the logits are vocab-sharded and `loss_parallel` never gathers them."""
        labels, family_ids = target[..., 0], target[..., 1]
        per_token = self._token_nll(logits, labels)
        valid = labels.flatten() != IGNORE_INDEX
        family = torch.where(valid, family_ids.flatten(), len(self.families))
        stats = torch.zeros(self._stats_shape(), device=per_token.device)
        stats[0].index_add_(0, family, per_token.detach().float())
        stats[1].index_add_(0, family, valid.float())
        self._microbatch_stats.append(stats)
        return per_token.sum() * self.scaler.scale * self._replica_factor / self._denominator

    def _stats_shape(self) -> tuple[int, ...]:
        """Per-family [loss sum, token count], plus a column for ignored tokens."""
        return (2, len(self.families) + 1)

    def _summarize(self, stats: torch.Tensor, prefix: str = "") -> dict[str, float]:
        sums, counts = stats[0, :-1].cpu(), stats[1, :-1].cpu()
        out = {f"{prefix}loss": float(sums.sum() / counts.sum()), f"{prefix}tokens": float(counts.sum())}
        for i, family in enumerate(self.families):
            if counts[i] > 0:
                out[f"{prefix}loss/{family}"] = float(sums[i] / counts[i])
        return out

    def _token_nll(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Per-token negative log-likelihood, flat, 0 where the label is ignored (works on TP-sharded logits)."""
        if self.vocab_shards is not None:
            return self.vocab_shards.token_nll(logits, labels)
        per_token = F.cross_entropy(
            logits.flatten(0, 1), labels.flatten().long(), reduction="none", ignore_index=IGNORE_INDEX
        )
        return per_token.to_local() if isinstance(per_token, DTensor) else per_token

    def _loss_context(self):
        return loss_parallel() if self.dims.tp > 1 else contextlib.nullcontext()

    # ---- one step ---------------------------------------------------------------------------
    def _run_batch(self, batch: Batch, backward: bool) -> None:
        """Loss (and with `backward`, gradients) of the global-batch mean over micro-batches."""
        batch = batch.to(self.device)
        model_kwargs = {}
        if self.cp_positions is not None:
            batch = Batch(*(shard_sequence(t, self.cp_positions) for t in batch.tensors()[:4]), batch.rows)
            model_kwargs = dict(positions=self.cp_positions, seq_len=self.loader.dataset.manifest["seq_len"])
        self._microbatch_stats.clear()
        target = self._targets(batch)
        self._denominator = self._loss_denominator(batch)
        if self.dims.dp > 1:
            dist.all_reduce(self._denominator, group=self.mesh["dp"].get_group())
        if self.dims.cp > 1:
            dist.all_reduce(self._denominator, group=self.mesh["cp"].get_group())
        with self._loss_context(), torch.set_grad_enabled(backward), autocast(self.config.precision, self.device.type):
            if self.schedule is not None:
                args = (batch.tokens,) if self.is_first_stage else ()
                kwargs = dict(target=target if self.is_last_stage else None, doc_ids=batch.doc_ids)
                if model_kwargs:  # positions per row, so the schedule splits them with the micro-batches
                    rows = batch.tokens.shape[0]
                    kwargs.update(model_kwargs, positions=self.cp_positions.expand(rows, -1))
                if backward:
                    self.schedule.step(*args, **kwargs, return_outputs=False)
                else:
                    self.schedule.eval(*args, **kwargs)
            else:
                micro = zip(batch.split(self.n_microbatches), target.chunk(self.n_microbatches), strict=True)
                # Under FSDP every micro-batch's gradients are reduce-scattered into the sharded ones: holding
                # them unsharded until the last micro-batch would keep a whole local model's gradients.
                for mb, mb_target in micro:
                    loss = self._loss(self.model(mb.tokens, doc_ids=mb.doc_ids, **model_kwargs), mb_target)
                    if backward:
                        loss.backward()

    def forward_backward(self, batch: Batch) -> None:
        """Gradients of the global-batch mean loss, summed over data-parallel replicas."""
        self._run_batch(batch, backward=True)
        if self.tied_group is not None:
            sync_tied_embedding_grads(self.model, self.tied_group)
        if self.vocab_shards is not None:
            self.vocab_shards.average_gradients(self.model)
        if self.config.parallel.sequence_parallel:
            reduce_partial_grads(self.model.parameters())
        if self.dims.dp > 1 and not self.fsdp:
            allreduce_gradients(self.model.parameters(), self.mesh["dp"].get_group())
        if self.dims.cp > 1:  # each CP rank holds the gradients of its share of the tokens
            allreduce_gradients(self.model.parameters(), self.mesh["cp"].get_group())

    def evaluate(self) -> dict[str, float]:
        """Loss per family on the held-out `valid` split (`eval_batches` global batches, 0 = all)."""
        if self.valid_loader is None:
            return {}
        if self.config.parallel.pp_schedule in V_SHAPE_SCHEDULES and self.dims.pp > 1:
            # torch's pipelining cannot run V-shaped schedules forward-only (eval) yet.
            self.metrics.note(f"evaluation skipped: not available with pp_schedule={self.config.parallel.pp_schedule}")
            return {}
        n = self.valid_loader.steps_per_epoch
        n = min(n, self.config.eval_batches) if self.config.eval_batches else n
        totals = torch.zeros(self._stats_shape(), device=self.device)
        for i in range(n):
            self._run_batch(self.valid_loader.batch_at(i), backward=False)
            totals += self._replica_stats()
        return self._summarize(totals, prefix="val/")

    def train_step(self, batch: Batch) -> dict[str, float]:
        self.forward_backward(batch)
        params = list(self.model.parameters())
        overflow = self.scaler.unscale_and_check(params)
        pp_group = self.mesh["pp"].get_group() if self.dims.pp > 1 else None
        # A pipeline's last stage holds a copy of tied embeddings: the first stage counts them in the norm.
        copy = [self.model.output.weight] if self.tied_group is not None and not self.is_first_stage else []
        grad_norm = clip_grad_norm(params, self.config.optim.grad_clip, pp_group=pp_group, counted_elsewhere=copy)
        # The norm is global, so every rank takes the same branch: nobody waits in a collective alone.
        nonfinite = not overflow and not torch.isfinite(grad_norm).item()
        if nonfinite and self.config.nonfinite == "stop":
            rows = self.loader.global_rows(self.step).tolist()
            raise NonFiniteLossError(
                f"non-finite loss or gradients at step {self.step + 1} (global batch rows {rows} of "
                f"{self.loader.dataset.data_dir}); set nonfinite=skip to skip such steps"
            )
        lr = self.scheduler.get_last_lr()[0]
        if not (overflow or nonfinite):
            self.optimizer.step()
        self.scheduler.step()
        self.scaler.update(overflow)
        self.optimizer.zero_grad(set_to_none=True)
        self.skipped_steps += int(overflow or nonfinite)
        metrics = self._reduce_metrics(grad_norm, lr)
        metrics.update(skipped=float(overflow or nonfinite), skipped_total=float(self.skipped_steps))
        if self.scaler.enabled:
            metrics.update(loss_scale=self.scaler.scale)
        return metrics

    def _replica_stats(self) -> torch.Tensor:
        """Per-family [loss sum, token count] of the global batch, counted once per replica (TP rank 0,
        last stage) and summed over replicas. Only the last `n_microbatches` loss calls count: on its
        first step a pipeline schedule also calls the loss once on placeholder activations."""
        stats = torch.zeros(self._stats_shape(), device=self.device)
        if self.is_last_stage and self.tp_rank == 0:
            stats += torch.stack(self._microbatch_stats[-self.n_microbatches :]).sum(0)
        if dist.is_initialized():
            dist.all_reduce(stats)
        return stats

    def _reduce_metrics(self, grad_norm: torch.Tensor, lr: float) -> dict[str, float]:
        return {**self._summarize(self._replica_stats()), "grad_norm": float(grad_norm), "lr": lr}

    # ---- the loop ---------------------------------------------------------------------------
    def next_batch(self, step: int) -> Batch:
        """The global batch of `step` (RL makes its own: rollouts of the current policy)."""
        return self.loader.batch_at(step)

    def maybe_resume(self) -> None:
        path = [None]
        if self.is_main:  # one rank reads and checks the files; every rank loads what it chose
            remove_unfinished_saves(self.config.run_dir / "checkpoints", self.metrics.note)
            path[0] = resolve_checkpoint(
                self.config.checkpoint.resume, self.config.run_dir / "checkpoints", self.metrics.note
            )
        if dist.is_initialized():
            dist.broadcast_object_list(path, src=0)
        if path[0] is None:
            return
        path = path[0]
        state = load_checkpoint(path, self.model, self.optimizer)
        self.loader.check_resume(state.get("data", {}), str(path))
        self._check_same_data(state.get("dataset", {}), path)
        self.step = state["step"]
        # The schedule's position; each group's current lr came back with the optimizer state (keyed by
        # parameter), and the group lists differ between pipeline stages, so they are not taken from rank 0.
        position = {k: state["scheduler"][k] for k in ("last_epoch", "_step_count") if k in state["scheduler"]}
        self.scheduler.load_state_dict({**self.scheduler.state_dict(), **position})
        self.scheduler._last_lr = [group["lr"] for group in self.optimizer.param_groups]
        self.scaler.load_state_dict(state["loss_scaler"])
        self.metrics.note(f"resumed from {path} at step {self.step}")

    def _check_same_data(self, saved: dict, path: Path) -> None:
        """Refuse a resume onto other tokens (another tokenizer) or other sequences (another build)."""
        dataset = self.loader.dataset
        if saved.get("tokenizer_hash") not in (None, dataset.manifest["tokenizer_hash"]):
            raise ValueError(
                f"{path}: the run was trained on data tokenized with {saved['tokenizer_hash']} "
                f"({saved.get('path')}); {dataset.data_dir} was tokenized with {dataset.manifest['tokenizer_hash']}. "
                "Resuming would read other tokens; rebuild the data with the run's tokenizer or start a new run"
            )
        if saved.get("train_fingerprint") not in (None, dataset.fingerprint):
            raise ValueError(
                f"{path}: the run was trained on {saved.get('path')} (train shards {saved['train_fingerprint']}); "
                f"{dataset.data_dir} holds other sequences (train shards {dataset.fingerprint}). Resuming would "
                "continue the saved data order over other data; to start on it from these weights, begin a new "
                f"run (another name or out_dir) with init_from={path}"
            )

    def save(self) -> Path:
        state = {
            "data": self.loader.state_dict(self.step),
            "scheduler": self.scheduler.state_dict(),
            "loss_scaler": self.scaler.state_dict(),
            "config": to_dict(self.config),
            "layout": {"tp": self.dims.tp, "pp": self.dims.pp, "dp": self.dims.dp, "cp": self.dims.cp},
            "dataset": {
                "path": str(self.loader.dataset.data_dir),
                "tokenizer_hash": self.loader.dataset.manifest["tokenizer_hash"],
                "seq_len": self.loader.dataset.manifest["seq_len"],
                "train_fingerprint": self.loader.dataset.fingerprint,
            },
        }
        return self.checkpointer.save(self.step, self.model, self.optimizer, state)

    def _watch_for_spike(self, metrics: dict[str, float]) -> None:
        """Flag a loss far above its running mean (a spike), without changing the training."""
        loss = metrics["loss"]
        if (
            not metrics["skipped"]
            and self.loss_ema is not None
            and loss > self.config.loss_spike_factor * self.loss_ema
        ):
            metrics["loss_spike"] = 1.0
            self.metrics.note(f"loss spike at step {self.step}: {loss:.4f} vs running mean {self.loss_ema:.4f}")
        if not metrics["skipped"] and loss == loss:
            self.loss_ema = loss if self.loss_ema is None else 0.9 * self.loss_ema + 0.1 * loss

    def fit(self) -> list[dict[str, float]]:
        """Train from the latest checkpoint (if any) to `steps`, holding the run folder's lock."""
        take_run_lock(self.config.run_dir, self.is_main)
        try:
            return self._fit()
        finally:
            if self.is_main:
                run_lock.release(self.config.run_dir)

    def _fit(self) -> list[dict[str, float]]:
        config = self.config
        self.maybe_resume()
        if self.is_main:
            config.run_dir.mkdir(parents=True, exist_ok=True)
            try:  # a record for people; a full disk is met (and stops the run) at the next checkpoint
                atomic_write_text(config.run_dir / "config.json", json.dumps(to_dict(config), indent=2))
            except OSError as err:
                self.metrics.note(f"{config.run_dir / 'config.json'} not written: {err.strerror or err}")
        end = min(config.steps, config.stop_after or config.steps)
        history = []
        self.metrics.start(self.step, end, self.nparams)
        while self.step < end:
            t0 = time.perf_counter()
            metrics = self.train_step(self.next_batch(self.step))
            self.step += 1
            seconds = time.perf_counter() - t0
            metrics.update(step=self.step, step_time_s=seconds, tokens_per_s=metrics["tokens"] / seconds)
            history.append(metrics)
            self._watch_for_spike(metrics)
            self.metrics.log(metrics, console=self.step % config.log_every == 0 or self.step == end)
            if config.eval_every and self.step % config.eval_every == 0 and self.step < end:
                self.metrics.log_eval(self.step, self.evaluate())
            if config.checkpoint.save_every and self.step % config.checkpoint.save_every == 0 and self.step < end:
                self.save()
        if history:
            history[-1].update(self.evaluate())
            self.metrics.log_eval(self.step, history[-1])
            path = self.save()
            self.checkpointer.wait()
            self.metrics.note(f"saved checkpoint {path}")
        self.metrics.close()
        return history
