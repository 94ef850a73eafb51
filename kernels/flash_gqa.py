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


@triton.jit
def _tile(PTR, b, h, offs, offs_d, seq_len, head_dim, s_b, s_s, s_h):
    """Rows `offs` of head `h` of sequence `b` as a [rows, BLOCK_D] tile (zeros past the ends)."""
    mask = (offs[:, None] < seq_len) & (offs_d[None, :] < head_dim)
    return tl.load(PTR + b * s_b + offs[:, None] * s_s + h * s_h + offs_d[None, :], mask=mask, other=0.0)


@triton.jit
def _store_tile(PTR, value, b, h, offs, offs_d, seq_len, head_dim, s_b, s_s, s_h):
    mask = (offs[:, None] < seq_len) & (offs_d[None, :] < head_dim)
    tl.store(PTR + b * s_b + offs[:, None] * s_s + h * s_h + offs_d[None, :], value.to(PTR.dtype.element_ty), mask=mask)


@triton.jit
def _doc_ids(DOC, b, offs, seq_len, s_db, HAS_DOC: tl.constexpr, BLOCK: tl.constexpr):
    ids = tl.zeros([BLOCK], dtype=tl.int32)
    if HAS_DOC:
        ids = tl.load(DOC + b * s_db + offs, mask=offs < seq_len, other=-2)
    return ids


@triton.jit
def _allowed(offs_m, offs_n, seq_len, doc_q, doc_k, window):
    """Causal, inside the sliding window (the sequence length when there is none), inside the
    sequence, same document (doc ids are zeros without documents)."""
    distance = offs_m[:, None] - offs_n[None, :]
    return (distance >= 0) & (distance < window) & (offs_n[None, :] < seq_len) & (doc_q[:, None] == doc_k[None, :])


