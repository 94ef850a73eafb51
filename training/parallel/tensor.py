"""Megatron-style tensor parallelism through DTensor plans, applied to an unmodified model.

QKV and FFN-up/gate are column-parallel, attention-out and FFN-down row-parallel; the embedding is
vocab-parallel (rows of the table split, `vocab_parallel_embedding`) and the LM head too, leaving
logits sharded over the vocabulary for the vocab-parallel cross-entropy (`loss_parallel`). KV heads are split across
ranks, so each rank keeps whole GQA groups, and S2 layers keep their own heads' sparsity patterns.
"""

from __future__ import annotations

import dataclasses
import functools

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from training.models.phi import PhiModel


def apply_tensor_parallel(
    model: PhiModel, tp_mesh: DeviceMesh, sequence_parallel: bool = False, vocab: bool = True
) -> None:
    """With `sequence_parallel`, the residual stream between blocks (and each norm) is sharded over the
    sequence: all-gather before the column-parallel layers, reduce-scatter after the row-parallel ones.
    `vocab=False` leaves the embedding and head to `training.parallel.vocab` (split over DP x TP)."""
    between_blocks = Shard(1) if sequence_parallel else Replicate()
    plan = {}
    if model.norm is not None and sequence_parallel:
        plan["norm"] = SequenceParallel()
    if model.output is not None and vocab:
        plan["output"] = ColwiseParallel(input_layouts=between_blocks, output_layouts=Shard(-1), use_local_output=False)
    for name in model.layers:
        prefix = f"layers.{name}"
        plan.update(
            {
                f"{prefix}.attention.wq": ColwiseParallel(),
                f"{prefix}.attention.wk": ColwiseParallel(),
                f"{prefix}.attention.wv": ColwiseParallel(),
                f"{prefix}.attention.wo": RowwiseParallel(output_layouts=between_blocks),
                f"{prefix}.feed_forward.w1": ColwiseParallel(),
                f"{prefix}.feed_forward.w3": ColwiseParallel(),
                f"{prefix}.feed_forward.w2": RowwiseParallel(output_layouts=between_blocks),
            }
        )
        if sequence_parallel:
            plan.update(
                {
                    f"{prefix}.attention_norm": SequenceParallel(),
                    f"{prefix}.ffn_norm": SequenceParallel(),
                    # attention(x, cos, sin, doc_ids) and feed_forward(x) gather the sequence first
                    f"{prefix}.attention": PrepareModuleInput(
                        input_layouts=(Shard(1), None, None, None, None),  # x, cos, sin, doc_ids, cache
                        desired_input_layouts=(Replicate(), None, None, None, None),
                    ),
                    f"{prefix}.feed_forward": PrepareModuleInput(
                        input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)
                    ),
                }
            )
    parallelize_module(model, tp_mesh, plan)
    if model.tok_embeddings is not None and vocab:
        embedding = model.tok_embeddings
        embedding.weight = nn.Parameter(distribute_tensor(embedding.weight, tp_mesh, [Shard(0)]))
        embedding.forward = functools.partial(vocab_parallel_embedding, embedding, tp_mesh, between_blocks)
    local_kv_heads = model.config.n_kv_heads // tp_mesh.size()
    for layer in model.layers.values():
        if layer.attention.s2 is not None:  # keep this rank's heads' S2 shards
            head_start = tp_mesh.get_local_rank() * local_kv_heads
            layer.attention.s2 = dataclasses.replace(layer.attention.s2, head_start=head_start)
    if vocab and model.config.tie_embeddings and model.tok_embeddings is not None and model.output is not None:
        model.output.weight = model.tok_embeddings.weight  # both are Shard(0) over the vocabulary


def vocab_parallel_embedding(embedding: nn.Embedding, tp_mesh: DeviceMesh, output_layout, ids: torch.Tensor):
    """Megatron's VocabParallelEmbedding: each rank looks the ids up in its slice of the vocabulary
    (zeros for ids outside it) and the partial results are summed over TP. The weight's gradient is
    computed for the local slice only; DTensor's own embedding backward builds a full-vocabulary
    gradient on every rank (2.4 GB for Phi-4-mini's table in fp32)."""
    first_row = tp_mesh.get_local_rank() * embedding.weight.to_local().shape[0]
    partial = lookup_local_rows(embedding, ids, first_row)
    summed = DTensor.from_local(partial, tp_mesh, [Partial()], run_check=False)
    return summed.redistribute(tp_mesh, [output_layout]).to_local()


def lookup_local_rows(embedding: nn.Embedding, ids: torch.Tensor, first_row: int) -> torch.Tensor:
    """The ids looked up in this rank's rows of a vocabulary-sharded table, which start at global
    row `first_row` (zeros for ids outside them); summing over the ranks that share the table gives
    the embedding."""
    local_rows = embedding.weight.to_local().shape[0]
    local_ids = ids - first_row
    outside = (local_ids < 0) | (local_ids >= local_rows)
    anchor = torch.empty(0, device=ids.device, requires_grad=torch.is_grad_enabled())
    return _LocalLookup.apply(local_ids.masked_fill(outside, 0), outside, anchor, embedding)


class _LocalLookup(torch.autograd.Function):
    """Rows of the local vocabulary slice, whose gradient backward adds straight into `weight.grad`
    (as Megatron's gradient-accumulation fusion adds into `main_grad`).

    The weight is deliberately not an autograd input (`anchor`, an empty leaf, makes the output
    require grad): autograd would hold a tied head's gradient until this lookup's arrived and sum
    the two out of place (DTensor gradients are never summed in place), three vocabulary tables at
    once. This way the head's gradient is already `weight.grad` and the lookup adds its rows to it."""

    @staticmethod
    def forward(ctx, local_ids: torch.Tensor, outside: torch.Tensor, anchor: torch.Tensor, embedding: nn.Embedding):
        ctx.save_for_backward(local_ids, outside)
        ctx.weight = embedding.weight  # FSDP's gathered parameter while it runs: the one it reduces
        return F.embedding(local_ids, ctx.weight.to_local().detach()).masked_fill(outside[..., None], 0.0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        local_ids, outside = ctx.saved_tensors
        weight = ctx.weight
        if not weight.requires_grad:
            return None, None, None, None
        if weight.grad is None:
            weight.grad = torch.zeros_like(weight)
        rows = grad.masked_fill(outside[..., None], 0.0).reshape(-1, grad.shape[-1])
        weight.grad.to_local().index_add_(0, local_ids.reshape(-1), rows.to(weight.grad.dtype))
        return None, None, None, None


def reduce_partial_grads(parameters) -> None:
    """Replicated parameters used on sequence-sharded activations (norm weights under sequence
    parallel) get partial-sum gradients; sum them over the TP group so every rank holds the full one."""
    for param in parameters:
        grad = param.grad
        if isinstance(grad, DTensor) and any(pl.is_partial() for pl in grad.placements):
            placements = [Replicate() if pl.is_partial() else pl for pl in grad.placements]
            param.grad = grad.redistribute(grad.device_mesh, placements)
