"""Model construction: resolve the config, build on the meta device, then give this rank's shards
memory and weights (drawn from the seed, or read from a checkpoint, an HF folder or a .pt file).

No rank ever holds the whole model: the trainer builds it on `meta`, applies pipeline, tensor and
FSDP sharding (`training.parallel`), allocates only the local shards (`to_empty`), and then either
initialises them (`training.models.init`: identical in every layout) or reads them, each rank only
its slice: DCP checkpoints through DCP's own resharding, HF folders through safetensors slices,
`.pt` files through a memory map.
"""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

from common.config import ConfigError, from_dict, keys_given
from training.checkpoint import TRAINER_STATE, find_checkpoint, load_state, saved_run_config
from training.models.hf import CONFIG_FILE, HFWeights, config_from_hf, read_hf_config
from training.models.init import canonical_name, init_weights, local_region
from training.models.phi import PhiConfig, PhiModel

# What shapes the computation of a checkpoint's weights: taken from the checkpoint under init_from.
ARCHITECTURE_FIELDS = (
    "vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn_dim", "norm_eps", "rope_theta",
    "rope_fraction", "longrope", "max_seq_len", "sliding_window", "tie_embeddings",
)  # fmt: skip


def source_model_config(path: str | Path) -> PhiConfig | None:
    """The model config stored with `init_from` weights: an HF folder's config.json or a checkpoint's
    run config; None for a bare .pt file."""
    if find_checkpoint(path) is not None:
        return checkpoint_model_config(path)[1]
    if Path(path, CONFIG_FILE).is_file():
        return config_from_hf(read_hf_config(path), where=str(Path(path) / CONFIG_FILE))
    if not Path(path).exists():
        raise FileNotFoundError(f"init_from={path}: no such checkpoint, HF folder or weights file")
    return None


def checkpoint_model_config(path: str | Path) -> tuple[Path, PhiConfig, dict]:
    """A complete checkpoint (or a run's `checkpoints/`: its latest), the model config it was trained
    with, and its whole run config as saved."""
    found, run_config = saved_run_config(path)
    where = f"{found / TRAINER_STATE}: model"
    return found, from_dict(PhiConfig, run_config["model"], where=where), run_config


def _defaults(given: PhiConfig) -> PhiConfig:
    return PhiConfig.from_preset(given.preset) if given.preset else PhiConfig()


def resolve_model_config(given: PhiConfig, init_from: str | None, data_vocab: int, data_seq_len: int) -> PhiConfig:
    """The model to build. With `init_from`, its architecture comes from the weights' own config, and
    a `model.*` key set to another value is refused naming both. Without a preset, `vocab_size` and
    `max_seq_len` left at their defaults follow the dataset (a preset keeps its own: Phi-4-mini's
    vocabulary is padded past its tokenizer's size). A key counts as set when a file or the command
    line gave it (`keys_given`), even at its default value; for a config built in code, when it
    differs from its default (or its preset's value)."""
    defaults = _defaults(given)
    source = source_model_config(init_from) if init_from else None
    written = keys_given(given)
    if source is not None:
        updates = {}
        for key in ARCHITECTURE_FIELDS:
            mine, theirs = getattr(given, key), getattr(source, key)
            set_by_user = key in written if written is not None else mine != getattr(defaults, key)
            if set_by_user and mine != theirs:
                raise ConfigError(
                    f"model.{key}={mine!r} conflicts with init_from={init_from}, whose model has {key}={theirs!r}; "
                    f"remove model.{key} to adopt it"
                )
            updates[key] = theirs
        return dataclasses.replace(given, **updates, hf_metadata=source.hf_metadata)
    if given.preset is not None:
        return given
    updates = {}
    for key, from_data in (("vocab_size", data_vocab), ("max_seq_len", data_seq_len)):
        left = key not in written if written is not None else getattr(given, key) == getattr(defaults, key)
        if left:
            updates[key] = from_data
    return dataclasses.replace(given, **updates)


