"""S2-Attention sparsity patterns as data: which key blocks each query block of each KV head may read.

One function builds the block mask; the Triton kernel, the PyTorch reference, the decode path and
the tests all consume it. Block-level rule for KV head `h` (global index), query block `q`, key
block `k` (DKernel):

    allowed(h, q, k) = q >= k and (q - k < local_blocks or (k + h * step + head_offset) % vert_stride == 0)
    step = max(1, vert_stride // num_kv_heads)

Each head reads a local window plus its own strided shard of the past; when num_kv_heads >=
vert_stride the shards of all heads together cover every causal block.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class S2Pattern:
    block_size: int = 64
    local_blocks: int = 16
    vert_stride: int = 8
    head_offset: int = 0
    homogeneous: bool = False  # every head uses head 0's shard
    dense_heads: tuple[int, ...] = ()  # global KV heads that attend to every causal block

    def __post_init__(self):
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise ValueError(f"s2.block_size must be a power of two >= 16, got {self.block_size}")
        if self.local_blocks < 1 or self.vert_stride < 1:
            raise ValueError(
                f"s2.local_blocks and s2.vert_stride must be >= 1, got {self.local_blocks}, {self.vert_stride}"
            )


def block_mask(
    pattern: S2Pattern, num_kv_heads: int, num_blocks: int, head_start: int = 0, num_local_heads: int | None = None
) -> torch.Tensor:
    """Boolean [heads, q_blocks, k_blocks] for global KV heads head_start .. head_start + num_local_heads.

    Tensor parallelism passes its rank's `head_start` so each rank keeps its own heads' patterns."""
    num_local_heads = num_kv_heads if num_local_heads is None else num_local_heads
    blocks = torch.arange(num_blocks)
    q, k = blocks[None, :, None], blocks[None, None, :]
    shard = strided_blocks(pattern, num_kv_heads, torch.arange(head_start, head_start + num_local_heads), blocks)
    return (q >= k) & ((q - k < pattern.local_blocks) | shard[:, None, :])


def strided_blocks(pattern: S2Pattern, num_kv_heads: int, heads: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """Boolean [heads, blocks]: whether each (global) KV head may read each key block from any later
    query block: its strided shard, or every block for a dense head."""
    step = max(1, pattern.vert_stride // num_kv_heads)
    shard_heads = torch.zeros_like(heads) if pattern.homogeneous else heads
    strided = (blocks[None, :] + shard_heads[:, None] * step + pattern.head_offset) % pattern.vert_stride == 0
    dense = torch.tensor([h in pattern.dense_heads for h in heads.tolist()], dtype=torch.bool)[:, None]
    return strided | dense


def window_block_mask(num_blocks: int, block_size: int, window: int) -> torch.Tensor:
    """Boolean [qb, kb]: some query of block qb may read some key of block kb under a sliding window
    (query i reads key j when 0 <= i - j < window). The nearest pair is (qb * B, kb * B + B - 1)."""
    q = torch.arange(num_blocks)[:, None]
    k = torch.arange(num_blocks)[None, :]
    return (q >= k) & ((q - k) * block_size - (block_size - 1) < window)


def block_lists(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per (head, row): the allowed column indices, ascending, padded with 0, and their count.

    For a forward mask [h, q, k] rows are query blocks; pass `mask.transpose(1, 2)` to get, per key
    block, the query blocks that read it (what the backward pass for dK/dV iterates)."""
    counts = mask.sum(-1).to(torch.int32)
    width = max(1, int(counts.max()))
    columns = torch.arange(mask.shape[-1]).expand_as(mask)
    keyed = torch.where(mask, columns, mask.shape[-1] + columns)  # allowed first, in order
    index = keyed.sort(dim=-1).values[..., :width]
    index = torch.where(index < mask.shape[-1], index, 0).to(torch.int32)
    return index.contiguous(), counts.contiguous()


def token_mask(block: torch.Tensor, seq_len: int, block_size: int) -> torch.Tensor:
    """Expand a block mask [h, qb, kb] to tokens [h, s, s], causal inside the diagonal blocks."""
    pos = torch.arange(seq_len, device=block.device)
    expanded = block[:, pos[:, None] // block_size, pos[None, :] // block_size]
    return expanded & (pos[None, :] <= pos[:, None])


def density(mask: torch.Tensor) -> float:
    """Share of causal blocks the pattern reads (1.0 = dense)."""
    n = mask.shape[-1]
    return float(mask.sum()) / (mask.shape[0] * n * (n + 1) / 2)
