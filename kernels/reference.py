"""Plain PyTorch attention: the ground truth the kernels are tested against, and the CPU fallback."""

from __future__ import annotations

import math

import torch


def document_causal_mask(
    doc_ids: torch.Tensor | None, seq_len: int, device=None, window: int | None = None
) -> torch.Tensor:
    """Boolean [b or 1, 1, s, s]: query i may read key j when j <= i, both are in one document and,
    with a sliding `window`, i - j < window."""
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool, device=device).tril()
    if window is not None:
        causal = causal.triu(-(window - 1))
    if doc_ids is None:
        return causal[None, None]
    same_doc = doc_ids[:, :, None] == doc_ids[:, None, :]
    return (causal[None] & same_doc)[:, None]


def reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    doc_ids: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    return_lse: bool = False,
    window: int | None = None,
):
    """q [b, s, hq, d], k/v [b, s, hkv, d] -> [b, s, hq, d] (and log-sum-exp [b, hq, s]).

    Causal within documents (and a sliding `window`) unless an explicit boolean `mask` [b|1, hq|1, s, s]
    is given. K/V heads are repeated for GQA here; the kernels must not need to.
    """
    b, s, hq, d = q.shape
    group = hq // k.shape[2]
    qt = q.transpose(1, 2).float()
    kt = k.transpose(1, 2).float().repeat_interleave(group, dim=1)
    vt = v.transpose(1, 2).float().repeat_interleave(group, dim=1)
    if mask is None:
        mask = document_causal_mask(doc_ids, s, q.device, window)
    scores = (qt @ kt.transpose(-1, -2)) / math.sqrt(d)
    scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse[..., None]).nan_to_num(0.0)  # rows with no key read nothing
    out = (probs @ vt).transpose(1, 2).to(q.dtype)
    return (out, lse) if return_lse else out


def s2_token_mask(
    block: torch.Tensor,
    group: int,
    doc_ids: torch.Tensor | None,
    seq_len: int,
    block_size: int,
    window: int | None = None,
) -> torch.Tensor:
    """Token mask [b|1, hq, s, s] from a per-KV-head block mask [hkv, qb, kb], GQA-expanded."""
    from kernels.patterns import token_mask

    mask = token_mask(block, seq_len, block_size).repeat_interleave(group, dim=0)[None]
    return mask & document_causal_mask(doc_ids, seq_len, block.device, window)


def reference_s2_attention(
    q, k, v, block: torch.Tensor, block_size: int, doc_ids=None, return_lse: bool = False, window: int | None = None
):
    """S2-Attention by masking dense attention: the ground truth for the sparse kernel."""
    mask = s2_token_mask(block.to(q.device), q.shape[2] // k.shape[2], doc_ids, q.shape[1], block_size, window)
    return reference_attention(q, k, v, mask=mask, return_lse=return_lse)
