"""What a checkpoint holds besides the weights and optimizer (step, schedules, data position, the
config, the dataset it trained on), and resuming from one: which checkpoint (chosen by rank 0,
loaded by every rank), and the refusal to continue a saved data order over other data; and the same
state handed live to a fault-tolerant replica that joins its peers."""

from __future__ import annotations

from pathlib import Path

import torch.distributed as dist

from common.config import to_dict
from data_pipeline.loader import PackedDataset
from training.checkpoint import (
    NoIntactCheckpointError,
    load_checkpoint,
    remove_unfinished_saves,
    resolve_checkpoint,
)
from training.parallel.replicas import load_local_state, local_state


def dataset_state(dataset: PackedDataset) -> dict:
    """What a checkpoint records of its training data, to recognise other data on resume."""
    return {
        "path": str(dataset.data_dir),
        "tokenizer_hash": dataset.manifest["tokenizer_hash"],
        "seq_len": dataset.manifest["seq_len"],
        "train_fingerprint": dataset.fingerprint,
    }


def config_record(trainer) -> dict:
    """The run config as saved with checkpoints and in the run folder, the objective's section included."""
    record = to_dict(trainer.config)
    mix = getattr(trainer.loader.dataset, "mix", None)
    if mix is not None:  # the mixture as drawn, unset settings resolved from the build
        record["data"]["mix"] = to_dict(mix)
        record["data_mixture"] = trainer.loader.dataset.manifest["family_stats"]  # asked and drawn, per family
    objective = trainer.objective
    if objective.config is not None:
        record[objective.name] = to_dict(objective.config)
    return record


def saved_state(trainer) -> dict:
    """The `Trainer`'s state a checkpoint keeps beside the weights and optimizer (`trainer_state.json`)."""
    dims = trainer.dims
    return {
        "data": trainer.loader.state_dict(trainer.step),
        "scheduler": trainer.scheduler.state_dict(),
        "loss_scaler": trainer.scaler.state_dict(),
        "config": config_record(trainer),
        "layout": {"tp": dims.tp, "pp": dims.pp, "dp": dims.dp, "cp": dims.cp},
        "dataset": dataset_state(trainer.loader.dataset),
    }


def check_same_data(saved: dict, dataset: PackedDataset, path: Path) -> None:
    """Refuse a resume onto other tokens (another tokenizer) or other sequences (another build)."""
    if saved.get("tokenizer_hash") not in (None, dataset.manifest["tokenizer_hash"]):
        raise ValueError(
            f"{path}: the run was trained on data tokenized with {saved['tokenizer_hash']} "
            f"({saved.get('path')}); {dataset.data_dir} was tokenized with {dataset.manifest['tokenizer_hash']}. "
            "Resuming would read other tokens; rebuild the data with the run's tokenizer or start a new run"
        )
    if saved.get("train_fingerprint") not in (None, dataset.fingerprint):
        raise ValueError(
            f"{path}: the run was trained on {saved.get('path')} (training data {saved['train_fingerprint']}); "
            f"{dataset.data_dir} holds other sequences (training data {dataset.fingerprint}). Resuming would "
            "continue the saved data order over other data; to start on it from these weights, begin a new "
            f"run (another name or out_dir) with init_from={path}"
        )


def resume(trainer, which: str | None = None) -> None:
    """Load the `Trainer`'s state from the checkpoint `which` (default: `checkpoint.resume`) names, if any."""
    config, note = trainer.config, trainer.metrics.note
    ckpt_dir = config.run_dir / "checkpoints"
    which = which or config.checkpoint.resume
    choice = [None, None]  # (checkpoint, refusal)
    if trainer.is_main:  # one rank reads and checks the files; every rank loads what it chose, or stops
        remove_unfinished_saves(ckpt_dir, note)
        try:
            choice[0] = resolve_checkpoint(which, ckpt_dir, note)
        except (FileNotFoundError, NoIntactCheckpointError) as err:
            choice[1] = err
    if dist.is_initialized():
        dist.broadcast_object_list(choice, src=0)
    path, refusal = choice
    if refusal is not None:
        raise refusal
    if path is None:
        return
    state = load_checkpoint(path, trainer.model, trainer.optimizer)
    trainer.loader.check_resume(state.get("data", {}), str(path))
    check_same_data(state.get("dataset", {}), trainer.loader.dataset, path)
    restore_position(trainer, state)
    note(f"resumed from {path} at step {trainer.step}")


def restore_position(trainer, state: dict) -> None:
    """The step, the schedule's position and the loss scale, after the optimizer state is loaded."""
    trainer.step = state["step"]
    # Each group's current lr came back with the optimizer state (keyed by parameter), and the group
    # lists differ between pipeline stages, so they are not taken from rank 0.
    position = {k: state["scheduler"][k] for k in ("last_epoch", "_step_count") if k in state["scheduler"]}
    trainer.scheduler.load_state_dict({**trainer.scheduler.state_dict(), **position})
    trainer.scheduler._last_lr = [group["lr"] for group in trainer.optimizer.param_groups]
    trainer.scaler.load_state_dict(state["loss_scaler"])


def replica_state(trainer) -> dict:
    """What a replica joining the fault-tolerant groups receives from this rank (the same rank of a
    live peer): weights and optimizer state as local shards, the step, the schedule, the loss scale."""
    return {
        **local_state(trainer.model, trainer.optimizer),
        "step": trainer.step,
        "scheduler": trainer.scheduler.state_dict(),
        "loss_scaler": trainer.scaler.state_dict(),
    }


def load_replica_state(trainer, state: dict) -> None:
    load_local_state(trainer.model, trainer.optimizer, state)
    restore_position(trainer, state)
    trainer.metrics.note(f"joined the live replicas at step {trainer.step} with their weights and optimizer state")