@triton.jit
def _key_blocks(pid_m, b, hk, SEG_START, BLOCK_CNT, s_db, s_ch, window, HAS_DOC: tl.constexpr, SPARSE: tl.constexpr,
                BLOCK: tl.constexpr):  # fmt: skip
    """(first, count) of the key blocks query block `pid_m` reads: its list (sparse), or from the
    start of its first query's document (or its window) to the diagonal (dense)."""
    lo = 0
    if SPARSE:
        n_iter = tl.load(BLOCK_CNT + hk * s_ch + pid_m)
    else:
        if HAS_DOC:
            lo = tl.load(SEG_START + b * s_db + pid_m * BLOCK) // BLOCK
        lo = tl.maximum(lo, tl.maximum(pid_m * BLOCK - window + 1, 0) // BLOCK)
        n_iter = pid_m + 1 - lo
    return lo, n_iter


@triton.jit
def _list_entry(i, lo, row, h, BLOCK_IDX, s_ih, s_iq, SPARSE: tl.constexpr):
    """The i-th block to visit: entry i of the row's list (sparse), or lo + i (dense)."""
    entry = lo + i
    if SPARSE:
        entry = tl.load(BLOCK_IDX + h * s_ih + row * s_iq + i)
    return entry


@triton.jit
def _fwd_kernel(
    Q, K, V, OUT, LSE, DOC, SEG_START, BLOCK_IDX, BLOCK_CNT,
    s_qb, s_qs, s_qh, s_kb, s_ks, s_kh, s_vb, s_vs, s_vh, s_ob, s_os, s_oh,
    s_lb, s_lh, s_db, s_ih, s_iq, s_ch,
    seq_len, head_dim, num_q_heads, sm_scale, window,
    GROUP: tl.constexpr, HAS_DOC: tl.constexpr, SPARSE: tl.constexpr, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """One program per (query block, query head): online softmax over the visited key blocks."""
    pid_m, pid_bh = tl.program_id(0), tl.program_id(1)
    b, hq = pid_bh // num_q_heads, pid_bh % num_q_heads
    hk = hq // GROUP
    offs_m = pid_m * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, BLOCK_D)
    q = _tile(Q, b, hq, offs_m, offs_d, seq_len, head_dim, s_qb, s_qs, s_qh)
    doc_q = _doc_ids(DOC, b, offs_m, seq_len, s_db, HAS_DOC, BLOCK)
    m_i = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK], dtype=tl.float32)
    acc = tl.zeros([BLOCK, BLOCK_D], dtype=tl.float32)
    qk_scale = sm_scale * 1.4426950408889634  # exp2 instead of exp
    lo, n_iter = _key_blocks(pid_m, b, hk, SEG_START, BLOCK_CNT, s_db, s_ch, window, HAS_DOC, SPARSE, BLOCK)
    for i in range(0, n_iter):
        kb = _list_entry(i, lo, pid_m, hk, BLOCK_IDX, s_ih, s_iq, SPARSE)
        offs_n = kb * BLOCK + tl.arange(0, BLOCK)
        k = _tile(K, b, hk, offs_n, offs_d, seq_len, head_dim, s_kb, s_ks, s_kh)
        v = _tile(V, b, hk, offs_n, offs_d, seq_len, head_dim, s_vb, s_vs, s_vh)
        doc_k = _doc_ids(DOC, b, offs_n, seq_len, s_db, HAS_DOC, BLOCK)
        allowed = _allowed(offs_m, offs_n, seq_len, doc_q, doc_k, window)
        qk = tl.where(allowed, tl.dot(q, tl.trans(k)) * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(qk - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    m_safe = tl.where(m_i == float("-inf"), 0.0, m_i)
    lse = tl.where(l_i > 0, (m_safe + tl.log2(l_safe)) * 0.6931471805599453, float("-inf"))
    _store_tile(OUT, acc / l_safe[:, None], b, hq, offs_m, offs_d, seq_len, head_dim, s_ob, s_os, s_oh)
    tl.store(LSE + b * s_lb + hq * s_lh + offs_m, lse, mask=offs_m < seq_len)


@triton.jit
def _probs_and_dscores(q, k, v, do, lse, delta, offs_m, offs_n, seq_len, doc_q, doc_k, sm_scale, window):
    """Recomputed probabilities P and score gradients dS = P * (dO V^T - delta) of one tile pair."""
    s = tl.dot(q, tl.trans(k)) * sm_scale
    p = tl.where(_allowed(offs_m, offs_n, seq_len, doc_q, doc_k, window), tl.exp(s - lse[:, None]), 0.0)
    return p, p * (tl.dot(do, tl.trans(v)) - delta[:, None])


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, DOC, SEG_END, BLOCK_IDX, BLOCK_CNT,
    s_qb, s_qs, s_qh, s_kb, s_ks, s_kh, s_vb, s_vs, s_vh, s_ob, s_os, s_oh,
    s_lb, s_lh, s_db, s_ih, s_iq, s_ch, s_dkb, s_dks, s_dkh, s_dvb, s_dvs, s_dvh,
    seq_len, head_dim, num_kv_heads, sm_scale, window,
    GROUP: tl.constexpr, HAS_DOC: tl.constexpr, SPARSE: tl.constexpr, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """One program per (key block, KV head); loops over the query heads of its group and the query
    blocks that read this key block (the transposed list, or the diagonal to the document's end or
    the window's)."""
    pid_n, pid_bh = tl.program_id(0), tl.program_id(1)
    b, hk = pid_bh // num_kv_heads, pid_bh % num_kv_heads
    offs_n = pid_n * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, BLOCK_D)
    k = _tile(K, b, hk, offs_n, offs_d, seq_len, head_dim, s_kb, s_ks, s_kh)
    v = _tile(V, b, hk, offs_n, offs_d, seq_len, head_dim, s_vb, s_vs, s_vh)
    doc_k = _doc_ids(DOC, b, offs_n, seq_len, s_db, HAS_DOC, BLOCK)
    dk = tl.zeros([BLOCK, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK, BLOCK_D], dtype=tl.float32)
    if SPARSE:
        n_iter = tl.load(BLOCK_CNT + hk * s_ch + pid_n)
    else:
        hi = tl.cdiv(seq_len, BLOCK)
        if HAS_DOC:
            last = tl.minimum(pid_n * BLOCK + BLOCK, seq_len) - 1
            hi = tl.cdiv(tl.load(SEG_END + b * s_db + last), BLOCK)
        hi = tl.minimum(hi, (pid_n * BLOCK + BLOCK - 1 + window - 1) // BLOCK + 1)
        n_iter = hi - pid_n
    for g in range(0, GROUP):
        hq = hk * GROUP + g
        for i in range(0, n_iter):
            qb = _list_entry(i, pid_n, pid_n, hk, BLOCK_IDX, s_ih, s_iq, SPARSE)
            offs_m = qb * BLOCK + tl.arange(0, BLOCK)
            q = _tile(Q, b, hq, offs_m, offs_d, seq_len, head_dim, s_qb, s_qs, s_qh)
            do = _tile(DO, b, hq, offs_m, offs_d, seq_len, head_dim, s_ob, s_os, s_oh)
            lse = tl.load(LSE + b * s_lb + hq * s_lh + offs_m, mask=offs_m < seq_len, other=0.0)
            delta = tl.load(DELTA + b * s_lb + hq * s_lh + offs_m, mask=offs_m < seq_len, other=0.0)
            doc_q = _doc_ids(DOC, b, offs_m, seq_len, s_db, HAS_DOC, BLOCK)
            p, ds = _probs_and_dscores(q, k, v, do, lse, delta, offs_m, offs_n, seq_len, doc_q, doc_k, sm_scale,
                                       window)  # fmt: skip
            dv += tl.dot(tl.trans(p.to(do.dtype)), do)
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q)
    _store_tile(DK, dk * sm_scale, b, hk, offs_n, offs_d, seq_len, head_dim, s_dkb, s_dks, s_dkh)
    _store_tile(DV, dv, b, hk, offs_n, offs_d, seq_len, head_dim, s_dvb, s_dvs, s_dvh)


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, DOC, SEG_START, BLOCK_IDX, BLOCK_CNT,
    s_qb, s_qs, s_qh, s_kb, s_ks, s_kh, s_vb, s_vs, s_vh, s_ob, s_os, s_oh,
    s_lb, s_lh, s_db, s_ih, s_iq, s_ch, s_dqb, s_dqs, s_dqh,
    seq_len, head_dim, num_q_heads, sm_scale, window,
    GROUP: tl.constexpr, HAS_DOC: tl.constexpr, SPARSE: tl.constexpr, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """One program per (query block, query head); walks the same key blocks as the forward pass."""
    pid_m, pid_bh = tl.program_id(0), tl.program_id(1)
    b, hq = pid_bh // num_q_heads, pid_bh % num_q_heads
    hk = hq // GROUP
    offs_m = pid_m * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, BLOCK_D)
    q = _tile(Q, b, hq, offs_m, offs_d, seq_len, head_dim, s_qb, s_qs, s_qh)
    do = _tile(DO, b, hq, offs_m, offs_d, seq_len, head_dim, s_ob, s_os, s_oh)
    lse = tl.load(LSE + b * s_lb + hq * s_lh + offs_m, mask=offs_m < seq_len, other=0.0)
    delta = tl.load(DELTA + b * s_lb + hq * s_lh + offs_m, mask=offs_m < seq_len, other=0.0)
    doc_q = _doc_ids(DOC, b, offs_m, seq_len, s_db, HAS_DOC, BLOCK)
    dq = tl.zeros([BLOCK, BLOCK_D], dtype=tl.float32)
    lo, n_iter = _key_blocks(pid_m, b, hk, SEG_START, BLOCK_CNT, s_db, s_ch, window, HAS_DOC, SPARSE, BLOCK)
    for i in range(0, n_iter):
        kb = _list_entry(i, lo, pid_m, hk, BLOCK_IDX, s_ih, s_iq, SPARSE)
        offs_n = kb * BLOCK + tl.arange(0, BLOCK)
        k = _tile(K, b, hk, offs_n, offs_d, seq_len, head_dim, s_kb, s_ks, s_kh)
        v = _tile(V, b, hk, offs_n, offs_d, seq_len, head_dim, s_vb, s_vs, s_vh)
        doc_k = _doc_ids(DOC, b, offs_n, seq_len, s_db, HAS_DOC, BLOCK)
        _, ds = _probs_and_dscores(q, k, v, do, lse, delta, offs_m, offs_n, seq_len, doc_q, doc_k, sm_scale, window)
        dq += tl.dot(ds.to(k.dtype), k)
    _store_tile(DQ, dq * sm_scale, b, hq, offs_m, offs_d, seq_len, head_dim, s_dqb, s_dqs, s_dqh)


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
    def forward(ctx, q, k, v, doc_ids, lists, block, window):
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
            window,
            GROUP=hq // hkv,
            HAS_DOC=has_doc,
            SPARSE=lists is not None,
            BLOCK=block,
            BLOCK_D=triton.next_power_of_2(d),
        )
        ctx.save_for_backward(q, k, v, o, lse, doc, seg_start, seg_end)
        ctx.lists, ctx.block, ctx.has_doc, ctx.sm_scale, ctx.window = lists, block, has_doc, sm_scale, window
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
            *_strides(dv),
            s,
            d,
            hkv,
            ctx.sm_scale,
            ctx.window,
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
            ctx.window,
            **common,
        )
        return dq, dk, dv, None, None, None, None


def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    doc_ids: torch.Tensor | None = None,
    lists: SparsityLists | None = None,
    block: int = 64,
    return_lse: bool = False,
    window: int | None = None,
):
    """Causal GQA attention; with `lists`, only the listed key blocks (block size `block`) are read;
    with a sliding `window`, query i reads keys j with i - j < window."""
    if q.shape[-1] not in (16, 32, 64, 96, 128, 256) and q.shape[-1] % 16:
        raise ValueError(f"head_dim {q.shape[-1]} is not supported (multiples of 16)")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"query heads {q.shape[2]} must be a multiple of KV heads {k.shape[2]}")
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    o, lse = _FlashAttention.apply(q, k, v, doc_ids, lists, block, window or q.shape[1])
    return (o, lse) if return_lse else o
