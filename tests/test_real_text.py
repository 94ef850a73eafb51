"""The data pipeline on real multilingual text: human translations of PostgreSQL's messages in 15
languages of 9 families (tests/fixtures/real_text, see its NOTICE), not generated word lists."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from data_pipeline.build import BuildConfig, NearDedupConfig, TokenizerConfig, build
from data_pipeline.languages import family_of, language_table
from data_pipeline.mixed import MixConfig, MixedDataset
from data_pipeline.sources import LanguageIdentifier, SourceConfig

REAL = Path(__file__).parent / "fixtures" / "real_text"
RECORDS = [json.loads(line) for f in sorted(REAL.glob("*.jsonl")) for line in f.open(encoding="utf-8")]


def real_build(tmp_path, sources, **kw) -> BuildConfig:
    defaults = dict(seq_len=128, total_tokens=0, valid_docs_per_family=1, tokenizer=TokenizerConfig(vocab_size=2000))
    return BuildConfig(output_dir=str(tmp_path / "out"), sources=sources, **{**defaults, **kw})


def test_the_fixture_is_real_multilingual_text():
    langs = {r["lang"] for r in RECORDS}
    assert len(langs) == 15 and len({family_of(lang, language_table()) for lang in langs}) == 9
    assert sum(len(r["text"]) for r in RECORDS) > 150_000


def test_language_identification_on_real_text():
    """Whole documents, each identified with its probability; a foreign preamble does not decide."""
    identify = LanguageIdentifier(language_table())
    results = [identify(r["text"]) for r in RECORDS]
    accuracy = np.mean([lang == r["lang"] for (lang, _), r in zip(results, RECORDS, strict=True)])
    assert accuracy >= 0.95, accuracy
    assert all(0.0 < p <= 1.0 for _, p in results)
    german = " ".join(r["text"] for r in RECORDS if r["lang"] == "de")[:6000]
    preamble = "This document was translated from English. The original text follows below. " * 3
    assert identify(preamble + german)[0] == "de"


def test_every_token_once_and_the_language_table(tmp_path):
    manifest = build(real_build(tmp_path, [SourceConfig(paths=[str(REAL / "*.jsonl")])]))
    assert all(s["epochs"] == 1.0 for s in manifest["family_stats"].values())
    assert set(manifest["languages"]) == {r["lang"] for r in RECORDS}
    for lang, stats in manifest["languages"].items():
        assert stats["documents"] == sum(r["lang"] == lang for r in RECORDS) and stats["confidence"] == 1.0
    train = MixedDataset(tmp_path / "out", MixConfig())
    kept = int((train.get(np.arange(len(train))).doc_ids >= 0).sum())
    assert kept == sum(s["tokens"] for s in manifest["family_stats"].values())


def test_shares_hold_on_real_text_with_a_long_document(tmp_path):
    """One Japanese document of every Japanese message in a row must not push its family past its share."""
    long_ja = {"text": "\n".join(r["text"] for r in RECORDS if r["lang"] == "ja"), "lang": "ja"}
    path = tmp_path / "long.jsonl"
    path.write_text(json.dumps(long_ja, ensure_ascii=False) + "\n", encoding="utf-8")
    ratios = {"slavic": 0.3, "romance": 0.3, "japonic": 0.1, "sino_tibetan": 0.1, "germanic": 0.2}
    sources = [SourceConfig(paths=[str(REAL / f"{lang}.jsonl") for lang in ("cs", "ru", "fr", "es", "zh", "de")])]
    sources.append(SourceConfig(paths=[str(path), str(REAL / "ja.jsonl")]))
    manifest = build(real_build(tmp_path, sources, total_tokens=60_000, ratios=ratios, max_epochs=None))
    for family, stats in manifest["family_stats"].items():
        assert stats["share"] == pytest.approx(ratios[family], abs=0.01), family


@pytest.mark.parametrize("lang", ["ja", "zh"])
def test_near_duplicates_of_real_text_are_found(tmp_path, lang):
    rng = np.random.default_rng(0)
    docs = [r["text"] for r in RECORDS if r["lang"] == lang]
    copies = []
    for text in docs[:10]:  # a character changed and a line appended
        chars = list(text)
        position = int(rng.integers(len(chars)))
        chars[position] = "x" if chars[position] != "x" else "y"
        copies.append("".join(chars) + "\n(copy)")
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": t, "lang": lang}) + "\n" for t in docs + copies))
    config = real_build(tmp_path, [SourceConfig(paths=[str(path)])], near_dedup=NearDedupConfig(threshold=0.8))
    removed = build(dataclasses.replace(config, tokenizer=TokenizerConfig(vocab_size=500)))["near_duplicates_removed"]
    assert 9 <= removed <= 10, "recall >= 0.9 and no distinct document taken for a copy"


def test_every_token_carries_its_language_in_the_shards(tmp_path):
    """Languages identified from the text (no language field), recorded per token beside the family."""
    from data_pipeline.shards import open_shard

    unlabeled = tmp_path / "unlabeled.jsonl"
    unlabeled.write_text("".join(json.dumps({"text": r["text"]}) + "\n" for r in RECORDS), encoding="utf-8")
    manifest = build(real_build(tmp_path, [SourceConfig(paths=[str(unlabeled)], lang="auto")], shards=True))
    names = list(manifest["languages"])
    assert len(names) >= 14 and all(0.5 < s["confidence"] <= 1.0 for s in manifest["languages"].values())
    table = language_table()
    for entry in manifest["splits"]["train"] + manifest["splits"]["valid"]:
        shard = open_shard(tmp_path / "out", entry)
        real = shard["doc_ids"] >= 0
        langs, families = shard["lang_ids"][real], shard["family_ids"][real]
        expected = [manifest["families"].index(family_of(names[i], table)) for i in langs]
        assert families.tolist() == expected, "each token's family is its language's"
    for lang in {r["lang"] for r in RECORDS}:  # identification is right for (nearly) every document
        truth = sum(r["lang"] == lang for r in RECORDS)
        assert abs(manifest["languages"][lang]["documents"] - truth) <= 2, lang
