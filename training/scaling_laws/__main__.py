"""python -m training.scaling_laws {sweep,fit-lr,fit-multilingual,optimal-mix,compare} ...

  sweep SPEC.yaml [--slurm]                run (or write a SLURM array for) a grid, collect results.csv
  fit-lr RESULTS.csv [--out DIR]          columns N, D, lr, loss
  fit-multilingual RESULTS.csv [--out DIR] columns N, D, ratio/<family>, loss/<family>
  optimal-mix FIT.json --params N --tokens D [--weights f=w ...] [--normalize]
              [--min f=p ...] [--max f=p ...] [--manifest DATA_DIR --max-epochs E] [--out ratios.yaml]
  compare BASELINE.csv CANDIDATE.csv [--out FILE.json]   losses paired by seed, t intervals

Each fit writes JSON and PNG plots; optimal-mix writes a ratios file for `ratios: from FILE`.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import yaml

from common.cli import print_error
from common.files import atomic_write_text
from data_pipeline.shards import read_manifest
from training.scaling_laws.lr_law import fit_lr_law, optimal_lr, predict_longest_horizon
from training.scaling_laws.multilingual import (
    PARAMS,
    FamilyLaw,
    bootstrap_family,
    fit_family,
    held_out_errors,
    identification_warnings,
    leave_one_out_rmse,
    optimal_mix,
)
from training.scaling_laws.results import (
    compare_runs,
    comparison_table,
    interval_text,
    lr_law_markdown,
    mean_with_t_interval,
    multilingual_markdown,
    read_rows,
)


def family_styles(count: int) -> list[tuple[tuple, str]]:
    """A distinct (colour, marker) for each of `count` families: tab10's or tab20's colours while they
    last (then evenly spaced hues), each with a marker, so no two families look alike at any count."""
    import matplotlib

    if count <= 20:
        cmap = matplotlib.colormaps["tab10" if count <= 10 else "tab20"]
        colours = [cmap(i) for i in range(count)]
    else:
        colours = [matplotlib.colormaps["turbo"](i / (count - 1)) for i in range(count)]
    markers = "osD^vP*Xhp<>"
    return [(colour, markers[i % len(markers)]) for i, colour in enumerate(colours)]


def _figure(path: Path, draw, size: tuple[float, float]) -> None:
    """A figure drawn by `draw(fig)`, with room kept for a legend outside the axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=size, layout="constrained")
    draw(fig)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def _plot(path: Path, draw) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.2), layout="constrained")
    draw(ax)
    fig.savefig(path, dpi=120, bbox_inches="tight")  # a legend placed outside the axes is kept
    plt.close(fig)


def _label_ticks(axis, values) -> None:
    """Ticks at `values` only, labelled with three significant digits (a log axis that spans less than
    a decade has no labelled ticks of its own; its minor labels overlap)."""
    from matplotlib.ticker import FixedLocator, NullLocator

    axis.set_major_locator(FixedLocator(list(values)))
    axis.set_minor_locator(NullLocator())
    axis.set_ticklabels([f"{v:.2g}" for v in values])


