"""Triton flash attention for GQA, causal, inside packed documents, forward and backward.

One kernel family serves dense and S2-sparse attention. Dense: each query block walks the key
blocks from its document's start to the diagonal. Sparse: it walks a precomputed list of allowed
key blocks (`kernels.patterns.block_lists`), so the work falls with the pattern's density. K/V are
never repeated for GQA: a query head reads its KV head through strides. The backward pass has no
atomics: one program per (key block, KV head) accumulates dK/dV over the group's query heads, one
per (query block, query head) accumulates dQ.

Shapes: q [b, s, hq, d], k/v [b, s, hkv, d], any strides with a contiguous last dim; doc_ids [b, s]
must label contiguous segments (as packing writes them). Runs on CPU under TRITON_INTERPRET=1.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


@triton.jit
def _block_mask(offs_m, offs_n, seq_len, doc_q, DOC_K, HAS_DOC: tl.constexpr):
    mask = (offs_m[:, None] >= offs_n[None, :]) & (offs_n[None, :] < seq_len)
    if HAS_DOC:
        doc_k = tl.load(DOC_K + offs_n, mask=offs_n < seq_len, other=-3)
        mask = mask & (doc_q[:, None] == doc_k[None, :])
    return mask


@triton.jit
def _fwd_kernel(
    Q,
    K,
    V,
    OUT,
    LSE,
    DOC,
    SEG_START,
    BLOCK_IDX,
    BLOCK_CNT,
    s_qb,
    s_qs,
    s_qh,
    s_kb,
    s_ks,
    s_kh,
    s_vb,
    s_vs,
    s_vh,
    s_ob,
    s_os,
    s_oh,
    s_lb,
    s_lh,
    s_db,
    s_ih,
    s_iq,
    s_ch,
    seq_len,
    head_dim,
    num_q_heads,
    sm_scale,
    GROUP: tl.constexpr,
    HAS_DOC: tl.constexpr,
    SPARSE: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // num_q_heads
    hq = pid_bh % num_q_heads
    hk = hq // GROUP
    offs_m = pid_m * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, BLOCK_D)
    offs_j = tl.arange(0, BLOCK)
    d_ok = offs_d[None, :] < head_dim
    q = tl.load(
        Q + b * s_qb + offs_m[:, None] * s_qs + hq * s_qh + offs_d[None, :],
        mask=(offs_m[:, None] < seq_len) & d_ok,
        other=0.0,
    )
    doc_q = tl.zeros([BLOCK], dtype=tl.int32)
    if HAS_DOC:
        doc_q = tl.load(DOC + b * s_db + offs_m, mask=offs_m < seq_len, other=-2)

    m_i = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK], dtype=tl.float32)
    acc = tl.zeros([BLOCK, BLOCK_D], dtype=tl.float32)
    qk_scale = sm_scale * 1.4426950408889634

    if SPARSE:
        n_iter = tl.load(BLOCK_CNT + hk * s_ch + pid_m)
        lo = 0
    else:
        lo = 0
        if HAS_DOC:
            lo = tl.load(SEG_START + b * s_db + pid_m * BLOCK) // BLOCK
        n_iter = pid_m + 1 - lo
    for i in range(0, n_iter):
        if SPARSE:
            kb = tl.load(BLOCK_IDX + hk * s_ih + pid_m * s_iq + i)
        else:
            kb = lo + i
        offs_n = kb * BLOCK + offs_j
        kv_ok = (offs_n[:, None] < seq_len) & d_ok
        k = tl.load(K + b * s_kb + offs_n[:, None] * s_ks + hk * s_kh + offs_d[None, :], mask=kv_ok, other=0.0)
        v = tl.load(V + b * s_vb + offs_n[:, None] * s_vs + hk * s_vh + offs_d[None, :], mask=kv_ok, other=0.0)
        qk = tl.dot(q, tl.trans(k)) * qk_scale
        mask = _block_mask(offs_m, offs_n, seq_len, doc_q, DOC + b * s_db, HAS_DOC)
        qk = tl.where(mask, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(qk - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    l_safe = tl.where(l_i > 0, l_i, 1.0)
    out = acc / l_safe[:, None]
    m_safe = tl.where(m_i == float("-inf"), 0.0, m_i)
    lse = tl.where(l_i > 0, (m_safe + tl.log2(l_safe)) * 0.6931471805599453, float("-inf"))
    row_ok = offs_m < seq_len
    tl.store(
        OUT + b * s_ob + offs_m[:, None] * s_os + hq * s_oh + offs_d[None, :],
        out.to(OUT.dtype.element_ty),
        mask=row_ok[:, None] & d_ok,
    )
    tl.store(LSE + b * s_lb + hq * s_lh + offs_m, lse, mask=row_ok)


@triton.jit
def _bwd_dkdv_kernel(
    Q,
    K,
    V,
    DO,
    LSE,
    DELTA,
    DK,
    DV,
    DOC,
    SEG_END,
    BLOCK_IDX,
    BLOCK_CNT,
    s_qb,
    s_qs,
    s_qh,
    s_kb,
    s_ks,
    s_kh,
    s_vb,
    s_vs,
    s_vh,
    s_ob,
    s_os,
    s_oh,
    s_lb,
    s_lh,
    s_db,
    s_ih,
    s_iq,
    s_ch,
    s_dkb,
    s_dks,
    s_dkh,
    seq_len,
    head_dim,
    num_kv_heads,
    sm_scale,
    GROUP: tl.constexpr,
    HAS_DOC: tl.constexpr,
    SPARSE: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """One program per (key block, KV head); loops over the query heads of its group."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // num_kv_heads
    hk = pid_bh % num_kv_heads
    offs_n = pid_n * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, BLOCK_D)
    offs_i = tl.arange(0, BLOCK)
    d_ok = offs_d[None, :] < head_dim
    kv_ok = (offs_n[:, None] < seq_len) & d_ok
    k = tl.load(K + b * s_kb + offs_n[:, None] * s_ks + hk * s_kh + offs_d[None, :], mask=kv_ok, other=0.0)
    v = tl.load(V + b * s_vb + offs_n[:, None] * s_vs + hk * s_vh + offs_d[None, :], mask=kv_ok, other=0.0)
    dk = tl.zeros([BLOCK, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK, BLOCK_D], dtype=tl.float32)
    num_blocks = tl.cdiv(seq_len, BLOCK)

    if SPARSE:
        n_iter = tl.load(BLOCK_CNT + hk * s_ch + pid_n)
    else:
        hi = num_blocks
        if HAS_DOC:
            last = tl.minimum(pid_n * BLOCK + BLOCK, seq_len) - 1
            hi = tl.cdiv(tl.load(SEG_END + b * s_db + last), BLOCK)
        n_iter = hi - pid_n
    for g in range(0, GROUP):
        hq = hk * GROUP + g
        for i in range(0, n_iter):
            if SPARSE:
                qb = tl.load(BLOCK_IDX + hk * s_ih + pid_n * s_iq + i)
            else:
                qb = pid_n + i
            offs_m = qb * BLOCK + offs_i
            row_ok = offs_m < seq_len
            q = tl.load(
                Q + b * s_qb + offs_m[:, None] * s_qs + hq * s_qh + offs_d[None, :],
                mask=row_ok[:, None] & d_ok,
                other=0.0,
            )
            do = tl.load(
                DO + b * s_ob + offs_m[:, None] * s_os + hq * s_oh + offs_d[None, :],
                mask=row_ok[:, None] & d_ok,
                other=0.0,
            )
            lse = tl.load(LSE + b * s_lb + hq * s_lh + offs_m, mask=row_ok, other=0.0)
            delta = tl.load(DELTA + b * s_lb + hq * s_lh + offs_m, mask=row_ok, other=0.0)
            doc_q = tl.zeros([BLOCK], dtype=tl.int32)
            if HAS_DOC:
                doc_q = tl.load(DOC + b * s_db + offs_m, mask=row_ok, other=-2)
            mask = _block_mask(offs_m, offs_n, seq_len, doc_q, DOC + b * s_db, HAS_DOC)
            s = tl.dot(q, tl.trans(k)) * sm_scale
            p = tl.where(mask, tl.exp(s - lse[:, None]), 0.0)
            dv += tl.dot(tl.trans(p.to(do.dtype)), do)
            dp = tl.dot(do, tl.trans(v))
            ds = p * (dp - delta[:, None])
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q)
    dk = dk * sm_scale
    tl.store(
        DK + b * s_dkb + offs_n[:, None] * s_dks + hk * s_dkh + offs_d[None, :], dk.to(DK.dtype.element_ty), mask=kv_ok
    )
    tl.store(
        DV + b * s_dkb + offs_n[:, None] * s_dks + hk * s_dkh + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=kv_ok
    )


