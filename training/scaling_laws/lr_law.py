"""Token-horizon LR law: LR*(D) = B * D^-beta, and jointly LR*(N, D) = C * N^-alpha * D^-beta.

For each (N, D) the optimal LR is the vertex of a parabola fitted to loss vs log(LR) around the
lowest loss; the laws are straight lines in log-log space, fitted by least squares.

Two 95% intervals per exponent, because two things make it uncertain:
- `*_ci95`: the scatter of the optima about the line, from the fit's covariance with Student's t
  quantile at the fit's degrees of freedom (a handful of horizons leaves one or two: the normal
  quantile 1.96 would be several times too narrow). An exactly determined line (as many optima as
  parameters) has no interval, and says so in `warnings`.
- `*_ci95_bootstrap`: each optimum's own uncertainty carried into the law: the losses of every
  (N, D) are redrawn about their parabola with its residual noise, every vertex and then the law
  refitted (a parametric bootstrap of the whole fit, percentile interval).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats

BOOTSTRAP_SAMPLES = 1000


@dataclass
class Optimum:
    n: float
    d: float
    lr: float
    log_lr_stderr: float  # uncertainty of log(LR*) from the parabola's covariance (delta method)
    points: list[tuple[float, float]]  # (lr, loss) used


def optimal_lr(lrs: list[float], losses: list[float], n: float, d: float, window: int = 5) -> Optimum:
    """Vertex of loss = a x^2 + b x + c, x = log(lr), fitted to every point (every seed) at the
    `window` learning rates around the one with the lowest mean loss. Repeated seeds at one LR are
    kept as separate points: their spread is part of the noise the intervals carry."""
    x, y = np.log(np.asarray(lrs, float)), np.asarray(losses, float)
    distinct = np.unique(x)
    if len(distinct) < 3:
        raise ValueError(f"N={n:g}, D={d:g}: need at least 3 learning rates, got {len(distinct)}")
    best = int(np.argmin([y[x == u].mean() for u in distinct]))
    lo = max(0, min(best - window // 2, len(distinct) - window))
    keep = np.isin(x, distinct[lo : lo + window])
    order = np.argsort(x[keep], kind="stable")
    x, y = x[keep][order], y[keep][order]
    vertex, a, b, cov = _vertex(x, y)
    if vertex is None:
        raise ValueError(f"N={n:g}, D={d:g}: loss vs log(lr) has no minimum inside the swept range (widen it)")
    grad = np.array([b / (2 * a**2), -1 / (2 * a), 0.0])  # d(vertex)/d(a, b, c)
    stderr = math.sqrt(max(0.0, float(grad @ cov @ grad)))
    return Optimum(
        n, d, float(math.exp(vertex)), stderr, [(float(math.exp(u)), float(v)) for u, v in zip(x, y, strict=True)]
    )


def _parabola(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Least squares y = a x^2 + b x + c: the coefficients (a, b, c) and the design matrix."""
    design = np.stack([x**2, x, np.ones_like(x)], axis=1)
    return np.linalg.lstsq(design, y, rcond=None)[0], design


def _vertex(x: np.ndarray, y: np.ndarray):
    """The parabola's vertex (None when it opens downwards), its a and b, and their covariance."""
    coef, design = _parabola(x, y)
    a, b, _ = coef
    dof = len(x) - 3
    sigma2 = float(np.sum((design @ coef - y) ** 2)) / dof if dof > 0 else 0.0
    cov = sigma2 * np.linalg.pinv(design.T @ design)
    return (-b / (2 * a) if a > 0 else None), a, b, cov


