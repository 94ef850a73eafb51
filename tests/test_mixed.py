"""Mixing and packing at load time from the token store: the build's sequences when nothing
changes, a new mixture or sequence length with no rebuild, the same batches for the same config,
and clear refusals."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from common.config import ConfigError
from data_pipeline.build import BuildConfig, TokenizerConfig, build
from data_pipeline.loader import PackedDataset
from data_pipeline.mixed import MixConfig, MixedDataset
from data_pipeline.shards import read_manifest
from data_pipeline.sources import SourceConfig
from tests.conftest import SMALL_VOCAB
from tests.test_parallel import small_config
from training.config import CheckpointConfig, DataConfig
from training.objectives import trainer_for


@pytest.fixture(scope="module")
def best_fit_dataset(corpus_dir, tmp_path_factory):
    """The small dataset built with best-fit packing (whole documents, padded rows)."""
    out = tmp_path_factory.mktemp("data") / "best_fit"
    build(BuildConfig(output_dir=str(out), sources=[SourceConfig(paths=[str(corpus_dir / "*.jsonl")])], seq_len=64,
                      total_tokens=30_000, valid_docs_per_family=5, sequences_per_shard=100, packing="best_fit",
                      shards=True, tokenizer=TokenizerConfig(vocab_size=SMALL_VOCAB)))  # fmt: skip
    return out


@pytest.mark.parametrize("split", ["train", "valid"])
@pytest.mark.parametrize("built", ["small_dataset", "best_fit_dataset"])
def test_an_unchanged_mix_gives_the_builds_sequences(request, built, split):
    """Concat and best-fit alike: the rows the build packed, from the store, with no setting changed."""
    data = request.getfixturevalue(built)
    packed, mixed = PackedDataset(data, split), MixedDataset(data, MixConfig(), split)
    assert len(mixed) == len(packed)
    rows = np.arange(len(packed))
    want, got = packed.get(rows), mixed.get(rows)
    for name in ("tokens", "labels", "doc_ids", "family_ids"):
        assert bool((getattr(got, name) == getattr(want, name)).all()), name


def test_best_fit_at_load_time_is_the_builds_packer_on_the_same_draw(small_dataset):
    """Best fit at another sequence length, from a store built for concat: the rows the build's own
    packer (`split_long_documents`, `best_fit_bins`, `pack_bins`, in windows) makes of the drawn
    documents, read token by token from the store."""
    from data_pipeline.packing import PackedSequences, best_fit_bins, pack_bins, split_long_documents

    mix = MixConfig(ratios={"germanic": 1, "code": 1}, total_tokens=15_000, seq_len=48)
    drawn = MixedDataset(small_dataset, mix).streams[0]  # concat: the draw's documents and sizes, in order
    best = MixedDataset(small_dataset, dataclasses.replace(mix, packing="best_fit"))
    store, window = drawn.store, 500 * 48 // 64  # the build's sequences_per_shard
    docs = [(int(store.family[d]), store.tokens[store.part[d]][store.start[d] : store.start[d] + n - 1])
            for d, n in zip(drawn.docs.tolist(), drawn.sizes.tolist(), strict=True)]  # fmt: skip
    want = []
    for start in range(0, len(docs), window):
        pieces = split_long_documents(docs[start : start + window], 48)
        bins = best_fit_bins([len(p[1]) + p[2] for p in pieces], 48)
        want.append(pack_bins(pieces, 48, best.eos, best.pad, bins))
    want = PackedSequences.concatenate(want)
    got = best.sequences(np.arange(len(best)))
    assert len(best) == len(want) and (got.doc_ids[:, -1] == -1).any()
    for name in ("tokens", "doc_ids", "family_ids"):
        assert bool((getattr(got, name) == getattr(want, name)).all()), name


def test_a_new_mixture_and_sequence_length_need_no_rebuild(small_dataset):
    ratios = {"germanic": 0.5, "code": 0.3, "synthetic": 0.2}
    mix = MixConfig(ratios=ratios, total_tokens=20_000, seq_len=48, max_epochs=None)
    mixed = MixedDataset(small_dataset, mix)
    assert mixed.manifest["seq_len"] == 48
    batch = mixed.get(np.arange(len(mixed)))
    assert batch.tokens.shape == (len(mixed), 48)
    families = read_manifest(small_dataset)["families"]
    counts = {f: int((batch.family_ids == families.index(f)).sum()) for f in families}
    assert sum(counts.values()) == 20_000  # the stream holds exactly the tokens asked (EOS included)
    for family, share in ratios.items():  # each family's budget met exactly: the crossing document is cut
        assert counts[family] == round(share * 20_000), family
        assert mixed.manifest["family_stats"][family]["share"] == pytest.approx(share, abs=1e-4)
    again = MixedDataset(small_dataset, mix).get(np.array([3, 1, 4]))
    assert bool((again.tokens == batch.tokens[[3, 1, 4]]).all())  # the same config, the same sequences
    other = MixedDataset(small_dataset, dataclasses.replace(mix, seed=1)).get(np.array([3, 1, 4]))
    assert not bool((other.tokens == again.tokens).all())
    assert MixedDataset(small_dataset, dataclasses.replace(mix, seed=1)).fingerprint != mixed.fingerprint


def test_ratios_from_the_optimal_mix_file(small_dataset, tmp_path):
    path = tmp_path / "mix.yaml"
    path.write_text("germanic: 2\ncode: 2\n")
    mixed = MixedDataset(small_dataset, MixConfig(ratios=f"from {path}", total_tokens=10_000))
    assert {f for f, s in mixed.manifest["family_stats"].items() if s["share"] > 0} == {"germanic", "code"}
    assert any("ratios sum to 4" in w for w in mixed.warnings)


@pytest.mark.parametrize(
    "mix, message",
    [
        (
            MixConfig(ratios={"germanik": 1.0}, total_tokens=1000),
            "data.mix.ratios.germanik: .* did you mean 'germanic'",
        ),
        (MixConfig(ratios={"germanic": 1.0}, total_tokens=0), "data.mix.total_tokens: 0"),
        (MixConfig(packing="bestfit"), "data.mix.packing: 'bestfit' is not one of .*did you mean 'best_fit'"),
    ],
)
def test_bad_mixes_are_refused(small_dataset, mix, message):
    with pytest.raises(ConfigError, match=message):
        MixedDataset(small_dataset, mix)


def test_bad_values_and_stores_are_refused(small_dataset, tmp_path):
    with pytest.raises(ConfigError, match="seq_len must be >= 2"):
        MixConfig(seq_len=1)
    with pytest.raises(ValueError, match="tokenized with tokenizer .*, not 0123"):
        MixedDataset(small_dataset, MixConfig(), tokenizer_hash="0123")
    import shutil

    old = tmp_path / "old"
    shutil.copytree(small_dataset, old)
    manifest = read_manifest(old)
    del manifest["store"]
    (old / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="no token store"):
        MixedDataset(old, MixConfig())


def test_a_mixed_sequence_longer_than_the_model_is_refused(small_dataset, tmp_path):
    mix = MixConfig(seq_len=64)  # the small model's max_seq_len is 32
    config = small_config(small_dataset, tmp_path)
    config = dataclasses.replace(config, data=dataclasses.replace(config.data, mix=mix))
    with pytest.raises(ValueError, match=r"\(data.mix.seq_len\): seq_len 64 .* exceed model.max_seq_len 32"):
        trainer_for(config)


def test_training_from_the_store_records_the_mixture(small_dataset, tmp_path):
    mix = MixConfig(ratios={"germanic": 0.6, "synthetic": 0.4}, total_tokens=8_000)
    base = small_config(small_dataset, tmp_path)
    config = dataclasses.replace(
        base,
        steps=2,
        data=DataConfig(path=str(small_dataset), global_batch_size=8, mix=mix, cache_dir=str(tmp_path / "cache")),
    )
    trainer = trainer_for(config)
    history = trainer.fit()
    assert len(history) >= 2 and np.isfinite(history[-1]["loss"])
    record = json.loads((config.run_dir / "config.json").read_text())
    assert record["data"]["mix"]["seq_len"] == read_manifest(small_dataset)["seq_len"]  # resolved from the build
    assert record["data_mixture"]["germanic"]["share"] == pytest.approx(0.6, abs=1e-3)
    other_mix = dataclasses.replace(config.data, mix=dataclasses.replace(mix, seed=3))
    other = dataclasses.replace(config, data=other_mix, checkpoint=CheckpointConfig(resume="auto"))
    with pytest.raises(ValueError, match="holds other sequences"):
        trainer_for(other).maybe_resume()


def test_data_parallel_ranks_share_out_the_same_global_batches(small_dataset):
    """What a resume into another data-parallel size relies on: the global batch of a step is the
    same rows whatever the DP size, each rank taking its slice (the order is over global rows)."""
    from data_pipeline.loader import DataLoader

    mixed = MixedDataset(small_dataset, MixConfig(ratios={"germanic": 1, "code": 1}, total_tokens=30_000))
    whole = DataLoader(mixed, 8, dp_rank=0, dp_size=1, seed=4)
    for step in (0, 5, 11):
        want = whole.batch_at(step).tokens
        for dp in (2, 4):
            parts = [DataLoader(mixed, 8, dp_rank=r, dp_size=dp, seed=4).batch_at(step).tokens for r in range(dp)]
            got = torch.cat(parts)
            assert sorted(map(tuple, got.tolist())) == sorted(map(tuple, want.tolist())), (step, dp)


@pytest.mark.parametrize("split", ["train", "valid"])
def test_the_cached_index_is_mapped_and_gives_the_same_rows(small_dataset, tmp_path, split):
    """The index made once per store and mix and memory-mapped after: the same sequences, no
    O(documents) array in the process, and a part replaced since then is refused by name."""
    mix = MixConfig(ratios={"germanic": 1, "code": 2}, total_tokens=12_000, seq_len=40)
    plain = MixedDataset(small_dataset, mix, split)
    made = MixedDataset(small_dataset, mix, split, cache_dir=tmp_path)
    mapped = MixedDataset(small_dataset, mix, split, cache_dir=tmp_path)
    rows = np.arange(len(plain))
    for dataset in (made, mapped):
        assert len(dataset) == len(plain) and dataset.fingerprint == plain.fingerprint
        assert bool((dataset.get(rows).tokens == plain.get(rows).tokens).all())
        assert dataset.manifest["family_stats"] == plain.manifest["family_stats"]
        assert dataset.warnings == plain.warnings
    assert all(isinstance(s.docs, np.memmap) and isinstance(s.ends, np.memmap) for s in mapped.streams)
    assert len(list((tmp_path / "index").glob(f"{split}-*"))) == 2  # the index and its lock
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(small_dataset, copy)
    MixedDataset(copy, mix, split, cache_dir=tmp_path)  # the same store elsewhere: the same index
    part = sorted((copy / "store" / split).glob("*.arrow"))[0]
    part.write_bytes(part.read_bytes() + b"extra")
    with pytest.raises(ValueError, match=rf"{part}.* the manifest says .*changed since .*index"):
        MixedDataset(copy, mix, split, cache_dir=tmp_path)
