"""The tokenizer's training sample, fair to every language.

A byte-level BPE learns merges in proportion to how often pairs occur in its sample, so a language
the sample starves is cut into many short tokens (in one build that took the first documents of
each family's first file, Russian came out at 0.96 characters per token against German's 3.4). So:
- every source file is read whole and each of its languages keeps a random sample of its documents
  (seeded, from anywhere in the file: the documents with the smallest random keys), merged across
  files into one sample per language: files contribute in proportion to their documents;
- every language gets the same budget of characters, `min(sample_chars_per_language, the largest
  language's sample)`, times its UTF-8 bytes per character: a script of 3 bytes per character
  needs two merges per character before a merge can join characters;
- a language with fewer characters than its budget has its sample repeated to fill it (repetition
  is a frequency weight to BPE), reported in the manifest with a warning past `MANY_REPEATS`.
"""

from __future__ import annotations

import functools
import heapq
from dataclasses import dataclass

import numpy as np

from data_pipeline.languages import language_table
from data_pipeline.sources import LanguageIdentifier, read_file

MAX_BYTES_PER_CHAR = 4  # UTF-8: a language's budget is at most 4x the characters asked
MANY_REPEATS = 8.0  # a language repeated more often than this in the sample is warned about

Keyed = tuple[float, str]  # (random key, text)


def _keep_smallest(heap: list, chars: int, key: float, text: str, cap: int) -> int:
    """Add `text` to `heap` (a max-heap by key, as negated keys) and drop the largest keys while
    the rest still holds `cap` characters; returns the characters held."""
    heapq.heappush(heap, (-key, text))
    chars += len(text)
    while chars - len(heap[0][1]) >= cap:
        chars -= len(heapq.heappop(heap)[1])
    return chars


class LanguageSamples:
    """Per language, the documents with the smallest random keys holding at least `cap` characters."""

    def __init__(self, cap: int):
        self.cap = cap
        self.heaps: dict[str, list] = {}
        self.chars: dict[str, int] = {}

    def add(self, lang: str, key: float, text: str) -> None:
        heap = self.heaps.setdefault(lang, [])
        self.chars[lang] = _keep_smallest(heap, self.chars.get(lang, 0), key, text[: self.cap], self.cap)

    def merge(self, other: dict[str, list[Keyed]]) -> None:
        for lang, docs in other.items():
            for key, text in docs:
                self.add(lang, key, text)

    def sorted(self) -> dict[str, list[Keyed]]:
        """Each language's documents by key, languages by name: the same whatever order files came in."""
        return {lang: sorted((-k, t) for k, t in self.heaps[lang]) for lang in sorted(self.heaps)}


def sample_file(path: str, source, index: int, families_file: str | None, chars_per_language: int, seed: int):
    """One source file's sample (an engine unit): per language, a random sample of its documents of at
    least MAX_BYTES_PER_CHAR x `chars_per_language` characters where it has them."""
    table = language_table(families_file)
    identify = _identifier(families_file) if source.lang == "auto" else None
    keys = np.random.default_rng([seed, index])
    samples = LanguageSamples(MAX_BYTES_PER_CHAR * chars_per_language)
    for doc in read_file(path, source, table, identify):
        samples.add(doc.lang.lower().replace("_", "-"), float(keys.random()), doc.text)
    return samples.sorted()


@functools.cache
def _identifier(families_file: str | None) -> LanguageIdentifier:
    """One language identifier per worker process (its model takes a while to load)."""
    return LanguageIdentifier(language_table(families_file))


@dataclass
class TokenizerSample:
    texts: list[str]
    report: dict[str, dict]  # per language: characters sampled, characters trained on, repeats

    def warnings(self) -> list[str]:
        return [
            f"language {lang!r}: {r['characters']:,} characters in the tokenizer's sample, repeated {r['repeats']:g}x "
            f"to meet its budget of {r['trained_characters']:,}: its tokens may fit those few documents closely; "
            "give it more text or lower tokenizer.sample_chars_per_language"
            for lang, r in self.report.items()
            if r["repeats"] > MANY_REPEATS
        ]


def balanced_sample(per_language: dict[str, list[Keyed]], chars_per_language: int) -> TokenizerSample:
    """Every language's share of the BPE's training text: the same characters times its bytes per
    character, by random key, repeated where a language has fewer."""
    available = {lang: sum(len(t) for _, t in docs) for lang, docs in per_language.items()}
    budget = min(chars_per_language, max(available.values()))
    texts, report = [], {}
    for lang, docs in per_language.items():
        encoded = sum(len(t.encode("utf-8", "surrogatepass")) for _, t in docs)
        target = round(budget * encoded / available[lang])
        chars, taken = 0, 0
        while chars < target:  # cycles through the language's documents when it has fewer than `target`
            text = docs[taken % len(docs)][1]
            texts.append(text)
            chars += len(text)
            taken += 1
        report[lang] = {
            "characters": min(available[lang], chars),
            "trained_characters": chars,
            "repeats": round(chars / available[lang], 2),
        }
    return TokenizerSample(texts, report)
