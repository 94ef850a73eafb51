from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

# Without a GPU the Triton kernels run in Triton's interpreter; it must be chosen before triton loads.
if shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from data_pipeline.build import BuildConfig, TokenizerConfig, build  # noqa: E402
from data_pipeline.corpus import write_default_corpus  # noqa: E402
from data_pipeline.sources import SourceConfig  # noqa: E402
from tests.distributed import free_port  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SMALL_SEQ_LEN = 32
SMALL_VOCAB = 512
LONG_SEQ_LEN = 1024


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus")
    write_default_corpus(path, docs_per_language=60, seed=1)
    return path


@pytest.fixture(scope="session")
def tiny_data(corpus_dir, tmp_path_factory):
    """The bundled corpus built as configs/data/default.yaml builds it, 150K tokens: for whole jobs."""
    from common.config import load_config

    out = tmp_path_factory.mktemp("launch") / "data"
    overrides = [f"output_dir={out}", f"sources=[{{paths: ['{corpus_dir}/*.jsonl']}}]", "total_tokens=150000"]
    build(load_config(BuildConfig, ROOT / "configs/data/default.yaml", overrides))
    return out


def build_corpus(corpus_dir, out, seq_len: int, total_tokens: int):
    """The bundled corpus built with a 512-token vocabulary at `seq_len`, packed shards included."""
    build(
        BuildConfig(
            output_dir=str(out),
            sources=[SourceConfig(paths=[str(corpus_dir / "*.jsonl")])],
            seq_len=seq_len,
            total_tokens=total_tokens,
            valid_docs_per_family=5,
            sequences_per_shard=500,
            shards=True,  # the packed rows the loader's store mixing is held to
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


@pytest.fixture
def s3(monkeypatch, tmp_path):
    """A bucket on a local S3 server (moto's, over HTTP); fsspec, here and in spawned processes, is
    pointed at it. Yields (an s3fs filesystem, the bucket, the endpoint)."""
    fsspec = pytest.importorskip("fsspec")
    s3fs = pytest.importorskip("s3fs", reason="object stores need s3fs")
    moto_server = pytest.importorskip("moto.server", reason="the local S3 server is moto's (the dev extra)")

    port = free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    for key, value in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
                       "AWS_ENDPOINT_URL": endpoint, "FSSPEC_S3_ENDPOINT_URL": endpoint}.items():  # fmt: skip
        monkeypatch.setenv(key, value)
    monkeypatch.setitem(fsspec.config.conf, "s3", {"endpoint_url": endpoint})
    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem(endpoint_url=endpoint)
    bucket = f"corpus-{uuid.uuid4().hex[:12]}"  # moto keeps its buckets for the whole process
    fs.mkdir(bucket)
    yield fs, bucket, endpoint
    s3fs.S3FileSystem.clear_instance_cache()
    server.stop()
