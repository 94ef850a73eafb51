"""Triton flash attention for GQA, causal, inside packed documents, forward and backward.

One kernel family serves dense and S2-sparse attention. Dense: each query tile walks the key
tiles from its document's start (or window's) to the diagonal. Sparse: it walks a precomputed list
of allowed S2 blocks (`kernels.patterns.block_lists`), each S2 block split into key tiles, skipping
tiles before its document, so the work falls with the pattern's density. Query and key tiles
(BLOCK_M, BLOCK_N) are sized per kernel and head dim, apart from the S2 block size, and autotuned on
a GPU (`CANDIDATES`). The mask is applied only to tiles that need it (the diagonal, the window's
edge, document boundaries, the sequence end): interior tiles run mask-free. K/V are never repeated
for GQA: a query head reads its KV head through strides. The backward pass has no atomics: one
program per (key tile, KV head) accumulates dK/dV over the group's query heads, one per (query
tile, query head) accumulates dQ.

Shapes: q [b, s, hq, d], k/v [b, s, hkv, d], any strides with a contiguous last dim; doc_ids [b, s]
must label contiguous segments (as packing writes them). Runs on CPU under TRITON_INTERPRET=1.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass

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
def _rows(PTR, b, heads, pos, offs_d, seq_len, head_dim, s_b, s_s, s_h):
    """Row i of the tile is position pos[i] of head heads[i] (packed GQA mixes heads in one tile)."""
    mask = (pos[:, None] < seq_len) & (offs_d[None, :] < head_dim)
    return tl.load(PTR + b * s_b + pos[:, None] * s_s + heads[:, None] * s_h + offs_d[None, :], mask=mask, other=0.0)


@triton.jit
def _store_rows(PTR, value, b, heads, pos, offs_d, seq_len, head_dim, s_b, s_s, s_h):
    mask = (pos[:, None] < seq_len) & (offs_d[None, :] < head_dim)
    ptrs = PTR + b * s_b + pos[:, None] * s_s + heads[:, None] * s_h + offs_d[None, :]
    tl.store(ptrs, value.to(PTR.dtype.element_ty), mask=mask)


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
def _tile_is_full(q_first, q_last, k_first, k_last, seq_len, window, SEG_END, b, s_db, HAS_DOC: tl.constexpr):
    """Every query of [q_first, q_last] may read every key of [k_first, k_last]: the tile is wholly
    below the diagonal, inside the window and the sequence, and one document spans it (segments are
    contiguous, so the key tile's first document reaching q_last is enough). Such tiles skip the mask."""
    full = (k_last <= q_first) & (k_last < seq_len) & (q_last - k_first < window)
    if HAS_DOC:
        full = full & (tl.load(SEG_END + b * s_db + k_first) > q_last)
    return full


@triton.jit
def _key_range(q_first, q_last, b, SEG_START, s_db, window, HAS_DOC: tl.constexpr):
    """[lo, q_last]: the keys some query of [q_first, q_last] may read (its first query's document
    start or window start, to the diagonal)."""
    lo = tl.maximum(q_first - window + 1, 0)
    if HAS_DOC:
        lo = tl.maximum(lo, tl.load(SEG_START + b * s_db + q_first))
    return lo


@triton.jit
def _query_end(k_last, b, SEG_END, s_db, seq_len, window, HAS_DOC: tl.constexpr):
    """The end (exclusive) of the queries that may read key k_last or an earlier key of its tile."""
    hi = tl.minimum(seq_len, k_last + window)
    if HAS_DOC:
        hi = tl.minimum(hi, tl.load(SEG_END + b * s_db + k_last))
    return hi


@triton.jit
def _key_tiles(lo, q_last, hk, row, BLOCK_CNT, s_ch, SPARSE: tl.constexpr, S2_BLOCK: tl.constexpr,
               BLOCK_N: tl.constexpr):  # fmt: skip
    """(first tile, count) a query tile walks: its S2 row's blocks split into key tiles (sparse), or
    the tiles from `lo` to the diagonal (dense)."""
    if SPARSE:
        return 0, tl.load(BLOCK_CNT + hk * s_ch + row) * (S2_BLOCK // BLOCK_N)
    return lo // BLOCK_N, q_last // BLOCK_N + 1 - lo // BLOCK_N


@triton.jit
def _visit(i, lo_tile, row, h, BLOCK_IDX, s_ih, s_iq, SPARSE: tl.constexpr, SUB: tl.constexpr):
    """The i-th tile to visit: lo_tile + i (dense), or sub-tile i % SUB of the (i // SUB)-th S2 block
    of the row's list (sparse; an S2 block holds SUB tiles)."""
    tile = lo_tile + i
    if SPARSE:
        tile = tl.load(BLOCK_IDX + h * s_ih + row * s_iq + i // SUB) * SUB + i % SUB
    return tile


@triton.jit
def _fwd_kernel(
    Q, K, V, OUT, LSE, DOC, SEG_START, SEG_END, BLOCK_IDX, BLOCK_CNT,
    s_qb, s_qs, s_qh, s_kb, s_ks, s_kh, s_vb, s_vs, s_vh, s_ob, s_os, s_oh,
    s_lb, s_lh, s_db, s_ih, s_iq, s_ch,
    seq_len, head_dim, grid_heads, sm_scale, window,
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
        q_first = pid_m * (BLOCK_M // GROUP)
        q_last = tl.minimum(q_first + BLOCK_M // GROUP, seq_len) - 1
        offs_m = q_first + rows // GROUP
        heads = hk * GROUP + rows % GROUP
    else:
        hq = pid_bh % grid_heads
        hk = hq // GROUP
        q_first = pid_m * BLOCK_M
        q_last = tl.minimum(q_first + BLOCK_M, seq_len) - 1
        offs_m = q_first + rows
        heads = hq + rows * 0
    offs_d = tl.arange(0, BLOCK_D)
    q = _rows(Q, b, heads, offs_m, offs_d, seq_len, head_dim, s_qb, s_qs, s_qh)
    doc_q = _doc_ids(DOC, b, offs_m, seq_len, s_db, HAS_DOC, BLOCK_M)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    qk_scale = sm_scale * 1.4426950408889634  # exp2 instead of exp
    lo = _key_range(q_first, q_last, b, SEG_START, s_db, window, HAS_DOC)
    row = q_first // S2_BLOCK
    lo_tile, n_iter = _key_tiles(lo, q_last, hk, row, BLOCK_CNT, s_ch, SPARSE, S2_BLOCK, BLOCK_N)
    for i in range(0, n_iter):
        k_first = _visit(i, lo_tile, row, hk, BLOCK_IDX, s_ih, s_iq, SPARSE, S2_BLOCK // BLOCK_N) * BLOCK_N
        k_last = k_first + BLOCK_N - 1
        if (k_first <= q_last) & (k_last >= lo):  # S2 tiles past the diagonal or before the document
            offs_n = k_first + tl.arange(0, BLOCK_N)
            k = _tile(K, b, hk, offs_n, offs_d, seq_len, head_dim, s_kb, s_ks, s_kh)
            v = _tile(V, b, hk, offs_n, offs_d, seq_len, head_dim, s_vb, s_vs, s_vh)
            qk = tl.dot(q, tl.trans(k)) * qk_scale
            if not _tile_is_full(q_first, q_last, k_first, k_last, seq_len, window, SEG_END, b, s_db, HAS_DOC):
                doc_k = _doc_ids(DOC, b, offs_n, seq_len, s_db, HAS_DOC, BLOCK_N)
                qk = tl.where(_allowed(offs_m, offs_n, seq_len, doc_q, doc_k, window), qk, float("-inf"))
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
    _store_rows(OUT, acc / l_safe[:, None], b, heads, offs_m, offs_d, seq_len, head_dim, s_ob, s_os, s_oh)
    tl.store(LSE + b * s_lb + heads * s_lh + offs_m, lse, mask=offs_m < seq_len)


@triton.jit
def _probs_and_dscores(q, k, v, do, lse, delta, sm_scale, full, offs_m, offs_n, seq_len, doc_q, doc_k, window):
    """Recomputed probabilities P and score gradients dS = P * (dO V^T - delta) of one tile pair;
    the mask only where the tile is not `full`."""
    p = tl.exp(tl.dot(q, tl.trans(k)) * sm_scale - lse[:, None])
    if not full:
        p = tl.where(_allowed(offs_m, offs_n, seq_len, doc_q, doc_k, window), p, 0.0)
    return p, p * (tl.dot(do, tl.trans(v)) - delta[:, None])


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, DOC, SEG_START, SEG_END, BLOCK_IDX, BLOCK_CNT,
    s_qb, s_qs, s_qh, s_kb, s_ks, s_kh, s_vb, s_vs, s_vh, s_ob, s_os, s_oh,
    s_lb, s_lh, s_db, s_ih, s_iq, s_ch, s_dkb, s_dks, s_dkh, s_dvb, s_dvs, s_dvh,
    seq_len, head_dim, num_kv_heads, sm_scale, window,
    GROUP: tl.constexpr, HAS_DOC: tl.constexpr, SPARSE: tl.constexpr, S2_BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """One program per (key tile, KV head): K and V stay loaded while it walks the query tiles that
    read them (the transposed S2 list, or the diagonal to the document's or window's end) for every
    query head of its group."""
    pid_n, pid_bh = tl.program_id(0), tl.program_id(1)
    b, hk = pid_bh // num_kv_heads, pid_bh % num_kv_heads
    k_first = pid_n * BLOCK_N
    k_last = tl.minimum(k_first + BLOCK_N, seq_len) - 1
    offs_n = k_first + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    k = _tile(K, b, hk, offs_n, offs_d, seq_len, head_dim, s_kb, s_ks, s_kh)
    v = _tile(V, b, hk, offs_n, offs_d, seq_len, head_dim, s_vb, s_vs, s_vh)
    doc_k = _doc_ids(DOC, b, offs_n, seq_len, s_db, HAS_DOC, BLOCK_N)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    hi = _query_end(k_last, b, SEG_END, s_db, seq_len, window, HAS_DOC)
    row = k_first // S2_BLOCK
    if SPARSE:
        lo_tile, n_iter = 0, tl.load(BLOCK_CNT + hk * s_ch + row) * (S2_BLOCK // BLOCK_M)
    else:
        lo_tile = k_first // BLOCK_M
        n_iter = tl.cdiv(hi, BLOCK_M) - lo_tile
    for g in range(0, GROUP):
        hq = hk * GROUP + g
        for i in range(0, n_iter):
            q_first = _visit(i, lo_tile, row, hk, BLOCK_IDX, s_ih, s_iq, SPARSE, S2_BLOCK // BLOCK_M) * BLOCK_M
            q_last = tl.minimum(q_first + BLOCK_M, seq_len) - 1
            if (q_last >= k_first) & (q_first < hi):
                offs_m = q_first + tl.arange(0, BLOCK_M)
                q = _tile(Q, b, hq, offs_m, offs_d, seq_len, head_dim, s_qb, s_qs, s_qh)
                do = _tile(DO, b, hq, offs_m, offs_d, seq_len, head_dim, s_ob, s_os, s_oh)
                lse = tl.load(LSE + b * s_lb + hq * s_lh + offs_m, mask=offs_m < seq_len, other=0.0)
                delta = tl.load(DELTA + b * s_lb + hq * s_lh + offs_m, mask=offs_m < seq_len, other=0.0)
                doc_q = _doc_ids(DOC, b, offs_m, seq_len, s_db, HAS_DOC, BLOCK_M)
                full = _tile_is_full(q_first, q_last, k_first, k_last, seq_len, window, SEG_END, b, s_db, HAS_DOC)
                p, ds = _probs_and_dscores(q, k, v, do, lse, delta, sm_scale, full, offs_m, offs_n, seq_len, doc_q,
                                           doc_k, window)  # fmt: skip
                dv += tl.dot(tl.trans(p.to(do.dtype)), do)
                dk += tl.dot(tl.trans(ds.to(q.dtype)), q)
    _store_tile(DK, dk * sm_scale, b, hk, offs_n, offs_d, seq_len, head_dim, s_dkb, s_dks, s_dkh)
    _store_tile(DV, dv, b, hk, offs_n, offs_d, seq_len, head_dim, s_dvb, s_dvs, s_dvh)


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, DOC, SEG_START, SEG_END, BLOCK_IDX, BLOCK_CNT,
    s_qb, s_qs, s_qh, s_kb, s_ks, s_kh, s_vb, s_vs, s_vh, s_ob, s_os, s_oh,
    s_lb, s_lh, s_db, s_ih, s_iq, s_ch, s_dqb, s_dqs, s_dqh,
    seq_len, head_dim, num_q_heads, sm_scale, window,
    GROUP: tl.constexpr, HAS_DOC: tl.constexpr, SPARSE: tl.constexpr, S2_BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """One program per (query tile, query head); walks the same key tiles as the forward pass."""
    pid_m, pid_bh = tl.program_id(0), tl.program_id(1)
    b, hq = pid_bh // num_q_heads, pid_bh % num_q_heads
    hk = hq // GROUP
    q_first = pid_m * BLOCK_M
    q_last = tl.minimum(q_first + BLOCK_M, seq_len) - 1
    offs_m = q_first + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q = _tile(Q, b, hq, offs_m, offs_d, seq_len, head_dim, s_qb, s_qs, s_qh)
    do = _tile(DO, b, hq, offs_m, offs_d, seq_len, head_dim, s_ob, s_os, s_oh)
    lse = tl.load(LSE + b * s_lb + hq * s_lh + offs_m, mask=offs_m < seq_len, other=0.0)
    delta = tl.load(DELTA + b * s_lb + hq * s_lh + offs_m, mask=offs_m < seq_len, other=0.0)
    doc_q = _doc_ids(DOC, b, offs_m, seq_len, s_db, HAS_DOC, BLOCK_M)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    lo = _key_range(q_first, q_last, b, SEG_START, s_db, window, HAS_DOC)
    row = q_first // S2_BLOCK
    lo_tile, n_iter = _key_tiles(lo, q_last, hk, row, BLOCK_CNT, s_ch, SPARSE, S2_BLOCK, BLOCK_N)
    for i in range(0, n_iter):
        k_first = _visit(i, lo_tile, row, hk, BLOCK_IDX, s_ih, s_iq, SPARSE, S2_BLOCK // BLOCK_N) * BLOCK_N
        k_last = k_first + BLOCK_N - 1
        if (k_first <= q_last) & (k_last >= lo):
            offs_n = k_first + tl.arange(0, BLOCK_N)
            k = _tile(K, b, hk, offs_n, offs_d, seq_len, head_dim, s_kb, s_ks, s_kh)
            v = _tile(V, b, hk, offs_n, offs_d, seq_len, head_dim, s_vb, s_vs, s_vh)
            doc_k = _doc_ids(DOC, b, offs_n, seq_len, s_db, HAS_DOC, BLOCK_N)
            full = _tile_is_full(q_first, q_last, k_first, k_last, seq_len, window, SEG_END, b, s_db, HAS_DOC)
            _, ds = _probs_and_dscores(q, k, v, do, lse, delta, sm_scale, full, offs_m, offs_n, seq_len, doc_q, doc_k,
                                       window)  # fmt: skip
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

    def tensors(self) -> list[torch.Tensor]:
        return [self.fwd_index, self.fwd_count, self.bwd_index, self.bwd_count]


def _strides(t: torch.Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


@dataclass(frozen=True)
class Tiles:
    """One launch configuration of one kernel: query and key tile sizes, warps, pipeline stages."""

    block_m: int
    block_n: int
    num_warps: int = 4
    num_stages: int = 2
    pack_gqa: bool = False  # forward only: the rows of a query tile are the group's heads (see _fwd_kernel)

    def fit(self, cap: int) -> Tiles:
        """Tiles no larger than `cap` (the S2 block size: a tile must not straddle two S2 blocks)."""
        return Tiles(min(self.block_m, cap), min(self.block_n, cap), self.num_warps, self.num_stages, self.pack_gqa)

    def fits_group(self, group: int) -> bool:
        """Packed GQA needs the group to be a power of two that divides the query tile."""
        return not self.pack_gqa or (group & (group - 1) == 0 and self.block_m % group == 0)

    @staticmethod
    def encode(tiles: dict[str, Tiles] | None) -> str:
        """{"fwd", "dkdv", "dq"} -> Tiles as a string a custom operator can take ("": none)."""
        if not tiles:
            return ""
        return ",".join(str(int(x)) for name in KERNELS for x in dataclasses.astuple(tiles[name]))

    @staticmethod
    def decode(encoded: str) -> dict[str, Tiles]:
        if not encoded:
            return {}
        flat = [int(x) for x in encoded.split(",")]
        width = len(dataclasses.fields(Tiles))
        rows = [flat[i : i + width] for i in range(0, len(flat), width)]
        return {name: Tiles(*row[:-1], pack_gqa=bool(row[-1])) for name, row in zip(KERNELS, rows, strict=True)}


KERNELS = ("fwd", "dkdv", "dq")


# What the autotuner may pick, per kernel and padded head dim; the first is used untuned (CPU, or
# KERNELS_AUTOTUNE=0). The forward and dQ hold a query tile and stream key tiles; dK/dV holds a key
# tile and streams query tiles, so its query tile is small. `python -m kernels.compile_report`
# compiles every one for sm_80 and sm_90 and fails on spills or shared memory over the limit; these
# were chosen from a sweep of that report (with 4 warps at head dim 128, or K/V tiles of 64 keys at
# head dim 64, dK/dV spilled 100-500 bytes per thread).
CANDIDATES: dict[tuple[str, int], list[Tiles]] = {
    ("fwd", 64): [Tiles(64, 64, 4, 3), Tiles(128, 64, 8, 3), Tiles(64, 32, 4, 3), Tiles(64, 64, 4, 3, True)],
    ("fwd", 128): [Tiles(64, 64, 8, 3), Tiles(128, 64, 8, 2), Tiles(128, 32, 8, 2), Tiles(64, 64, 8, 3, True)],
    ("dkdv", 64): [Tiles(64, 32, 8, 1), Tiles(32, 32, 4, 1), Tiles(64, 32, 8, 2)],
    ("dkdv", 128): [Tiles(32, 64, 8, 2), Tiles(64, 64, 8, 2), Tiles(16, 64, 8, 2), Tiles(16, 32, 4, 2)],
    ("dq", 64): [Tiles(64, 32, 4, 2), Tiles(128, 32, 8, 2), Tiles(64, 64, 8, 2)],
    ("dq", 128): [Tiles(64, 64, 8, 2), Tiles(32, 32, 8, 2)],  # (128, 32) spills once fitted to 64-token S2 blocks
}
_TUNED: dict[tuple, Tiles] = {}


def candidates(kernel: str, block_d: int, cap: int, group: int = 1) -> list[Tiles]:
    """The distinct candidates of `kernel` at padded head dim `block_d`, fitted under `cap`, that
    suit GQA groups of `group` query heads."""
    listed = CANDIDATES[(kernel, 64 if block_d <= 64 else 128)]
    return list(dict.fromkeys(t.fit(cap) for t in listed if t.fit(cap).fits_group(group)))


def pick_tiles(kernel: str, key: tuple, options: list[Tiles], launch, tune: bool, timer=None) -> Tiles:
    """The fastest of `options` for this shape, timed once per `key` and remembered (tune), or the first."""
    if not tune or len(options) == 1:
        return options[0]
    if (kernel, *key) not in _TUNED:
        if timer is None:
            from triton.testing import do_bench as timer
        times = {t: timer(lambda t=t: launch(t)) for t in options}
        _TUNED[(kernel, *key)] = min(times, key=times.get)
    return _TUNED[(kernel, *key)]


def _autotune(device: torch.device) -> bool:
    return device.type == "cuda" and os.environ.get("KERNELS_AUTOTUNE", "1") != "0"


def _list_args(lists: list[torch.Tensor], backward: bool, device) -> tuple:
    """(index, count, their strides) for a launch; dense (no lists), the kernels never read them,
    but Triton wants a pointer on the kernel's device."""
    if not lists:
        dummy = torch.zeros(1, dtype=torch.int32, device=device)
        return dummy, dummy, 0, 0, 0
    index, count = lists[2:] if backward else lists[:2]
    return index, count, index.stride(0), index.stride(1), count.stride(0)


def _documents(doc_ids: torch.Tensor | None) -> list[torch.Tensor]:
    """[int32 document ids, each position's segment start, its end], made once for the forward and
    the backward; empty without documents."""
    if doc_ids is None:
        return []
    doc = doc_ids.to(torch.int32).contiguous()
    return [doc, *segment_bounds(doc)]


def _doc_args(documents: list[torch.Tensor], device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(doc, segment start, segment end) for a launch; placeholders on the device without documents."""
    if not documents:
        doc = torch.zeros(1, 1, dtype=torch.int32, device=device)
        return doc, doc, doc
    return tuple(documents)


def _tuning_key(q: torch.Tensor, k: torch.Tensor, has_doc: bool, sparse: bool, cap: int) -> tuple:
    hq, hkv, s = q.shape[2], k.shape[2], q.shape[1]
    return (q.dtype, triton.next_power_of_2(q.shape[3]), hq // hkv, has_doc, sparse, cap, triton.next_power_of_2(s))


def _options(kernel: str, tiles: str, block_d: int, cap: int, group: int = 1) -> list[Tiles]:
    """The fixed configuration of `kernel` when `tiles` (Tiles.encode) names one, else the candidates."""
    fixed = Tiles.decode(tiles)
    return [fixed[kernel].fit(cap)] if fixed else candidates(kernel, block_d, cap, group)


# The kernels run inside custom operators so that torch.compile treats them as opaque calls with
# known output shapes: traced into, Dynamo and Inductor re-derive every Triton launch (and the
# autotuner's timing runs), which fails for these kernels on the GPU and under the interpreter.
@torch.library.custom_op("kernels::flash_gqa_fwd", mutates_args=())
def _flash_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, documents: list[torch.Tensor], lists: list[torch.Tensor],
    cap: int, window: int, tiles: str,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(out, lse); `documents`: `_documents` (or empty); `lists`: SparsityLists.tensors() (S2) or empty
    (dense); `tiles`: Tiles.encode."""
    b, s, hq, d = q.shape
    hkv = k.shape[2]
    block_d = triton.next_power_of_2(d)
    o = torch.empty_like(q)
    lse = torch.empty(b, hq, s, device=q.device, dtype=torch.float32)
    doc, seg_start, seg_end = _doc_args(documents, q.device)
    index, count, s_ih, s_iq, s_ch = _list_args(lists, backward=False, device=q.device)
    common = dict(GROUP=hq // hkv, HAS_DOC=bool(documents), SPARSE=bool(lists), S2_BLOCK=cap,
                  BLOCK_D=block_d)  # fmt: skip

    def launch(t: Tiles):
        positions, grid_heads = (t.block_m // (hq // hkv), hkv) if t.pack_gqa else (t.block_m, hq)
        _fwd_kernel[(triton.cdiv(s, positions), b * grid_heads)](
            q, k, v, o, lse, doc, seg_start, seg_end, index, count,
            *_strides(q), *_strides(k), *_strides(v), *_strides(o), lse.stride(0), lse.stride(1), doc.stride(0),
            s_ih, s_iq, s_ch, s, d, grid_heads, 1.0 / math.sqrt(d), window,
            **common, BLOCK_M=t.block_m, BLOCK_N=t.block_n, PACK_GQA=t.pack_gqa, num_warps=t.num_warps,
            num_stages=t.num_stages,
        )  # fmt: skip

    options = _options("fwd", tiles, block_d, cap, hq // hkv)
    if not options[0].fits_group(hq // hkv):
        raise ValueError(f"{options[0]}: packed GQA needs a power-of-two group dividing BLOCK_M, not {hq // hkv}")
    key = _tuning_key(q, k, bool(documents), bool(lists), cap)
    launch(pick_tiles("fwd", key, options, launch, _autotune(q.device)))
    return o, lse


@_flash_fwd.register_fake
def _(q, k, v, documents, lists, cap, window, tiles):
    b, s, hq, _ = q.shape
    return torch.empty_like(q), q.new_empty(b, hq, s, dtype=torch.float32)


@torch.library.custom_op("kernels::flash_gqa_bwd", mutates_args=())
def _flash_bwd(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
    documents: list[torch.Tensor], lists: list[torch.Tensor], cap: int, window: int, tiles: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """(dq, dk, dv): dK/dV by key tile over the backward lists, dQ by query tile over the forward ones."""
    b, s, hq, d = q.shape
    hkv = k.shape[2]
    block_d = triton.next_power_of_2(d)
    do = do.contiguous()
    delta = (do.float() * o.float()).sum(-1).transpose(1, 2).contiguous()
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    doc, seg_start, seg_end = _doc_args(documents, q.device)
    sm_scale = 1.0 / math.sqrt(d)
    common = dict(GROUP=hq // hkv, HAS_DOC=bool(documents), SPARSE=bool(lists), S2_BLOCK=cap,
                  BLOCK_D=block_d)  # fmt: skip
    strides = (*_strides(q), *_strides(k), *_strides(v), *_strides(do), lse.stride(0), lse.stride(1), doc.stride(0))
    bwd_lists = _list_args(lists, backward=True, device=q.device)
    fwd_lists = _list_args(lists, backward=False, device=q.device)

    def launch_dkdv(t: Tiles):
        _bwd_dkdv_kernel[(triton.cdiv(s, t.block_n), b * hkv)](
            q, k, v, do, lse, delta, dk, dv, doc, seg_start, seg_end, *bwd_lists[:2],
            *strides, *bwd_lists[2:], *_strides(dk), *_strides(dv), s, d, hkv, sm_scale, window,
            **common, BLOCK_M=t.block_m, BLOCK_N=t.block_n, num_warps=t.num_warps, num_stages=t.num_stages,
        )  # fmt: skip

    def launch_dq(t: Tiles):
        _bwd_dq_kernel[(triton.cdiv(s, t.block_m), b * hq)](
            q, k, v, do, lse, delta, dq, doc, seg_start, seg_end, *fwd_lists[:2],
            *strides, *fwd_lists[2:], *_strides(dq), s, d, hq, sm_scale, window,
            **common, BLOCK_M=t.block_m, BLOCK_N=t.block_n, num_warps=t.num_warps, num_stages=t.num_stages,
        )  # fmt: skip

    key = _tuning_key(q, k, bool(documents), bool(lists), cap)
    for name, launch in (("dkdv", launch_dkdv), ("dq", launch_dq)):
        launch(pick_tiles(name, key, _options(name, tiles, block_d, cap), launch, _autotune(q.device)))
    return dq, dk, dv


@_flash_bwd.register_fake
def _(do, q, k, v, o, lse, documents, lists, cap, window, tiles):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, documents, lists, cap, window, tiles = inputs
    ctx.save_for_backward(q, k, v, *output, *documents, *lists)
    ctx.documents, ctx.cap, ctx.window, ctx.tiles = len(documents), cap, window, tiles
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, do, _dlse):
    q, k, v, o, lse, *rest = ctx.saved_tensors
    documents, lists = rest[: ctx.documents], rest[ctx.documents :]
    dq, dk, dv = _flash_bwd(do, q, k, v, o, lse, documents, lists, ctx.cap, ctx.window, ctx.tiles)
    # a tensor list's gradient: one per element
    return dq, dk, dv, [None] * len(documents), [None] * len(lists), None, None, None


_flash_fwd.register_autograd(_backward, setup_context=_setup_context)


def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    doc_ids: torch.Tensor | None = None,
    lists: SparsityLists | list[torch.Tensor] | None = None,
    block: int = 128,
    return_lse: bool = False,
    window: int | None = None,
    tiles: dict[str, Tiles] | None = None,
):
    """Causal GQA attention; with `lists`, only the listed key blocks (S2 block size `block`) are
    read; with a sliding `window`, query i reads keys j with i - j < window. Without lists, `block`
    caps the tile sizes (tests use small tiles to cross many tile edges). `tiles` ({"fwd", "dkdv",
    "dq"} -> Tiles) fixes the launch configurations instead of the tuned or default ones."""
    if q.shape[-1] not in (16, 32, 64, 96, 128, 256) and q.shape[-1] % 16:
        raise ValueError(f"head_dim {q.shape[-1]} is not supported (multiples of 16)")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"query heads {q.shape[2]} must be a multiple of KV heads {k.shape[2]}")
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    tensors = lists.tensors() if isinstance(lists, SparsityLists) else list(lists or [])
    o, lse = _flash_fwd(q, k, v, _documents(doc_ids), tensors, block, window or q.shape[1], Tiles.encode(tiles))
    return (o, lse) if return_lse else o
