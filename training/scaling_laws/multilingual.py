"""Multilingual family law: L_i(N, D, p_i) = (E_i + A_i / N^alpha_i + B_i / D^beta_i) * p_i^-gamma_i,
and the mixture that minimises the weighted sum of family losses."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import least_squares

PARAMS = ("E", "A", "alpha", "B", "beta", "gamma")


@dataclass
class FamilyLaw:
    E: float
    A: float
    alpha: float
    B: float
    beta: float
    gamma: float

    def base(self, n, d):
        """L-hat: the family's loss at ratio 1."""
        return self.E + self.A / np.power(n, self.alpha) + self.B / np.power(d, self.beta)

    def loss(self, n, d, p):
        return self.base(n, d) * np.power(p, -self.gamma)


def _predict(theta, n, d, p):
    log_e, log_a, alpha, log_b, beta, gamma = theta
    return (np.exp(log_e) + np.exp(log_a) / n**alpha + np.exp(log_b) / d**beta) * p ** (-gamma)


def _solve(n, d, p, loss, theta0):
    return least_squares(
        lambda t: np.log(_predict(t, n, d, p)) - np.log(loss), theta0, loss="soft_l1", f_scale=0.05,
        bounds=([-10, -10, 0.0, -10, 0.0, 0.0], [10, 30, 2.0, 30, 2.0, 2.0]),
    )  # fmt: skip


def _law(t) -> FamilyLaw:
    return FamilyLaw(
        float(np.exp(t[0])), float(np.exp(t[1])), float(t[2]), float(np.exp(t[3])), float(t[4]), float(t[5])
    )


def _theta(law: FamilyLaw) -> list[float]:
    return [np.log(law.E), np.log(law.A), law.alpha, np.log(law.B), law.beta, law.gamma]


def fit_family(n, d, p, loss, seed: int = 0, starts: int = 12) -> tuple[FamilyLaw, float]:
    """Robust (soft-L1) least squares on log-loss from several random starts; returns the law and RMSE
    of log-loss."""
    n, d, p, loss = (np.asarray(v, float) for v in (n, d, p, loss))
    rng = np.random.default_rng(seed)
    best = None
    for _ in range(starts):
        theta0 = [np.log(loss.min() * rng.uniform(0.3, 0.9)), rng.uniform(0, 8), rng.uniform(0.1, 0.8),
                  rng.uniform(0, 8), rng.uniform(0.1, 0.8), rng.uniform(0.0, 0.3)]  # fmt: skip
        result = _solve(n, d, p, loss, theta0)
        if best is None or result.cost < best.cost:
            best = result
    law = _law(best.x)
    rmse = float(np.sqrt(np.mean((np.log(law.loss(n, d, p)) - np.log(loss)) ** 2)))
    return law, rmse


def refit(law: FamilyLaw, n, d, p, loss) -> FamilyLaw:
    """The law refitted to other runs, starting from `law` (one local solve, not a multi-start fit)."""
    return _law(_solve(n, d, p, loss, _theta(law)).x)


def leave_one_out_rmse(n, d, p, loss, law: FamilyLaw) -> float:
    """RMSE of log-loss on each run when the law is refitted without it (held-out error)."""
    n, d, p, loss = (np.asarray(v, float) for v in (n, d, p, loss))
    errors = []
    for i in range(len(n)):
        keep = np.arange(len(n)) != i
        rest = refit(law, n[keep], d[keep], p[keep], loss[keep])
        errors.append(np.log(rest.loss(n[i], d[i], p[i])) - np.log(loss[i]))
    return float(np.sqrt(np.mean(np.square(errors))))


def bootstrap_family(n, d, p, loss, law: FamilyLaw, samples: int = 200, seed: int = 0) -> dict[str, list[float]]:
    """95% percentile intervals of every parameter over runs resampled with replacement (each refit
    from the full fit's parameters): what the particular set of runs makes uncertain."""
    n, d, p, loss = (np.asarray(v, float) for v in (n, d, p, loss))
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(samples):
        pick = rng.integers(0, len(n), len(n))
        draws.append(refit(law, n[pick], d[pick], p[pick], loss[pick]))
    return {k: [float(np.percentile([getattr(x, k) for x in draws], q)) for q in (2.5, 97.5)] for k in PARAMS}


def held_out_errors(n, d, p, loss, held) -> np.ndarray:
    """log(predicted / measured) loss on the runs marked `held`, by a law fitted to the others."""
    n, d, p, loss = (np.asarray(v, float) for v in (n, d, p, loss))
    held = np.asarray(held, bool)
    law, _ = fit_family(n[~held], d[~held], p[~held], loss[~held])
    return np.log(law.loss(n[held], d[held], p[held])) - np.log(loss[held])


def identification_warnings(family: str, n, d, p) -> list[str]:
    """Parameters the runs cannot pin down: A and alpha need two model sizes or more, B and beta two
    token counts, gamma two ratios; the law has six parameters."""
    warnings = []
    for values, names, what in ((n, "A and alpha", "model sizes N"), (d, "B and beta", "token counts D"),
                                (p, "gamma", "ratios")):  # fmt: skip
        if len(set(np.asarray(values, float).tolist())) < 2:
            warnings.append(f"{family}: one value of {what} in the runs: {names} are not identified (their "
                            "values and intervals say nothing); sweep two or more")  # fmt: skip
    if len(n) < 12:
        warnings.append(f"{family}: {len(n)} runs for 6 parameters: the fit and its intervals are fragile")
    return warnings


def optimal_mix(
    laws: dict[str, FamilyLaw],
    n: float,
    d: float,
    weights: dict[str, float] | None = None,
    normalize: bool = False,
    min_ratio: dict[str, float] | None = None,
    max_ratio: dict[str, float] | None = None,
) -> dict[str, float]:
    """Minimise sum_i w_i L_i subject to sum_i p_i = 1 and per-family bounds (epoch caps become upper
    bounds). KKT: p_i = clip((w_i gamma_i Lhat_i / lambda)^(1 / (1 + gamma_i)), lo_i, hi_i), with the
    multiplier lambda found by bisection so the ratios sum to one."""
    families = sorted(laws)
    base = {f: float(laws[f].base(n, d)) for f in families}
    w = {f: (weights or {}).get(f, 1.0) / (base[f] if normalize else 1.0) for f in families}
    lo = {f: (min_ratio or {}).get(f, 1e-6) for f in families}
    hi = {f: (max_ratio or {}).get(f, 1.0) for f in families}
    if sum(lo.values()) > 1 or sum(hi.values()) < 1:
        raise ValueError(f"no mixture satisfies the bounds: minimums sum to {sum(lo.values()):.3f}, "
                         f"maximums to {sum(hi.values()):.3f}")  # fmt: skip

    def ratios(lam: float) -> dict[str, float]:
        out = {}
        for f in families:
            g = laws[f].gamma
            free = (w[f] * g * base[f] / lam) ** (1 / (1 + g)) if g > 0 else 0.0
            out[f] = min(hi[f], max(lo[f], free))
        return out

    low, high = 1e-12, 1e12
    for _ in range(200):  # sum of ratios falls as lambda grows
        mid = (low * high) ** 0.5
        if sum(ratios(mid).values()) > 1:
            low = mid
        else:
            high = mid
    result = ratios((low * high) ** 0.5)
    total = sum(result.values())
    return {f: v / total for f, v in result.items()}
