"""The training loop. It is handed its parts (`training.components.build_trainer` builds them) and an
objective (`training.objective`): it runs micro-batches through the model or the pipeline schedule,
reduces gradients and statistics over the layout, steps the optimizer, evaluates, saves and resumes."""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import loss_parallel

from common.files import atomic_write_text
from data_pipeline.loader import IGNORE_INDEX, Batch, DataLoader
from training import run_lock
from training.checkpoint import Checkpointer
from training.config import TrainConfig
from training.integrity import ReplicaDivergence, compare_replicas, maybe_flip_bit
from training.metrics import MetricsLogger, SpikeWatcher
from training.objective import Objective
from training.optim import clip_grad_norm
from training.parallel.context import shard_sequence
from training.parallel.data import allreduce_gradients, sum_gradients
from training.parallel.mesh import ParallelDims
from training.parallel.parallelize import ParallelModel
from training.parallel.pipeline import V_SHAPE_SCHEDULES, build_schedule, sync_tied_embedding_grads
from training.parallel.replicas import ReplicaGroups
from training.parallel.tensor import reduce_partial_grads
from training.precision import LossScaler, autocast
from training.run_state import config_record, resume, saved_state
from training.stragglers import StragglerWatch
from training.watchdog import HangWatchdog


class NonFiniteLossError(RuntimeError):
    """A step produced NaN/inf under `nonfinite: stop`; the message names the step and the batch."""


@dataclass
class Layout:
    """Where this rank sits: the mesh, its coordinates, its device, and micro-batches per step."""

    dims: ParallelDims
    mesh: DeviceMesh | None
    device: torch.device
    pp_rank: int
    dp_rank: int
    cp_rank: int
    tp_rank: int
    n_microbatches: int


