"""The backward kernels: one program per (key tile, KV head) accumulates dK and dV over the group's
query heads, streaming the query tiles that may read its keys (the backward S2 lists). dQ either
comes from a second kernel, one program per (query tile, query head) streaming key tiles as the
forward does (deterministic; P and dS are computed twice), or, with ATOMIC_DQ, from the same
program, which adds each tile's dS K into an fp32 dQ with atomics as FlashAttention-2 does (one pass:
5 matmuls per tile pair instead of 7, but the order of the additions varies from run to run).
Both take delta = rowsum(dO * O), computed once before the launch. Positions are global, as in the
forward: query row r is position q_offset + r."""

from __future__ import annotations

import triton
import triton.language as tl

from kernels.flash_gqa_common import (
    allowed_mask,
    key_range,
    key_tiles,
    load_doc_ids,
    load_tile,
    query_end,
    store_tile,
    tile_is_full,
    tile_to_visit,
)


@triton.jit
def _probs_and_dscores(q, k, v, do, lse, delta, sm_scale, full, offs_m, offs_n, seq_len, doc_q, doc_k, window):
    """Recomputed probabilities P and score gradients dS = P * (dO V^T - delta) of one tile pair;
    the mask only where the tile is not `full`."""
    p = tl.exp(tl.dot(q, tl.trans(k)) * sm_scale - lse[:, None])
    if not full:
        p = tl.where(allowed_mask(offs_m, offs_n, seq_len, doc_q, doc_k, window), p, 0.0)
    return p, p * (tl.dot(do, tl.trans(v)) - delta[:, None])


