"""Real multilingual text that every Linux machine carries: the human translations of program messages
in its gettext catalogs (/usr/share/locale/<locale>/LC_MESSAGES/*.mo), grouped into documents, one
JSONL file per language. No network: what the corpus holds depends on the packages installed, so a
build from it records its own manifest hash, and the catalog count and characters per language are
printed.

    python -m data_pipeline gettext-corpus OUT --languages de,fr,ru,ja,zh_CN --max-chars 750000

Deterministic for a given set of catalogs: catalogs and messages are taken in sorted order, and a
message translated the same way by several programs is kept once."""

from __future__ import annotations

import gettext
import json
import re
import struct
from collections.abc import Iterator
from pathlib import Path

from common.files import atomic_write_text

PLACEHOLDER = re.compile(r"%[-+ #0-9.*]*[a-zA-Z]|\\[nt]|\$\d+")
LOCALE_DIR = "/usr/share/locale"


def messages(folder: Path, patterns: list[str], min_chars: int = 40) -> Iterator[str]:
    """Every distinct translated message of at least `min_chars` characters, printf placeholders and
    escapes removed, whitespace collapsed. Unreadable catalogs are skipped (some packages ship
    empty or malformed ones)."""
    seen: set[str] = set()
    for catalog in sorted(c for pattern in patterns for c in folder.glob(pattern)):
        try:
            with catalog.open("rb") as f:
                translations = gettext.GNUTranslations(f)._catalog
        except (OSError, UnicodeDecodeError, struct.error):
            continue
        for key in sorted(translations, key=str):
            text = translations[key]
            if not key or not isinstance(text, str):
                continue
            text = " ".join(PLACEHOLDER.sub("", text).split())
            if len(text) >= min_chars and text not in seen:
                seen.add(text)
                yield text


def documents(lines: Iterator[str], doc_chars: int, max_docs: int | None = None, max_chars: int | None = None):
    """Consecutive messages joined by newlines into documents of about `doc_chars` characters, up to
    `max_docs` documents or `max_chars` characters in all."""
    docs: list[str] = []
    current: list[str] = []
    size = total = 0
    for line in lines:
        current.append(line)
        size += len(line) + 1
        if size >= doc_chars:
            docs.append("\n".join(current))
            total += size
            current, size = [], 0
            if (max_docs and len(docs) >= max_docs) or (max_chars and total >= max_chars):
                break
    return docs


def language_code(locale: str) -> str:
    """The language of a locale folder name: zh_CN -> zh, pt_BR -> pt, sr@latin -> sr."""
    return re.split(r"[_@.]", locale)[0]


def write_gettext_corpus(
    out_dir: str | Path,
    locales: list[str],
    max_chars: int | None = None,
    doc_chars: int = 700,
    patterns: tuple[str, ...] = ("*.mo",),
    locale_dir: str | Path = LOCALE_DIR,
) -> dict[str, dict]:
    """Write <out_dir>/<language>.jsonl per locale ({"text", "lang"} lines), each written whole
    (temporary name, then rename). Returns per language its documents and characters. A locale
    with no catalog is an error that names it and the folder looked in."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, dict] = {}
    for locale in locales:
        folder = Path(locale_dir, locale, "LC_MESSAGES")
        if not any(folder.glob(p) for p in patterns):
            raise FileNotFoundError(f"no gettext catalog ({', '.join(patterns)}) for locale {locale!r} in {folder}")
        lang = language_code(locale)
        if lang in written:
            raise ValueError(f"locales {written[lang]['locale']!r} and {locale!r} are both language {lang!r}")
        docs = documents(messages(folder, list(patterns)), doc_chars, max_chars=max_chars)
        lines = [json.dumps({"text": d, "lang": lang}, ensure_ascii=False) for d in docs]
        atomic_write_text(out / f"{lang}.jsonl", "\n".join(lines) + "\n")
        written[lang] = {"locale": locale, "documents": len(docs), "characters": sum(len(d) for d in docs)}
    return written