def check_fits_dataset(config: PhiConfig, data_dir: Path | str, data_vocab: int, data_seq_len: int) -> None:
    if data_seq_len > config.max_seq_len or data_vocab > config.vocab_size:
        raise ValueError(
            f"{data_dir}: seq_len {data_seq_len} / vocab {data_vocab} exceed model.max_seq_len "
            f"{config.max_seq_len} / model.vocab_size {config.vocab_size}"
        )


def meta_model(config: PhiConfig) -> PhiModel:
    """The whole model's structure with no memory behind it."""
    with torch.device("meta"):
        return PhiModel(config)


def materialize(model: PhiModel, device: torch.device, seed: int, init_from: str | None) -> None:
    """Memory for this rank's shards, then the weights: read from `init_from`, or initialised from
    `seed` identically in every layout."""
    allocate(model, device)
    if init_from:
        load_weights(model, init_from)
    else:
        init_weights(model, seed)


@contextlib.contextmanager
def _swap_params_on_conversion():
    """`to_empty` swaps tensors in place (keeping tied parameters tied and FSDP's references valid)."""
    previous = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        yield
    finally:
        torch.__future__.set_swap_module_params_on_conversion(previous)


def allocate(model: nn.Module, device: torch.device) -> None:
    """Real (uninitialised) memory for the local shards of a model built on the meta device."""
    with _swap_params_on_conversion():
        model.to_empty(device=device)


class TorchFileWeights:
    """Slices of a `python -m training.export ... torch` file, memory-mapped (nothing read up front)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.state = torch.load(self.path, map_location="cpu", weights_only=True, mmap=True)

    def read(self, name: str, index: tuple[slice, ...]) -> torch.Tensor:
        if name not in self.state:
            raise KeyError(f"{self.path}: no tensor {name!r}")
        return self.state[name][index]


@torch.no_grad()
def copy_slices(model: nn.Module, weights) -> None:
    """Fill every local shard from `weights.read(name, global index ranges)`."""
    for name, param in model.named_parameters():
        local, region = local_region(param)
        local.copy_(weights.read(canonical_name(model, name), region))


def load_dcp_weights(model: nn.Module, checkpoint: Path) -> None:
    """Model weights of a DCP checkpoint written by any layout, each rank reading only its shards."""
    set_model_state_dict(model, load_state({"model": get_model_state_dict(model)}, checkpoint)["model"])


def load_weights(model: nn.Module, path: str | Path) -> None:
    """Local shards from a checkpoint (or a run's checkpoints folder), an HF Phi3 folder or a .pt file."""
    checkpoint = find_checkpoint(path)
    if checkpoint is not None:
        load_dcp_weights(model, checkpoint)
    elif Path(path, CONFIG_FILE).is_file():
        copy_slices(model, HFWeights(path, model.config))
    elif Path(path).is_file():
        copy_slices(model, TorchFileWeights(path))
    else:
        raise FileNotFoundError(f"{path}: neither a checkpoint, a checkpoints folder, an HF folder nor a weights file")


def load_model_weights(path: str | Path, model_config: PhiConfig) -> dict[str, torch.Tensor]:
    """Full-model weights in one process from a checkpoint (any layout), a run's `checkpoints/`
    folder, an HF Phi3 folder or a `python -m training.export ... torch` file."""
    model = meta_model(model_config)
    materialize(model, torch.device("cpu"), seed=0, init_from=str(path))
    return model.state_dict()


def checkpoint_tensors(checkpoint: Path, model_config: PhiConfig):
    """A function reading named full-model tensors from a DCP checkpoint on demand, so a consumer
    (the HF export) holds only what it asked for."""
    shapes = {name: t.shape for name, t in meta_model(model_config).state_dict().items()}

    def read(names: list[str]) -> dict[str, torch.Tensor]:
        request = {name: torch.empty(shapes[name]) for name in names}
        return load_state({"model": request}, checkpoint, no_dist=True)["model"]

    return read