def cmd_fit_lr(results: str, out: Path) -> dict:
    rows = read_rows(results)
    for key in ("N", "D", "lr", "loss"):
        if key not in rows[0]:
            raise ValueError(f"{results}: missing column {key!r}")
    groups = defaultdict(list)
    for r in rows:
        groups[(r["N"], r["D"])].append((r["lr"], r["loss"]))
    optima = [
        optimal_lr([lr for lr, _ in pts], [loss for _, loss in pts], n, d) for (n, d), pts in sorted(groups.items())
    ]
    law = fit_lr_law(optima)
    law["optima"] = [{"N": o.n, "D": o.d, "lr": o.lr, "log_lr_stderr": o.log_lr_stderr} for o in optima]
    if sum(o.n == law["N"] for o in optima) >= 3:
        law["longest_horizon_held_out"] = predict_longest_horizon(optima)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "lr_law.json", json.dumps(law, indent=2))
    atomic_write_text(out / "lr_law.md", lr_law_markdown(groups, law))

    def loss_vs_lr(ax):
        horizons, sizes = sorted({d for _, d in groups}), sorted({n for n, _ in groups})
        colours = dict(zip(horizons, family_styles(len(horizons)), strict=True))  # a colour per horizon D
        dashes = ["-", "--", "-.", (0, (1, 1)), (0, (5, 1, 1, 1))]  # a line style and marker per size N
        for (n, d), pts in sorted(groups.items()):
            k, colour = sizes.index(n), colours[d][0]
            lrs = sorted({lr for lr, _ in pts})
            means = [np.mean([loss for x, loss in pts if x == lr]) for lr in lrs]  # the line: mean over seeds
            ax.plot(lrs, means, color=colour, ls=dashes[k % len(dashes)], label=f"N={n:.2g}, D={d:.2g}")
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "osD^v"[k % 5], color=colour, ms=4, ls="none")
            best = next(o for o in optima if (o.n, o.d) == (n, d))
            ax.axvline(best.lr, color=colour, ls=":", lw=0.8)
        ax.set(xscale="log", xlabel="peak LR", ylabel="final loss",
               title="loss vs LR (points: seeds; line: their mean; dotted: fitted LR*)")  # fmt: skip
        _label_ticks(ax.xaxis, sorted({lr for pts in groups.values() for lr, _ in pts}))
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)

    def law_plot(ax):
        from matplotlib.ticker import NullFormatter

        ds = np.array([o.d for o in optima])
        grid = np.geomspace(ds.min() / 2, ds.max() * 4, 50)
        sizes = sorted({o.n for o in optima})
        for n, (colour, marker) in zip(sizes, family_styles(len(sizes)), strict=True):
            mine = [o for o in optima if o.n == n]
            lrs, se = np.array([o.lr for o in mine]), np.array([o.log_lr_stderr for o in mine])
            ax.errorbar([o.d for o in mine], lrs, yerr=[lrs - lrs * np.exp(-se), lrs * np.exp(se) - lrs], fmt=marker,
                        color=colour, capsize=3, label=f"LR* at N={n:.3g} (+-1 s.e.)")  # fmt: skip
            if "C" in law:
                ax.plot(grid, law["C"] * n ** -law["alpha"] * grid ** -law["beta"], color=colour)
            elif n == law["N"]:
                ax.plot(grid, law["B"] * grid ** -law["beta"], color=colour)
        ax.set(xscale="log", yscale="log", xlabel="tokens D", ylabel="LR*",
               title=f"token-horizon LR law: beta = {law['beta']:.3f}")  # fmt: skip
        ax.xaxis.set_minor_formatter(NullFormatter())  # decade labels only: minor ones overlap
        low, high = ax.get_ylim()
        _label_ticks(ax.yaxis, np.geomspace(low, high, 5)[1:-1])  # the optima may span less than a decade
        ax.legend(fontsize=7, loc="best")

    _plot(out / "loss_vs_lr.png", loss_vs_lr)
    _plot(out / "lr_law.png", law_plot)
    return law


def family_columns(rows: list[dict], family: str) -> tuple[list[dict], list[np.ndarray]]:
    """The runs that drew the family and measured its loss, and their N, D, ratio and loss columns."""
    use = [r for r in rows if f"loss/{family}" in r and r.get(f"ratio/{family}", 0) > 0]
    return use, [np.array([r[k] for r in use]) for k in ("N", "D", f"ratio/{family}", f"loss/{family}")]


