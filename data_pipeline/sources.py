"""Read documents (text + language) from JSONL, Parquet, Arrow files or Hugging Face datasets.

A source is split into work units, one per file, that the build tokenizes in parallel: a
`save_to_disk` folder contributes its Arrow files and `load_dataset` its cache files.
"""

from __future__ import annotations

import glob
import io
import json
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from common.config import ConfigError
from data_pipeline.languages import family_of, language_hint


@dataclass
class SourceConfig:
    paths: list[str] = field(default_factory=list)  # files or globs: .jsonl[.gz|.zst|.bz2], .parquet, .arrow
    # A Hugging Face dataset instead of paths: a `save_to_disk` folder, or a `load_dataset` name
    # ("json", "parquet" with hf_data_files, or a hub id when the hub is reachable).
    hf_dataset: str | None = None
    hf_data_files: list[str] = field(default_factory=list)
    hf_config: str | None = None
    hf_split: str = "train"
    text_field: str = "text"
    lang_field: str | None = "lang"
    # A fixed language for every record when the files carry none, or `auto`: identify each
    # document's language with py3langid's offline model, among the languages of the family table.
    lang: str | None = None
    min_chars: int = 1  # shorter documents (after normalisation) are dropped
    max_chars: int | None = None  # longer documents are dropped (quality filter)

    def __post_init__(self):
        if bool(self.paths) == bool(self.hf_dataset):
            raise ConfigError(
                f"a source needs either paths or hf_dataset, got paths={self.paths} hf_dataset={self.hf_dataset}"
            )
        if self.lang_field is None and self.lang is None:
            raise ConfigError(f"source {self.name}: set lang_field, a fixed lang, or lang: auto")

    @property
    def name(self) -> str:
        return self.hf_dataset or ",".join(self.paths)


@dataclass(frozen=True)
class Document:
    text: str
    lang: str
    family: str
    confidence: float = 1.0  # of language identification; 1 when the record gave its language


def is_url(path: str | Path) -> bool:
    """A location on a filesystem fsspec reaches by protocol (s3://, gs://, az://, https://, ...)."""
    return "://" in str(path) and not str(path).startswith("file://")


def expand_paths(patterns: list[str]) -> list[str]:
    """The files each pattern matches, sorted: local paths (made absolute, since workers, Ray's on
    other nodes too, run elsewhere) and fsspec URLs."""
    files: list[str] = []
    for pattern in patterns:
        if is_url(pattern):
            import fsspec

            fs, _ = fsspec.core.url_to_fs(pattern)
            matched = sorted(fs.unstrip_protocol(m) for m in fs.glob(pattern))
        else:
            matched = sorted(str(Path(m).absolute()) for m in glob.glob(pattern, recursive=True))
        if not matched:
            raise ConfigError(f"source path {pattern!r} matches no file")
        files.extend(matched)
    return files


def file_identity(path: str) -> tuple:
    """What tells whether a source file changed since an interrupted build: size and modification
    time (local), or size and ETag / modification time (object stores)."""
    if not is_url(path):
        stat = Path(path).stat()
        return path, stat.st_size, stat.st_mtime_ns
    import fsspec

    fs, _ = fsspec.core.url_to_fs(path)
    info = fs.info(path)
    return path, info.get("size"), str(info.get("ETag") or info.get("LastModified") or info.get("mtime"))


JSONL_SUFFIXES = tuple(f".{ext}{comp}" for ext in ("jsonl", "json") for comp in ("", ".gz", ".zst", ".bz2"))


def _open(path: str):
    """A binary stream of the file, decompressed by its suffix (.gz, .zst, .bz2)."""
    if is_url(path):
        import fsspec

        return fsspec.open(path, "rb", compression="infer").open()
    return io.BufferedReader(pa.input_stream(path, compression="detect"))


def _seekable(path: str):
    """The file for readers that seek (Parquet, Arrow): memory-mapped here, or fsspec's file."""
    if is_url(path):
        import fsspec

        return fsspec.open(path, "rb").open()
    return pa.memory_map(path)


def _utf8_error(raw: bytes) -> str:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as err:
        return f"not valid UTF-8 (byte 0x{raw[err.start]:02x} at column {err.start + 1})"
    return "not valid UTF-8"


