"""Sweep results as numbers: reading results.csv, means with t intervals, and the paired comparison
of two sets of runs that differ in one recipe (the law-chosen LR and mix against the defaults)."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np

from training.scaling_laws.lr_law import t_interval


def read_rows(path: str | Path, skip_text: bool = False) -> list[dict[str, float]]:
    """results.csv's rows as numbers (the `run` name column left out); errors name the file and line.
    `skip_text` leaves out cells that are not numbers (a run's `lr` is `auto` when the law chose it)."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise ValueError(f"{path}: no rows")
    out = []
    for i, row in enumerate(rows, 2):
        cells = {k: v for k, v in row.items() if v not in ("", None) and k != "run"}
        if skip_text:
            cells = {k: v for k, v in cells.items() if _is_number(v)}
        try:
            out.append({k: float(v) for k, v in cells.items()})
        except ValueError as err:
            raise ValueError(f"{path}:{i}: not a number ({err})") from None
    return out


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


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
    rows = {name: {int(r["seed"]): r for r in read_rows(path, skip_text=True)} for name, path in paths.items()}
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
        interval = e.get("note") or _interval(e["ci95_t"])
        lines.append(f"| {metric} | {e['baseline']:.3f} | {e['candidate']:.3f} | {e['mean']:+.3f} | {interval} |")
    return "\n".join(lines)


def _interval(interval: list[float] | None, digits: int = 3) -> str:
    return "none" if interval is None else f"[{interval[0]:+.{digits}f}, {interval[1]:+.{digits}f}]"


def lr_law_markdown(groups: dict[tuple[float, float], list[tuple[float, float]]], law: dict) -> str:
    """fit-lr's result as Markdown: the final loss per (LR, D) (mean over seeds, with the spread
    between seeds), each horizon's LR*, the law with both intervals, the held-out horizon and the
    warnings."""
    main = sorted(d for n, d in groups if n == law["N"])
    lrs = sorted({lr for (n, _), pts in groups.items() if n == law["N"] for lr, _ in pts})
    header = "| peak LR | " + " | ".join(f"D = {d:.3g}" for d in main) + " |"
    lines = [f"Final validation loss, N = {law['N']:.3g} (mean over seeds; +- half the range between them):", "",
             header, "|---:|" + "---:|" * len(main)]  # fmt: skip
    losses = {(d, lr): [v for x, v in groups[(law["N"], d)] if x == lr] for d in main for lr in lrs}
    best = {d: min((np.mean(v), lr) for (dd, lr), v in losses.items() if dd == d and v)[1] for d in main}
    for lr in lrs:
        cells = []
        for d in main:
            values = losses[(d, lr)]
            cell = (
                f"{np.mean(values):.3f}" + (f" +- {np.ptp(values) / 2:.3f}" if len(values) > 1 else "")
                if values
                else "-"
            )
            cells.append(f"**{cell}**" if best[d] == lr else cell)
        lines.append(f"| {lr:g} | " + " | ".join(cells) + " |")
    lines += ["", "| D (tokens) | LR* | s.e. of log LR* |", "|---:|---:|---:|"]
    lines += [
        f"| {o['D']:.3g} | {o['lr']:.3g} | {o['log_lr_stderr']:.2f} |" for o in law["optima"] if o["N"] == law["N"]
    ]
    lines += ["", f"Law: LR*(D) = {law['B']:.3g} * D^{-law['beta']:+.3f}; **beta = {law['beta']:.3f}**, 95% t interval "
              f"{_interval(law['beta_ci95'])} ({law['dof']} dof), 95% bootstrap interval "
              f"{_interval(law['beta_ci95_bootstrap'])}."]  # fmt: skip
    held = law.get("longest_horizon_held_out")
    if held:
        fitted = ", ".join(f"{d:.3g}" for d in held["fitted_D"])
        lines += ["", f"Held out: fitted on D = {fitted}, the law predicts LR* = "
                  f"{held['predicted_lr']:.3g} at D = {held['held_out_D']:.3g}; measured {held['measured_lr']:.3g}. "
                  f"Error log(predicted / measured) = **{held['log_error']:+.2f}**, 95% bootstrap interval "
                  f"{_interval(held['log_error_ci95_bootstrap'], 2)}."]  # fmt: skip
    lines += [f"\nWarning: {w}" for w in law["warnings"]]
    return "\n".join(lines) + "\n"


def multilingual_markdown(fit: dict, held: dict | None) -> str:
    """fit-multilingual's result as Markdown: per family gamma with its bootstrap interval, alpha,
    beta, the fit's error, and (with a held-out model size) the error predicting it."""
    head = "| family | gamma [95% bootstrap] | alpha | beta | RMSE (log loss) | leave-one-run-out RMSE |"
    rule = "|---|---|---:|---:|---:|---:|"
    if held:
        head += f" held-out N = {held['N']:.3g}: log(pred / measured) [95% t] |"
        rule += "---|"
    lines = [head, rule]
    for family, f in fit.items():
        low, high = f["ci95_bootstrap"]["gamma"]
        row = (f"| {family} | {f['gamma']:.3f} [{low:.3f}, {high:.3f}] | {f['alpha']:.2f} | {f['beta']:.2f} | "
               f"{f['rmse_log_loss']:.3f} | {f['heldout_rmse_log_loss']:.3f} |")  # fmt: skip
        if held:
            e = held["per_family"][family]
            row += f" {e['mean']:+.3f} {_interval(e['ci95_t'])} |"
        lines.append(row)
    if held:
        m = held["mean_abs_log_error"]
        lines += ["", f"Predicting the held-out largest model (N = {held['N']:.3g}) from the smaller ones: mean "
                  f"|log error| over families **{m['mean']:.3f}** ({100 * (np.exp(m['mean']) - 1):.1f}% of the loss), "
                  "95% t interval "
                  f"{_interval(m['ci95_t'])} over its {m['runs']} runs."]  # fmt: skip
    warnings = sorted({w for f in fit.values() for w in f["warnings"]})
    lines += [f"\nWarning: {w}" for w in warnings]
    return "\n".join(lines) + "\n"
