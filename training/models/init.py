"""How a model's weights are first drawn, identically in every parallel layout.

Each parameter's rows are drawn in fixed blocks, each block from a generator seeded by (seed,
parameter name, block), so a rank that holds a shard of a parameter (a DTensor under tensor
parallel or FSDP) draws exactly the rows of the full tensor it covers: any layout starts from
bit-identical weights, and no rank ever draws the whole tensor.
"""

from __future__ import annotations

import hashlib
import math

import torch
from torch import nn
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
