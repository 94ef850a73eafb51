"""FlexAttention backend (`model.attn_backend: flex`): the same masks as our kernels, as block masks.

PyTorch's FlexAttention compiles a fused kernel from a `mask_mod`; its block mask lets it skip key
blocks that are wholly masked, as our kernels do. The masks: causal, the sliding window, packed
documents (same document id) and S2 (the per-KV-head block mask of `kernels.patterns`, looked up
by the query head's KV head). It is the peer to compare our Triton kernels with on a GPU.

On CUDA it is compiled (forward and backward). On CPU PyTorch runs it eagerly and forward only
(torch 2.13 refuses inputs that require grad): use it there for evaluation and generation; training
on CPU with `flex` is refused with that reason.
"""

from __future__ import annotations

from functools import lru_cache

import torch
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

DENSE_BLOCK = 128  # FlexAttention's default tile


def flex_block_mask(
    doc_ids: torch.Tensor | None,
    seq_len: int,
    device: torch.device,
    window: int | None = None,
    s2_block: torch.Tensor | None = None,
    s2_block_size: int = 64,
    group: int = 1,
) -> BlockMask:
    """The block mask of causal attention inside documents, a sliding `window` and, with
    `s2_block` ([hkv, qb, kb] booleans), S2's pattern for query heads h (KV head h // group)."""

    def mask_mod(b, h, q_idx, kv_idx):
        allowed = q_idx >= kv_idx
        if window is not None:
            allowed = allowed & (q_idx - kv_idx < window)
        if doc_ids is not None:
            allowed = allowed & (doc_ids[b, q_idx] == doc_ids[b, kv_idx])
        if s2_block is not None:
            allowed = allowed & s2_block[h // group, q_idx // s2_block_size, kv_idx // s2_block_size]
        return allowed

    batch = doc_ids.shape[0] if doc_ids is not None else None
    heads = s2_block.shape[0] * group if s2_block is not None else None
    # Flex's compiled tiles must divide the mask's blocks (torch 2.11 on an H200 refused 64-token
    # blocks under its 128-token tiles): S2 blocks smaller than a tile are resolved by mask_mod.
    block = s2_block_size if s2_block is not None and s2_block_size % DENSE_BLOCK == 0 else DENSE_BLOCK
    # On CUDA the mask is built by a compiled kernel, never as a [seq, seq] tensor (128K tokens fit).
    on_gpu = torch.device(device).type == "cuda"
    return create_block_mask(mask_mod, batch, heads, seq_len, seq_len, device, BLOCK_SIZE=block, _compile=on_gpu)


@lru_cache(maxsize=1)
def _compiled_flex():
    return torch.compile(flex_attention, dynamic=False)


def flex_attention_bshd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    doc_ids: torch.Tensor | None = None,
    window: int | None = None,
    s2_block: torch.Tensor | None = None,
    s2_block_size: int = 64,
) -> torch.Tensor:
    """q [b, s, hq, d], k/v [b, s, hkv, d] -> [b, s, hq, d] through FlexAttention (GQA without repeats)."""
    if q.device.type == "cpu":
        if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
            raise NotImplementedError(
                "attn_backend 'flex': PyTorch's FlexAttention has no backward on CPU (torch "
                f"{torch.__version__}); train with it on a GPU, or use it on CPU under torch.no_grad() "
                "(evaluation, generation). On CPU, train with attn_backend sdpa or triton"
            )
        q, k, v = q.detach(), k.detach(), v.detach()  # PyTorch refuses leaves that require grad, even here
    group = q.shape[2] // k.shape[2]
    if s2_block is not None:
        s2_block = s2_block.to(q.device)
    mask = flex_block_mask(doc_ids, q.shape[1], q.device, window, s2_block, s2_block_size, group)
    run = _compiled_flex() if q.device.type == "cuda" else flex_attention  # CPU: eager, forward only
    out = run(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=mask, enable_gqa=True)
    return out.transpose(1, 2)
