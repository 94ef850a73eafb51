"""Sample documents per language family so each family gets its configured share of tokens."""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

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
    ratios: dict[str, float],
    available: dict[str, int],
    temperature: float | None = None,
    key: str = "ratios",
    where: str = "the sources",
) -> dict[str, float]:
    """Ratios over the families present. An empty mapping means proportions to the data, or with a
    `temperature` T, p ~ n^(1/T) (T > 1 flattens towards scarce families, as in mT5 / XLM-R). Errors
    name the setting as `key` and the data as `where`."""
    if temperature is not None and temperature <= 0:
        raise ConfigError(f"temperature must be > 0, got {temperature}")
    if ratios and temperature is not None:
        raise ConfigError(f"give either {key} or temperature, not both")
    if not ratios:
        power = 1.0 / (temperature or 1.0)
        ratios = {family: float(count) ** power for family, count in available.items()}
    for family, value in ratios.items():
        if family not in available:
            near = difflib.get_close_matches(family, available, n=1)
            hint = f"; did you mean {near[0]!r}?" if near else f" (present: {', '.join(sorted(available))})"
            raise ConfigError(f"{key}.{family}: no documents of family {family!r} in {where}{hint}", key)
        if value < 0:
            raise ConfigError(f"{key}.{family}: must be >= 0, got {value}", key)
    total = sum(ratios.values())
    if total <= 0:
        raise ConfigError(f"{key}: at least one family needs a positive ratio", key)
    return {family: value / total for family, value in ratios.items() if value > 0}


def read_ratios(ratios: dict[str, float] | str, key: str = "ratios") -> dict[str, float]:
    """A ratios mapping, or the one in FILE for `from FILE` (what `optimal-mix` writes)."""
    if isinstance(ratios, dict):
        return ratios
    if not ratios.startswith("from "):
        raise ConfigError(f"{key}: {ratios!r} is neither a mapping nor 'from FILE'", key)
    path = Path(ratios[5:].strip())
    if not path.is_file():
        raise ConfigError(f"{key}: file {path} not found", key)
    loaded = yaml.safe_load(path.read_text())
    if not isinstance(loaded, dict) or not all(isinstance(v, (int, float)) for v in loaded.values()):
        raise ConfigError(f"{key}: {path} must map family names to numbers", key)
    return {str(k): float(v) for k, v in loaded.items()}


@dataclass
class Mixture:
    """The documents drawn for training: rows of (family position in `families`, document index,
    tokens kept or -1), in training order, with what each family got and what fell short."""

    rows: np.ndarray
    families: list[str]  # sorted
    draws: list[FamilyDraw]
    total_tokens: int  # asked (the draw may fall short: see `warnings`)
    warnings: list[str]


def mix_documents(
    lengths_by_family: dict[str, np.ndarray],
    ratios: dict[str, float] | str,
    temperature: float | None,
    total_tokens: int,
    seed: int,
    max_epochs: float | None,
    key: str = "ratios",
    where: str = "the sources",
) -> Mixture:
    """The mixture of the build's plan and of the loader (`data_pipeline.mixed`), one function so both
    draw alike: `ratios` (or `from FILE`, or `temperature`) over the families with documents,
    `total_tokens` of them (0: every token once), drawn by `draw_documents`."""
    available = {f: int(n.sum()) + len(n) for f, n in lengths_by_family.items() if len(n)}
    asked = read_ratios(ratios, key)  # a `from FILE` is read once
    shares = normalize_ratios(asked, available, temperature, key, where)
    total = total_tokens or sum(available[f] for f in shares)
    lengths = {f: lengths_by_family[f] for f in shares}
    rows, draws = draw_documents(lengths, shares, total, seed, max_epochs)
    warnings = ratio_warnings(asked, shares, available) + capped_warnings(max_epochs, draws, total)
    return Mixture(rows, sorted(shares), draws, total, warnings)


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


def ratio_warnings(given: dict[str, float], used: dict[str, float], available: dict[str, int]) -> list[str]:
    """Ratios are weights: when they do not sum to 1 they are normalised over the families listed, and
    families of the data left out of them get nothing. Both said, so a partial list is not a surprise."""
    if not given:
        return []
    warnings = []
    total = sum(given.values())
    if abs(total - 1.0) > 1e-6:
        shares = ", ".join(f"{family} {share:.2%}" for family, share in sorted(used.items()))
        warnings.append(f"ratios sum to {total:g}, not 1: normalised over the families listed to {shares}")
    left_out = sorted(f for f, n in available.items() if n and f not in given)
    if left_out:
        warnings.append(f"families in the data but not in ratios get no tokens: {', '.join(left_out)}")
    return warnings


def capped_warnings(max_epochs: float | None, draws, asked: int) -> list[str]:
    """Families capped at `max_epochs` short of their ratio: what they could not supply is not given
    to the others (the total falls short by it, said with the total)."""
    warnings, capped = [], []
    drawn = sum(d.drawn_tokens for d in draws)
    for d in draws:
        if max_epochs is not None and d.epochs >= max_epochs - 1e-9 and d.drawn_tokens / drawn < d.ratio:
            capped.append(d.family)
            warnings.append(
                f"family {d.family!r}: capped at max_epochs={max_epochs:g} ({d.available_tokens:,} tokens); "
                f"share {d.drawn_tokens / drawn:.2%} instead of the {d.ratio:.2%} asked"
            )
    if capped and drawn < asked:
        warnings.append(
            f"{drawn:,} training tokens instead of the {asked:,} asked: the capped families ({', '.join(capped)}) "
            f"could not supply {asked - drawn:,}, which go to no other family (each keeps its own budget, so its "
            "share of the smaller total is above its ratio); raise max_epochs or lower total_tokens"
        )
    return warnings
