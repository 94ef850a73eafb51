"""Read documents (text + language) from JSONL, Parquet or Arrow files."""

from __future__ import annotations

import glob
import io
import json
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from data_pipeline.config import ConfigError
from data_pipeline.languages import family_of


@dataclass
class SourceConfig:
    paths: list[str]
    text_field: str = "text"
    lang_field: str | None = "lang"
    lang: str | None = None  # a fixed language for every record, when the files carry none
    min_chars: int = 1  # shorter documents (after normalisation) are dropped


@dataclass(frozen=True)
class Document:
    text: str
    lang: str
    family: str


def expand_paths(patterns: list[str]) -> list[Path]:
    files: list[Path] = []
    for pattern in patterns:
        matched = sorted(glob.glob(pattern, recursive=True))
        if not matched:
            raise ConfigError(f"source path {pattern!r} matches no file")
        files.extend(Path(m) for m in matched)
    return files


JSONL_SUFFIXES = tuple(f".{ext}{comp}" for ext in ("jsonl", "json") for comp in ("", ".gz", ".zst", ".bz2"))


def _records(path: Path) -> Iterator[dict]:
    name = path.name
    if name.endswith(JSONL_SUFFIXES):  # compression detected from the suffix
        with pa.input_stream(str(path), compression="detect") as raw, io.TextIOWrapper(raw, encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if line.strip():
                    try:
                        yield json.loads(line)
                    except json.JSONDecodeError as err:
                        raise ValueError(f"{path}:{line_no}: not valid JSON: {err.msg}") from err
    elif name.endswith(".parquet"):
        for batch in pq.ParquetFile(path).iter_batches():
            yield from batch.to_pylist()
    elif name.endswith(".arrow"):
        with pa.memory_map(str(path)) as source:
            try:
                reader = pa.ipc.open_file(source)
                batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
            except pa.ArrowInvalid:
                source.seek(0)
                batches = pa.ipc.open_stream(source)
            for batch in batches:
                yield from batch.to_pylist()
    else:
        raise ConfigError(f"{path}: unsupported file type (use .jsonl[.gz|.zst|.bz2], .parquet or .arrow)")


def read_documents(source: SourceConfig, table: dict[str, str]) -> Iterator[Document]:
    """Yield NFC-normalised, non-empty documents with their language family resolved."""
    if source.lang_field is None and source.lang is None:
        raise ConfigError(f"source {source.paths}: set lang_field or a fixed lang")
    for path in expand_paths(source.paths):
        for i, record in enumerate(_records(path)):
            if source.text_field not in record:
                raise ConfigError(f"{path}: record {i} has no field {source.text_field!r}")
            lang = source.lang or record.get(source.lang_field)
            if not lang:
                raise ConfigError(f"{path}: record {i} has no language in field {source.lang_field!r}")
            text = unicodedata.normalize("NFC", record[source.text_field] or "").strip()
            if len(text) >= max(1, source.min_chars):
                try:
                    yield Document(text=text, lang=lang, family=family_of(lang, table))
                except KeyError as err:
                    raise ConfigError(f"{path}: record {i}: {err.args[0]}") from None
