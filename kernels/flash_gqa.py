"""Triton flash attention for GQA, causal, inside packed documents, forward and backward.

One kernel family serves dense and S2-sparse attention. Dense: each query tile walks the key
tiles from its document's start (or window's) to the diagonal. Sparse: it walks a precomputed list
of allowed S2 blocks (`kernels.patterns.block_lists`), each S2 block split into key tiles, skipping
tiles before its document, so the work falls with the pattern's density. Query and key tiles
(BLOCK_M, BLOCK_N) are sized per kernel and head dim, apart from the S2 block size, and autotuned on
a GPU (`CANDIDATES`). The mask is applied only to tiles that need it (the diagonal, the window's
edge, document boundaries, the sequence end): interior tiles run mask-free. K/V are never repeated
for GQA: a query head reads its KV head through strides. The backward pass: one program per (key
tile, KV head) accumulates dK/dV over the group's query heads, and dQ comes either from one program
per (query tile, query head) (deterministic, the default off the GPU) or from the dK/dV program
itself through fp32 atomics (FlashAttention-2's one pass); on a GPU the tuner times both per shape,
unless torch.use_deterministic_algorithms(True) is set.

Shapes: q [b, s, hq, d], k/v [b, s, hkv, d], any strides with a contiguous last dim; doc_ids [b, s]
must label contiguous segments (as packing writes them). Runs on CPU under TRITON_INTERPRET=1.

Kernels and launches live apart: `flash_gqa_common` (shared Triton helpers), `flash_gqa_fwd` and
`flash_gqa_bwd` (the kernels), `flash_gqa_tuning` (tile candidates and the autotuner); this module
launches them inside custom operators and exposes `flash_attention`.
"""

from __future__ import annotations

import math

import torch
import triton

from kernels.flash_gqa_bwd import bwd_dkdv_kernel, bwd_dq_kernel
from kernels.flash_gqa_fwd import fwd_kernel
from kernels.flash_gqa_tuning import Tiles, autotune_enabled, backward_plans, launch_options, pick_tiles, tuning_key
from kernels.patterns import block_lists


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
        self.fwd_index, self.fwd_count = (t.to(device) for t in block_lists(mask))
        self.bwd_index, self.bwd_count = (t.to(device) for t in block_lists(mask.transpose(1, 2)))

    def tensors(self) -> list[torch.Tensor]:
        return [self.fwd_index, self.fwd_count, self.bwd_index, self.bwd_count]


