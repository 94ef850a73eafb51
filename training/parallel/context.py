"""Context parallelism: each sequence split over the `cp` ranks of a group, attention exchanged.

Causal attention gives later tokens more work, so the sequence is cut into 2 x cp chunks and rank r
holds chunk r and its mirror 2 cp - 1 - r (Megatron-LM's and torchtitan's load balancing): every
rank then holds the same number of query-key pairs. Positions and document ids stay global: RoPE
rotates by each token's place in the whole sequence, and a document that crosses a chunk boundary
stays one document.

Attention on a rank: its queries against every rank's keys. Dense layers gather K and V (small
under GQA) from the group (gradients return by the gather's backward) and merge the partial result
of each source chunk with its log-sum-exp, as ring attention merges its steps. S2 layers exchange
only the key rows each peer's heads may read (its local window and strided blocks, known to every
rank from the pattern), point to point, so the bytes fall with the pattern's density. Applied from
outside, like tensor parallelism: `apply_context_parallel` replaces each attention module's core
attention; the model only receives its tokens' global positions.

Inside a rank, `attn_backend: triton` (and `flash_attn`) runs the Triton kernels: the keys are laid
out in global order (gathered, or for S2 the received rows placed at their positions with zeros the
pattern never reads) and each of the rank's two chunks attends to the keys before it with its
global offset (`flash_attention(..., q_offset=)`), so the kernels skip what causality, documents and
the pattern exclude. Other backends run plain PyTorch with an explicit mask per source chunk.
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist

from kernels.attention import attention
from kernels.reference import reference_attention
from kernels.s2_attention import S2Heads

KERNEL_BACKENDS = ("triton", "flash_attn")  # backends whose CP attention runs the Triton kernels


def balanced_positions(seq_len: int, cp: int, rank: int, device=None) -> torch.Tensor:
    """Global positions rank `rank` of `cp` holds: chunk `rank` and chunk 2 cp - 1 - rank of 2 cp."""
    if seq_len % (2 * cp):
        raise ValueError(f"context parallel {cp} needs sequences divisible by 2 x cp = {2 * cp}, not {seq_len}")
    chunk = seq_len // (2 * cp)
    front = torch.arange(rank * chunk, (rank + 1) * chunk, device=device)
    back = torch.arange((2 * cp - 1 - rank) * chunk, (2 * cp - rank) * chunk, device=device)
    return torch.cat([front, back])


def shard_sequence(t: torch.Tensor | None, positions: torch.Tensor) -> torch.Tensor | None:
    """The tokens of `t` [b, s, ...] at `positions` (this rank's share), or None."""
    return None if t is None else t[:, positions.to(t.device)]


def allowed_keys(q_pos, k_pos, q_doc, k_doc, window: int | None, s2_block: torch.Tensor | None, block_size: int,
                 group: int) -> torch.Tensor:  # fmt: skip
    """Boolean [b|1, heads|1, sq, sk]: causal by global position, inside the window and the document,
    and, for S2 layers, inside each head's allowed blocks (`s2_block` [hkv, qb, kb])."""
    allowed = (q_pos[:, None] >= k_pos[None, :])[None, None]
    if window is not None:
        allowed = allowed & (q_pos[:, None] - k_pos[None, :] < window)
    if q_doc is not None:
        allowed = allowed & (q_doc[:, :, None] == k_doc[:, None, :])[:, None]
    if s2_block is not None:
        heads = s2_block[:, q_pos // block_size][:, :, k_pos // block_size].repeat_interleave(group, dim=0)
        allowed = allowed & heads[None]
    return allowed


def merge_partials(outs: list[torch.Tensor], lses: list[torch.Tensor]) -> torch.Tensor:
    """Softmax over the union of the key sets: each partial output [b, s, h, d] weighted by
    exp(its log-sum-exp [b, h, s] - the total's). A chunk with no allowed key has lse -inf, weight 0."""
    lse = torch.logsumexp(torch.stack(lses), dim=0)
    safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    total = 0
    for out, part in zip(outs, lses, strict=True):
        weight = torch.exp(part - safe).nan_to_num(0.0).transpose(1, 2)[..., None]  # [b, s, h, 1]
        total = total + out.float() * weight
    return total.to(outs[0].dtype)


class _GatherSequence(torch.autograd.Function):
    """Every rank's tensor (forward all-gather); each rank's gradient is the sum of what every rank's
    queries sent it (backward reduce-scatter). On gloo (torch 2.13), inside a backward pass, both
    torch.distributed.nn's all_gather (all-to-all) and the list form of reduce_scatter returned wrong
    sums for these tensors; the flat reduce_scatter_single (reduce_scatter_tensor) is what FSDP uses, and is right."""

    @staticmethod
    def forward(ctx, tensor, group):
        ctx.group = group
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, tensor.contiguous(), group=group)
        return tuple(parts)

    @staticmethod
    def backward(ctx, *grads):
        mine = torch.empty_like(grads[0], memory_format=torch.contiguous_format)
        dist.reduce_scatter_single(mine, torch.cat(grads), group=ctx.group)
        return mine, None


def s2_exchange_plan(s2_block: torch.Tensor, shares: list[torch.Tensor], block_size: int, rank: int):
    """Which keys rank `rank` sends and receives under S2: (send, recv), peer -> per KV head the
    indices into the sender's share of the keys some query of the receiver's share may read for
    that head (its local window and strided blocks). Every rank derives every plan from the pattern."""

    def needed(dst: int, src: int) -> list[torch.Tensor]:
        wanted = s2_block[:, torch.unique(shares[dst] // block_size)].any(1)  # [hkv, key blocks]
        return [row.nonzero().flatten() for row in wanted[:, shares[src] // block_size]]

    peers = [p for p in range(len(shares)) if p != rank]
    return {p: needed(p, rank) for p in peers}, {p: needed(rank, p) for p in peers}


def _exchange(outgoing: dict[int, torch.Tensor], incoming: dict[int, torch.Tensor], group) -> None:
    """Point-to-point: outgoing[p] to peer p, incoming[p] from peer p (sizes agreed by the plans)."""
    ops = [dist.P2POp(dist.isend, t.contiguous(), dist.get_global_rank(group, p), group)
           for p, t in outgoing.items() if t.numel()]  # fmt: skip
    ops += [dist.P2POp(dist.irecv, t, dist.get_global_rank(group, p), group) for p, t in incoming.items() if t.numel()]
    for request in dist.batch_isend_irecv(ops) if ops else []:
        request.wait()


class _ExchangeKeys(torch.autograd.Function):
    """K and V rows [2, b, s, hkv, d] that peers' S2 patterns read, sent to them and received from
    them; the backward sends each gradient back to the rank that owns the row."""

    @staticmethod
    def forward(ctx, kv, send, recv, group):
        ctx.send, ctx.recv, ctx.group, ctx.shape = send, recv, group, kv.shape
        out = {p: torch.cat([kv[:, :, idx, h] for h, idx in enumerate(heads)], dim=2) for p, heads in send.items()}
        two, b, _, _, d = kv.shape
        into = {p: kv.new_empty(two, b, sum(len(i) for i in heads), d) for p, heads in recv.items()}
        _exchange(out, into, group)
        return tuple(into[p] for p in sorted(into))

    @staticmethod
    def backward(ctx, *grads):
        back = dict(zip(sorted(ctx.recv), grads, strict=True))
        two, b, _, _, d = ctx.shape
        owned = {p: grads[0].new_empty(two, b, sum(len(i) for i in heads), d) for p, heads in ctx.send.items()}
        _exchange(back, owned, ctx.group)
        dkv = grads[0].new_zeros(ctx.shape)
        for p, heads in ctx.send.items():
            offset = 0
            for h, idx in enumerate(heads):
                dkv[:, :, idx, h] += owned[p][:, :, offset : offset + len(idx)]
                offset += len(idx)
        return dkv, None, None, None


@functools.lru_cache(maxsize=64)
def _s2_plan(s2: S2Heads, num_local_heads: int, seq_len: int, window: int | None, cp: int, rank: int, device):
    """The S2 block mask and this rank's exchange plan, for one layout (every S2 layer shares them)."""
    s2_block = s2.mask(num_local_heads, seq_len, window).to(device)
    shares = [balanced_positions(seq_len, cp, r, device) for r in range(cp)]
    send, recv = s2_exchange_plan(s2_block, shares, s2.pattern.block_size, rank)
    return s2_block, send, recv, _placement(shares, rank, num_local_heads, recv)


def _placement(shares, rank: int, heads: int, recv) -> tuple[torch.Tensor, torch.Tensor]:
    """(global position, head) of every K/V row an S2 layer holds: its own rows for every head, then
    each peer's received rows (peers in order, head after head), as `_s2_keys_in_place` stacks them."""
    positions = shares[rank]
    seq = [positions.repeat_interleave(heads)]
    head = [torch.arange(heads, device=positions.device).repeat(positions.numel())]
    for p in sorted(recv):
        for h, idx in enumerate(recv[p]):
            seq.append(shares[p][idx])
            head.append(torch.full_like(idx, h))
    return torch.cat(seq), torch.cat(head)


def _exchange_s2_keys(k, v, shares, rank, group, s2: S2Heads, window):
    """Send peers the K/V rows their S2 heads read and receive ours: (block mask, receive plan,
    placement of our rows, peer -> received rows [2, b, n, d], each head's rows one after another)."""
    positions, cp = shares[rank], len(shares)
    s2_block, send, recv, placement = _s2_plan(s2, k.shape[2], cp * positions.numel(), window, cp, rank, k.device)
    received = dict(zip(sorted(recv), _ExchangeKeys.apply(torch.stack([k, v]), send, recv, group), strict=True))
    return s2_block, recv, placement, received


def _s2_attention(q, k, v, doc_ids, shares, rank, docs, group, s2: S2Heads, window):
    """S2 layers: each KV head's queries read their own keys plus the rows peers sent for that head."""
    positions = shares[rank]
    s2_block, recv, _, received = _exchange_s2_keys(k, v, shares, rank, group, s2, window)
    group_size = q.shape[2] // k.shape[2]
    outs = []
    for h in range(k.shape[2]):
        keys, key_positions, key_docs = [torch.stack([k[:, :, h], v[:, :, h]])], [positions], [doc_ids]
        for p, heads in recv.items():
            offset = sum(len(i) for i in heads[:h])
            keys.append(received[p][:, :, offset : offset + len(heads[h])])
            key_positions.append(shares[p][heads[h]])
            key_docs.append(docs[p][:, heads[h]] if doc_ids is not None else None)
        kv = torch.cat(keys, dim=2)  # [2, b, n, d]
        k_docs = torch.cat(key_docs, dim=1) if doc_ids is not None else None
        mask = allowed_keys(positions, torch.cat(key_positions), doc_ids, k_docs, window, s2_block[h : h + 1],
                            s2.pattern.block_size, group_size)  # fmt: skip
        q_h = q[:, :, h * group_size : (h + 1) * group_size]
        outs.append(reference_attention(q_h, kv[0][:, :, None], kv[1][:, :, None], mask=mask))
    return torch.cat(outs, dim=2)


def in_global_order(parts: list[torch.Tensor]) -> torch.Tensor:
    """Every rank's share [b, s_local, ...] (`balanced_positions` order) as one sequence [b, s, ...]."""
    cp = len(parts)
    chunk = parts[0].shape[1] // 2
    return torch.cat([parts[j][:, :chunk] if j < cp else parts[2 * cp - 1 - j][:, chunk:] for j in range(2 * cp)], 1)


def _s2_keys_in_place(k, v, shares, rank, group, s2: S2Heads, window):
    """K and V [b, s, hkv, d] in global order holding the rows this rank's S2 heads read (its own and
    what peers sent), zeros elsewhere: rows the kernel's block lists never visit."""
    b, _, heads, d = k.shape
    _, recv, (seq_index, head_index), received = _exchange_s2_keys(k, v, shares, rank, group, s2, window)
    rows = [torch.stack([k, v]).permute(2, 3, 0, 1, 4).flatten(0, 1)]  # [s_local * hkv, 2, b, d]
    rows += [received[p].permute(2, 0, 1, 3) for p in sorted(recv)]
    seq_len = len(shares) * shares[rank].numel()
    placed = k.new_zeros(seq_len, heads, 2, b, d).index_put((seq_index, head_index), torch.cat(rows))
    kv = placed.permute(2, 3, 0, 1, 4)  # [2, b, s, hkv, d], the head dim still contiguous
    return kv[0], kv[1]


def kernel_attention(q, k, v, doc_ids, docs, shares, rank, group, s2: S2Heads | None, window):
    """The Triton kernels on this rank's two chunks, each against the keys before it in global order."""
    if s2 is None:
        keys, values = (in_global_order(list(_GatherSequence.apply(t, group))) for t in (k, v))
    else:
        keys, values = _s2_keys_in_place(k, v, shares, rank, group, s2, window)
    all_docs = in_global_order(docs) if doc_ids is not None else None
    chunk = q.shape[1] // 2
    outs = []
    for half in range(2):
        start = int(shares[rank][half * chunk])
        end = start + chunk
        q_chunk = q[:, half * chunk : (half + 1) * chunk]
        chunk_docs = all_docs[:, :end] if all_docs is not None else None
        outs.append(attention(q_chunk, keys[:, :end], values[:, :end], chunk_docs, "triton", s2, window, start))
    return torch.cat(outs, dim=1)


def context_parallel_attention(
    q, k, v, doc_ids, shares, rank, group, s2: S2Heads | None, window: int | None, kernels: bool = False
):
    """This rank's queries [b, s_local, hq, d] against the whole sequence's keys and values (`shares`:
    every rank's global positions): dense layers gather every rank's K/V; S2 layers receive only the
    rows their heads' patterns read. `kernels`: the Triton kernels, else plain PyTorch."""
    docs = [None] * len(shares)
    if doc_ids is not None:
        docs = [torch.empty_like(doc_ids) for _ in shares]
        dist.all_gather(docs, doc_ids.contiguous(), group=group)
    if kernels:
        return kernel_attention(q, k, v, doc_ids, docs, shares, rank, group, s2, window)
    if s2 is not None:
        return _s2_attention(q, k, v, doc_ids, shares, rank, docs, group, s2, window)
    return gathered_attention(q, k, v, doc_ids, docs, shares, rank, group, window)


def gathered_attention(q, k, v, doc_ids, docs, shares, rank, group, window, s2_block=None, block_size: int = 1):
    """The dense exchange: every rank's K/V gathered, each source chunk attended under its mask (and
    S2's block mask `s2_block` when given, as a dense ring would run an S2 layer), the partial
    outputs merged by their log-sum-exp."""
    keys = _GatherSequence.apply(k, group)
    values = _GatherSequence.apply(v, group)
    group_size = q.shape[2] // k.shape[2]
    outs, lses = [], []
    for k_src, v_src, pos_src, doc_src in zip(keys, values, shares, docs, strict=True):
        mask = allowed_keys(shares[rank], pos_src, doc_ids, doc_src, window, s2_block, block_size, group_size)
        out, lse = reference_attention(q, k_src, v_src, mask=mask, return_lse=True)
        outs.append(out)
        lses.append(lse)
    return merge_partials(outs, lses)


def apply_context_parallel(model, group, seq_len: int, device=None) -> torch.Tensor:
    """Make every attention module of `model` attend across `group` (its core attention is replaced,
    as activation checkpointing replaces it); returns this rank's global positions (on `device`),
    which the caller shards its batch by (`shard_sequence`) and passes to the model as `positions`.
    Every rank's share follows from the layout, so none is exchanged."""
    cp, rank = dist.get_world_size(group), dist.get_rank(group)
    shares = [balanced_positions(seq_len, cp, r, device) for r in range(cp)]
    for block in model.layers.values():
        attention = block.attention
        attention.core_attention = functools.partial(
            context_parallel_attention, shares=shares, rank=rank, group=group, s2=attention.s2,
            window=attention.window, kernels=runs_kernels(attention.backend, attention.s2, cp, seq_len),
        )  # fmt: skip
    return shares[rank]


def runs_kernels(backend: str, s2: S2Heads | None, cp: int, seq_len: int) -> bool:
    """Whether a layer's CP attention runs the Triton kernels; refused when a chunk would split an S2 block."""
    if backend not in KERNEL_BACKENDS:
        return False
    chunk, block = seq_len // (2 * cp), s2.pattern.block_size if s2 is not None else 1
    if chunk % block:
        raise ValueError(
            f"context parallel {cp} with attn_backend {backend} cuts seq_len {seq_len} into chunks of {chunk} "
            f"tokens, not a multiple of the S2 block size {block}: the kernels start each chunk at a block edge "
            f"(choose seq_len a multiple of {2 * cp * block})"
        )
    return True
