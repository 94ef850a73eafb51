"""The search: every TP x PP x CP x DP/FSDP x micro-batch x recompute layout of a cluster, why each
one that cannot run cannot, the rest predicted and sorted; `parallel: auto`'s choice."""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import replace

from training.config import TrainConfig
from training.models.phi import PhiConfig, count_params_and_flops
from training.parallel.mesh import LayoutError, ParallelDims
from training.plan.cost import (
    BYTES_MODEL_STATE,
    GIB,
    MAX_BUBBLE,
    MICRO_BATCHES,
    PRESETS,
    RECOMPUTE,
    Cluster,
    Layout,
    Prediction,
    cpu_cluster,
    predict,
)


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def layouts(model: PhiConfig, cluster: Cluster, seq_len: int, global_batch: int) -> list[tuple[Layout, str | None]]:
    """Every layout of the cluster's GPUs, each with why it cannot run (None when it can)."""
    found = []
    for tp, pp, cp in itertools.product(divisors(cluster.gpus), repeat=3):
        if cluster.gpus % (tp * pp * cp):
            continue
        dp = cluster.gpus // (tp * pp * cp)
        problem = shape_problem(model, cluster, seq_len, global_batch, tp, pp, cp, dp)
        for dp_mode, mb, recompute in itertools.product(("allreduce", "fsdp"), MICRO_BATCHES, RECOMPUTE):
            if dp_mode == "fsdp" and dp == 1:
                continue
            sp = tp > 1 and cp == 1
            layout = Layout(tp, pp, cp, dp, dp_mode, mb, recompute, sp)
            why = problem
            if why is None and (global_batch // dp) % mb:
                why = f"micro-batch {mb} does not divide the {global_batch // dp} sequences per replica"
            found.append((layout, why))
    return found


def shape_problem(model, cluster, seq_len, global_batch, tp, pp, cp, dp) -> str | None:
    """Why TP x PP x CP x DP cannot run this model, or None."""
    try:
        ParallelDims(dp=dp, tp=tp, pp=pp, cp=cp).check_model(model.n_heads, model.n_kv_heads, model.n_layers,
                                                            model.vocab_size)  # fmt: skip
    except LayoutError as err:
        return str(err)
    if tp > cluster.gpus_per_node:
        return f"TP {tp} spans nodes ({cluster.gpus_per_node} GPUs each): its all-reduces need NVLink"
    if global_batch % dp:
        return f"DP {dp} does not divide the global batch of {global_batch} sequences"
    if cp > 1 and seq_len % (2 * cp * (model.s2.block_size if model.s2 else 1)):
        return f"CP {cp} needs seq_len a multiple of {2 * cp * (model.s2.block_size if model.s2 else 1)}"
    return None


def plan(model: PhiConfig, cluster: Cluster, seq_len: int, global_batch: int) -> tuple[list, list]:
    """(feasible predictions, fastest first; rejected predictions, each with its problem)."""
    feasible, rejected = [], []
    for layout, problem in layouts(model, cluster, seq_len, global_batch):
        if problem is not None:
            rejected.append(Prediction(layout, {"total": 0.0}, {"step": math.inf}, 0.0, 0.0, {}, problem))
            continue
        p = predict(model, layout, cluster, seq_len, global_batch)
        if p.memory["total"] > cluster.memory_bytes:
            over = (p.memory["total"] - cluster.memory_bytes) / GIB
            p.problem = (
                f"out of memory by {over:.1f} GiB ({p.memory['total'] / GIB:.1f} of {cluster.memory_bytes / GIB:.1f})"
            )
        elif layout.pp > 1 and p.time["bubble"] / p.time["step"] > MAX_BUBBLE:
            p.problem = f"pipeline bubble {p.time['bubble'] / p.time['step']:.0%} of the step (> {MAX_BUBBLE:.0%})"
        (rejected if p.problem else feasible).append(p)
    feasible.sort(key=lambda p: (round(p.time["step"], 6), p.memory["total"]))  # ties: the leaner
    return feasible, rejected


def fully_sharded_problem(model: PhiConfig, cluster: Cluster) -> str | None:
    """When even the model states sharded over every GPU do not fit, one clear line."""
    nparams, _ = count_params_and_flops(model, model.max_seq_len)
    need = nparams * BYTES_MODEL_STATE / cluster.gpus + cluster.reserved_bytes
    if need > cluster.memory_bytes:
        return (f"the model's {nparams / 1e9:.2f}B parameters need {nparams * BYTES_MODEL_STATE / GIB:.0f} GiB of "
                f"weights, gradients and AdamW states: {need / GIB:.1f} GiB per GPU even fully sharded over "
                f"{cluster.gpus} GPUs of {cluster.memory_bytes / GIB:.1f} GiB; use more GPUs")  # fmt: skip
    return None


def local_cluster(world: int) -> Cluster:
    """The machines a run was launched on: its GPUs (a preset by name, their memory as reported), or
    CPU ranks under gloo (host memory shared by the node's ranks; speeds fit to this project's CPU
    measurements, `cost.cpu_cluster`)."""
    import os

    import torch

    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name().lower()
        preset = next((key for key in PRESETS if key in name), "h100")
        fields = {**PRESETS[preset], "memory_bytes": torch.cuda.get_device_properties(0).total_memory}
        return Cluster(gpus=world, gpus_per_node=min(per_node, world), name=preset, **fields)
    with open("/proc/meminfo") as f:
        total = int(f.readline().split()[1]) * 1024
    ranks_per_node = min(per_node, world)
    return cpu_cluster(world, ranks_per_node, total // max(ranks_per_node, 1), len(os.sched_getaffinity(0)))


def choose_layout(config: TrainConfig, model: PhiConfig, seq_len: int, world: int, cluster: Cluster | None = None):
    """`parallel: auto`: (the planner's best layout as a ParallelConfig, activation checkpointing,
    a line saying what was chosen and predicted). Refuses, with the commonest reasons, when nothing
    fits. Context parallel only for the lm objective (DPO and GRPO refuse it)."""
    from training.parallel.mesh import ParallelConfig

    cluster = cluster or local_cluster(world)
    model = replace(model, max_seq_len=seq_len)
    feasible, rejected = plan(model, cluster, seq_len, config.data.global_batch_size)
    if config.objective != "lm":
        feasible = [p for p in feasible if p.layout.cp == 1]
    if not feasible:
        why = "; ".join(f"{n} x {p.layout.name()}: {p.problem}" for n, p in rejection_summary(rejected)[:3])
        raise LayoutError(f"parallel: auto found no layout of {world} {cluster.name} ranks for this model: {why}")
    best = feasible[0]
    lay = best.layout
    chosen = ParallelConfig(tp=lay.tp, pp=lay.pp, cp=lay.cp, dp=lay.dp, dp_mode=lay.dp_mode,
                            micro_batch_size=lay.micro_batch, sequence_parallel=lay.sequence_parallel)  # fmt: skip
    note = (f"parallel: auto chose {lay.name()} for {world} {cluster.name} ranks (of {len(feasible)} that fit): "
            f"predicted {best.memory['total'] / GIB:.1f} GiB per rank, {best.time['step']:.3f} s per step, "
            f"{best.tokens_per_s:,.0f} tokens/s, MFU {best.mfu:.1%}")  # fmt: skip
    return chosen, lay.recompute, note


def rejection_summary(rejected: list[Prediction]) -> list[tuple[int, Prediction]]:
    """Rejections grouped by their reason with the numbers taken out, most common first."""
    groups: dict[str, list[Prediction]] = {}
    for p in rejected:
        groups.setdefault(re.sub(r"\d+(\.\d+)?", "N", p.problem), []).append(p)
    return sorted(((len(g), g[0]) for g in groups.values()), key=lambda x: -x[0])
