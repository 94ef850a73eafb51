"""S2-Attention: each KV head reads its local window plus its own strided shard of the past.

Training and prefill use the block-sparse Triton kernel (only the allowed key blocks are read);
decoding with a KV cache gathers only the allowed blocks of the cache.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch

from kernels.patterns import S2Pattern, block_mask, strided_blocks, window_block_mask


@dataclass(frozen=True)
class S2Heads:
    """A pattern plus which global KV heads this module holds (tensor parallel keeps a slice)."""

    pattern: S2Pattern
    num_kv_heads: int  # in the whole model, which sets the heads' shard offsets
    head_start: int = 0

    def mask(self, num_local_heads: int, seq_len: int, window: int | None = None) -> torch.Tensor:
        """Block mask [heads, qb, kb]; with a sliding `window`, blocks wholly outside it are dropped."""
        return _cached_mask(self, num_local_heads, math.ceil(seq_len / self.pattern.block_size), window)


@lru_cache(maxsize=64)
def _cached_mask(heads: S2Heads, num_local_heads: int, num_blocks: int, window: int | None) -> torch.Tensor:
    mask = block_mask(heads.pattern, heads.num_kv_heads, num_blocks, heads.head_start, num_local_heads)
    if window is not None:
        mask = mask & window_block_mask(num_blocks, heads.pattern.block_size, window)
    return mask


@lru_cache(maxsize=64)
def _cached_lists(heads: S2Heads, num_local_heads: int, num_blocks: int, device: torch.device, window: int | None):
    from kernels.flash_gqa import SparsityLists

    return SparsityLists(_cached_mask(heads, num_local_heads, num_blocks, window), device)


@torch.compiler.assume_constant_result
def _list_tensors(heads: S2Heads, num_local_heads: int, num_blocks: int, device: torch.device, window: int | None):
    """The kernels' block lists: fixed by the shapes, so torch.compile takes them as constants
    instead of tracing the mask's construction into every step's graph."""
    return _cached_lists(heads, num_local_heads, num_blocks, device, window).tensors()


def s2_attention(
    q,
    k,
    v,
    heads: S2Heads,
    doc_ids: torch.Tensor | None = None,
    return_lse: bool = False,
    window: int | None = None,
    q_offset: int = 0,
):
    """Block-sparse causal GQA attention (Triton). q [b, sq, hq, d], k/v [b, sk, hkv, d]; query row r
    at position `q_offset` + r (see `flash_attention`)."""
    from kernels.flash_gqa import flash_attention

    num_blocks = math.ceil(k.shape[1] / heads.pattern.block_size)
    lists = _list_tensors(heads, k.shape[2], num_blocks, q.device, window)
    block = heads.pattern.block_size
    return flash_attention(
        q, k, v, doc_ids, lists=lists, block=block, return_lse=return_lse, window=window, q_offset=q_offset
    )


def s2_decode_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, heads: S2Heads, window: int | None = None
) -> torch.Tensor:
    """One new token per sequence attending to a KV cache [b, t, hkv, d] (its own K/V included, at
    position t - 1). Reads only the key blocks the pattern allows for the token's query block (and,
    with a sliding `window`, only its last `window` positions)."""
    t, hkv = k_cache.shape[1], k_cache.shape[2]
    block = heads.pattern.block_size
    row = heads.mask(hkv, t, window)[:, (t - 1) // block]  # [hkv, key blocks]
    first = 0 if window is None else t - window

    def read(h: int) -> tuple[torch.Tensor, torch.Tensor]:
        blocks = row[h].nonzero().flatten()
        pos = (blocks[:, None] * block + torch.arange(block)).flatten()
        pos = pos[(pos < t) & (pos >= first)].to(k_cache.device)
        return k_cache[:, pos, h], v_cache[:, pos, h]

    return _decode_heads(q, hkv, read)


def _decode_heads(q: torch.Tensor, hkv: int, read) -> torch.Tensor:
    """One token's attention (q [b, 1, hq, d]) per KV head over the keys and values [b, n, d] that
    `read(head)` gives, in fp32; each KV head serves its group of query heads."""
    d, group = q.shape[-1], q.shape[2] // hkv
    out = torch.empty_like(q)
    for h in range(hkv):
        keys, values = (x.float() for x in read(h))
        queries = q[:, 0, h * group : (h + 1) * group].float()  # [b, group, d]
        probs = torch.softmax(queries @ keys.transpose(1, 2) / math.sqrt(d), dim=-1)
        out[:, 0, h * group : (h + 1) * group] = (probs @ values).to(q.dtype)
    return out


class S2LayerCache:
    """The KV cache of one S2 layer, keeping per KV head only the key blocks that the newest query or
    any later one can still read: the head's strided shard (every such block, for ever) and the
    last `local_blocks` blocks; a block that has left the local window and is not in the shard is
    dropped for good. Every head keeps its own positions, in order, in its own rows. Decoding reads
    exactly what `s2_decode_attention` reads from a full cache, in the same order, so the outputs
    are the same; memory grows as 1 / vert_stride of the positions."""

    def __init__(self, max_len: int, heads: S2Heads):
        self.max_len, self.heads, self.length = max_len, heads, 0
        self.keys = self.values = self.positions = None
        self.counts: list[int] = []

    @staticmethod
    def capacity(max_len: int, heads: S2Heads, num_local_heads: int) -> int:
        """Positions per head the cache allocates: the largest shard plus the local window and the
        block being filled."""
        return _capacity(max_len, heads, _shard(heads, num_local_heads, max_len))

    @property
    def bytes(self) -> int:
        return 0 if self.keys is None else 2 * self.keys.numel() * self.keys.element_size()

    def _keep(self, head: int, positions: torch.Tensor, newest_block: int) -> torch.Tensor:
        blocks = positions // self.heads.pattern.block_size
        return self._shard[head, blocks] | (blocks > newest_block - self.heads.pattern.local_blocks)

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Add positions length .. length + s - 1 (k, v [b, s, hkv, d]) and drop what no query from
        the newest one on can read."""
        b, s, hkv, d = k.shape
        if self.keys is None:
            shard = _shard(self.heads, hkv, self.max_len)
            capacity = _capacity(self.max_len, self.heads, shard)
            self.keys = k.new_zeros(b, hkv, capacity, d)
            self.values = torch.zeros_like(self.keys)
            self.positions = torch.full((hkv, capacity), -1, dtype=torch.long, device=k.device)
            self.counts = [0] * hkv
            self._shard = shard.to(k.device)
        end = self.length + s
        if end > self.max_len:
            raise ValueError(f"KV cache full: {end} positions > max_len {self.max_len}")
        newest = (end - 1) // self.heads.pattern.block_size
        new = torch.arange(self.length, end, device=k.device)
        for h in range(hkv):
            count = self.counts[h]
            keep = self._keep(h, self.positions[h, :count], newest).nonzero().flatten()
            if len(keep) < count:  # compact: kept rows move to the front, in order
                self.keys[:, h, : len(keep)] = self.keys[:, h, keep]
                self.values[:, h, : len(keep)] = self.values[:, h, keep]
                self.positions[h, : len(keep)] = self.positions[h, keep]
                count = len(keep)
            fresh = self._keep(h, new, newest).nonzero().flatten()
            self.keys[:, h, count : count + len(fresh)] = k[:, fresh, h]
            self.values[:, h, count : count + len(fresh)] = v[:, fresh, h]
            self.positions[h, count : count + len(fresh)] = new[fresh]
            self.counts[h] = count + len(fresh)
        self.length = end

    def decode(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None = None) -> torch.Tensor:
        """Append the new token's K/V, then its attention (q [b, 1, hq, d]) over what each head kept,
        within the last `window` positions when there is a sliding window."""
        self.append(k, v)
        first = 0 if window is None else self.length - window

        def read(h: int) -> tuple[torch.Tensor, torch.Tensor]:
            rows = slice(0, self.counts[h])
            inside = self.positions[h, rows] >= first
            return self.keys[:, h, rows][:, inside], self.values[:, h, rows][:, inside]

        return _decode_heads(q, self.keys.shape[1], read)


def _shard(heads: S2Heads, num_local_heads: int, max_len: int) -> torch.Tensor:
    """[local heads, blocks of max_len]: which key blocks each head may read from any later query block."""
    local = torch.arange(heads.head_start, heads.head_start + num_local_heads)
    blocks = torch.arange(math.ceil(max_len / heads.pattern.block_size))
    return strided_blocks(heads.pattern, heads.num_kv_heads, local, blocks)


def _capacity(max_len: int, heads: S2Heads, shard: torch.Tensor) -> int:
    largest = int(shard.sum(-1).max())
    return min(max_len, (largest + heads.pattern.local_blocks + 1) * heads.pattern.block_size)
