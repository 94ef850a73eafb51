"""Give a model built on the meta device real weights, one rank's shards at a time.

No rank ever holds the whole model: the trainer builds it on `meta`, applies pipeline, tensor and
FSDP sharding, allocates only the local shards (`to_empty`), and then either initialises them or
reads them from a file. Both work on "the region of the full tensor this rank holds", which a
DTensor describes by its placements:

- initialisation draws each parameter's rows in fixed blocks, each block from a generator seeded by
  (seed, parameter name, block), so every layout produces bit-identical initial weights;
- loading reads only the rank's slice: DCP checkpoints through DCP's own resharding, HF folders
  through safetensors slices, `.pt` files through a memory map.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from pathlib import Path

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

ROWS_PER_DRAW = 256  # rows drawn from one generator: any shard's rows can be drawn without the others


def local_region(param: torch.Tensor) -> tuple[torch.Tensor, tuple[slice, ...]]:
    """This rank's piece of a (possibly sharded) parameter and the global index ranges it covers."""
    if isinstance(param, DTensor):
        shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
        return param.to_local(), tuple(slice(o, o + n) for o, n in zip(offset, shape, strict=True))
    return param, tuple(slice(0, n) for n in param.shape)


def _seed(seed: int, name: str, block: int) -> int:
    digest = hashlib.sha256(f"{seed}/{name}/{block}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _fill_normal(out: torch.Tensor, name: str, seed: int, std: float, full_shape: torch.Size, region) -> None:
    """Write N(0, std) values of `region` of a full tensor, whose rows come in seeded blocks, into
    `out` one block at a time (no second copy of the shard)."""
    rows, rest = region[0], region[1:]
    row_len = math.prod(full_shape[1:])
    for block in range(rows.start // ROWS_PER_DRAW, -(-rows.stop // ROWS_PER_DRAW)):
        lo, hi = block * ROWS_PER_DRAW, min((block + 1) * ROWS_PER_DRAW, full_shape[0])
        generator = torch.Generator().manual_seed(_seed(seed, name, block))
        values = torch.empty(hi - lo, row_len).normal_(0.0, std, generator=generator).view(hi - lo, *full_shape[1:])
        first, last = max(lo, rows.start), min(hi, rows.stop)
        out[first - rows.start : last - rows.start].copy_(values[first - lo : last - lo][(slice(None), *rest)])


# Tied embeddings: a pipeline's last stage holds its own copy of the embedding as `output.weight`.
TIED_COPY, TIED_SOURCE = "output.weight", "tok_embeddings.weight"


def canonical_name(model: nn.Module, name: str) -> str:
    """The name a parameter's values are drawn and stored under (a tied copy's is the embedding's)."""
    if getattr(model.config, "tie_embeddings", False) and name == TIED_COPY:
        return TIED_SOURCE
    return name


@torch.no_grad()
def init_weights(model: nn.Module, seed: int) -> None:
    """Initialise every local shard as `model.init_std(name)` says (None: ones), identically in any layout."""
    for name, param in model.named_parameters():
        name = canonical_name(model, name)
        local, region = local_region(param)
        std = model.init_std(name)
        if std is None:
            local.fill_(1.0)
        else:
            _fill_normal(local, name, seed, std, param.shape, region)


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
    from training.checkpoint import load_state

    set_model_state_dict(model, load_state({"model": get_model_state_dict(model)}, checkpoint)["model"])


def load_weights(model: nn.Module, path: str | Path) -> None:
    """Local shards from a checkpoint (or a run's checkpoints folder), an HF Phi3 folder or a .pt file."""
    from training.checkpoint import find_checkpoint
    from training.models.hf import CONFIG_FILE, HFWeights

    checkpoint = find_checkpoint(path)
    if checkpoint is not None:
        load_dcp_weights(model, checkpoint)
    elif Path(path, CONFIG_FILE).is_file():
        copy_slices(model, HFWeights(path, model.config))
    elif Path(path).is_file():
        copy_slices(model, TorchFileWeights(path))
    else:
        raise FileNotFoundError(f"{path}: neither a checkpoint, a checkpoints folder, an HF folder nor a weights file")