class Trainer:
    def __init__(self, config: TrainConfig, objective: Objective, layout: Layout, loader: DataLoader,
                 valid_loader: DataLoader | None, parallel: ParallelModel, optimizer, scheduler,
                 checkpointer: Checkpointer, metrics: MetricsLogger, nparams: int):  # fmt: skip
        self.config, self.objective, self.layout, self.parallel = config, objective, layout, parallel
        self.dims, self.mesh, self.device = layout.dims, layout.mesh, layout.device
        self.dp_rank, self.cp_rank, self.tp_rank = layout.dp_rank, layout.cp_rank, layout.tp_rank
        self.n_microbatches = layout.n_microbatches
        self.loader, self.valid_loader, self.families = loader, valid_loader, loader.dataset.families
        self.model, self.optimizer, self.scheduler = parallel.model, optimizer, scheduler
        self.checkpointer, self.metrics, self.nparams = checkpointer, metrics, nparams
        self.is_main = not dist.is_initialized() or dist.get_rank() == 0
        self.watchdog: HangWatchdog | None = None
        self.replicas: ReplicaGroups | None = None  # fault-tolerant replica groups, when enabled
        self.stragglers: StragglerWatch | None = None
        self.is_last_stage = parallel.is_last_stage
        self.scaler = LossScaler(enabled=config.precision == "fp16")
        self.replica_factor = self.dims.dp if parallel.fsdp else 1  # FSDP averages over replicas; we need the sum
        self.schedule = None
        if self.dims.pp > 1:
            pc, group = config.parallel, self.mesh["pp"].get_group()
            self.schedule = build_schedule(self.model, parallel.stages, parallel.num_stages, group, self.device,
                                           self.n_microbatches, self._loss, pc.pp_schedule, pc.pp_layers)  # fmt: skip
        self.step, self.skipped_steps = 0, 0
        self.spikes = SpikeWatcher(config.loss_spike_factor, metrics.note)
        self._denominator = torch.ones((), device=self.device)
        self._microbatch_stats: list[torch.Tensor] = []
        self._recording: list[torch.Tensor] | None = None  # set while `record` runs

    # ---- the loss: the loop computes per-token NLL, the objective the rest ---------------------
    def _token_nll(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Per-token negative log-likelihood, flat, 0 where the label is ignored; under TP the logits
        are vocab-sharded and `loss_parallel` never gathers them."""
        if self.parallel.vocab_shards is not None:
            return self.parallel.vocab_shards.token_nll(logits, labels)
        per_token = F.cross_entropy(
            logits.flatten(0, 1), labels.flatten().long(), reduction="none", ignore_index=IGNORE_INDEX
        )
        return per_token.to_local() if isinstance(per_token, DTensor) else per_token

    def _loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        nll = self._token_nll(logits, target[..., 0])
        if self._recording is not None:
            self._recording.append(self.objective.record(nll, target))
            return nll.sum() * 0
        loss, stats = self.objective.loss(nll, target)
        self._microbatch_stats.append(stats)
        return loss * self.scaler.scale * self.replica_factor / self._denominator

    def _run_batch(self, batch: Batch, backward: bool, split: str = "train") -> None:
        """Loss (and with `backward`, gradients) of the global-batch mean over micro-batches."""
        batch = batch.to(self.device)
        model_kwargs, positions = {}, self.parallel.cp_positions
        if positions is not None:
            batch = Batch(*(shard_sequence(t, positions) for t in batch.tensors()[:4]), batch.rows)
            model_kwargs = dict(positions=positions, seq_len=self.loader.dataset.manifest["seq_len"])
        self._microbatch_stats.clear()
        target = batch.labels[..., None] if self._recording is not None else self.objective.targets(batch, split)
        self._denominator = self.objective.denominator(batch)
        for group in ("dp", "cp"):
            if getattr(self.dims, group) > 1:
                dist.all_reduce(self._denominator, group=self.mesh[group].get_group())
        if self.replicas is not None and backward:  # evaluation runs whole on every replica group
            self.replicas.sum_(self._denominator)
        loss_context = loss_parallel() if self.dims.tp > 1 else contextlib.nullcontext()
        with loss_context, torch.set_grad_enabled(backward), autocast(self.config.precision, self.device.type):
            if self.schedule is not None:
                args = (batch.tokens,) if self.parallel.is_first_stage else ()
                kwargs = dict(target=target if self.is_last_stage else None, doc_ids=batch.doc_ids)
                if model_kwargs:  # positions per row, so the schedule splits them with the micro-batches
                    kwargs.update(model_kwargs, positions=positions.expand(batch.tokens.shape[0], -1))
                if backward:
                    self.schedule.step(*args, **kwargs, return_outputs=False)
                else:
                    self.schedule.eval(*args, **kwargs)
            else:
                # Under FSDP every micro-batch's gradients are reduce-scattered into the sharded ones: holding
                # them unsharded until the last micro-batch would keep a whole local model's gradients.
                micro = zip(batch.split(self.n_microbatches), target.chunk(self.n_microbatches), strict=True)
                for mb, mb_target in micro:
                    loss = self._loss(self.model(mb.tokens, doc_ids=mb.doc_ids, **model_kwargs), mb_target)
                    if backward:
                        loss.backward()

    def record(self, batch: Batch) -> torch.Tensor | None:
        """What the objective records (`Objective.record`) for this replica's rows of `batch`, in a
        forward-only pass; None on pipeline stages without the head."""
        self._recording = []
        try:
            self._run_batch(batch, backward=False)
            recorded = self._recording[-self.n_microbatches :]
        finally:
            self._recording = None
        return torch.cat(recorded) if self.is_last_stage else None

    # ---- one step ---------------------------------------------------------------------------
    def forward_backward(self, batch: Batch) -> None:
        """Gradients of the global-batch mean loss, summed over data-parallel replicas."""
        self._run_batch(batch, backward=True)
        params = self.model.parameters
        if self.parallel.tied_group is not None:
            sync_tied_embedding_grads(self.model, self.parallel.tied_group)
        if self.parallel.vocab_shards is not None:
            self.parallel.vocab_shards.average_gradients(self.model)
        if self.config.parallel.sequence_parallel:
            reduce_partial_grads(params())
        if self.dims.dp > 1 and not self.parallel.fsdp:
            allreduce_gradients(params(), self.mesh["dp"].get_group())
        if self.dims.cp > 1:  # each CP rank holds the gradients of its share of the tokens
            allreduce_gradients(params(), self.mesh["cp"].get_group())
        if self.replicas is not None:
            sum_gradients(params(), self.replicas.sum_)

    def train_step(self, batch: Batch) -> dict[str, float] | None:
        """One optimizer step; None when the fault-tolerant replicas voted it down (a peer was lost
        during it), to be taken again."""
        self.forward_backward(batch)
        stats = self._replica_stats(over_replica_groups=True)
        if self.replicas is not None and not self.replicas.commit():
            self.optimizer.zero_grad(set_to_none=True)
            return None
        params = list(self.model.parameters())
        overflow = self.scaler.unscale_and_check(params)
        pp_group = self.mesh["pp"].get_group() if self.dims.pp > 1 else None
        # A pipeline's last stage holds a copy of tied embeddings: the first stage counts them in the norm.
        tied_copy = self.parallel.tied_group is not None and not self.parallel.is_first_stage
        copy = [self.model.output.weight] if tied_copy else []
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
        metrics = {**self.objective.summarize(stats), "grad_norm": float(grad_norm), "lr": lr}
        metrics.update(skipped=float(overflow or nonfinite), skipped_total=float(self.skipped_steps))
        if self.scaler.enabled:
            metrics.update(loss_scale=self.scaler.scale)
        return metrics

    def _replica_stats(self, over_replica_groups: bool = False) -> torch.Tensor:
        """The objective's statistics of the global batch, counted once per replica (TP rank 0, last
        stage) and summed over replicas (and the live fault-tolerant replica groups, if asked). Only
        the last `n_microbatches` loss calls count: on its first step a pipeline schedule also calls
        the loss once on placeholder activations."""
        stats = torch.zeros(self.objective.stats_shape(), device=self.device)
        if self.is_last_stage and self.tp_rank == 0:
            stats += torch.stack(self._microbatch_stats[-self.n_microbatches :]).sum(0)
        if dist.is_initialized():
            dist.all_reduce(stats)
        if over_replica_groups and self.replicas is not None:
            self.replicas.sum_(stats)
        return stats

    def evaluate(self) -> dict[str, float]:
        """The objective's metrics on the held-out `valid` split (`eval_batches` global batches, 0 = all)."""
        if self.valid_loader is None or not self.objective.evaluates:
            return {}
        if self.config.parallel.pp_schedule in V_SHAPE_SCHEDULES and self.dims.pp > 1:
            # torch's pipelining cannot run V-shaped schedules forward-only (eval) yet.
            self.metrics.note(f"evaluation skipped: not available with pp_schedule={self.config.parallel.pp_schedule}")
            return {}
        n = self.valid_loader.steps_per_epoch
        n = min(n, self.config.eval_batches) if self.config.eval_batches else n
        totals = torch.zeros(self.objective.stats_shape(), device=self.device)
        for i in range(n):
            self.report(self.step, f"evaluate batch {i}")
            self._run_batch(self.valid_loader.batch_at(i), backward=False, split="valid")
            totals += self._replica_stats()
        return self.objective.summarize(totals, prefix="val/")

    # ---- the run ----------------------------------------------------------------------------
    def next_batch(self, step: int) -> Batch:
        made = self.objective.batch_at(step)
        return made if made is not None else self.loader.batch_at(step)

    def maybe_resume(self, which: str | None = None) -> None:
        """Resume from the checkpoint `which` (default: `checkpoint.resume`) names, if any."""
        resume(self, which)
        if self.replicas is not None:
            self.replicas.resumed_at(self.step)

    def save(self):
        return self.checkpointer.save(self.step, self.model, self.optimizer, saved_state(self))

    def fit(self) -> list[dict[str, float]]:
        """Train from the latest checkpoint (if any) to `steps`, holding the run folder's lock."""
        with run_lock.held_by_job(self.config.run_dir, self.is_main):
            return self._fit()

    def _fit(self) -> list[dict[str, float]]:
        config = self.config
        multi_rank = dist.is_initialized() and dist.get_world_size() > 1
        if config.hang_timeout_s and multi_rank:
            self.watchdog = HangWatchdog(config.run_dir, dist.get_rank(), dist.get_world_size(), config.hang_timeout_s)
            self.watchdog.start()
        if config.check.stragglers_every and multi_rank:
            check = config.check
            self.stragglers = StragglerWatch(check.stragglers_every, check.straggler_factor, self.layout.pp_rank,
                                             self.metrics.note)  # fmt: skip
        try:
            return self._train()
        finally:
            if self.watchdog:
                self.watchdog.stop()
                self.watchdog = None
            if self.replicas is not None:
                self.replicas.close()

    def check_replicas(self) -> None:
        """Compare the copies that must be bit-identical (training/integrity.py): data-parallel replicas
        (not under FSDP: no two ranks hold the same shard) and what every TP rank holds whole; stop, or
        restore the newest checkpoint on every rank, when one differs."""
        groups = []
        if self.dims.dp > 1 and not self.parallel.fsdp:
            groups.append(("data-parallel", self.mesh["dp"].get_group(), None))
        if self.dims.tp > 1:
            groups.append(("tensor-parallel", self.mesh["tp"].get_group(), "tp"))
        if not groups:
            return
        found = [compare_replicas(self.model, self.optimizer, group, self.step, kind, only)
                 for kind, group, only in groups]  # fmt: skip
        # Every rank must take the same branch, also those whose own groups agree (TP x DP, say).
        everyone: list = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, [p for p in found if p is not None])
        problems = list(dict.fromkeys(p for ranks_problems in everyone for p in ranks_problems))
        if not problems:
            return
        problem = "; ".join(problems)
        if self.config.check.on_divergence == "stop":
            raise ReplicaDivergence(f"{problem}; stopped (check.on_divergence: stop)")
        self.checkpointer.wait()
        self.metrics.note(f"{problem}; every rank restores the newest intact checkpoint (check.on_divergence: restore)")
        at = self.step
        self.maybe_resume("auto")
        if self.step >= at:
            raise ReplicaDivergence(f"{problem}; no checkpoint before step {at} to restore")

    def report(self, step: int, phase: str) -> None:
        """Progress, for the hang watchdog when one runs."""
        if self.watchdog:
            self.watchdog.progress(step, phase)

    def _train(self) -> list[dict[str, float]]:
        config = self.config
        report = self.report
        report(self.step, "resume")
        self.maybe_resume()
        if self.is_main:
            config.run_dir.mkdir(parents=True, exist_ok=True)
            try:  # a record for people; a full disk is met (and stops the run) at the next checkpoint
                atomic_write_text(config.run_dir / "config.json", json.dumps(config_record(self), indent=2))
            except OSError as err:
                self.metrics.note(f"{config.run_dir / 'config.json'} not written: {err.strerror or err}")
        end = min(config.steps, config.stop_after or config.steps)
        history = []
        self.metrics.start(self.step, end, self.nparams)
        while self.step < end:
            if self.replicas is not None:
                report(self.step, "quorum")
                change = self.replicas.begin_step()  # a replica behind its peers takes their state here
                if change:
                    self.metrics.note(change)
                if self.step >= end:
                    break
            report(self.step, "train step")
            if self.stragglers:
                self.stragglers.step_started()
            t0 = time.perf_counter()
            metrics = self.train_step(self.next_batch(self.step))
            if metrics is None:
                self.metrics.note(f"step {self.step + 1} not committed: a replica was lost during it; taken again")
                continue
            self.step += 1
            seconds = time.perf_counter() - t0
            metrics.update(step=self.step, step_time_s=seconds, tokens_per_s=metrics["tokens"] / seconds)
            if self.replicas is not None:
                metrics.update(replicas=float(self.replicas.live))
            if self.stragglers:
                report(self.step, "straggler check")
                metrics.update(self.stragglers.after_step(self.step, seconds))
            history.append(metrics)
            if self.objective.watches_spikes:
                self.spikes.watch(self.step, metrics)
            self.metrics.log(metrics, console=self.step % config.log_every == 0 or self.step == end)
            maybe_flip_bit(self.model, self.step, dist.get_rank() if dist.is_initialized() else 0)
            if config.check.replicas_every and self.step % config.check.replicas_every == 0:
                report(self.step, "replica check")
                self.check_replicas()
            if config.eval_every and self.step % config.eval_every == 0 and self.step < end:
                report(self.step, "evaluate")
                self.metrics.log_eval(self.step, self.evaluate())
            if config.checkpoint.save_every and self.step % config.checkpoint.save_every == 0 and self.step < end:
                report(self.step, "save")
                self.save()
        if history:
            report(self.step, "final evaluate and save")
            history[-1].update(self.evaluate())
            self.metrics.log_eval(self.step, history[-1])
            path = self.save()
            self.checkpointer.wait()
            self.metrics.note(f"saved checkpoint {path}")
        self.metrics.close()
        return history
