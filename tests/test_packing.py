"""The packer and mixer: nothing lost, nothing crosses a document, ratios met."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from data_pipeline.loader import IGNORE_INDEX, DataLoader, PackedDataset
from data_pipeline.mixing import draw_documents, normalize_ratios
from data_pipeline.packing import (
    concat_shard_plan,
    pack_best_fit,
    pack_concat_shard,
    pack_documents,
)
from data_pipeline.shards import read_manifest
from kernels.reference import document_causal_mask

EOS, PAD = 0, 1


def random_docs(n: int, seed: int = 0) -> list[tuple[int, list[int]]]:
    rng = np.random.default_rng(seed)
    return [(int(rng.integers(0, 3)), rng.integers(2, 500, size=int(rng.integers(1, 90))).tolist()) for _ in range(n)]


@pytest.mark.parametrize("seq_len", [7, 32, 128])
def test_no_token_lost_or_duplicated(seq_len):
    docs = random_docs(200)
    packed = pack_documents(docs, seq_len, EOS, PAD)
    expected = np.concatenate([np.array([*tokens, EOS]) for _, tokens in docs])
    real = packed.doc_ids.ravel() >= 0
    np.testing.assert_array_equal(packed.tokens.ravel()[real], expected)
    assert packed.padding_tokens == packed.tokens.size - len(expected) < seq_len
    assert (packed.tokens.ravel()[~real] == PAD).all()


def test_document_ids_follow_eos_boundaries():
    docs = random_docs(100, seed=1)
    packed = pack_documents(docs, 64, EOS, PAD)
    families = np.concatenate([[f] * (len(t) + 1) for f, t in docs])
    real = packed.doc_ids.ravel() >= 0
    np.testing.assert_array_equal(packed.family_ids.ravel()[real], families)
    for row_tokens, row_ids in zip(packed.tokens, packed.doc_ids, strict=True):
        valid = row_ids >= 0
        assert row_ids[0] == 0 and (np.diff(row_ids[valid]) >= 0).all()
        # A new document starts right after each EOS, and only there.
        starts = np.flatnonzero(np.diff(row_ids[valid]) == 1) + 1
        np.testing.assert_array_equal(starts, np.flatnonzero(row_tokens[valid][:-1] == EOS) + 1)


def test_attention_mask_never_crosses_documents():
    doc_ids = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, -1, -1]])
    mask = document_causal_mask(doc_ids, 10)[0, 0]
    for q in range(10):
        for k in range(10):
            assert bool(mask[q, k]) == (k <= q and doc_ids[0, q] == doc_ids[0, k]), (q, k)


def test_family_ratios_met():
    rng = np.random.default_rng(0)
    docs = {
        f: [rng.integers(2, 100, size=int(rng.integers(20, 300))).tolist() for _ in range(n)]
        for f, n in [("germanic", 400), ("slavic", 50), ("code", 200)]
    }
    available = {f: sum(len(d) for d in ds) for f, ds in docs.items()}
    ratios = normalize_ratios({"germanic": 5, "slavic": 3, "code": 2}, available)
    total = 400_000
    lengths = {f: np.array([len(d) for d in ds]) for f, ds in docs.items()}
    mixture, report = draw_documents(lengths, ratios, total, seed=0)
    drawn = {r.family: r.drawn_tokens for r in report}
    for family, ratio in ratios.items():
        # Whole documents are drawn, so a family overshoots its budget by at most one document (<300 tokens).
        assert drawn[family] / sum(drawn.values()) == pytest.approx(ratio, abs=0.002)
    slavic = next(r for r in report if r.family == "slavic")
    assert slavic.epochs > 1, "a scarce family is upsampled to meet its ratio"
    assert len(mixture) == sum(r.drawn_docs for r in report)


def test_built_dataset_ratios_and_loader(small_dataset):
    manifest = read_manifest(small_dataset)
    stats = manifest["family_stats"]
    total = sum(s["tokens"] for s in stats.values())
    for family, s in stats.items():
        assert s["tokens"] / total == pytest.approx(s["ratio"], abs=0.02), family
    dataset = PackedDataset(small_dataset, "train")
    assert sum(e["tokens"] for e in manifest["splits"]["train"]) == total
    batch = DataLoader(dataset, global_batch_size=4).batch_at(0)
    # Labels are the next token, ignored where the next position is padding.
    real = batch.doc_ids >= 0
    shifted = torch.where(real[:, 1:] & real[:, :-1], batch.tokens[:, 1:], IGNORE_INDEX)
    assert torch.equal(batch.labels[:, :-1], shifted) and (batch.labels[:, -1] == IGNORE_INDEX).all()


def test_loader_shards_only_over_data_parallel_ranks(small_dataset):
    dataset = PackedDataset(small_dataset, "train")
    full = DataLoader(dataset, global_batch_size=8).batch_at(3)
    halves = [DataLoader(dataset, global_batch_size=8, dp_rank=r, dp_size=2).batch_at(3) for r in range(2)]
    assert torch.equal(torch.cat([h.tokens for h in halves]).sort(0).values, full.tokens.sort(0).values)
    assert not torch.equal(halves[0].tokens, halves[1].tokens)


@pytest.mark.parametrize("rows", [1, 3, 50])
@pytest.mark.parametrize("exact", [False, True], ids=["short-last-shard", "exact-multiple"])
def test_shards_packed_each_on_its_own_equal_the_stream(rows, exact):
    """What lets workers pack concat shards in parallel: each shard from its plan entry alone equals
    the same rows of the whole stream, documents cut across shard edges included."""
    docs = [(family, np.array(tokens, np.int32)) for family, tokens in random_docs(150, seed=3)]
    if exact:  # the stream fills its last shard exactly: no padded shard at the end
        extra = -sum(len(t) + 1 for _, t in docs) % (rows * 32)
        docs.append((0, np.arange(2, 2 + extra - 1, dtype=np.int32))) if extra else None
    whole = pack_documents([(f, t.tolist()) for f, t in docs], 32, EOS, PAD)
    plan = concat_shard_plan(np.array([len(t) + 1 for _, t in docs]), 32, rows)
    shards = [pack_concat_shard(docs[first:last], offset, 32, EOS, PAD, rows) for first, offset, last in plan]
    assert all(len(shard) == rows for shard in shards[:-1]) and len(plan) == -(-len(whole) // rows)
    for name in ("tokens", "doc_ids", "family_ids"):
        np.testing.assert_array_equal(np.concatenate([getattr(b, name) for b in shards]), getattr(whole, name))


def test_best_fit_keeps_documents_whole_and_beats_first_come_padding():
    docs = random_docs(300, seed=3)
    packed = pack_best_fit(docs, 128, EOS, PAD)
    # Every document appears exactly once, unsplit, inside one row.
    rows = []
    for tokens, ids in zip(packed.tokens, packed.doc_ids, strict=True):
        for d in range(ids.max() + 1):
            rows.append(tuple(tokens[ids == d]))
    assert sorted(rows) == sorted(tuple([*t, EOS]) for _, t in docs)
    # Fewer rows than one document per row, and within 10% of the token lower bound.
    total = sum(len(t) + 1 for _, t in docs)
    assert len(packed) < len(docs) and len(packed) <= 1.1 * -(-total // 128)
    long = [(0, list(range(2, 300)))]
    assert pack_best_fit(long, 128, EOS, PAD).truncated_docs == 1


def test_one_long_document_cannot_push_its_family_past_its_share():
    """The document that crosses a family's budget is cut there: shares hold within a point."""
    rng = np.random.default_rng(1)
    lengths = {"germanic": rng.integers(50, 400, size=2000), "semitic": np.array([385_000, 300, 200, 500])}
    lengths["romance"] = rng.integers(50, 400, size=3000)
    ratios = {"germanic": 0.45, "semitic": 0.15, "romance": 0.40}
    mixture, report = draw_documents(lengths, ratios, 1_000_000, seed=0, max_epochs=None)
    total = sum(r.drawn_tokens for r in report)
    for r in report:
        assert r.drawn_tokens / total == pytest.approx(ratios[r.family], abs=0.01), r.family
        assert r.drawn_tokens == round(ratios[r.family] * 1_000_000)
    cut = mixture[mixture[:, 2] >= 0]
    assert len(cut) <= len(ratios), "at most one cut document per family"


