"""Sample documents per language family so each family gets its configured share of tokens."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from common.config import ConfigError


@dataclass
class FamilyDraw:
    family: str
    ratio: float
    available_tokens: int
    drawn_tokens: int
    drawn_docs: int

    @property
    def epochs(self) -> float:
        """How many passes over this family's data the draw made (>1 means upsampled)."""
        return self.drawn_tokens / max(1, self.available_tokens)


def normalize_ratios(
    ratios: dict[str, float], available: dict[str, int], temperature: float | None = None
) -> dict[str, float]:
    """Ratios over the families present. An empty mapping means proportions to the data, or with a
    `temperature` T, p ~ n^(1/T) (T > 1 flattens towards scarce families, as in mT5 / XLM-R)."""
    if temperature is not None and temperature <= 0:
        raise ConfigError(f"temperature must be > 0, got {temperature}")
    if ratios and temperature is not None:
        raise ConfigError("give either ratios or temperature, not both")
    if not ratios:
        power = 1.0 / (temperature or 1.0)
        ratios = {family: float(count) ** power for family, count in available.items()}
    for family, value in ratios.items():
        if family not in available:
            raise ConfigError(
                f"ratios.{family}: no documents of family {family!r} in the sources (present: {sorted(available)})"
            )
        if value < 0:
            raise ConfigError(f"ratios.{family}: must be >= 0, got {value}")
    total = sum(ratios.values())
    if total <= 0:
        raise ConfigError("ratios: at least one family needs a positive ratio")
    return {family: value / total for family, value in ratios.items() if value > 0}


def draw_documents(
    lengths_by_family: dict[str, np.ndarray],
    ratios: dict[str, float],
    total_tokens: int,
    seed: int,
    max_epochs: float | None = None,
) -> tuple[np.ndarray, list[FamilyDraw]]:
    """Draw documents from each family (cycling through it in a seeded order, re-shuffled each
    epoch) until its token budget `ratio * total_tokens` is met exactly: the document that crosses
    the budget is cut there, so one long document cannot push a family past its share. With
    `max_epochs`, no family is drawn more than that many times over (its budget shrinks; the
    caller reports the share achieved). Then the mix is shuffled.

    `lengths_by_family` holds each document's token count (EOS excluded; packing appends one).
    Returns the mixture as rows (family position in sorted(ratios), document index, tokens kept or
    -1 for the whole document), in order."""
    parts, report = [], []
    families = sorted(ratios)
    for position, family in enumerate(families):
        sizes = np.asarray(lengths_by_family[family], dtype=np.int64) + 1
        rng = np.random.default_rng([seed, position])
        budget = round(ratios[family] * total_tokens)
        if max_epochs is not None:
            budget = min(budget, int(max_epochs * sizes.sum()))
        drawn, picked, limits = 0, [], []
        while drawn < budget:
            order = rng.permutation(len(sizes))
            cumulative = np.cumsum(sizes[order])
            take = min(int(np.searchsorted(cumulative, budget - drawn)) + 1, len(order))
            picked.append(order[:take])
            limit = np.full(take, -1, np.int64)
            overshoot = drawn + int(cumulative[take - 1]) - budget
            if overshoot > 0:  # cut the last document: its first tokens and an EOS fill the budget
                limit[-1] = int(sizes[order[take - 1]]) - overshoot - 1
            limits.append(limit)
            drawn += int(cumulative[take - 1]) - max(overshoot, 0)
        docs = np.concatenate(picked) if picked else np.zeros(0, np.int64)
        kept = np.concatenate(limits) if limits else np.zeros(0, np.int64)
        parts.append(np.stack([np.full(len(docs), position), docs, kept], axis=1))
        report.append(FamilyDraw(family, ratios[family], int(sizes.sum()), drawn, len(docs)))
    mixture = np.concatenate(parts)
    return mixture[np.random.default_rng(seed).permutation(len(mixture))], report


def draw_summary(draws: list[FamilyDraw]) -> dict[str, dict]:
    """Per family, what was asked and what the draw gave (the manifest's `family_stats`, and the
    load-time mixture's)."""
    drawn = sum(d.drawn_tokens for d in draws)
    return {
        d.family: {
            "ratio": round(d.ratio, 6),
            "share": round(d.drawn_tokens / max(1, drawn), 6),
            "available_tokens": d.available_tokens,
            "tokens": d.drawn_tokens,
            "documents": d.drawn_docs,
            "epochs": round(d.epochs, 4),
        }
        for d in draws
    }