def _linear_fit(features: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Least squares with an intercept: coefficients, their standard errors, degrees of freedom."""
    design = np.column_stack([np.ones(len(target)), features])
    coef, *_ = np.linalg.lstsq(design, target, rcond=None)
    dof = len(target) - design.shape[1]
    sigma2 = float(np.sum((design @ coef - target) ** 2)) / dof if dof > 0 else float("nan")
    return coef, np.sqrt(np.abs(np.diag(sigma2 * np.linalg.pinv(design.T @ design)))), dof


def t_interval(value: float, stderr: float, dof: int) -> list[float] | None:
    """value -/+ t(0.975, dof) * stderr; None when nothing is left to estimate the scatter from."""
    if dof < 1 or not math.isfinite(stderr):
        return None
    half = float(stats.t.ppf(0.975, dof)) * stderr
    return [value - half, value + half]


def _exponents(optima: list[Optimum], main_n: float) -> dict[str, float]:
    """beta at the main size alone and, with two or more sizes, alpha and beta jointly."""
    group = [o for o in optima if o.n == main_n]
    coef, _, _ = _linear_fit(np.log([o.d for o in group])[:, None], np.log([o.lr for o in group]))
    out = {"beta_main": float(-coef[1])}
    if len({o.n for o in optima}) >= 2:
        feats = np.column_stack([np.log([o.n for o in optima]), np.log([o.d for o in optima])])
        joint, _, _ = _linear_fit(feats, np.log([o.lr for o in optima]))
        out.update(alpha=float(-joint[1]), beta=float(-joint[2]))
    return out


def _redraws(optima: list[Optimum], samples: int, seed: int):
    """Parametric bootstrap of the optima: every optimum's losses redrawn about its parabola with
    that fit's residual noise (pooled over all fits where a fit has none to spare), the vertices
    refitted. Yields a list of redrawn optima, or None where some parabola had no minimum inside the
    swept LRs. Raises ValueError when no noise is known."""
    fits = []  # per optimum: log-LRs, fitted losses, residual sum of squares, degrees of freedom
    for o in optima:
        x, y = np.log([p[0] for p in o.points]), np.array([p[1] for p in o.points])
        coef, design = _parabola(x, y)
        fitted = design @ coef
        fits.append((o, x, fitted, float(np.sum((y - fitted) ** 2)), len(x) - 3))
    spare = [(ss, dof) for *_, ss, dof in fits if dof > 0]
    if not spare or sum(d for _, d in spare) == 0:
        raise ValueError("every parabola went through its points exactly (3 learning rates): no noise to redraw")
    pooled = math.sqrt(sum(ss for ss, _ in spare) / sum(d for _, d in spare))
    noise = [math.sqrt(ss / dof) if dof > 0 else pooled for *_, ss, dof in fits]
    rng = np.random.default_rng(seed)
    for _ in range(samples):
        redrawn = []
        for (o, x, fitted, _, _), sigma in zip(fits, noise, strict=True):
            vertex, *_ = _vertex(x, fitted + rng.normal(0.0, sigma, len(x)))
            if vertex is None or not x.min() <= vertex <= x.max():  # no minimum inside the swept LRs
                break
            redrawn.append(Optimum(o.n, o.d, math.exp(vertex), 0.0, o.points))
        yield redrawn if len(redrawn) == len(fits) else None


def _percentiles(values: list[float]) -> list[float] | None:
    return [float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))] if values else None


def bootstrap_exponents(optima: list[Optimum], main_n: float, samples: int = BOOTSTRAP_SAMPLES,
                        seed: int = 0) -> tuple[dict[str, list[float]], float, str | None]:  # fmt: skip
    """Percentile 95% intervals of the exponents over the redrawn optima, and the share of redraws
    left out (an optimum outside the swept LRs). None where no noise is known."""
    try:
        redraws = list(_redraws(optima, samples, seed))
    except ValueError as err:
        return {}, 0.0, str(err)
    draws: dict[str, list[float]] = {}
    for redrawn in filter(None, redraws):
        for name, value in _exponents(redrawn, main_n).items():
            draws.setdefault(name, []).append(value)
    failed = sum(r is None for r in redraws) / samples
    return {name: _percentiles(v) for name, v in draws.items()}, failed, None


def predict_longest_horizon(optima: list[Optimum], samples: int = BOOTSTRAP_SAMPLES, seed: int = 0) -> dict:
    """A held-out test of the law: fitted on every horizon of the most-swept size but the longest,
    the LR* it predicts at the longest against the LR* measured there. The error is log(predicted /
    measured), with a 95% interval from the same parametric bootstrap (every optimum, the held-out
    one included, redrawn; the law refitted on the shorter ones)."""
    main_n = max({o.n for o in optima}, key=lambda n: sum(o.n == n for o in optima))
    group = sorted((o for o in optima if o.n == main_n), key=lambda o: o.d)
    if len(group) < 3:
        raise ValueError(f"a held-out horizon needs optima at 3 or more horizons (N={main_n:g} has {len(group)})")

    def error(fitted: list[Optimum]) -> tuple[float, float]:
        *rest, held = fitted
        coef, _, _ = _linear_fit(np.log([o.d for o in rest])[:, None], np.log([o.lr for o in rest]))
        return float(coef[0] + coef[1] * math.log(held.d)), float(math.log(held.lr))

    predicted, measured = error(group)
    try:
        errors = [p - m for p, m in (error(r) for r in _redraws(group, samples, seed) if r is not None)]
    except ValueError:
        errors = []
    return {
        "N": main_n, "fitted_D": [o.d for o in group[:-1]], "held_out_D": group[-1].d,
        "predicted_lr": math.exp(predicted), "measured_lr": math.exp(measured),
        "measured_log_lr_stderr": group[-1].log_lr_stderr, "log_error": predicted - measured,
        "log_error_ci95_bootstrap": _percentiles(errors),
    }  # fmt: skip


def fit_lr_law(optima: list[Optimum]) -> dict:
    """B, beta (one model size, the largest group) and, with >= 2 sizes, C, alpha, beta jointly;
    each exponent with its t interval and its bootstrap interval, and warnings where a fit has too
    few points to say much."""
    ns = sorted({o.n for o in optima})
    main_n = max(ns, key=lambda n: sum(o.n == n for o in optima))
    group = [o for o in optima if o.n == main_n]
    if len({o.d for o in group}) < 2:
        raise ValueError("the LR law needs optima at two or more token horizons")
    warnings = []
    log_d = np.log([o.d for o in group])
    coef, se, dof = _linear_fit(log_d[:, None], np.log([o.lr for o in group]))
    law = {
        "form": "LR = B * D^-beta" + ("" if len(ns) < 2 else " ; joint LR = C * N^-alpha * D^-beta"),
        "N": main_n, "B": float(math.exp(coef[0])), "beta": float(-coef[1]),
        "beta_ci95": t_interval(float(-coef[1]), float(se[1]), dof), "dof": dof,
        "interval_method": "t (scatter of the optima about the line) and parametric bootstrap of the whole fit "
                           "(each optimum's own noise)",
    }  # fmt: skip
    if len(ns) >= 2:
        feats = np.column_stack([np.log([o.n for o in optima]), np.log([o.d for o in optima])])
        jc, jse, jdof = _linear_fit(feats, np.log([o.lr for o in optima]))
        law.update({
            "C": float(math.exp(jc[0])), "alpha": float(-jc[1]), "beta": float(-jc[2]), "dof": jdof,
            "alpha_ci95": t_interval(float(-jc[1]), float(jse[1]), jdof),
            "beta_ci95": t_interval(float(-jc[2]), float(jse[2]), jdof),
            "B": float(math.exp(jc[0]) * main_n ** jc[1]),  # C * N^-alpha at the main size
        })  # fmt: skip
    points = f"{len(optima)} optima ({len(ns)} sizes)" if len(ns) >= 2 else f"{len(group)} horizons"
    if law["dof"] < 1:
        warnings.append(f"{points} determine the fit exactly: no interval from their scatter; sweep more horizons")
    elif law["dof"] < 3:
        quantile = stats.t.ppf(0.975, law["dof"])
        warnings.append(f"{points} leave {law['dof']} degree(s) of freedom: the t intervals are wide "
                        f"(t quantile {quantile:.1f}); sweep more horizons to narrow them")  # fmt: skip
    intervals, failed, why = bootstrap_exponents(optima, main_n)
    if why:
        warnings.append(f"no bootstrap interval: {why}")
    key = "beta" if len(ns) >= 2 else "beta_main"
    law["beta_ci95_bootstrap"] = intervals.get(key)
    if len(ns) >= 2:
        law["alpha_ci95_bootstrap"] = intervals.get("alpha")
    if failed > 0.05:
        warnings.append(f"{failed:.0%} of bootstrap redraws put an optimum outside the swept range (left out): "
                        "widen the LR grid")  # fmt: skip
    for o in optima:
        lrs = [p[0] for p in o.points]
        if not min(lrs) < o.lr < max(lrs):
            warnings.append(f"N={o.n:g}, D={o.d:g}: the fitted LR* {o.lr:.3g} lies outside the LRs around the "
                            "minimum: an extrapolation; widen the LR grid")  # fmt: skip
    law["heldout"] = leave_one_horizon_out(group)
    law["warnings"] = warnings
    return law


def leave_one_horizon_out(group: list[Optimum]) -> dict:
    """Relative error of the LR predicted for each horizon by a law fitted to the others."""
    errors = {}
    if len(group) < 3:
        return errors
    for held in group:
        rest = [o for o in group if o is not held]
        coef, _, _ = _linear_fit(np.log([o.d for o in rest])[:, None], np.log([o.lr for o in rest]))
        predicted = math.exp(coef[0] + coef[1] * math.log(held.d))
        errors[f"{held.d:g}"] = abs(predicted - held.lr) / held.lr
    return errors


def transfer_lr(lr: float, tuned_tokens: float, target_tokens: float, beta: float) -> float:
    """The rule of thumb: move an LR tuned at one horizon to another with the fitted exponent."""
    return lr * (target_tokens / tuned_tokens) ** -beta
