"""Sources and outputs on an object store, against a real S3-compatible server on this machine
(moto's, over HTTP through s3fs): the build reads `s3://` files as it reads local ones and uploads
its dataset with the manifest last, byte for byte what a local build writes."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from common.config import ConfigError
from data_pipeline.build import BuildConfig, TokenizerConfig, build
from data_pipeline.sources import SourceConfig

pytest.importorskip("s3fs", reason="object-store sources need s3fs")
pytest.importorskip("moto.server", reason="the local S3 server is moto's (the dev extra)")

RECORDS = [{"text": f"record {i} of the store " * (i % 5 + 1), "lang": ["en", "de", "ru"][i % 3]} for i in range(90)]


def write_sources(folder: Path) -> None:
    """The same records as JSONL, gzipped JSONL and Parquet."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(r) for r in RECORDS]
    (folder / "a.jsonl").write_text("\n".join(lines[:30]) + "\n")
    (folder / "b.jsonl.gz").write_bytes(gzip.compress(("\n".join(lines[30:60]) + "\n").encode()))
    pq.write_table(pa.Table.from_pylist(RECORDS[60:]), folder / "c.parquet")


def config(sources: str, output_dir: str, **kw) -> BuildConfig:
    return BuildConfig(output_dir=output_dir, sources=[SourceConfig(paths=[sources])], seq_len=16, total_tokens=3000,
                       valid_docs_per_family=2, tokenizer=TokenizerConfig(vocab_size=300), **kw)  # fmt: skip


def test_sources_and_output_on_s3_equal_a_local_build(s3, tmp_path):
    s3, bucket, _ = s3
    write_sources(tmp_path / "local")
    s3.put(str(tmp_path / "local") + "/", f"{bucket}/in/", recursive=True)
    local = build(config(str(tmp_path / "local" / "*"), str(tmp_path / "out"), workers=1))
    remote = build(
        config(f"s3://{bucket}/in/*", f"s3://{bucket}/datasets/run1", workers=2, staging_dir=str(tmp_path / "st"))
    )

    assert local["store"]["splits"] == remote["store"]["splits"] and local["tokenizer_hash"] == remote["tokenizer_hash"]
    uploaded = sorted(s3.find(f"{bucket}/datasets/run1"))
    written = sorted(str(p.relative_to(tmp_path / "out")) for p in (tmp_path / "out").rglob("*") if p.is_file())
    assert [u.removeprefix(f"{bucket}/datasets/run1/") for u in uploaded] == written
    for name in written:
        if name != "manifest.json":
            assert s3.cat(f"{bucket}/datasets/run1/{name}") == (tmp_path / "out" / name).read_bytes(), name
    manifest = json.loads(s3.cat(f"{bucket}/datasets/run1/manifest.json"))
    assert manifest["config"]["output_dir"] == f"s3://{bucket}/datasets/run1"
    # The same manifest but for where things were read and written: the config and the store's file list.
    for got in (manifest, local):
        got["store"]["sources"] = [Path(source).name for source in got["store"]["sources"]]
    assert {k: v for k, v in manifest.items() if k != "config"} == {k: v for k, v in local.items() if k != "config"}
    assert not list((tmp_path / "st").iterdir()), "the local copy is removed once uploaded"


def test_an_existing_dataset_on_s3_is_never_overwritten(s3, tmp_path):
    s3, bucket, _ = s3
    write_sources(tmp_path / "local")
    s3.put(str(tmp_path / "local") + "/", f"{bucket}/in/", recursive=True)
    target = f"s3://{bucket}/datasets/kept"
    build(config(f"s3://{bucket}/in/*", target, workers=1, staging_dir=str(tmp_path / "st")))
    before = {key: s3.cat(key) for key in s3.find(f"{bucket}/datasets/kept")}
    with pytest.raises(ConfigError, match="holds a dataset .*cannot replace one in a single step"):
        build(config(f"s3://{bucket}/in/*", target, workers=1, seed=1, staging_dir=str(tmp_path / "st")))
    assert {key: s3.cat(key) for key in s3.find(f"{bucket}/datasets/kept")} == before


def test_a_bad_record_on_s3_is_named_by_its_url_and_line(s3, tmp_path):
    s3, bucket, _ = s3
    s3.pipe(f"{bucket}/bad/x.jsonl", b'{"text": "fine", "lang": "en"}\n{"text": oops}\n')
    with pytest.raises(ValueError, match=rf"s3://{bucket}/bad/x.jsonl:2: not valid JSON"):
        build(config(f"s3://{bucket}/bad/*.jsonl", str(tmp_path / "out"), workers=1))
    with pytest.raises(ConfigError, match=rf"s3://{bucket}/none/\*.jsonl' matches no file"):
        build(config(f"s3://{bucket}/none/*.jsonl", str(tmp_path / "out"), workers=1))
