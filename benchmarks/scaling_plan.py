"""The planner's predictions for Phi-4-mini pretraining past this machine (docs/scaling.md).

    python benchmarks/scaling_plan.py [--gpus 8 64 512 4096] [--markdown FILE] [--plot FILE] [--out FILE]

For 4K tokens (dense) and 32K tokens (dense, and with every other layer S2: block 64, local window
16 blocks, stride 16) on H100 nodes of 8: the best layout at each GPU count (`training.plan`), its
memory per GPU, step time, tokens per second, MFU and the bytes each GPU moves per step by
collective. Global batch: 2M tokens up to 512 GPUs, 8M at 4,096 (a batch of 2M tokens cannot keep
4,096 GPUs busy without splitting every sequence). Prints the tables, writes Markdown, JSON and a
plot of predicted MFU against GPU count.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common.files import atomic_write_text  # noqa: E402
from kernels.patterns import S2Pattern  # noqa: E402
from training.models.phi import PhiConfig  # noqa: E402
from training.plan import GIB, PRESETS, RESERVED, Cluster, plan  # noqa: E402

S2 = S2Pattern(block_size=64, local_blocks=16, vert_stride=16)
CASES = {  # name -> (sequence length, S2 pattern on every other layer or None)
    "4K dense": (4096, None),
    "32K dense": (32768, None),
    "32K dense+S2": (32768, S2),
}


def global_batch(seq_len: int, gpus: int) -> int:
    tokens = 8 * 2**20 if gpus >= 4096 else 2 * 2**20
    return tokens // seq_len


def best_layouts(gpu_counts: list[int]) -> list[dict]:
    rows = []
    for name, (seq_len, pattern) in CASES.items():
        model = replace(PhiConfig.from_preset("phi-4-mini"), max_seq_len=seq_len, s2=pattern, dense_every=2)
        for gpus in gpu_counts:
            cluster = Cluster(gpus=gpus, gpus_per_node=min(8, gpus), name="h100", **PRESETS["h100"])
            batch = global_batch(seq_len, gpus)
            feasible, rejected = plan(model, cluster, seq_len, batch)
            row = {"case": name, "gpus": gpus, "seq_len": seq_len, "global_batch": batch, "fit": len(feasible),
                   "rejected": len(rejected)}  # fmt: skip
            if feasible:
                row.update(feasible[0].row())
            rows.append(row)
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| case | GPUs | batch (seqs) | best layout | GiB/GPU | step s | tokens/s | MFU | bubble s | TP GB "
             "| CP GB | PP GB | DP GB | exposed comm s |",
             "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for r in rows:
        if "layout" not in r:
            lines.append(f"| {r['case']} | {r['gpus']:,} | {r['global_batch']} | nothing fits | | | | | | | | | | |")
            continue
        t, c = r["time"], r["comm_bytes"]
        exposed = t["tp"] + t["cp"] + t["pp"] + t["dp_exposed"]
        lines.append(
            f"| {r['case']} | {r['gpus']:,} | {r['global_batch']} | {r['layout']} | {r['memory_gib']:.1f} "
            f"| {r['step_s']:.2f} | {r['tokens_per_s']:,.0f} | {r['mfu']:.1%} | {t['bubble']:.2f} "
            f"| {c['tp'] / 1e9:.1f} | {c['cp'] / 1e9:.1f} | {c['pp'] / 1e9:.2f} | {c['dp'] / 1e9:.1f} | {exposed:.2f} |"
        )
    h100 = PRESETS["h100"]
    lines += ["", f"Assumptions (H100 preset, `training/plan/cost.py`): {h100['memory_bytes'] / 1e9:.0f} GB per GPU "
              f"({RESERVED / GIB:.0f} GiB reserved), {h100['peak_tflops']:.0f} TFLOP/s dense bf16 at "
              f"{h100['efficiency']:.1%} efficiency in the matmuls (from the compiled SDPA step measured on one "
              "H100), NVLink "
              f"{h100['intra_node_gbps']:.0f} GB/s and InfiniBand {h100['inter_node_gbps']:.0f} GB/s per GPU "
              f"each way, HBM {h100['memory_gbps'] / 1e3:.2f} TB/s, 8 GPUs per node."]  # fmt: skip
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for case in CASES:
        points = [(r["gpus"], r["mfu"]) for r in rows if r["case"] == case and "mfu" in r]
        ax.plot([p[0] for p in points], [100 * p[1] for p in points], marker="o", label=case)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("H100 GPUs")
    ax.set_ylabel("predicted MFU (%)")
    ax.set_title("Phi-4-mini pretraining: the planner's best layout")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpus", type=int, nargs="+", default=[8, 64, 512, 4096])
    parser.add_argument("--markdown", default=None)
    parser.add_argument("--plot", default="benchmarks/results/scaling_plan.png")
    parser.add_argument("--out", default="benchmarks/results/scaling_plan.json")
    args = parser.parse_args(argv)
    rows = best_layouts(args.gpus)
    table = markdown(rows)
    print(table)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(args.out), json.dumps(rows, indent=1))
    if args.markdown:
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(Path(args.markdown), table + "\n")
    plot(rows, Path(args.plot))
    return 0


if __name__ == "__main__":
    sys.exit(main())
