"""The forward kernel: one program per (query tile, query head), or with packed GQA per (tile of
positions, KV head) whose rows are the group's query heads, so each K/V tile is loaded once per
group. It streams the key tiles the query tile may read and keeps an online softmax; the mask is
applied only to tiles that need it. Writes the output and each row's log-sum-exp for the backward.

Positions are global: keys are 0..seq_len - 1 (document ids likewise), query row r is position
q_offset + r of q_len (a context-parallel chunk reads the keys before it; 0 and seq_len otherwise)."""

from __future__ import annotations

import triton
import triton.language as tl

from kernels.flash_gqa_common import (
    allowed_mask,
    key_range,
    key_tiles,
    load_doc_ids,
    load_rows,
    load_tile,
    store_rows,
    tile_is_full,
    tile_to_visit,
)


@triton.jit
def fwd_kernel(
    Q, K, V, OUT, LSE, DOC, SEG_START, SEG_END, BLOCK_IDX, BLOCK_CNT,
    s_qb, s_qs, s_qh, s_kb, s_ks, s_kh, s_vb, s_vs, s_vh, s_ob, s_os, s_oh,
    s_lb, s_lh, s_db, s_ih, s_iq, s_ch,
    seq_len, q_offset, q_len, head_dim, grid_heads, sm_scale, window,
    GROUP: tl.constexpr, HAS_DOC: tl.constexpr, SPARSE: tl.constexpr, S2_BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PACK_GQA: tl.constexpr,
):  # fmt: skip
    """One program per (query tile, query head): online softmax over the key tiles it may read.
    PACK_GQA: one program per (query tile, KV head) whose rows are the group's query heads at
    BLOCK_M // GROUP positions, so each K/V tile is loaded once for the whole group."""
    pid_m, pid_bh = tl.program_id(0), tl.program_id(1)
    b = pid_bh // grid_heads
    rows = tl.arange(0, BLOCK_M)
    if PACK_GQA:
        hk = pid_bh % grid_heads
        q_first = q_offset + pid_m * (BLOCK_M // GROUP)
        q_last = tl.minimum(q_first + BLOCK_M // GROUP, q_offset + q_len) - 1
        offs_m = q_first + rows // GROUP
        heads = hk * GROUP + rows % GROUP
    else:
        hq = pid_bh % grid_heads
        hk = hq // GROUP
        q_first = q_offset + pid_m * BLOCK_M
        q_last = tl.minimum(q_first + BLOCK_M, q_offset + q_len) - 1
        offs_m = q_first + rows
        heads = hq + rows * 0
    offs_d = tl.arange(0, BLOCK_D)
    q = load_rows(Q, b, heads, offs_m - q_offset, offs_d, q_len, head_dim, s_qb, s_qs, s_qh)
    doc_q = load_doc_ids(DOC, b, offs_m, seq_len, s_db, HAS_DOC, BLOCK_M)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    qk_scale = sm_scale * 1.4426950408889634  # exp2 instead of exp
    lo = key_range(q_first, q_last, b, SEG_START, s_db, window, HAS_DOC)
    row = q_first // S2_BLOCK
    lo_tile, n_iter = key_tiles(lo, q_last, hk, row, BLOCK_CNT, s_ch, SPARSE, S2_BLOCK, BLOCK_N)
    for i in range(0, n_iter):
        k_first = tile_to_visit(i, lo_tile, row, hk, BLOCK_IDX, s_ih, s_iq, SPARSE, S2_BLOCK // BLOCK_N) * BLOCK_N
        k_last = k_first + BLOCK_N - 1
        if (k_first <= q_last) & (k_last >= lo):  # S2 tiles past the diagonal or before the document
            offs_n = k_first + tl.arange(0, BLOCK_N)
            k = load_tile(K, b, hk, offs_n, offs_d, seq_len, head_dim, s_kb, s_ks, s_kh)
            v = load_tile(V, b, hk, offs_n, offs_d, seq_len, head_dim, s_vb, s_vs, s_vh)
            qk = tl.dot(q, tl.trans(k)) * qk_scale
            if not tile_is_full(q_first, q_last, k_first, k_last, seq_len, window, SEG_END, b, s_db, HAS_DOC):
                doc_k = load_doc_ids(DOC, b, offs_n, seq_len, s_db, HAS_DOC, BLOCK_N)
                qk = tl.where(allowed_mask(offs_m, offs_n, seq_len, doc_q, doc_k, window), qk, float("-inf"))
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
    rows_q = offs_m - q_offset
    store_rows(OUT, acc / l_safe[:, None], b, heads, rows_q, offs_d, q_len, head_dim, s_ob, s_os, s_oh)
    tl.store(LSE + b * s_lb + heads * s_lh + rows_q, lse, mask=rows_q < q_len)
