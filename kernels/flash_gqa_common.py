"""Triton building blocks shared by the forward and backward attention kernels: tile loads and
stores (K/V read through strides, never repeated for GQA), document ids, the mask, and which key
tiles a query tile visits (dense: its document's or window's start to the diagonal; S2: its list)."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def load_tile(PTR, b, h, offs, offs_d, seq_len, head_dim, s_b, s_s, s_h):
    """Rows `offs` of head `h` of sequence `b` as a [rows, BLOCK_D] tile (zeros outside [0, seq_len))."""
    mask = (offs[:, None] >= 0) & (offs[:, None] < seq_len) & (offs_d[None, :] < head_dim)
    return tl.load(PTR + b * s_b + offs[:, None] * s_s + h * s_h + offs_d[None, :], mask=mask, other=0.0)


@triton.jit
def store_tile(PTR, value, b, h, offs, offs_d, seq_len, head_dim, s_b, s_s, s_h):
    mask = (offs[:, None] >= 0) & (offs[:, None] < seq_len) & (offs_d[None, :] < head_dim)
    tl.store(PTR + b * s_b + offs[:, None] * s_s + h * s_h + offs_d[None, :], value.to(PTR.dtype.element_ty), mask=mask)


@triton.jit
def load_rows(PTR, b, heads, pos, offs_d, seq_len, head_dim, s_b, s_s, s_h):
    """Row i of the tile is position pos[i] of head heads[i] (packed GQA mixes heads in one tile)."""
    mask = (pos[:, None] < seq_len) & (offs_d[None, :] < head_dim)
    return tl.load(PTR + b * s_b + pos[:, None] * s_s + heads[:, None] * s_h + offs_d[None, :], mask=mask, other=0.0)


@triton.jit
def store_rows(PTR, value, b, heads, pos, offs_d, seq_len, head_dim, s_b, s_s, s_h):
    mask = (pos[:, None] < seq_len) & (offs_d[None, :] < head_dim)
    ptrs = PTR + b * s_b + pos[:, None] * s_s + heads[:, None] * s_h + offs_d[None, :]
    tl.store(ptrs, value.to(PTR.dtype.element_ty), mask=mask)


@triton.jit
def load_doc_ids(DOC, b, offs, seq_len, s_db, HAS_DOC: tl.constexpr, BLOCK: tl.constexpr):
    ids = tl.zeros([BLOCK], dtype=tl.int32)
    if HAS_DOC:
        ids = tl.load(DOC + b * s_db + offs, mask=offs < seq_len, other=-2)
    return ids


@triton.jit
def allowed_mask(offs_m, offs_n, seq_len, doc_q, doc_k, window):
    """Causal, inside the sliding window (the sequence length when there is none), inside the
    sequence, same document (doc ids are zeros without documents)."""
    distance = offs_m[:, None] - offs_n[None, :]
    return (distance >= 0) & (distance < window) & (offs_n[None, :] < seq_len) & (doc_q[:, None] == doc_k[None, :])


@triton.jit
def tile_is_full(q_first, q_last, k_first, k_last, seq_len, window, SEG_END, b, s_db, HAS_DOC: tl.constexpr):
    """Every query of [q_first, q_last] may read every key of [k_first, k_last]: the tile is wholly
    below the diagonal, inside the window and the sequence, and one document spans it (segments are
    contiguous, so the key tile's first document reaching q_last is enough). Such tiles skip the mask."""
    full = (k_last <= q_first) & (k_last < seq_len) & (q_last - k_first < window)
    if HAS_DOC:
        full = full & (tl.load(SEG_END + b * s_db + k_first) > q_last)
    return full


@triton.jit
def key_range(q_first, q_last, b, SEG_START, s_db, window, HAS_DOC: tl.constexpr):
    """[lo, q_last]: the keys some query of [q_first, q_last] may read (its first query's document
    start or window start, to the diagonal)."""
    lo = tl.maximum(q_first - window + 1, 0)
    if HAS_DOC:
        lo = tl.maximum(lo, tl.load(SEG_START + b * s_db + q_first))
    return lo


@triton.jit
def query_end(k_last, b, SEG_END, s_db, seq_len, window, HAS_DOC: tl.constexpr):
    """The end (exclusive) of the queries that may read key k_last or an earlier key of its tile."""
    hi = tl.minimum(seq_len, k_last + window)
    if HAS_DOC:
        hi = tl.minimum(hi, tl.load(SEG_END + b * s_db + k_last))
    return hi


@triton.jit
def key_tiles(lo, q_last, hk, row, BLOCK_CNT, s_ch, SPARSE: tl.constexpr, S2_BLOCK: tl.constexpr,
               BLOCK_N: tl.constexpr):  # fmt: skip
    """(first tile, count) a query tile walks: its S2 row's blocks split into key tiles (sparse), or
    the tiles from `lo` to the diagonal (dense)."""
    if SPARSE:
        return 0, tl.load(BLOCK_CNT + hk * s_ch + row) * (S2_BLOCK // BLOCK_N)
    return lo // BLOCK_N, q_last // BLOCK_N + 1 - lo // BLOCK_N


@triton.jit
def tile_to_visit(i, lo_tile, row, h, BLOCK_IDX, s_ih, s_iq, SPARSE: tl.constexpr, SUB: tl.constexpr):
    """The i-th tile to visit: lo_tile + i (dense), or sub-tile i % SUB of the (i // SUB)-th S2 block
    of the row's list (sparse; an S2 block holds SUB tiles)."""
    tile = lo_tile + i
    if SPARSE:
        tile = tl.load(BLOCK_IDX + h * s_ih + row * s_iq + i // SUB) * SUB + i % SUB
    return tile
