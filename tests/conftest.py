from __future__ import annotations

import os
import shutil

# Without a GPU the Triton kernels run in Triton's interpreter; it must be chosen before triton loads.
if shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from data_pipeline.build import BuildConfig, TokenizerConfig, build  # noqa: E402
from data_pipeline.corpus import write_default_corpus  # noqa: E402
from data_pipeline.sources import SourceConfig  # noqa: E402

SMALL_SEQ_LEN = 32
SMALL_VOCAB = 512
LONG_SEQ_LEN = 1024


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus")
    write_default_corpus(path, docs_per_language=60, seed=1)
    return path


def build_corpus(corpus_dir, out, seq_len: int, total_tokens: int):
    """The bundled corpus built with a 512-token vocabulary at `seq_len`."""
    build(
        BuildConfig(
            output_dir=str(out),
            sources=[SourceConfig(paths=[str(corpus_dir / "*.jsonl")])],
            seq_len=seq_len,
            total_tokens=total_tokens,
            valid_docs_per_family=5,
            sequences_per_shard=500,
            tokenizer=TokenizerConfig(vocab_size=SMALL_VOCAB),
        )
    )
    return out


@pytest.fixture(scope="session")
def small_dataset(corpus_dir, tmp_path_factory):
    """A small built dataset of the bundled corpus: seq_len 32, vocab 512."""
    return build_corpus(corpus_dir, tmp_path_factory.mktemp("data") / "small", SMALL_SEQ_LEN, 60_000)


@pytest.fixture(scope="session")
def long_dataset(corpus_dir, tmp_path_factory):
    """The same corpus packed into 1,024-token rows: each holds several documents, so document
    boundaries fall inside every context-parallel chunk."""
    return build_corpus(corpus_dir, tmp_path_factory.mktemp("data") / "long", LONG_SEQ_LEN, 24_000)
