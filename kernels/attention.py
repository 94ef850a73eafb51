"""The one attention entry point the model calls; `backend` picks the implementation.

| backend      | dense GQA                          | S2 layers                               |
|--------------|------------------------------------|-----------------------------------------|
| `triton`     | `flash_gqa` kernel                 | block-sparse kernel (skips masked blocks) |
| `flash_attn` | flash-attn 2 (varlen for documents)| the Triton kernel                        |
| `flex`       | FlexAttention (block mask)         | FlexAttention with S2's block mask       |
| `sdpa`       | PyTorch SDPA                       | SDPA with the S2 mask (no speed-up)      |
| `reference`  | plain PyTorch                      | plain PyTorch with the S2 mask           |
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.reference import document_causal_mask, reference_attention, reference_s2_attention, s2_token_mask
from kernels.s2_attention import S2Heads, s2_attention, s2_decode_attention

BACKENDS = ("sdpa", "reference", "triton", "flash_attn", "flex")


def sdpa_attention(
    q, k, v, doc_ids: torch.Tensor | None, mask: torch.Tensor | None = None, window: int | None = None
) -> torch.Tensor:
    """PyTorch SDPA (flash / memory-efficient / math, chosen by PyTorch); GQA without repeating K/V."""
    if mask is None and (doc_ids is not None or window is not None):
        mask = document_causal_mask(doc_ids, q.shape[1], q.device, window)
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        attn_mask=mask,
        is_causal=mask is None,
        enable_gqa=True,
    )
    return out.transpose(1, 2)


def flash_attn_attention(q, k, v, doc_ids: torch.Tensor | None, window: int | None = None) -> torch.Tensor:
    """flash-attn 2; packed documents go through its varlen API with per-document cu_seqlens."""
    try:
        from flash_attn import flash_attn_func, flash_attn_varlen_func
    except ImportError as err:
        raise RuntimeError("attn_backend 'flash_attn' needs the gpu extra: pip install -e .[gpu]") from err
    window_size = (window - 1, 0) if window is not None else (-1, -1)  # keys i - (window - 1) .. i
    if doc_ids is None:
        return flash_attn_func(q, k, v, causal=True, window_size=window_size)
    b, s = doc_ids.shape
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    offsets = starts.flatten().nonzero().flatten()
    cu_seqlens = torch.cat([offsets, offsets.new_tensor([b * s])]).to(torch.int32)
    max_len = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    flat = [t.reshape(b * s, t.shape[2], t.shape[3]) for t in (q, k, v)]
    out = flash_attn_varlen_func(*flat, cu_seqlens, cu_seqlens, max_len, max_len, causal=True, window_size=window_size)
    return out.reshape(q.shape)


def training_problem(backend: str, device_type: str) -> str | None:
    """Why `backend` cannot train on `device_type` (None when it can), said before a model is built
    rather than at the first backward."""
    if backend == "flex" and device_type == "cpu":
        return (
            f"model.attn_backend=flex cannot train on CPU: PyTorch's FlexAttention has no backward there (torch "
            f"{torch.__version__}); train with attn_backend sdpa or triton, or run flex on a GPU"
        )
    if backend == "flash_attn" and device_type != "cuda":
        return "model.attn_backend=flash_attn needs a CUDA GPU (and the gpu extra: pip install -e .[gpu])"
    return None


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    doc_ids: torch.Tensor | None = None,
    backend: str = "sdpa",
    s2: S2Heads | None = None,
    window: int | None = None,
    q_offset: int = 0,
) -> torch.Tensor:
    """Causal attention inside documents, dense or S2, optionally inside a sliding `window` (query i
    reads keys j with i - j < window). q [b, s, hq, d], k/v [b, s, hkv, d] -> [b, s, hq, d].
    `q_offset` (the Triton kernels only): q holds positions q_offset.. of the keys' sequence."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {BACKENDS}")
    if q_offset and backend != "triton":
        raise ValueError(f"queries at an offset run on the Triton kernels, not attn_backend {backend!r}")
    if s2 is not None:
        if backend in ("triton", "flash_attn"):
            return s2_attention(q, k, v, s2, doc_ids, window=window, q_offset=q_offset)
        block = s2.mask(k.shape[2], q.shape[1], window)
        if backend == "flex":
            from kernels.flex import flex_attention_bshd

            return flex_attention_bshd(q, k, v, doc_ids, window, block, s2.pattern.block_size)
        if backend == "reference":
            return reference_s2_attention(q, k, v, block, s2.pattern.block_size, doc_ids, window=window)
        group = q.shape[2] // k.shape[2]
        mask = s2_token_mask(block.to(q.device), group, doc_ids, q.shape[1], s2.pattern.block_size, window)
        return sdpa_attention(q, k, v, doc_ids, mask=mask)
    if backend == "sdpa":
        return sdpa_attention(q, k, v, doc_ids, window=window)
    if backend == "reference":
        return reference_attention(q, k, v, doc_ids, window=window)
    if backend == "flash_attn":
        return flash_attn_attention(q, k, v, doc_ids, window)
    if backend == "flex":
        from kernels.flex import flex_attention_bshd

        return flex_attention_bshd(q, k, v, doc_ids, window)
    from kernels.flash_gqa import flash_attention

    return flash_attention(q, k, v, doc_ids, window=window, q_offset=q_offset)


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    s2: S2Heads | None = None,
    window: int | None = None,
):
    """One new token per sequence, q [b, 1, hq, d], attending to the cache [b, t, hkv, d] (its own
    K/V last): all of it, or its last `window` positions. S2 layers read only the blocks their
    pattern allows."""
    if s2 is not None:
        return s2_decode_attention(q, k_cache, v_cache, s2, window)
    if window is not None:
        k_cache, v_cache = k_cache[:, -window:], v_cache[:, -window:]
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k_cache.transpose(1, 2), v_cache.transpose(1, 2), enable_gqa=True
    )
    return out.transpose(1, 2)