def _records(path: str) -> Iterator[dict]:
    name = Path(path).name
    if name.endswith(JSONL_SUFFIXES):
        with _open(path) as f:
            for line_no, raw in enumerate(f, 1):
                if raw.strip():
                    try:
                        yield json.loads(raw)  # bytes: decoded as UTF-8 inside the parser
                    except UnicodeDecodeError:
                        raise ValueError(f"{path}:{line_no}: {_utf8_error(raw)}") from None
                    except json.JSONDecodeError as err:
                        raise ValueError(f"{path}:{line_no}: not valid JSON: {err.msg}") from err
    elif name.endswith(".parquet"):
        with _seekable(path) as source:
            for batch in pq.ParquetFile(source).iter_batches():
                yield from batch.to_pylist()
    elif name.endswith(".arrow"):
        with _seekable(path) as source:
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


def source_files(source: SourceConfig) -> list[str]:
    """The files a source reads, each one work unit of the build."""
    if not source.hf_dataset:
        return expand_paths(source.paths)
    folder = Path(source.hf_dataset)
    if (folder / "state.json").is_file():  # Dataset.save_to_disk
        state = json.loads((folder / "state.json").read_text())
        return [str((folder / f["filename"]).absolute()) for f in state["_data_files"]]
    if (folder / "dataset_dict.json").is_file():  # DatasetDict.save_to_disk: take the split
        return source_files(SourceConfig(hf_dataset=str(folder / source.hf_split), lang=source.lang or "auto"))
    import datasets

    data_files = expand_paths(source.hf_data_files) if source.hf_data_files else None
    try:
        dataset = datasets.load_dataset(
            source.hf_dataset,
            source.hf_config,
            data_files=data_files,
            split=source.hf_split,
        )
    except Exception as err:  # the hub, a missing builder, a bad file: say which source
        raise ConfigError(f"hf_dataset {source.hf_dataset!r}: {type(err).__name__}: {err}") from err
    return [str(Path(f["filename"]).absolute()) for f in dataset.cache_files]


class LanguageIdentifier:
    """py3langid's offline model restricted to the languages the family table knows, over the whole
    document: a long one is sampled at its start, middle and end, so a preamble in another language
    does not decide it. Returns the language and its probability."""

    SAMPLE_CHARS = 1000

    def __init__(self, table: dict[str, str]):
        from py3langid.langid import MODEL_FILE
        from py3langid.langid import LanguageIdentifier as Model

        self.model = Model.from_model_file(MODEL_FILE, norm_probs=True)
        known = [lang for lang in self.model.nb_classes if lang in table]
        self.model.set_languages(known)

    def __call__(self, text: str) -> tuple[str, float]:
        n = self.SAMPLE_CHARS
        if len(text) > 3 * n:
            middle = len(text) // 2
            text = " ".join((text[:n], text[middle - n // 2 : middle + n // 2], text[-n:]))
        lang, probability = self.model.classify(text)
        return lang, float(probability)


def read_file(path: str, source: SourceConfig, table: dict[str, str], identify=None) -> Iterator[Document]:
    """NFC-normalised documents of one file that pass the length filters, with their family."""
    records = 0
    for i, record in enumerate(_records(path)):
        records += 1
        where = f"{path}: record {i + 1}"  # 1-based: the line of a JSONL file without blank lines
        if not isinstance(record, dict) or source.text_field not in record:
            raise ConfigError(f"{where} has no field {source.text_field!r}")
        value = record[source.text_field]
        if value is None:
            raise ConfigError(
                f"{where}: field {source.text_field!r} is null, not text (drop the record or give it text)"
            )
        if not isinstance(value, str):
            raise ConfigError(f"{where}: field {source.text_field!r} is {type(value).__name__} {value!r:.40}, not text")
        nfc = value.isascii() or unicodedata.is_normalized("NFC", value)  # isascii: O(1), and ASCII is NFC
        text = (value if nfc else unicodedata.normalize("NFC", value)).strip()
        if len(text) < max(1, source.min_chars) or (source.max_chars and len(text) > source.max_chars):
            continue
        confidence = 1.0
        if source.lang == "auto":
            lang, confidence = identify(text)
        else:
            lang = source.lang or record.get(source.lang_field)
        if lang is not None and not isinstance(lang, str):
            raise ConfigError(
                f"{where}: field {source.lang_field!r} is {type(lang).__name__} {lang!r:.40}, not a language code"
            )
        if not lang:
            raise ConfigError(f"{where} has no language in field {source.lang_field!r}")
        try:
            yield Document(text=text, lang=lang, family=family_of(lang, table), confidence=confidence)
        except KeyError as err:
            raise ConfigError(f"{where}: {err.args[0]}{language_hint(lang, table)}") from None
    if records == 0:
        raise ConfigError(f"{path}: no records (an empty file); remove it from the sources")
