"""The construction of a training run, as steps that each return what they build; `build_trainer`
shows their order: layout -> data -> model config -> mesh -> loaders -> model (meta, parallelize,
materialise) -> optimizer and LR schedule -> checkpointer -> metrics -> the loop."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from data_pipeline.loader import DataLoader, PackedDataset
from data_pipeline.mixed import MixConfig, MixedDataset
from data_pipeline.remote import cached_dataset
from data_pipeline.shards import read_manifest
from data_pipeline.tokenizer import load_tokenizer, tokenizer_hash
from kernels.attention import training_problem
from training.checkpoint import Checkpointer
from training.config import TrainConfig
from training.metrics import MetricsLogger
from training.model_setup import check_fits_dataset, materialize, meta_model, resolve_model_config
from training.models.phi import count_params_and_flops
from training.objective import Objective
from training.optim import build_optimizer, build_scheduler, resolve_lr
from training.parallel.mesh import ParallelDims, device_type
from training.parallel.parallelize import ParallelModel, parallelize
from training.parallel.replicas import ReplicaGroups, lighthouse_address
from training.plan import choose_layout
from training.precision import PRECISIONS
from training.run_state import load_replica_state, replica_state
from training.trainer import Layout, Trainer


@dataclass
class Data:
    train: DataLoader
    valid: DataLoader | None  # None: a split smaller than one global batch is not evaluated
    note: str | None  # why there is no evaluation, if there is none


def open_split(
    config: TrainConfig, data_dir: Path, split: str, expected_tokenizer: str
) -> PackedDataset | MixedDataset:
    """A split of the dataset in `data_dir`. A pretraining build is read from its token store, mixed
    and packed here (`data.mix`; unset: as the build planned); a dataset without a store, as
    post-training data (SFT rows with loss masks, DPO pairs) or a build from before stores, from its
    packed rows."""
    if "store" in read_manifest(data_dir) or config.data.mix is not None:
        mix = config.data.mix or MixConfig()
        return MixedDataset(data_dir, mix, split, expected_tokenizer, cache_dir=config.data.cache_dir)
    return PackedDataset(data_dir, split, tokenizer_hash=expected_tokenizer)


def open_train_split(config: TrainConfig) -> PackedDataset | MixedDataset:
    """The training split of `data.path` (an object store's dataset: of this node's cached copy)."""
    data_dir = cached_dataset(config.data.path, config.data.cache_dir)
    return open_split(config, data_dir, "train", tokenizer_hash(load_tokenizer(data_dir)))


def replica_groups(config: TrainConfig) -> tuple[int, int]:
    """(this launch's index, how many launches) among fault-tolerant replica groups; (0, 1) without."""
    ft = config.fault_tolerance
    return (ft.replica_id, ft.replicas) if ft.enable else (0, 1)


def build_layout(config: TrainConfig, dims: ParallelDims, device: torch.device) -> Layout:
    """The device mesh, this rank's coordinates on it, and micro-batches per step."""
    mesh = dims.build_mesh(device.type)
    pp_rank, dp_rank, cp_rank, tp_rank = dims.coordinates(mesh)
    global_batch, micro = config.data.global_batch_size, config.parallel.micro_batch_size
    replicas = replica_groups(config)[1]
    local_batch, rem = divmod(global_batch, dims.dp * replicas)
    n_microbatches, rem2 = divmod(local_batch, micro)
    if rem or rem2 or n_microbatches == 0:
        groups = f" x fault_tolerance.replicas ({replicas})" if replicas > 1 else ""
        raise ValueError(
            f"data.global_batch_size={global_batch} must be a multiple of dp ({dims.dp}){groups} x "
            f"parallel.micro_batch_size ({micro})"
        )
    return Layout(dims, mesh, device, pp_rank, dp_rank, cp_rank, tp_rank, n_microbatches)


def build_data(config: TrainConfig, train, layout: Layout, rows_per_sample: int) -> Data:
    """Loaders of both splits, each global batch split across data-parallel replicas only; a training
    batch also across fault-tolerant replica groups (each evaluates the whole valid split)."""
    batch, dp_rank, dp = config.data.global_batch_size, layout.dp_rank, layout.dims.dp
    group, groups = replica_groups(config)
    loader = DataLoader(train, batch, group * dp + dp_rank, groups * dp, config.data.seed, rows_per_sample)
    valid = open_split(config, train.data_dir, "valid", train.manifest["tokenizer_hash"])
    if len(valid) < batch:
        note = f"no evaluation: {train.data_dir} has {len(valid)} valid rows, fewer than one global batch"
        return Data(loader, None, note)
    return Data(loader, DataLoader(valid, batch, dp_rank, dp, 0, rows_per_sample), None)


def mixture_notes(train) -> list[str]:
    """With `data.mix`: each family's asked and drawn share, and what the draw could not do."""
    if not isinstance(train, MixedDataset):
        return []
    shares = ", ".join(f"{f} {s['ratio']:.1%} -> {s['share']:.1%}" for f, s in train.manifest["family_stats"].items()
                       if s["share"] > 0)  # fmt: skip
    return [f"data mix (asked -> drawn): {shares}", *(f"warning: {w}" for w in train.warnings)]


def build_model(config: TrainConfig, layout: Layout, seq_len: int) -> ParallelModel:
    """No rank ever holds the whole model: structure on `meta`, sharding, then local memory and weights."""
    model = meta_model(config.model)
    parallel = parallelize(
        model,
        config.parallel,
        layout.dims,
        layout.mesh,
        layout.device,
        seq_len,
        config.activation_checkpointing,
        config.compile,
        PRECISIONS.get(config.precision),
    )
    materialize(model, layout.device, config.seed, config.init_from)
    return parallel


def check_run(config: TrainConfig, objective: Objective, world: int) -> ParallelDims:
    """What can be refused before any process group starts, so every rank says it alike and none waits
    for a peer that has left: the objective's needs, the attention backend on this device, the layout
    against the world size."""
    objective.check(config)
    problem = training_problem(config.model.attn_backend, device_type())
    if problem:
        raise ValueError(problem)
    if config.fault_tolerance.enable:
        lighthouse_address(config.fault_tolerance)
        if objective.name != "lm":
            raise ValueError(
                f"fault_tolerance.enable: replica groups train the lm objective only (this run's is "
                f"{objective.name}: its batches are made per data-parallel rank, not per replica group)"
            )
    return ParallelDims.from_config(config.parallel, world)


def build_trainer(config: TrainConfig, objective: Objective) -> Trainer:
    """Every part of a run, in order, for this rank; `objective` says what is optimised."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    dims = check_run(config, objective, world)
    train = open_train_split(config)
    vocab, seq_len = train.manifest["vocab_size"], train.manifest["seq_len"]
    mc = config.model = resolve_model_config(config.model, config.init_from, vocab, seq_len)
    mixed_len = config.data.mix is not None and config.data.mix.seq_len is not None
    where = f"{train.data_dir} (data.mix.seq_len)" if mixed_len else train.data_dir
    check_fits_dataset(mc, where, vocab, seq_len)
    auto_note = None
    if config.parallel.auto:
        config.parallel, config.activation_checkpointing, auto_note = choose_layout(config, mc, seq_len, world)
        dims = ParallelDims.from_config(config.parallel, world)
    dims.check_model(mc.n_heads, mc.n_kv_heads, mc.n_layers, mc.vocab_size)
    layout = build_layout(config, dims, torch.device(device_type(), int(os.environ.get("LOCAL_RANK", 0))))
    data = build_data(config, train, layout, objective.rows_per_sample)
    parallel = build_model(config, layout, seq_len)
    nparams, flops_per_token = count_params_and_flops(mc, seq_len)
    peak_lr, lr_note = resolve_lr(config.optim, nparams, config.steps * config.data.global_batch_size * seq_len)
    optimizer = build_optimizer(parallel.model, config.optim, peak_lr)
    scheduler = build_scheduler(optimizer, config.steps, config.optim)
    ckpt = config.checkpoint
    checkpointer = Checkpointer(config.run_dir / "checkpoints", ckpt.keep_last, ckpt.async_save)
    is_main = not dist.is_initialized() or dist.get_rank() == 0
    metrics = MetricsLogger(
        config.run_dir, train.families, flops_per_token, enabled=is_main, console=objective.console_metrics
    )
    for note in (auto_note, lr_note, data.note, *mixture_notes(train)):
        if note:
            metrics.note(note)
    trainer = Trainer(config, objective, layout, data.train, data.valid, parallel, optimizer, scheduler,
                      checkpointer, metrics, nparams)  # fmt: skip
    if config.fault_tolerance.enable:
        trainer.replicas = ReplicaGroups(config.fault_tolerance, layout.device, lambda: replica_state(trainer),
                                         lambda state: load_replica_state(trainer, state))  # fmt: skip
    objective.attach(trainer)
    return trainer