def largest_model_held_out(rows: list[dict], families: list[str]) -> dict:
    """Every family's law refitted without the runs of the largest model, then asked for their
    losses: log(predicted / measured) per family (mean over the held-out runs, t interval with the
    runs as the unit), and per run averaged over families."""
    largest = max(r["N"] for r in rows)
    if len({r["N"] for r in rows}) < 3:
        raise ValueError("--hold-out-largest needs three model sizes or more (two to fit A and alpha, one to predict)")
    per_family, per_run = {}, defaultdict(list)
    for family in families:
        use, cols = family_columns(rows, family)
        held = cols[0] == largest
        errors = held_out_errors(*cols, held)
        per_family[family] = {**mean_with_t_interval(errors), "rmse": float(np.sqrt(np.mean(errors**2)))}
        for r, e in zip([r for r, h in zip(use, held, strict=True) if h], errors, strict=True):
            per_run[(r["D"], tuple(sorted((k, v) for k, v in r.items() if k.startswith("ratio/"))))].append(e)
    run_means = [float(np.mean(e)) for e in per_run.values()]
    run_abs = [float(np.mean(np.abs(e))) for e in per_run.values()]
    return {"N": largest, "per_family": per_family, "mean_log_error": mean_with_t_interval(run_means),
            "mean_abs_log_error": mean_with_t_interval(run_abs)}  # fmt: skip


