"""`python -m training.plan`: the planner's command line (table, grouped rejections, JSON)."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, replace
from pathlib import Path

from common.config import ConfigError, load_config
from common.files import atomic_write_text
from training.config import TrainConfig
from training.plan.cost import GIB, PRESETS, Cluster, Prediction, parse_memory
from training.plan.search import fully_sharded_problem, plan, rejection_summary


def table(predictions: list[Prediction], top: int) -> str:
    lines = ["| layout | memory GiB | step s | tokens/s | MFU | bubble | TP s | CP s | PP s | DP exposed s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for p in predictions[:top]:
        t = p.time
        lines.append(f"| {p.layout.name()} | {p.memory['total'] / GIB:.1f} | {t['step']:.3f} | {p.tokens_per_s:,.0f} "
                     f"| {p.mfu:.1%} | {t['bubble']:.3f} | {t['tp']:.3f} | {t['cp']:.3f} | {t['pp']:.3f} "
                     f"| {t['dp_exposed']:.3f} |")  # fmt: skip
    return "\n".join(lines)


def cluster_from_args(args) -> Cluster:
    if args.gpu not in PRESETS:
        raise ValueError(f"unknown GPU preset {args.gpu!r}: choose one of {', '.join(PRESETS)} "
                         "(or give --gpu-memory, --peak-tflops and the bandwidths)")  # fmt: skip
    fields = dict(PRESETS[args.gpu])
    if args.gpu_memory:
        fields["memory_bytes"] = parse_memory(args.gpu_memory)
    for name in ("peak_tflops", "efficiency", "intra_node_gbps", "inter_node_gbps"):
        if getattr(args, name) is not None:
            fields[name] = getattr(args, name)
    if args.gpus < 1 or args.gpus_per_node < 1:
        raise ValueError(f"--gpus {args.gpus} and --gpus-per-node {args.gpus_per_node} must be >= 1")
    return Cluster(gpus=args.gpus, gpus_per_node=min(args.gpus_per_node, args.gpus), name=args.gpu, **fields)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.plan", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("config", help="a training config (YAML)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.max_seq_len=32768")
    parser.add_argument("--gpus", type=int, required=True)
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--gpu", default="h100", help=f"preset: {', '.join(PRESETS)}")
    parser.add_argument("--gpu-memory", help="e.g. 80GiB (overrides the preset's)")
    parser.add_argument("--peak-tflops", type=float)
    parser.add_argument("--efficiency", type=float, help="fraction of peak the matmuls reach")
    parser.add_argument("--intra-node-bw", dest="intra_node_gbps", type=float, help="GB/s per GPU (NVLink)")
    parser.add_argument("--inter-node-bw", dest="inter_node_gbps", type=float, help="GB/s per GPU (network)")
    parser.add_argument("--seq-len", type=int, help="training sequence length (default model.max_seq_len)")
    parser.add_argument("--top", type=int, default=10)
    parser.add_argument("--json", help="write every prediction, feasible and rejected, here")
    args = parser.parse_args(argv)
    try:
        cluster = cluster_from_args(args)
        config = load_config(TrainConfig, args.config, args.overrides)
    except (ValueError, ConfigError, OSError) as err:
        parser.exit(2, f"python -m training.plan: {err}\n")
    model = config.model
    seq_len = args.seq_len or model.max_seq_len
    model = replace(model, max_seq_len=seq_len)
    global_batch = config.data.global_batch_size
    problem = fully_sharded_problem(model, cluster)
    if problem:
        parser.exit(1, f"python -m training.plan: {problem}\n")
    feasible, rejected = plan(model, cluster, seq_len, global_batch)
    gpus = f"{cluster.gpus} x {cluster.name} ({cluster.gpus_per_node} per node, {cluster.memory_bytes / GIB:.1f} GiB)"
    print(f"{gpus}, seq {seq_len}, global batch {global_batch}: {len(feasible)} layouts fit, {len(rejected)} rejected")
    print(table(feasible, args.top))
    print("rejected (how many, one example each):")
    for count, example in rejection_summary(rejected):
        print(f"  {count:5d} x {example.layout.name()}: {example.problem}")
    if args.json:
        rows = {"cluster": asdict(cluster), "seq_len": seq_len, "global_batch": global_batch,
                "feasible": [p.row() for p in feasible], "rejected": [p.row() for p in rejected]}  # fmt: skip
        atomic_write_text(Path(args.json), json.dumps(rows, indent=1, default=str))
    if not feasible:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