def _strides(t: torch.Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


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


# The kernels run inside custom operators so that torch.compile treats them as opaque calls with
# known output shapes: traced into, Dynamo and Inductor re-derive every Triton launch (and the
# autotuner's timing runs), which fails for these kernels on the GPU and under the interpreter.
@torch.library.custom_op("kernels::flash_gqa_fwd", mutates_args=())
def _flash_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, documents: list[torch.Tensor], lists: list[torch.Tensor],
    cap: int, window: int, tiles: str, q_offset: int,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(out, lse); `documents`: `_documents` (or empty); `lists`: SparsityLists.tensors() (S2) or empty
    (dense); `tiles`: Tiles.encode; query row r at position q_offset + r of the keys."""
    b, s, hq, d = q.shape
    hkv, seq_len = k.shape[2], k.shape[1]
    block_d = triton.next_power_of_2(d)
    o = torch.empty_like(q)
    lse = torch.empty(b, hq, s, device=q.device, dtype=torch.float32)
    doc, seg_start, seg_end = _doc_args(documents, q.device)
    index, count, s_ih, s_iq, s_ch = _list_args(lists, backward=False, device=q.device)
    common = dict(GROUP=hq // hkv, HAS_DOC=bool(documents), SPARSE=bool(lists), S2_BLOCK=cap,
                  BLOCK_D=block_d)  # fmt: skip

    def launch(t: Tiles):
        positions, grid_heads = (t.block_m // (hq // hkv), hkv) if t.pack_gqa else (t.block_m, hq)
        fwd_kernel[(triton.cdiv(s, positions), b * grid_heads)](
            q, k, v, o, lse, doc, seg_start, seg_end, index, count,
            *_strides(q), *_strides(k), *_strides(v), *_strides(o), lse.stride(0), lse.stride(1), doc.stride(0),
            s_ih, s_iq, s_ch, seq_len, q_offset, s, d, grid_heads, 1.0 / math.sqrt(d), window,
            **common, BLOCK_M=t.block_m, BLOCK_N=t.block_n, PACK_GQA=t.pack_gqa, num_warps=t.num_warps,
            num_stages=t.num_stages,
        )  # fmt: skip

    options = launch_options("fwd", tiles, block_d, cap, hq // hkv)
    if not options[0].fits_group(hq // hkv):
        raise ValueError(f"{options[0]}: packed GQA needs a power-of-two group dividing BLOCK_M, not {hq // hkv}")
    key = tuning_key(q, k, bool(documents), bool(lists), cap)
    launch(pick_tiles("fwd", key, options, launch, autotune_enabled(q.device)))
    return o, lse


@_flash_fwd.register_fake
def _(q, k, v, documents, lists, cap, window, tiles, q_offset):
    b, s, hq, _ = q.shape
    return torch.empty_like(q), q.new_empty(b, hq, s, dtype=torch.float32)


@torch.library.custom_op("kernels::flash_gqa_bwd", mutates_args=())
def _flash_bwd(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
    documents: list[torch.Tensor], lists: list[torch.Tensor], cap: int, window: int, tiles: str, q_offset: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """(dq, dk, dv): dK/dV by key tile over the backward lists; dQ by query tile over the forward ones,
    or in the same pass through fp32 atomics (`Tiles.atomic_dq`), whichever the plan says."""
    b, s, hq, d = q.shape
    hkv, seq_len = k.shape[2], k.shape[1]
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
        dq_acc = torch.zeros(q.shape if t.atomic_dq else (1, 1, 1), device=q.device, dtype=torch.float32)
        bwd_dkdv_kernel[(triton.cdiv(seq_len, t.block_n), b * hkv)](
            q, k, v, do, lse, delta, dk, dv, dq_acc, doc, seg_start, seg_end, *bwd_lists[:2],
            *strides, *bwd_lists[2:], *_strides(dk), *_strides(dv), *_strides(dq_acc), seq_len, q_offset, s, d, hkv,
            sm_scale, window,
            **common, BLOCK_M=t.block_m, BLOCK_N=t.block_n, ATOMIC_DQ=t.atomic_dq, num_warps=t.num_warps,
            num_stages=t.num_stages,
        )  # fmt: skip
        if t.atomic_dq:
            dq.copy_(dq_acc)

    def launch_dq(t: Tiles):
        bwd_dq_kernel[(triton.cdiv(s, t.block_m), b * hq)](
            q, k, v, do, lse, delta, dq, doc, seg_start, seg_end, *fwd_lists[:2],
            *strides, *fwd_lists[2:], *_strides(dq), seq_len, q_offset, s, d, hq, sm_scale, window,
            **common, BLOCK_M=t.block_m, BLOCK_N=t.block_n, num_warps=t.num_warps, num_stages=t.num_stages,
        )  # fmt: skip

    def launch(plan: tuple[Tiles, ...]):
        launch_dkdv(plan[0])
        if len(plan) == 2:
            launch_dq(plan[1])

    key = tuning_key(q, k, bool(documents), bool(lists), cap)
    tune = autotune_enabled(q.device)
    dkdv_options = launch_options("dkdv", tiles, block_d, cap)
    two_pass = [t for t in dkdv_options if not t.atomic_dq]
    one_pass = [t for t in dkdv_options if t.atomic_dq]
    plans = [(t,) for t in one_pass]  # a fixed one-pass configuration is the only option
    if two_pass:
        dkdv_tiles = pick_tiles("dkdv", key, two_pass, launch_dkdv, tune)
        dq_tiles = pick_tiles("dq", key, launch_options("dq", tiles, block_d, cap), launch_dq, tune)
        plans = backward_plans(dkdv_tiles, dq_tiles, one_pass)
    launch(pick_tiles("bwd", key, plans, launch, tune))
    return dq, dk, dv


@_flash_bwd.register_fake
def _(do, q, k, v, o, lse, documents, lists, cap, window, tiles, q_offset):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, documents, lists, cap, window, tiles, q_offset = inputs
    ctx.save_for_backward(q, k, v, *output, *documents, *lists)
    ctx.documents, ctx.cap, ctx.window, ctx.tiles, ctx.q_offset = len(documents), cap, window, tiles, q_offset
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, do, _dlse):
    q, k, v, o, lse, *rest = ctx.saved_tensors
    documents, lists = rest[: ctx.documents], rest[ctx.documents :]
    dq, dk, dv = _flash_bwd(do, q, k, v, o, lse, documents, lists, ctx.cap, ctx.window, ctx.tiles, ctx.q_offset)
    # a tensor list's gradient: one per element
    return dq, dk, dv, [None] * len(documents), [None] * len(lists), None, None, None, None


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
    q_offset: int = 0,
):
    """Causal GQA attention; with `lists`, only the listed key blocks (S2 block size `block`) are
    read; with a sliding `window`, query i reads keys j with i - j < window. Without lists, `block`
    caps the tile sizes (tests use small tiles to cross many tile edges). `tiles` ({"fwd", "dkdv",
    "dq"} -> Tiles) fixes the launch configurations instead of the tuned or default ones.

    Positions are global: k/v (and `doc_ids`, [b, sk]) hold positions 0..sk - 1 and query row r is
    position `q_offset` + r, so a context-parallel chunk attends to the keys before it without
    holding the queries before it (q_offset + sq <= sk; with lists, q_offset a multiple of `block`)."""
    sq, sk = q.shape[1], k.shape[1]
    if q.shape[-1] not in (16, 32, 64, 96, 128, 256) and q.shape[-1] % 16:
        raise ValueError(f"head_dim {q.shape[-1]} is not supported (multiples of 16)")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"query heads {q.shape[2]} must be a multiple of KV heads {k.shape[2]}")
    if q_offset < 0 or q_offset + sq > sk:
        raise ValueError(f"queries at positions {q_offset}..{q_offset + sq - 1} need keys there: there are {sk}")
    if lists and q_offset % block:
        raise ValueError(f"q_offset {q_offset} must be a multiple of the S2 block size {block}")
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    tensors = lists.tensors() if isinstance(lists, SparsityLists) else list(lists or [])
    o, lse = _flash_fwd(q, k, v, _documents(doc_ids), tensors, block, window or sk, Tiles.encode(tiles), q_offset)
    return (o, lse) if return_lse else o
