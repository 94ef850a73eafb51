"""Sweep results as numbers: reading results.csv, means with t intervals, and the paired comparison
of two sets of runs that differ in one recipe (the law-chosen LR and mix against the defaults)."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np

from training.scaling_laws.lr_law import t_interval


def read_rows(path: str | Path) -> list[dict[str, float]]:
    """results.csv's rows as numbers (the `run` name column left out); errors name the file and line."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise ValueError(f"{path}: no rows")
    out = []
    for i, row in enumerate(rows, 2):
        try:
            out.append({k: float(v) for k, v in row.items() if v not in ("", None) and k != "run"})
        except ValueError as err:
            raise ValueError(f"{path}:{i}: not a number ({err})") from None
    return out


def interval_text(interval: list[float] | None) -> str:
    return "none (see warnings)" if interval is None else f"[{interval[0]:.4f}, {interval[1]:.4f}]"


def mean_with_t_interval(values) -> dict:
    """Mean, its 95% t interval (None with one value) and the count."""
    values = np.asarray(values, float)
    se = float(values.std(ddof=1) / math.sqrt(len(values))) if len(values) > 1 else float("nan")
    return {"mean": float(values.mean()), "ci95_t": t_interval(float(values.mean()), se, len(values) - 1),
            "runs": len(values)}  # fmt: skip


def compare_runs(baseline: str | Path, candidate: str | Path) -> dict:
    """candidate - baseline for the validation loss, every family's loss and the mean family loss,
    paired by seed (the same seed draws the same initialisation and data order in both): the mean
    difference over seeds with its t interval (seeds as the unit; n - 1 degrees of freedom).
    A difference that is the same at every seed is reported as no variation, not as an interval."""
    paths = {"baseline": baseline, "candidate": candidate}
    rows = {name: {int(r["seed"]): r for r in read_rows(path)} for name, path in paths.items()}
    seeds = sorted(set(rows["baseline"]) & set(rows["candidate"]))
    if len(seeds) < 2:
        raise ValueError(f"{baseline} and {candidate}: need runs at two or more common seeds, found {seeds}")
    for by_seed in rows.values():
        for seed in seeds:
            families = [k for k in by_seed[seed] if k.startswith("loss/")]
            by_seed[seed]["mean_family_loss"] = float(np.mean([by_seed[seed][k] for k in families]))
    metrics = [k for k in rows["baseline"][seeds[0]] if k in ("loss", "mean_family_loss") or k.startswith("loss/")]
    out = {"seeds": seeds, "metrics": {}}
    for metric in metrics:
        base = np.array([rows["baseline"][s][metric] for s in seeds])
        cand = np.array([rows["candidate"][s].get(metric, math.nan) for s in seeds])
        diff = cand - base
        entry = {"baseline": float(base.mean()), "candidate": float(cand.mean()), **mean_with_t_interval(diff)}
        if np.ptp(diff) == 0:
            entry["ci95_t"] = None
            entry["note"] = "no variation"
        out["metrics"][metric] = entry
    return out


def comparison_table(result: dict) -> str:
    """The comparison as a Markdown table."""
    lines = ["| metric | baseline | candidate | candidate - baseline | 95% t interval |", "|---|---:|---:|---:|---|"]
    for metric, e in result["metrics"].items():
        interval = e.get("note") or (f"[{e['ci95_t'][0]:+.3f}, {e['ci95_t'][1]:+.3f}]" if e["ci95_t"] else "none")
        lines.append(f"| {metric} | {e['baseline']:.3f} | {e['candidate']:.3f} | {e['mean']:+.3f} | {interval} |")
    return "\n".join(lines)
