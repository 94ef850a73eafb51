"""The embedding and LM head split over the vocabulary across all DP x TP ranks of a stage (FSDP).

FSDP gathers a unit whole before using it, and a large vocabulary's table is the largest unit:
Phi-4-mini's tied 200k x 3072 table at TP2 is 0.6 GB gathered in bf16 (1.2 GB in fp32), plus its
unsharded gradient and reduce-scatter buffer, on every rank at once. Here the table is never
gathered: rank (d, t) keeps rows [(d T + t) V / (D T), ...) for good, and the data travels instead.
Each micro-batch all-gathers the D replicas' token ids for the lookup (partial rows, summed back to
their replica with a reduce-scatter) and their final hidden states for the head, whose logits
[D b, s, V / (D T)] go to Megatron's vocab-parallel cross-entropy over the D x T ranks; each replica
keeps its own rows' losses. The weight's gradient is then complete on its rank (every replica's
tokens contributed), so it is neither reduced nor averaged by FSDP.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

from data_pipeline.loader import IGNORE_INDEX
from training.models.phi import PhiModel
from training.parallel.data import local_tensor
from training.parallel.tensor import lookup_local_rows


def _gather_rows(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    out = x.new_empty((group.size() * x.shape[0], *x.shape[1:]))
    dist.all_gather_single(out, x.contiguous(), group=group)
    return out


def _sum_own_rows(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Sum over the group, keeping this rank's share of the rows (gloo reduces in fp32 here)."""
    out = x.new_empty((x.shape[0] // group.size(), *x.shape[1:]), dtype=torch.float32)
    dist.reduce_scatter_single(out, x.float().contiguous(), group=group)
    return out.to(x.dtype)


def _own_rows(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    return x.view(group.size(), -1, *x.shape[1:])[group.rank()].clone()


# Row exchanges over the DP group, each with its adjoint as backward:
# "gather": every replica's rows on every rank; backward sums each row's gradient back to its owner.
# "sum": partial rows of every replica summed onto their replica; backward gives every rank all rows' gradients.
# "own": this replica's rows of a value every rank computed for all replicas; backward collects every
#        replica's gradient for its rows (each rank's vocabulary slice served all of them).
_EXCHANGES = {
    "gather": (_gather_rows, _sum_own_rows),
    "sum": (_sum_own_rows, _gather_rows),
    "own": (_own_rows, _gather_rows),
}


class RowExchange(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup, kind: str) -> torch.Tensor:
        ctx.group, ctx.kind = group, kind
        return _EXCHANGES[kind][0](x, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _EXCHANGES[ctx.kind][1](grad, ctx.group), None, None


class VocabParallelNLL(torch.autograd.Function):
    """Megatron's vocab-parallel cross-entropy: per-token NLL from logits split over the vocabulary,
    with two all-reduces of per-token values (max, then target logit and sum of exponentials)."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor, vocab_start: int, group: dist.ProcessGroup):
        local_vocab = logits.shape[-1]
        shifted = logits.float()
        top = shifted.max(dim=-1).values
        dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
        shifted = shifted - top[:, None]
        local = labels - vocab_start
        here = (local >= 0) & (local < local_vocab)
        local = local.clamp(0, local_vocab - 1)
        sums = torch.stack([shifted.gather(1, local[:, None])[:, 0] * here, shifted.exp_().sum(-1)])
        dist.all_reduce(sums, group=group)
        target_logit, sum_exp = sums
        ignored = labels == IGNORE_INDEX
        softmax = shifted.div_(sum_exp[:, None])  # the exponentials, normalised in place
        ctx.save_for_backward(softmax, local, here, ignored)
        ctx.dtype = logits.dtype
        return (sum_exp.log() - target_logit).masked_fill(ignored, 0.0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        softmax, local, here, ignored = ctx.saved_tensors
        grad_logits = softmax  # d nll / d logits = softmax - one-hot(target), per token
        grad_logits.scatter_add_(1, local[:, None], -here.float()[:, None])
        grad_logits.mul_(grad.masked_fill(ignored, 0.0)[:, None])
        return grad_logits.to(ctx.dtype), None, None, None


@dataclass
class VocabOverDP:
    """What the lookup, the head and the loss need to know about the vocabulary's split."""

    group: dist.ProcessGroup  # the D x T ranks that share the vocabulary
    dp_group: dist.ProcessGroup
    tp_mesh: DeviceMesh | None
    vocab_start: int

    def token_nll(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """This replica's per-token NLL, flat, from the head's logits of every replica's rows."""
        all_labels = _gather_rows(labels, self.dp_group)
        nll = VocabParallelNLL.apply(logits.flatten(0, 1), all_labels.flatten().long(), self.vocab_start, self.group)
        return RowExchange.apply(nll, self.dp_group, "own")

    def parameters(self, model: PhiModel) -> list[nn.Parameter]:
        found = [m.weight for m in (model.tok_embeddings, model.output) if m is not None]
        return list({id(p): p for p in found}.values())

    def average_gradients(self, model: PhiModel) -> None:
        """The trainer scales its loss by the DP size for FSDP, which averages; these weights are not
        FSDP's, and their gradients are already sums over every replica."""
        for param in self.parameters(model):
            if param.grad is not None:
                local_tensor(param.grad).div_(self.dp_group.size())


def apply_vocab_over_dp(model: PhiModel, mesh: DeviceMesh, sequence_parallel: bool) -> VocabOverDP:
    """Split the embedding and head of a (meta) model over the mesh's DP x TP ranks, rows in (d, t)
    order, and route their forward passes through the exchanges above. Apply before FSDP, which must
    leave these weights out (`apply_fsdp(..., ignored=...)`)."""
    tp = mesh["tp"].size()
    vocab_mesh = mesh["dp", "tp"] if tp > 1 else mesh["dp"]
    group = vocab_mesh._flatten("dp_tp").get_group() if tp > 1 else vocab_mesh.get_group()
    vocab = model.config.vocab_size
    if vocab % group.size():
        raise ValueError(
            f"parallel.vocab_over_dp: dp x tp = {group.size()} ranks do not divide vocab_size={vocab}; "
            "pad model.vocab_size to a multiple"
        )
    rank_in_vocab = mesh["dp"].get_local_rank() * tp + (mesh["tp"].get_local_rank() if tp > 1 else 0)
    shards = VocabOverDP(
        group=group,
        dp_group=mesh["dp"].get_group(),
        tp_mesh=mesh["tp"] if tp > 1 else None,
        vocab_start=rank_in_vocab * (vocab // group.size()),
    )
    between_blocks = Shard(1) if sequence_parallel else Replicate()
    placements = [Shard(0)] * vocab_mesh.ndim
    if model.tok_embeddings is not None:
        embedding = model.tok_embeddings
        embedding.weight = nn.Parameter(distribute_tensor(embedding.weight, vocab_mesh, placements))
        embedding.forward = functools.partial(_lookup, embedding, shards, between_blocks)
    if model.output is not None:
        head = model.output
        if model.config.tie_embeddings and model.tok_embeddings is not None:
            head.weight = model.tok_embeddings.weight
        else:
            head.weight = nn.Parameter(distribute_tensor(head.weight, vocab_mesh, placements))
        head.forward = functools.partial(_head, head, shards, between_blocks)
    return shards


def _lookup(embedding: nn.Embedding, shards: VocabOverDP, output_layout, ids: torch.Tensor) -> torch.Tensor:
    """Every replica's ids looked up in this rank's rows (zeros elsewhere), summed over DP onto their
    replica, then over TP as the tensor-parallel lookup does."""
    partial = lookup_local_rows(embedding, _gather_rows(ids, shards.dp_group), shards.vocab_start)
    mine = RowExchange.apply(partial, shards.dp_group, "sum")
    if shards.tp_mesh is None:
        return mine
    summed = DTensor.from_local(mine, shards.tp_mesh, [Partial()], run_check=False)
    return summed.redistribute(shards.tp_mesh, [output_layout]).to_local()


def _head(head: nn.Linear, shards: VocabOverDP, input_layout, h: torch.Tensor) -> torch.Tensor:
    """Logits of every replica's rows over this rank's vocabulary slice: [D b, s, V / (D T)]."""
    if shards.tp_mesh is not None:  # the whole hidden state; its gradient is a partial sum over TP
        if not isinstance(h, DTensor):
            h = DTensor.from_local(h, shards.tp_mesh, [input_layout], run_check=False)
        h = h.redistribute(shards.tp_mesh, [Replicate()]).to_local(grad_placements=[Partial()])
    return F.linear(RowExchange.apply(h, shards.dp_group, "gather"), head.weight.to_local())
