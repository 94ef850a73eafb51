from __future__ import annotations

import pytest

from data_pipeline.build import BuildConfig, TokenizerConfig, build
from data_pipeline.corpus import write_default_corpus
from data_pipeline.sources import SourceConfig

SMALL_SEQ_LEN = 32
SMALL_VOCAB = 512


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus")
    write_default_corpus(path, docs_per_language=60, seed=1)
    return path


@pytest.fixture(scope="session")
def small_dataset(corpus_dir, tmp_path_factory):
    """A small built dataset of the bundled corpus: seq_len 32, vocab 512."""
    out = tmp_path_factory.mktemp("data") / "small"
    build(
        BuildConfig(
            output_dir=str(out),
            sources=[SourceConfig(paths=[str(corpus_dir / "*.jsonl")])],
            seq_len=SMALL_SEQ_LEN,
            total_tokens=60_000,
            valid_docs_per_family=5,
            sequences_per_shard=500,
            tokenizer=TokenizerConfig(vocab_size=SMALL_VOCAB),
        )
    )
    return out
