"""The token store: every kept document tokenized once, stored compactly with its family, language
and source, checksummed; on real text every document decodes back to its record."""

from __future__ import annotations

import json
import unicodedata
from collections import Counter
from pathlib import Path

import pytest

from data_pipeline.__main__ import summarize
from data_pipeline.build import BuildConfig, TokenizerConfig, build
from data_pipeline.shards import read_manifest
from data_pipeline.sources import SourceConfig
from data_pipeline.store import open_part, token_type
from data_pipeline.tokenizer import load_tokenizer

REAL = Path(__file__).parent / "fixtures" / "real_text"


def stored_documents(data_dir: Path, split: str) -> list[tuple[list[int], int, int, int]]:
    manifest = read_manifest(data_dir)
    out = []
    for entry in manifest["store"]["splits"][split]:
        part = open_part(data_dir, entry)
        offsets = part["offsets"]
        for d in range(len(offsets) - 1):
            tokens = part["tokens"][offsets[d] : offsets[d + 1]].tolist()
            out.append((tokens, int(part["family"][d]), int(part["lang"][d]), int(part["source"][d])))
    return out


def test_every_document_is_stored_once_and_decodes_to_its_record(tmp_path):
    out = tmp_path / "out"
    paths = sorted(REAL.glob("*.jsonl"))
    manifest = build(
        BuildConfig(
            output_dir=str(out), sources=[SourceConfig(paths=[str(p) for p in paths])], seq_len=128,
            total_tokens=30_000, valid_docs_per_family=2, tokenizer=TokenizerConfig(vocab_size=2000),
        )
    )  # fmt: skip
    store = manifest["store"]
    assert store["token_type"] == "uint16" and store["sources"] == [str(p) for p in paths]
    tokenizer = load_tokenizer(out)
    languages, families = list(manifest["languages"]), manifest["families"]
    decoded = Counter()
    for split in ("train", "valid"):
        docs = stored_documents(out, split)
        for tokens, family, lang, source in docs:
            text = tokenizer.decode(tokens)
            record = json.loads(paths[source].read_text(encoding="utf-8").splitlines()[0])
            assert (
                languages[lang] == record["lang"]
                and families[family] == manifest["languages"][record["lang"]]["family"]
            )
            decoded[text] += 1
        per_family = Counter()
        for tokens, family, _, _ in docs:
            per_family[families[family]] += len(tokens) + 1  # with the EOS packing adds
        if split == "train":  # what the mixture drew from, whatever total_tokens asked
            assert per_family == {f: s["available_tokens"] for f, s in manifest["family_stats"].items()}
        else:
            assert per_family == {f: s["valid_tokens"] for f, s in manifest["family_stats"].items()}
    records = Counter(
        unicodedata.normalize("NFC", json.loads(line)["text"]).strip()
        for p in paths
        for line in p.open(encoding="utf-8")
    )
    assert decoded == records  # no duplicates in the fixture: every record once, none lost or changed
    assert "token store:" in summarize(out)


def test_the_token_type_is_the_narrowest_that_holds_the_vocabulary():
    assert str(token_type(2000)) == "uint16" and str(token_type(65_536)) == "uint16"
    assert str(token_type(65_537)) == "uint32" and str(token_type(200_064)) == "uint32"


def test_the_default_corpus_takes_at_most_2_2_bytes_per_token(small_dataset):
    """The bundled corpus (vocab 512): tokens as uint16, the per-document index included; a packed
    shard takes 11 bytes per token (int32 token and document id, int8 family, int16 language)."""
    store = read_manifest(small_dataset)["store"]
    assert store["bytes_per_token"] <= 2.2, store["bytes_per_token"]


def test_a_damaged_part_is_named(tmp_path, small_dataset):
    import shutil

    copy = tmp_path / "data"
    shutil.copytree(small_dataset, copy)
    entry = read_manifest(copy)["store"]["splits"]["train"][0]
    path = copy / entry["file"]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=f"token store part {path} is corrupt"):
        open_part(copy, entry)
