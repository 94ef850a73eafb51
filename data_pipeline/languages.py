"""Language -> family mapping; the unit the mixer samples and the trainer reports loss by."""

from __future__ import annotations

import difflib
from functools import cache
from pathlib import Path

import yaml

FAMILIES_FILE = Path(__file__).with_name("families.yaml")


@cache
def _read_table(path: str) -> dict[str, str]:
    raw = yaml.safe_load(Path(path).read_text()) or {}
    table: dict[str, str] = {}
    for family, langs in raw.items():
        if not isinstance(langs, list):
            raise ValueError(f"{path}: family {family!r} must list language codes, got {langs!r}")
        for lang in langs:
            table[str(lang).lower()] = family
    return table


def language_table(extra_file: str | Path | None = None) -> dict[str, str]:
    """The built-in table, with entries from `extra_file` (same YAML shape) taking precedence."""
    table = dict(_read_table(str(FAMILIES_FILE)))
    if extra_file:
        table.update(_read_table(str(Path(extra_file).resolve())))
    return table


def family_of(lang: str, table: dict[str, str]) -> str:
    """Family for an ISO code; region suffixes (`pt-BR`, `zh_Hans`) are ignored."""
    code = lang.lower().replace("_", "-").split("-")[0]
    try:
        return table[code]
    except KeyError:
        raise KeyError(
            f"language {lang!r} has no family; add it to a families file (families_file: in the data config)"
        ) from None


def language_hint(lang: str, table: dict[str, str]) -> str:
    """ "; did you mean 'de'?" for a code near a known one (region suffixes ignored), else ""."""
    code = lang.lower().replace("_", "-").split("-")[0]
    near = difflib.get_close_matches(code, list(table), n=1)
    return f"; did you mean {near[0]!r}?" if near else ""