@triton.jit
def _bwd_dq_kernel(
    Q,
    K,
    V,
    DO,
    LSE,
    DELTA,
    DQ,
    DOC,
    SEG_START,
    BLOCK_IDX,
    BLOCK_CNT,
    s_qb,
    s_qs,
    s_qh,
    s_kb,
    s_ks,
    s_kh,
    s_vb,
    s_vs,
    s_vh,
    s_ob,
    s_os,
    s_oh,
    s_lb,
    s_lh,
    s_db,
    s_ih,
    s_iq,
    s_ch,
    s_dqb,
    s_dqs,
    s_dqh,
    seq_len,
    head_dim,
    num_q_heads,
    sm_scale,
    GROUP: tl.constexpr,
    HAS_DOC: tl.constexpr,
    SPARSE: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """One program per (query block, query head); walks the same key blocks as the forward pass."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // num_q_heads
    hq = pid_bh % num_q_heads
    hk = hq // GROUP
    offs_m = pid_m * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, BLOCK_D)
    offs_j = tl.arange(0, BLOCK)
    d_ok = offs_d[None, :] < head_dim
    row_ok = offs_m < seq_len
    q = tl.load(
        Q + b * s_qb + offs_m[:, None] * s_qs + hq * s_qh + offs_d[None, :], mask=row_ok[:, None] & d_ok, other=0.0
    )
    do = tl.load(
        DO + b * s_ob + offs_m[:, None] * s_os + hq * s_oh + offs_d[None, :], mask=row_ok[:, None] & d_ok, other=0.0
    )
    lse = tl.load(LSE + b * s_lb + hq * s_lh + offs_m, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + b * s_lb + hq * s_lh + offs_m, mask=row_ok, other=0.0)
    doc_q = tl.zeros([BLOCK], dtype=tl.int32)
    if HAS_DOC:
        doc_q = tl.load(DOC + b * s_db + offs_m, mask=row_ok, other=-2)
    dq = tl.zeros([BLOCK, BLOCK_D], dtype=tl.float32)

    if SPARSE:
        n_iter = tl.load(BLOCK_CNT + hk * s_ch + pid_m)
        lo = 0
    else:
        lo = 0
        if HAS_DOC:
            lo = tl.load(SEG_START + b * s_db + pid_m * BLOCK) // BLOCK
        n_iter = pid_m + 1 - lo
    for i in range(0, n_iter):
        if SPARSE:
            kb = tl.load(BLOCK_IDX + hk * s_ih + pid_m * s_iq + i)
        else:
            kb = lo + i
        offs_n = kb * BLOCK + offs_j
        kv_ok = (offs_n[:, None] < seq_len) & d_ok
        k = tl.load(K + b * s_kb + offs_n[:, None] * s_ks + hk * s_kh + offs_d[None, :], mask=kv_ok, other=0.0)
        v = tl.load(V + b * s_vb + offs_n[:, None] * s_vs + hk * s_vh + offs_d[None, :], mask=kv_ok, other=0.0)
        mask = _block_mask(offs_m, offs_n, seq_len, doc_q, DOC + b * s_db, HAS_DOC)
        s = tl.dot(q, tl.trans(k)) * sm_scale
        p = tl.where(mask, tl.exp(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v))
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k)
    dq = dq * sm_scale
    tl.store(
        DQ + b * s_dqb + offs_m[:, None] * s_dqs + hq * s_dqh + offs_d[None, :],
        dq.to(DQ.dtype.element_ty),
        mask=row_ok[:, None] & d_ok,
    )


def segment_bounds(doc_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each position, where its contiguous segment starts and (exclusively) ends."""
    b, s = doc_ids.shape
    pos = torch.arange(s, device=doc_ids.device).expand(b, s)
    new = torch.ones_like(doc_ids, dtype=torch.bool)
    new[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    start = torch.where(new, pos, 0).cummax(dim=1).values
    end_marker = torch.ones_like(new)
    end_marker[:, :-1] = new[:, 1:]
    end = torch.where(end_marker, pos + 1, s).flip(1).cummin(dim=1).values.flip(1)
    return start.to(torch.int32).contiguous(), end.to(torch.int32).contiguous()


class SparsityLists:
    """Forward lists (per query block: key blocks) and backward lists (per key block: query blocks)."""

    def __init__(self, mask: torch.Tensor, device):
        from kernels.patterns import block_lists

        self.fwd_index, self.fwd_count = (t.to(device) for t in block_lists(mask))
        self.bwd_index, self.bwd_count = (t.to(device) for t in block_lists(mask.transpose(1, 2)))


def _strides(t: torch.Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def _launch_args(doc_ids, lists, backward):
    dummy = torch.zeros(1, dtype=torch.int32)
    if lists is None:
        index = count = dummy
        s_ih = s_iq = s_ch = 0
    else:
        index, count = (lists.bwd_index, lists.bwd_count) if backward else (lists.fwd_index, lists.fwd_count)
        s_ih, s_iq, s_ch = index.stride(0), index.stride(1), count.stride(0)
    return index, count, s_ih, s_iq, s_ch


class _FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, doc_ids, lists, block):
        b, s, hq, d = q.shape
        hkv = k.shape[2]
        sm_scale = 1.0 / math.sqrt(d)
        o = torch.empty_like(q)
        lse = torch.empty(b, hq, s, device=q.device, dtype=torch.float32)
        has_doc = doc_ids is not None
        doc = doc_ids.to(torch.int32).contiguous() if has_doc else torch.zeros(1, 1, dtype=torch.int32, device=q.device)
        seg_start, seg_end = segment_bounds(doc) if has_doc else (doc, doc)
        index, count, s_ih, s_iq, s_ch = _launch_args(doc, lists, backward=False)
        grid = (triton.cdiv(s, block), b * hq)
        _fwd_kernel[grid](
            q,
            k,
            v,
            o,
            lse,
            doc,
            seg_start,
            index,
            count,
            *_strides(q),
            *_strides(k),
            *_strides(v),
            *_strides(o),
            lse.stride(0),
            lse.stride(1),
            doc.stride(0),
            s_ih,
            s_iq,
            s_ch,
            s,
            d,
            hq,
            sm_scale,
            GROUP=hq // hkv,
            HAS_DOC=has_doc,
            SPARSE=lists is not None,
            BLOCK=block,
            BLOCK_D=triton.next_power_of_2(d),
        )
        ctx.save_for_backward(q, k, v, o, lse, doc, seg_start, seg_end)
        ctx.lists, ctx.block, ctx.has_doc, ctx.sm_scale = lists, block, has_doc, sm_scale
        ctx.mark_non_differentiable(lse)
        return o, lse

    @staticmethod
    def backward(ctx, do, _dlse):
        q, k, v, o, lse, doc, seg_start, seg_end = ctx.saved_tensors
        b, s, hq, d = q.shape
        hkv = k.shape[2]
        do = do.contiguous()
        delta = (do.float() * o.float()).sum(-1).transpose(1, 2).contiguous()
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        common = dict(
            GROUP=hq // hkv,
            HAS_DOC=ctx.has_doc,
            SPARSE=ctx.lists is not None,
            BLOCK=ctx.block,
            BLOCK_D=triton.next_power_of_2(d),
        )
        strides = (*_strides(q), *_strides(k), *_strides(v), *_strides(do), lse.stride(0), lse.stride(1), doc.stride(0))
        index, count, s_ih, s_iq, s_ch = _launch_args(doc, ctx.lists, backward=True)
        _bwd_dkdv_kernel[(triton.cdiv(s, ctx.block), b * hkv)](
            q,
            k,
            v,
            do,
            lse,
            delta,
            dk,
            dv,
            doc,
            seg_end,
            index,
            count,
            *strides,
            s_ih,
            s_iq,
            s_ch,
            *_strides(dk),
            s,
            d,
            hkv,
            ctx.sm_scale,
            **common,
        )
        index, count, s_ih, s_iq, s_ch = _launch_args(doc, ctx.lists, backward=False)
        _bwd_dq_kernel[(triton.cdiv(s, ctx.block), b * hq)](
            q,
            k,
            v,
            do,
            lse,
            delta,
            dq,
            doc,
            seg_start,
            index,
            count,
            *strides,
            s_ih,
            s_iq,
            s_ch,
            *_strides(dq),
            s,
            d,
            hq,
            ctx.sm_scale,
            **common,
        )
        return dq, dk, dv, None, None, None


def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    doc_ids: torch.Tensor | None = None,
    lists: SparsityLists | None = None,
    block: int = 64,
    return_lse: bool = False,
):
    """Causal GQA attention; with `lists`, only the listed key blocks (block size `block`) are read."""
    if q.shape[-1] not in (16, 32, 64, 96, 128, 256) and q.shape[-1] % 16:
        raise ValueError(f"head_dim {q.shape[-1]} is not supported (multiples of 16)")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"query heads {q.shape[2]} must be a multiple of KV heads {k.shape[2]}")
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    o, lse = _FlashAttention.apply(q, k, v, doc_ids, lists, block)
    return (o, lse) if return_lse else o
