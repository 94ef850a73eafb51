"""Token-horizon LR law: LR*(D) = B * D^-beta, and jointly LR*(N, D) = C * N^-alpha * D^-beta.

For each (N, D) the optimal LR is the vertex of a parabola fitted to loss vs log(LR) around the
lowest loss; the laws are straight lines in log-log space, fitted by least squares with 95%
intervals from the parameter covariance.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

Z95 = 1.96


@dataclass
class Optimum:
    n: float
    d: float
    lr: float
    log_lr_stderr: float  # uncertainty of log(LR*) from the parabola's covariance (delta method)
    points: list[tuple[float, float]]  # (lr, loss) used


def optimal_lr(lrs: list[float], losses: list[float], n: float, d: float, window: int = 5) -> Optimum:
    """Vertex of loss = a x^2 + b x + c, x = log(lr), fitted to the `window` points around the minimum."""
    order = np.argsort(lrs)
    x, y = np.log(np.asarray(lrs, float)[order]), np.asarray(losses, float)[order]
    if len(x) < 3:
        raise ValueError(f"N={n:g}, D={d:g}: need at least 3 learning rates, got {len(x)}")
    best = int(np.argmin(y))
    lo = max(0, min(best - window // 2, len(x) - window))
    x, y = x[lo : lo + window], y[lo : lo + window]
    design = np.stack([x**2, x, np.ones_like(x)], axis=1)
    coef, *_ = np.linalg.lstsq(design, y, rcond=None)
    a, b, _ = coef
    if a <= 0:
        raise ValueError(f"N={n:g}, D={d:g}: loss vs log(lr) has no minimum inside the swept range (widen it)")
    vertex = -b / (2 * a)
    dof = max(1, len(x) - 3)
    sigma2 = float(np.sum((design @ coef - y) ** 2)) / dof
    cov = sigma2 * np.linalg.pinv(design.T @ design)
    grad = np.array([b / (2 * a**2), -1 / (2 * a), 0.0])  # d(vertex)/d(a, b, c)
    stderr = math.sqrt(max(0.0, float(grad @ cov @ grad)))
    return Optimum(
        n, d, float(math.exp(vertex)), stderr, [(float(math.exp(u)), float(v)) for u, v in zip(x, y, strict=True)]
    )


def _linear_fit(features: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    design = np.column_stack([np.ones(len(target)), features])
    coef, *_ = np.linalg.lstsq(design, target, rcond=None)
    dof = max(1, len(target) - design.shape[1])
    sigma2 = float(np.sum((design @ coef - target) ** 2)) / dof
    return coef, np.sqrt(np.diag(sigma2 * np.linalg.pinv(design.T @ design)))


def fit_lr_law(optima: list[Optimum]) -> dict:
    """B, beta (one model size, the largest group) and, with >= 2 sizes, C, alpha, beta jointly."""
    ns = sorted({o.n for o in optima})
    main_n = max(ns, key=lambda n: sum(o.n == n for o in optima))
    group = [o for o in optima if o.n == main_n]
    if len({o.d for o in group}) < 2:
        raise ValueError("the LR law needs optima at two or more token horizons")
    log_d = np.log([o.d for o in group])
    coef, se = _linear_fit(log_d[:, None], np.log([o.lr for o in group]))
    law = {
        "form": "LR = B * D^-beta" + ("" if len(ns) < 2 else " ; joint LR = C * N^-alpha * D^-beta"),
        "N": main_n, "B": float(math.exp(coef[0])), "beta": float(-coef[1]),
        "beta_ci95": [float(-coef[1] - Z95 * se[1]), float(-coef[1] + Z95 * se[1])],
    }  # fmt: skip
    if len(ns) >= 2:
        feats = np.column_stack([np.log([o.n for o in optima]), np.log([o.d for o in optima])])
        jc, jse = _linear_fit(feats, np.log([o.lr for o in optima]))
        law.update({
            "C": float(math.exp(jc[0])), "alpha": float(-jc[1]), "beta": float(-jc[2]),
            "alpha_ci95": [float(-jc[1] - Z95 * jse[1]), float(-jc[1] + Z95 * jse[1])],
            "beta_ci95": [float(-jc[2] - Z95 * jse[2]), float(-jc[2] + Z95 * jse[2])],
            "B": float(math.exp(jc[0]) * main_n ** jc[1]),  # C * N^-alpha at the main size
        })  # fmt: skip
    law["heldout"] = leave_one_horizon_out(group)
    return law


def leave_one_horizon_out(group: list[Optimum]) -> dict:
    """Relative error of the LR predicted for each horizon by a law fitted to the others."""
    errors = {}
    if len(group) < 3:
        return errors
    for held in group:
        rest = [o for o in group if o is not held]
        coef, _ = _linear_fit(np.log([o.d for o in rest])[:, None], np.log([o.lr for o in rest]))
        predicted = math.exp(coef[0] + coef[1] * math.log(held.d))
        errors[f"{held.d:g}"] = abs(predicted - held.lr) / held.lr
    return errors


def transfer_lr(lr: float, tuned_tokens: float, target_tokens: float, beta: float) -> float:
    """The rule of thumb: move an LR tuned at one horizon to another with the fitted exponent."""
    return lr * (target_tokens / tuned_tokens) ** -beta