@triton.jit
def bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, DQ_ACC, DOC, SEG_START, SEG_END, BLOCK_IDX, BLOCK_CNT,
    s_qb, s_qs, s_qh, s_kb, s_ks, s_kh, s_vb, s_vs, s_vh, s_ob, s_os, s_oh,
    s_lb, s_lh, s_db, s_ih, s_iq, s_ch, s_dkb, s_dks, s_dkh, s_dvb, s_dvs, s_dvh, s_dqb, s_dqs, s_dqh,
    seq_len, q_offset, q_len, head_dim, num_kv_heads, sm_scale, window,
    GROUP: tl.constexpr, HAS_DOC: tl.constexpr, SPARSE: tl.constexpr, S2_BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, ATOMIC_DQ: tl.constexpr,
):  # fmt: skip
    """One program per (key tile, KV head): K and V stay loaded while it walks the query tiles that
    read them (the transposed S2 list, or the diagonal to the document's or window's end) for every
    query head of its group; with ATOMIC_DQ it also adds dS K (scaled) into the fp32 DQ_ACC."""
    pid_n, pid_bh = tl.program_id(0), tl.program_id(1)
    b, hk = pid_bh // num_kv_heads, pid_bh % num_kv_heads
    k_first = pid_n * BLOCK_N
    k_last = tl.minimum(k_first + BLOCK_N, seq_len) - 1
    offs_n = k_first + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    k = load_tile(K, b, hk, offs_n, offs_d, seq_len, head_dim, s_kb, s_ks, s_kh)
    v = load_tile(V, b, hk, offs_n, offs_d, seq_len, head_dim, s_vb, s_vs, s_vh)
    doc_k = load_doc_ids(DOC, b, offs_n, seq_len, s_db, HAS_DOC, BLOCK_N)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    q_end = q_offset + q_len
    hi = tl.minimum(query_end(k_last, b, SEG_END, s_db, seq_len, window, HAS_DOC), q_end)
    row = k_first // S2_BLOCK
    if SPARSE:
        lo_tile, n_iter = 0, tl.load(BLOCK_CNT + hk * s_ch + row) * (S2_BLOCK // BLOCK_M)
    else:
        lo_tile = tl.maximum(k_first, q_offset) // BLOCK_M
        n_iter = tl.cdiv(hi, BLOCK_M) - lo_tile
    for g in range(0, GROUP):
        hq = hk * GROUP + g
        for i in range(0, n_iter):
            q_first = tile_to_visit(i, lo_tile, row, hk, BLOCK_IDX, s_ih, s_iq, SPARSE, S2_BLOCK // BLOCK_M) * BLOCK_M
            q_last = tl.minimum(q_first + BLOCK_M, q_end) - 1
            if (q_last >= k_first) & (q_first < hi) & (q_last >= q_offset):
                offs_m = q_first + tl.arange(0, BLOCK_M)
                rows_q = offs_m - q_offset  # rows outside [0, q_len) load as zeros and add nothing
                q = load_tile(Q, b, hq, rows_q, offs_d, q_len, head_dim, s_qb, s_qs, s_qh)
                do = load_tile(DO, b, hq, rows_q, offs_d, q_len, head_dim, s_ob, s_os, s_oh)
                valid = (rows_q >= 0) & (rows_q < q_len)
                lse = tl.load(LSE + b * s_lb + hq * s_lh + rows_q, mask=valid, other=0.0)
                delta = tl.load(DELTA + b * s_lb + hq * s_lh + rows_q, mask=valid, other=0.0)
                doc_q = load_doc_ids(DOC, b, offs_m, seq_len, s_db, HAS_DOC, BLOCK_M)
                full = tile_is_full(q_first, q_last, k_first, k_last, seq_len, window, SEG_END, b, s_db, HAS_DOC)
                p, ds = _probs_and_dscores(q, k, v, do, lse, delta, sm_scale, full, offs_m, offs_n, seq_len, doc_q,
                                           doc_k, window)  # fmt: skip
                dv += tl.dot(tl.trans(p.to(do.dtype)), do)
                dk += tl.dot(tl.trans(ds.to(q.dtype)), q)
                if ATOMIC_DQ:
                    dq = tl.dot(ds.to(k.dtype), k) * sm_scale
                    ptrs = DQ_ACC + b * s_dqb + rows_q[:, None] * s_dqs + hq * s_dqh + offs_d[None, :]
                    tl.atomic_add(ptrs, dq, mask=valid[:, None] & (offs_d[None, :] < head_dim), sem="relaxed")
    store_tile(DK, dk * sm_scale, b, hk, offs_n, offs_d, seq_len, head_dim, s_dkb, s_dks, s_dkh)
    store_tile(DV, dv, b, hk, offs_n, offs_d, seq_len, head_dim, s_dvb, s_dvs, s_dvh)


@triton.jit
def bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, DOC, SEG_START, SEG_END, BLOCK_IDX, BLOCK_CNT,
    s_qb, s_qs, s_qh, s_kb, s_ks, s_kh, s_vb, s_vs, s_vh, s_ob, s_os, s_oh,
    s_lb, s_lh, s_db, s_ih, s_iq, s_ch, s_dqb, s_dqs, s_dqh,
    seq_len, q_offset, q_len, head_dim, num_q_heads, sm_scale, window,
    GROUP: tl.constexpr, HAS_DOC: tl.constexpr, SPARSE: tl.constexpr, S2_BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """One program per (query tile, query head); walks the same key tiles as the forward pass."""
    pid_m, pid_bh = tl.program_id(0), tl.program_id(1)
    b, hq = pid_bh // num_q_heads, pid_bh % num_q_heads
    hk = hq // GROUP
    q_first = q_offset + pid_m * BLOCK_M
    q_last = tl.minimum(q_first + BLOCK_M, q_offset + q_len) - 1
    offs_m = q_first + tl.arange(0, BLOCK_M)
    rows_q = offs_m - q_offset
    offs_d = tl.arange(0, BLOCK_D)
    q = load_tile(Q, b, hq, rows_q, offs_d, q_len, head_dim, s_qb, s_qs, s_qh)
    do = load_tile(DO, b, hq, rows_q, offs_d, q_len, head_dim, s_ob, s_os, s_oh)
    lse = tl.load(LSE + b * s_lb + hq * s_lh + rows_q, mask=rows_q < q_len, other=0.0)
    delta = tl.load(DELTA + b * s_lb + hq * s_lh + rows_q, mask=rows_q < q_len, other=0.0)
    doc_q = load_doc_ids(DOC, b, offs_m, seq_len, s_db, HAS_DOC, BLOCK_M)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    lo = key_range(q_first, q_last, b, SEG_START, s_db, window, HAS_DOC)
    row = q_first // S2_BLOCK
    lo_tile, n_iter = key_tiles(lo, q_last, hk, row, BLOCK_CNT, s_ch, SPARSE, S2_BLOCK, BLOCK_N)
    for i in range(0, n_iter):
        k_first = tile_to_visit(i, lo_tile, row, hk, BLOCK_IDX, s_ih, s_iq, SPARSE, S2_BLOCK // BLOCK_N) * BLOCK_N
        k_last = k_first + BLOCK_N - 1
        if (k_first <= q_last) & (k_last >= lo):
            offs_n = k_first + tl.arange(0, BLOCK_N)
            k = load_tile(K, b, hk, offs_n, offs_d, seq_len, head_dim, s_kb, s_ks, s_kh)
            v = load_tile(V, b, hk, offs_n, offs_d, seq_len, head_dim, s_vb, s_vs, s_vh)
            doc_k = load_doc_ids(DOC, b, offs_n, seq_len, s_db, HAS_DOC, BLOCK_N)
            full = tile_is_full(q_first, q_last, k_first, k_last, seq_len, window, SEG_END, b, s_db, HAS_DOC)
            _, ds = _probs_and_dscores(q, k, v, do, lse, delta, sm_scale, full, offs_m, offs_n, seq_len, doc_q, doc_k,
                                       window)  # fmt: skip
            dq += tl.dot(ds.to(k.dtype), k)
    store_tile(DQ, dq * sm_scale, b, hq, rows_q, offs_d, q_len, head_dim, s_dqb, s_dqs, s_dqh)
