"""Sample documents per language family so each family gets its configured share of tokens."""

from __future__ import annotations

import random
from dataclasses import dataclass

from data_pipeline.config import ConfigError


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
    docs_by_family: dict[str, list[list[int]]], ratios: dict[str, float], total_tokens: int, seed: int
) -> tuple[list[tuple[str, list[int]]], list[FamilyDraw]]:
    """Draw whole documents from each family (cycling through it in a seeded order, re-shuffled
    each epoch) until its token budget `ratio * total_tokens` is reached, then shuffle the mix.
    Token counts include the EOS that packing appends to every document."""
    rng = random.Random(seed)
    mixture: list[tuple[str, list[int]]] = []
    report = []
    for family in sorted(ratios):
        docs = docs_by_family[family]
        budget = ratios[family] * total_tokens
        drawn_tokens = drawn_docs = 0
        order: list[int] = []
        while drawn_tokens < budget:
            if not order:
                order = list(range(len(docs)))
                rng.shuffle(order)
            doc = docs[order.pop()]
            mixture.append((family, doc))
            drawn_tokens += len(doc) + 1
            drawn_docs += 1
        available = sum(len(d) + 1 for d in docs)
        report.append(FamilyDraw(family, ratios[family], available, drawn_tokens, drawn_docs))
    rng.shuffle(mixture)
    return mixture, report
