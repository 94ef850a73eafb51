"""Megatron-style tensor parallelism through DTensor plans, applied to an unmodified model.

QKV and FFN-up/gate are column-parallel, attention-out and FFN-down row-parallel; the embedding is
vocab-parallel (rows of the table split) and the LM head too, leaving logits sharded over the
vocabulary for the vocab-parallel cross-entropy (`loss_parallel`). KV heads are split across
ranks, so each rank keeps whole GQA groups, and S2 layers keep their own heads' sparsity patterns.
"""

from __future__ import annotations

import dataclasses

from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from training.models.phi import PhiModel


def apply_tensor_parallel(model: PhiModel, tp_mesh: DeviceMesh) -> None:
    plan = {}
    if model.tok_embeddings is not None:
        plan["tok_embeddings"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate())
    if model.output is not None:
        plan["output"] = ColwiseParallel(input_layouts=Replicate(), output_layouts=Shard(-1), use_local_output=False)
    for name in model.layers:
        prefix = f"layers.{name}"
        plan.update(
            {
                f"{prefix}.attention.wq": ColwiseParallel(),
                f"{prefix}.attention.wk": ColwiseParallel(),
                f"{prefix}.attention.wv": ColwiseParallel(),
                f"{prefix}.attention.wo": RowwiseParallel(),
                f"{prefix}.feed_forward.w1": ColwiseParallel(),
                f"{prefix}.feed_forward.w3": ColwiseParallel(),
                f"{prefix}.feed_forward.w2": RowwiseParallel(),
            }
        )
    parallelize_module(model, tp_mesh, plan)
    local_kv_heads = model.config.n_kv_heads // tp_mesh.size()
    for layer in model.layers.values():
        if layer.attention.s2 is not None:  # keep this rank's heads' S2 shards
            head_start = tp_mesh.get_local_rank() * local_kv_heads
            layer.attention.s2 = dataclasses.replace(layer.attention.s2, head_start=head_start)
    if model.config.tie_embeddings and model.tok_embeddings is not None and model.output is not None:
        model.output.weight = model.tok_embeddings.weight  # both are Shard(0) over the vocabulary