def test_max_epochs_caps_a_scarce_family_and_zero_total_takes_every_token_once():
    lengths = {"germanic": np.full(500, 100), "kra_dai": np.array([100, 120])}
    _, capped = draw_documents(lengths, {"germanic": 0.5, "kra_dai": 0.5}, 100_000, seed=0, max_epochs=4)
    kra_dai = next(r for r in capped if r.family == "kra_dai")
    assert kra_dai.epochs <= 4 and kra_dai.drawn_tokens == 4 * (101 + 121)
    available = {f: int(n.sum() + len(n)) for f, n in lengths.items()}
    natural = normalize_ratios({}, available)
    _, once = draw_documents(lengths, natural, sum(available.values()), seed=0, max_epochs=4)
    assert all(r.drawn_tokens == r.available_tokens for r in once), "every token exactly once"


def test_best_fit_splits_long_documents_instead_of_dropping_them(tmp_path):
    from data_pipeline.build import BuildConfig, TokenizerConfig, build
    from data_pipeline.loader import PackedDataset
    from data_pipeline.sources import SourceConfig

    rng = np.random.default_rng(0)
    words = [f"w{i}" for i in range(200)]
    texts = [" ".join(rng.choice(words, size=int(n))) for n in rng.integers(10, 400, size=60)]
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": t, "lang": "en"}) + "\n" for t in texts))
    config = BuildConfig(
        output_dir=str(tmp_path / "out"), sources=[SourceConfig(paths=[str(path)])], seq_len=64, total_tokens=0,
        packing="best_fit", valid_docs_per_family=2, shards=True, tokenizer=TokenizerConfig(vocab_size=300),
    )  # fmt: skip
    manifest = build(config)
    assert manifest["packing"]["truncated_docs"] == 0 and manifest["packing"]["split_docs"] > 10
    data = PackedDataset(tmp_path / "out", "train")
    batch = data.get(np.arange(len(data)))
    kept = int((batch.doc_ids >= 0).sum())
    assert kept == manifest["family_stats"]["germanic"]["tokens"], "every drawn token is in a sequence"
    assert manifest["family_stats"]["germanic"]["epochs"] == 1.0


def test_every_token_once_refuses_ratios():
    from common.config import ConfigError
    from data_pipeline.build import BuildConfig
    from data_pipeline.sources import SourceConfig

    with pytest.raises(ConfigError, match="total_tokens: 0 takes every token once"):
        BuildConfig(output_dir="x", sources=[SourceConfig(paths=["a"])], total_tokens=0, ratios={"germanic": 1.0})
