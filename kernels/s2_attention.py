"""S2-Attention: each KV head reads its local window plus its own strided shard of the past.

Training and prefill use the block-sparse Triton kernel (only the allowed key blocks are read);
decoding with a KV cache gathers only the allowed blocks of the cache.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch

from kernels.patterns import S2Pattern, block_mask, window_block_mask


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
    q, k, v, heads: S2Heads, doc_ids: torch.Tensor | None = None, return_lse: bool = False, window: int | None = None
):
    """Block-sparse causal GQA attention (Triton). q [b, s, hq, d], k/v [b, s, hkv, d]."""
    from kernels.flash_gqa import flash_attention

    num_blocks = math.ceil(q.shape[1] / heads.pattern.block_size)
    lists = _list_tensors(heads, k.shape[2], num_blocks, q.device, window)
    block = heads.pattern.block_size
    return flash_attention(q, k, v, doc_ids, lists=lists, block=block, return_lse=return_lse, window=window)


def s2_decode_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, heads: S2Heads, window: int | None = None
) -> torch.Tensor:
    """One new token per sequence attending to a KV cache [b, t, hkv, d] (its own K/V included, at
    position t - 1). Reads only the key blocks the pattern allows for the token's query block (and,
    with a sliding `window`, only its last `window` positions)."""
    b, t, hkv, d = k_cache.shape
    group = q.shape[2] // hkv
    block = heads.pattern.block_size
    row = heads.mask(hkv, t, window)[:, (t - 1) // block]  # [hkv, key blocks]
    first = 0 if window is None else t - window
    out = torch.empty_like(q)
    for h in range(hkv):
        blocks = row[h].nonzero().flatten()
        pos = (blocks[:, None] * block + torch.arange(block)).flatten()
        pos = pos[(pos < t) & (pos >= first)].to(k_cache.device)
        keys, values = k_cache[:, pos, h].float(), v_cache[:, pos, h].float()  # [b, n, d]
        queries = q[:, 0, h * group : (h + 1) * group].float()  # [b, group, d]
        probs = torch.softmax(queries @ keys.transpose(1, 2) / math.sqrt(d), dim=-1)
        out[:, 0, h * group : (h + 1) * group] = (probs @ values).to(q.dtype)
    return out
