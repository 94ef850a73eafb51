"""Megatron-style tensor parallelism through DTensor plans, applied to an unmodified model.

QKV and FFN-up/gate are column-parallel, attention-out and FFN-down row-parallel; the embedding is
vocab-parallel (rows of the table split) and the LM head too, leaving logits sharded over the
vocabulary for the vocab-parallel cross-entropy (`loss_parallel`). KV heads are split across
ranks, so each rank keeps whole GQA groups.
"""

from __future__ import annotations

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
    if model.config.tie_embeddings and model.tok_embeddings is not None and model.output is not None:
        model.output.weight = model.tok_embeddings.weight  # both are Shard(0) over the vocabulary
