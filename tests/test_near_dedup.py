"""Near-dedup on real text written without spaces (Chinese, Japanese, Thai): a pair at the
configured threshold is caught with probability >= 0.9 (the LSH bands are chosen for it), and no
pair below the threshold is removed (candidates are checked exactly)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from data_pipeline.build import BuildConfig, NearDedupConfig, TokenizerConfig, build
from data_pipeline.dedup import jaccard, shingles
from data_pipeline.sources import SourceConfig

FIXTURES = Path(__file__).parent / "fixtures"
UNSPACED = [("real_text", "zh"), ("real_text", "ja"), ("real_text_gtk", "th"), ("real_text_gtk", "zh")]


def unspaced_documents() -> list[tuple[str, str]]:
    """(language, text) of every Chinese, Japanese and Thai document of the two real-text fixtures."""
    return [
        (lang, json.loads(line)["text"])
        for folder, lang in UNSPACED
        for line in (FIXTURES / folder / f"{lang}.jsonl").open(encoding="utf-8")
    ]


def edited_to_similarity(text: str, low: float, high: float, ngram: int, rng) -> tuple[str, float]:
    """`text` with characters replaced at random positions (by other characters of the text) until
    the Jaccard similarity of its shingles to the original falls in [low, high)."""
    original, chars = shingles(text, ngram), list(text)
    while True:
        position = int(rng.integers(len(chars)))
        chars[position] = text[int(rng.integers(len(text)))]
        similarity = jaccard(original, shingles("".join(chars), ngram))
        if similarity < low:  # overshot: start again
            chars = list(text)
        elif similarity < high:
            return "".join(chars), similarity


def removed_copies(tmp_path, low: float, high: float, seed: int) -> tuple[int, int, list[float]]:
    """Build the originals followed by one edited copy each; how many copies and originals were removed."""
    near = NearDedupConfig()  # the defaults: threshold 0.8, 64 permutations, 5-character shingles
    rng = np.random.default_rng(seed)
    originals = unspaced_documents()
    copies = [(lang, *edited_to_similarity(text, low, high, near.ngram, rng)) for lang, text in originals]
    path = tmp_path / "docs.jsonl"
    rows = [{"text": t, "lang": lang} for lang, t in originals] + [{"text": t, "lang": lang} for lang, t, _ in copies]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    manifest = build(
        BuildConfig(
            output_dir=str(tmp_path / "out"), sources=[SourceConfig(paths=[str(path)])], seq_len=128, total_tokens=0,
            valid_docs_per_family=1, near_dedup=near, tokenizer=TokenizerConfig(vocab_size=1000),
        )
    )  # fmt: skip
    languages = manifest["languages"]
    kept = sum(s["documents"] for s in languages.values())
    removed = len(rows) - kept - manifest["duplicates_removed"]
    assert removed == manifest["near_duplicates_removed"]
    return removed, len(originals), [s for *_, s in copies]


def test_pairs_at_the_threshold_are_caught_nine_times_in_ten(tmp_path):
    removed, pairs, similarities = removed_copies(tmp_path, 0.80, 0.85, seed=0)
    assert pairs >= 50 and min(similarities) >= 0.8
    assert removed / pairs >= 0.9, f"recall {removed}/{pairs}"


def test_no_pair_below_the_threshold_is_removed(tmp_path):
    """Pairs at 0.6-0.7 share band buckets often (the bands favour recall); the exact check keeps them."""
    removed, pairs, similarities = removed_copies(tmp_path, 0.60, 0.70, seed=1)
    assert max(similarities) < 0.7
    assert removed == 0, f"{removed} of {pairs} pairs below threshold - 0.1 removed"