def cmd_fit_multilingual(results: str, out: Path, bootstrap: int = 200, hold_out_largest: bool = False) -> dict:
    rows = read_rows(results)
    families = sorted(k.split("/", 1)[1] for k in rows[0] if k.startswith("loss/"))
    if not families:
        raise ValueError(f"{results}: no loss/<family> columns")
    fit = {}
    for family in families:
        use, cols = family_columns(rows, family)
        law, rmse = fit_family(*cols)
        residual = np.log(law.loss(*cols[:3])) - np.log(cols[3])
        others = {o: np.array([r.get(f"ratio/{o}", 0.0) for r in use]) for o in families if o != family}
        # The hypothesis: at fixed p_i the loss does not depend on the other families' ratios.
        independence = {o: float(np.corrcoef(residual, v)[0, 1]) if v.std() > 0 and residual.std() > 0 else 0.0
                        for o, v in others.items()}  # fmt: skip
        fit[family] = {**{k: getattr(law, k) for k in PARAMS}, "rmse_log_loss": rmse,
                       "heldout_rmse_log_loss": leave_one_out_rmse(*cols, law),
                       "residual_corr_with_other_ratios": independence, "points": len(use),
                       "ci95_bootstrap": bootstrap_family(*cols, law, samples=bootstrap),
                       "warnings": identification_warnings(family, *cols[:3])}  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "multilingual_law.json", json.dumps(fit, indent=2))
    held = largest_model_held_out(rows, families) if hold_out_largest else None
    if held:
        atomic_write_text(out / "largest_held_out.json", json.dumps(held, indent=2))
    atomic_write_text(out / "multilingual_law.md", multilingual_markdown(fit, held))

    def draw(fig):
        from matplotlib.lines import Line2D

        horizons = sorted({(r["N"], r["D"]) for r in rows})
        cols = math.ceil(math.sqrt(len(horizons)))
        axes = fig.subplots(-(-len(horizons) // cols), cols, squeeze=False, sharey=True).ravel()
        styles = dict(zip(families, family_styles(len(families)), strict=True))
        for ax, (n, d) in zip(axes, horizons, strict=False):
            for family in families:
                law = FamilyLaw(**{k: fit[family][k] for k in PARAMS})
                use = [r for r in rows if (r["N"], r["D"]) == (n, d) and r.get(f"ratio/{family}", 0) > 0
                       and f"loss/{family}" in r]  # fmt: skip
                if not use:
                    continue
                color, marker = styles[family]
                ps = np.array([r[f"ratio/{family}"] for r in use])
                ax.plot(ps, [r[f"loss/{family}"] for r in use], marker, color=color, ms=4, ls="none")
                grid = np.linspace(ps.min(), ps.max(), 50)
                ax.plot(grid, law.loss(n, d, grid), color=color, lw=1)
            ax.set_title(f"N={n:.3g}, D={d:.3g}", fontsize=9)
            ax.set(xlabel="sampling ratio p", yscale="log")
        for ax in axes[len(horizons) :]:
            ax.set_visible(False)
        axes[0].set_ylabel("family validation loss")
        handles = [Line2D([], [], color=styles[f][0], marker=styles[f][1], lw=1,
                          label=f"{f} (gamma {fit[f]['gamma']:.2f})") for f in families]  # fmt: skip
        fig.legend(handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, frameon=False)
        fig.suptitle("L_i(p_i): points measured, lines the fitted law, one panel per (N, D)", fontsize=10)

    panels = len({(r["N"], r["D"]) for r in rows})
    cols = math.ceil(math.sqrt(panels))
    _figure(out / "multilingual_law.png", draw, size=(4.2 * cols, 3.4 * -(-panels // cols)))
    return fit


def _pairs(items: list[str] | None, what: str) -> dict[str, float]:
    out = {}
    for item in items or []:
        if "=" not in item:
            raise ValueError(f"--{what} {item!r}: use family=value")
        key, value = item.split("=", 1)
        out[key] = float(value)
    return out


def cmd_optimal_mix(args) -> dict[str, float]:
    fit = json.loads(Path(args.fit).read_text())
    laws = {f: FamilyLaw(**{k: v[k] for k in PARAMS}) for f, v in fit.items()}
    max_ratio = _pairs(args.max, "max")
    if args.manifest:
        stats = read_manifest(args.manifest)["family_stats"]
        for family, s in stats.items():  # at most max_epochs passes over a family's data
            cap = args.max_epochs * s["available_tokens"] / args.tokens
            max_ratio[family] = min(max_ratio.get(family, 1.0), cap)
    ratios = optimal_mix(laws, args.params, args.tokens, _pairs(args.weights, "weights"), args.normalize,
                         _pairs(args.min, "min"), max_ratio)  # fmt: skip
    atomic_write_text(args.out, yaml.safe_dump({k: round(v, 6) for k, v in ratios.items()}))
    return ratios


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.scaling_laws", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    sub = parser.add_subparsers(dest="command", required=True)
    sweep = sub.add_parser("sweep")
    sweep.add_argument("spec")
    sweep.add_argument("--slurm", action="store_true", help="write a SLURM job array instead of running locally")
    for name in ("fit-lr", "fit-multilingual"):
        p = sub.add_parser(name)
        p.add_argument("results")
        p.add_argument("--out", default="runs/scaling_laws")
    p.add_argument("--bootstrap", type=int, default=200, help="resamples of the runs for the parameters' intervals")
    p.add_argument(
        "--hold-out-largest",
        action="store_true",
        help="also refit without the largest model's runs and predict them (largest_held_out.json)",
    )
    compare = sub.add_parser("compare", help="paired by seed: candidate runs' losses minus the baseline's")
    compare.add_argument("baseline", help="results.csv of the baseline runs")
    compare.add_argument("candidate", help="results.csv of the candidate runs")
    compare.add_argument("--out", help="write the comparison as JSON here")
    mix = sub.add_parser("optimal-mix")
    mix.add_argument("fit")
    mix.add_argument("--params", type=float, required=True)
    mix.add_argument("--tokens", type=float, required=True)
    mix.add_argument("--weights", nargs="*")
    mix.add_argument("--normalize", action="store_true", help="weight each family by 1 / its loss at ratio 1")
    mix.add_argument("--min", nargs="*")
    mix.add_argument("--max", nargs="*")
    mix.add_argument("--manifest", help="a built dataset: caps each family at --max-epochs passes over its data")
    mix.add_argument("--max-epochs", type=float, default=4.0)
    mix.add_argument("--out", default="ratios.yaml")
    args = parser.parse_args(argv)
    try:
        if args.command == "sweep":
            from common.config import load_config
            from training.scaling_laws.sweep import SweepSpec, collect, execute, write_slurm_array

            spec = load_config(SweepSpec, args.spec)
            if args.slurm:
                print(
                    f"wrote {write_slurm_array(spec)}; after it ran: python -m training.scaling_laws sweep {args.spec}"
                )
                return 0
            failed = execute(spec)
            print(f"results: {collect(spec)}" + (f"; failed runs: {[r.name for r in failed]}" if failed else ""))
            return 1 if failed else 0
        if args.command == "fit-lr":
            law = cmd_fit_lr(args.results, Path(args.out))
            if "C" in law:
                print(f"LR*(N, D) = {law['C']:.4g} * N^{-law['alpha']:+.4f} * D^{-law['beta']:+.4f}")
                print(f"  alpha 95%: t {interval_text(law['alpha_ci95'])}, "
                      f"bootstrap {interval_text(law['alpha_ci95_bootstrap'])}")  # fmt: skip
            else:
                print(f"LR*(D) = {law['B']:.4g} * D^{-law['beta']:+.4f}")
            print(f"  beta 95%: t {interval_text(law['beta_ci95'])} ({law['dof']} dof), "
                  f"bootstrap {interval_text(law['beta_ci95_bootstrap'])}")  # fmt: skip
            held = law.get("longest_horizon_held_out")
            if held:
                ci = interval_text(held["log_error_ci95_bootstrap"])
                print(f"  held out D={held['held_out_D']:.4g}: LR* predicted {held['predicted_lr']:.4g} by the law "
                      f"fitted on the shorter horizons, measured {held['measured_lr']:.4g}; log error "
                      f"{held['log_error']:+.3f}, 95% bootstrap {ci}")  # fmt: skip
            for warning in law["warnings"]:
                print(f"warning: {warning}")
            print(f"wrote {args.out}/lr_law.json, loss_vs_lr.png, lr_law.png")
        elif args.command == "fit-multilingual":
            fit = cmd_fit_multilingual(args.results, Path(args.out), args.bootstrap, args.hold_out_largest)
            for family, f in fit.items():
                low, high = f["ci95_bootstrap"]["gamma"]
                print(
                    f"{family:14s} gamma={f['gamma']:.3f} [{low:.3f}, {high:.3f}] E={f['E']:.3f} "
                    f"rmse(log)={f['rmse_log_loss']:.4f} held-out={f['heldout_rmse_log_loss']:.4f}"
                )
            for warning in {w for f in fit.values() for w in f["warnings"]}:
                print(f"warning: {warning}")
            if args.hold_out_largest:
                held = json.loads((Path(args.out) / "largest_held_out.json").read_text())
                for family, e in held["per_family"].items():
                    print(f"held out N={held['N']:.4g}: {family:14s} log(predicted/measured) {e['mean']:+.4f} "
                          f"95% t {interval_text(e['ci95_t'])} over {e['runs']} runs")  # fmt: skip
                m = held["mean_abs_log_error"]
                print(f"held out N={held['N']:.4g}: mean |log error| over families {m['mean']:.4f}, "
                      f"95% t {interval_text(m['ci95_t'])} over {m['runs']} runs")  # fmt: skip
            print(f"wrote {args.out}/multilingual_law.json (95% bootstrap intervals over runs for every parameter), "
                  "multilingual_law.png" + (", largest_held_out.json" if args.hold_out_largest else ""))  # fmt: skip
        elif args.command == "compare":
            result = compare_runs(args.baseline, args.candidate)
            print(comparison_table(result))
            print(f"(paired by seed over seeds {result['seeds']}; t intervals with {len(result['seeds']) - 1} dof)")
            if args.out:
                atomic_write_text(args.out, json.dumps(result, indent=2))
                atomic_write_text(Path(args.out).with_suffix(".md"), comparison_table(result) + "\n")
        else:
            ratios = cmd_optimal_mix(args)
            print(" ".join(f"{k}={v:.3f}" for k, v in ratios.items()), f"-> {args.out}")
    except (ValueError, FileNotFoundError, KeyError) as err:
        print_error(str(err))
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
