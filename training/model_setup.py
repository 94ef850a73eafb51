"""Model construction as its own step: resolve the config, build on the meta device, apply
pipeline / tensor / FSDP sharding, then give only the local shards memory and weights.

Order as in torchtitan: pipeline stages -> tensor parallel -> activation checkpointing ->
torch.compile -> FSDP -> allocate -> initialise or load.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from data_pipeline.config import ConfigError, from_dict
from training.materialize import allocate, init_weights, load_weights
from training.models.phi import PhiConfig, PhiModel

# What shapes the computation of a checkpoint's weights: taken from the checkpoint under init_from.
ARCHITECTURE_FIELDS = (
    "vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn_dim", "norm_eps", "rope_theta",
    "rope_fraction", "longrope", "max_seq_len", "sliding_window", "tie_embeddings",
)  # fmt: skip


def source_model_config(path: str | Path) -> PhiConfig | None:
    """The model config stored with `init_from` weights: an HF folder's config.json or a checkpoint's
    run config; None for a bare .pt file."""
    from training.checkpoint import TRAINER_STATE, find_checkpoint
    from training.models.hf import CONFIG_FILE, config_from_hf, read_hf_config

    checkpoint = find_checkpoint(path)
    if checkpoint is not None:
        state_file = checkpoint / TRAINER_STATE
        return from_dict(PhiConfig, json.loads(state_file.read_text())["config"]["model"], where=f"{state_file}: model")
    if Path(path, CONFIG_FILE).is_file():
        return config_from_hf(read_hf_config(path), where=str(Path(path) / CONFIG_FILE))
    if not Path(path).exists():
        raise FileNotFoundError(f"init_from={path}: no such checkpoint, HF folder or weights file")
    return None


def _defaults(given: PhiConfig) -> PhiConfig:
    return PhiConfig.from_preset(given.preset) if given.preset else PhiConfig()


def resolve_model_config(given: PhiConfig, init_from: str | None, data_vocab: int, data_seq_len: int) -> PhiConfig:
    """The model to build. With `init_from`, its architecture comes from the weights' own config, and
    a `model.*` key set to another value is refused naming both. Without a preset, `vocab_size` and
    `max_seq_len` left at their defaults follow the dataset (a preset keeps its own: Phi-4-mini's
    vocabulary is padded past its tokenizer's size). A key counts as set when it differs from its
    default (or its preset's value)."""
    defaults = _defaults(given)
    source = source_model_config(init_from) if init_from else None
    if source is not None:
        updates = {}
        for key in ARCHITECTURE_FIELDS:
            mine, theirs = getattr(given, key), getattr(source, key)
            if mine != getattr(defaults, key) and mine != theirs:
                raise ConfigError(
                    f"model.{key}={mine!r} conflicts with init_from={init_from}, whose model has {key}={theirs!r}; "
                    f"remove model.{key} to adopt it"
                )
            updates[key] = theirs
        return dataclasses.replace(given, **updates, hf_metadata=source.hf_metadata)
    if given.preset is not None:
        return given
    updates = {}
    if given.vocab_size == defaults.vocab_size:
        updates["vocab_size"] = data_vocab
    if given.max_seq_len == defaults.max_seq_len:
        updates["max_seq_len"] = data_seq_len
    return dataclasses.replace(given, **updates)


def check_fits_dataset(config: PhiConfig, data_dir: Path, data_vocab: int, data_seq_len: int) -> None:
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
