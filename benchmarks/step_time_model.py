"""The planner's step-time model on CPU ranks (training/plan/cost.py: `cpu_cluster`) against the step
times benchmarks/memory.py measured: does it rank the layouts as the machine does?

    python benchmarks/step_time_model.py [MEMORY_JSON ...] [--fit] [--markdown FILE] [--plot FILE]

Each measured row (a model, a layout, every rank's mean step time) is predicted as that benchmark
ran it: fp32, micro-batch 1 of 64 tokens, its global batch, every rank on this one node. The step
ends with the slowest rank. Layouts are compared per model at equal work: seconds per 1,000 tokens
(the benchmark gives a single rank one sequence a step and other layouts two per replica). `--fit`
fits the CPU constants (a core's fp32 rate, its growth with threads, the node's memory bandwidth,
gloo's throughput) to the rows by least squares on log time and prints them: they are written into
training/plan/cost.py by hand, so the table is made with the constants the planner uses.
Defaults: every raw measurement recorded in docs/measurements/cpu-*/.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from itertools import combinations
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.memory_model import RECORDED, SEQ_LEN, layout_of, model_of, recorded_rows  # noqa: E402
from common.files import atomic_write_text  # noqa: E402
from training.plan.cost import GIB, cpu_cluster, predict  # noqa: E402

CONSTANTS = ("core_gflops", "thread_exponent", "memory_gbps", "gloo_gbps")
CORES = 2  # the machine the recorded measurements ran on


def measured_rows(paths: list[Path]) -> list[dict]:
    rows = []
    for path, r, _, world, batch in recorded_rows(paths):
        seconds = max(rank["step_s"] for rank in r["ranks"])
        rows.append({"model": r["model"], "layout": r["layout"], "world": world, "global_batch": batch,
                     "measured_s": seconds, "run": f"{path.parent.name}/{path.name}"})  # fmt: skip
    return rows


def predicted_s(row: dict, **constants: float) -> float:
    layout, model = layout_of(row["layout"]), model_of(row["model"])
    cluster = cpu_cluster(row["world"], row["world"], 64 * GIB, CORES, **constants)
    return predict(model, layout, cluster, SEQ_LEN, row["global_batch"]).time["step"]


def with_predictions(rows: list[dict]) -> list[dict]:
    """Each row with its predicted step time, and both per 1,000 tokens."""
    for r in rows:
        r["predicted_s"] = predicted_s(r)
        tokens_k = r["global_batch"] * SEQ_LEN / 1000
        r["measured_per_k"], r["predicted_per_k"] = r["measured_s"] / tokens_k, r["predicted_s"] / tokens_k
    return rows


def fit(rows: list[dict]) -> dict[str, float]:
    """The CPU constants that minimise the squared log error of the predicted step times."""
    from scipy.optimize import least_squares

    def residuals(logs):
        constants = dict(zip(CONSTANTS, map(math.exp, logs), strict=True))
        return [math.log(predicted_s(r, **constants) / r["measured_s"]) for r in rows]

    start = [math.log(v) for v in (50.0, 0.5, 10.0, 0.5)]
    # a rank's rate grows with its threads at most linearly: the exponent is at most 1 (its log 0)
    solution = least_squares(residuals, start, bounds=([-10] * 4, [15, 0, 15, 15]))
    return dict(zip(CONSTANTS, map(math.exp, solution.x), strict=True))


def rank_agreement(rows: list[dict]) -> list[dict]:
    """Per model: Kendall's tau between measured and predicted seconds per 1,000 tokens over pairs of
    different layouts, and the pairs the prediction orders the other way round, with how far apart
    they were measured and whether in the same run (runs on other days differ by up to 40% here)."""
    out = []
    for model in dict.fromkeys(r["model"] for r in rows):
        group = [r for r in rows if r["model"] == model]
        swapped, agree = [], 0
        for a, b in combinations(group, 2):
            if a["layout"] == b["layout"]:
                continue
            if (a["measured_per_k"] - b["measured_per_k"]) * (a["predicted_per_k"] - b["predicted_per_k"]) > 0:
                agree += 1
                continue
            gap = max(a["measured_per_k"], b["measured_per_k"]) / min(a["measured_per_k"], b["measured_per_k"]) - 1
            swapped.append({"pair": f"{a['layout']} / {b['layout']}", "gap": gap, "same_run": a["run"] == b["run"]})
        pairs = agree + len(swapped)
        tau = (2 * agree - pairs) / pairs if pairs else 1.0
        out.append({"model": model, "layouts": len({r["layout"] for r in group}), "tau": tau, "swapped": swapped})
    return out


def spread_between_runs(rows: list[dict]) -> list[tuple[str, str, float]]:
    """One layout of one model measured in two runs: how far apart (the measurements' own noise)."""
    found = []
    for a, b in combinations(rows, 2):
        if (a["model"], a["layout"]) == (b["model"], b["layout"]):
            found.append(
                (
                    a["model"],
                    a["layout"],
                    max(a["measured_s"], b["measured_s"]) / min(a["measured_s"], b["measured_s"]) - 1,
                )
            )
    return found


def markdown(rows: list[dict], agreement: list[dict]) -> str:
    lines = ["| model | layout | ranks | tokens a step | measured s/step | predicted s/step | error "
             "| measured s per 1K tokens | predicted |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for r in sorted(rows, key=lambda r: (r["model"], r["measured_per_k"])):
        error = r["predicted_s"] / r["measured_s"] - 1
        lines.append(f"| {r['model']} | {r['layout']} | {r['world']} | {r['global_batch'] * SEQ_LEN} | "
                     f"{r['measured_s']:.1f} | {r['predicted_s']:.1f} | {error:+.0%} | "
                     f"{r['measured_per_k']:.1f} | {r['predicted_per_k']:.1f} |")  # fmt: skip
    lines += ["", "| model | layouts | Kendall's tau (measured vs predicted order) | pairs ordered the other way |",
              "|---|---:|---:|---|"]  # fmt: skip
    for a in agreement:
        pairs = "; ".join(f"{p['pair']} ({p['gap']:.0%} apart, {'same run' if p['same_run'] else 'two runs'})"
                          for p in a["swapped"])  # fmt: skip
        lines.append(f"| {a['model']} | {a['layouts']} | {a['tau']:+.2f} | {pairs or 'none'} |")
    spreads = spread_between_runs(rows)
    if spreads:
        said = ", ".join(f"{layout} at {model.split(', ')[-1]} {gap:.0%}" for model, layout, gap in spreads)
        lines += ["", f"The same layout measured in two runs (the measurements' own spread): {said}."]
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 5))
    for model in dict.fromkeys(r["model"] for r in rows):
        group = [r for r in rows if r["model"] == model]
        ax.scatter([r["measured_per_k"] for r in group], [r["predicted_per_k"] for r in group], label=model)
    top = max(max(r["measured_per_k"], r["predicted_per_k"]) for r in rows) * 1.1
    ax.plot([0, top], [0, top], color="grey", linestyle="--", label="prediction = measurement")
    ax.set_xlabel("measured seconds per 1,000 tokens (CPU, gloo)")
    ax.set_ylabel("predicted (training/plan, cpu_cluster)")
    ax.set_title("Step-time model against CPU measurements, every layout")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="*", type=Path, default=RECORDED)
    parser.add_argument("--fit", action="store_true", help="fit the CPU constants and print them")
    parser.add_argument("--markdown", default=None)
    parser.add_argument("--plot", default=None)
    args = parser.parse_args(argv)
    rows = measured_rows(args.files)
    if args.fit:
        print(json.dumps(fit(rows), indent=2))
        return 0
    rows = with_predictions(rows)
    agreement = rank_agreement(rows)
    table = markdown(rows, agreement)
    print(table)
    if args.markdown:
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(Path(args.markdown), table + "\n")
    if args.plot:
        plot(rows, Path(args.plot))
    return 0


if __name__ == "__main__":
    sys.exit(main())
