"""The one attention entry point the model calls; `backend` picks the implementation."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.reference import document_causal_mask, reference_attention

BACKENDS = ("sdpa", "reference")


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, doc_ids: torch.Tensor | None) -> torch.Tensor:
    """PyTorch SDPA (flash / memory-efficient / math, chosen by PyTorch); GQA without repeating K/V."""
    mask = None if doc_ids is None else document_causal_mask(doc_ids, q.shape[1], q.device)
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        attn_mask=mask,
        is_causal=mask is None,
        enable_gqa=True,
    )
    return out.transpose(1, 2)


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, doc_ids: torch.Tensor | None = None, backend: str = "sdpa"
) -> torch.Tensor:
    """Causal attention inside documents. q [b, s, hq, d], k/v [b, s, hkv, d] -> [b, s, hq, d]."""
    if backend == "sdpa":
        return sdpa_attention(q, k, v, doc_ids)
    if backend == "reference":
        return reference_attention(q, k, v, doc_ids)
    raise ValueError(f"unknown attention backend {backend!r}; choose one of {BACKENDS}")
