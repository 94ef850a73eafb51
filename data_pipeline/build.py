"""`build`: sources -> families -> tokenizer -> dedup -> mixture -> packed sequences -> Arrow shards + manifest.

Streaming and resumable, in passes over `<output_dir>.building/`, each a set of units that an
engine (`data_pipeline.engine`: this machine's process pool, or a Ray cluster) runs:
1. tokenize: every source file is one unit, tokenized into `tokenized/unit_XXXXX.arrow` (family,
   token ids, content hash, MinHash); a finished unit is renamed into place;
2. deduplicate: exact and near duplicates as hash and band shuffles (`data_pipeline.dedup`);
3. plan: one unit selects the kept documents, holds out validation documents per family, draws the
   mixture by family ratios and cuts the packed stream into shards (`plan/`), writing the
   validation shards (and best-fit train shards) itself;
4. pack: every concat train shard is packed and written by its own unit, recorded in
   `progress.json` as it completes.
An interrupted build redoes only unfinished units, on either engine. The finished folder replaces
`output_dir` in one rename. The driver holds file names, shard entries and per-family and
per-language totals; a worker holds one tokenization batch, one shard, or (the plan unit) a few
integers per document.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import yaml
from tqdm import tqdm

from data_pipeline import arrow, dedup
from data_pipeline.config import ConfigError, to_dict
from data_pipeline.engine import ENGINES, LocalEngine, RayEngine, make_engine
from data_pipeline.languages import family_of, language_table
from data_pipeline.mixing import draw_documents, normalize_ratios
from data_pipeline.packing import (
    PackedSequences,
    best_fit_bins,
    concat_shard_plan,
    pack_bins,
    pack_concat_shard,
    pack_documents,
    split_long_documents,
)
from data_pipeline.shards import atomic_write_text, finish_dataset, manifest_header, write_shard
from data_pipeline.sources import (
    LanguageIdentifier,
    SourceConfig,
    file_identity,
    is_url,
    read_file,
    source_files,
)
from data_pipeline.tokenizer import (
    TOKENIZER_FILE,
    encode_batch,
    fast_encoder,
    load_tokenizer,
    special_ids,
    text_only,
    train_bpe,
)

PACKINGS = ("concat", "best_fit")
BATCH_CHARS = 1 << 22  # characters per tokenizer call at most, whatever the documents' length
SPEED_KNOBS = ("workers", "engine", "ray_address", "staging_dir", "batch_docs")  # where and how fast, not what
MINHASH_SCHEME = "affine32"  # datasketch's default; stored signatures are only comparable within one scheme


@dataclass
class TokenizerConfig:
    vocab_size: int = 4096
    path: str | None = None  # an existing tokenizer.json or HF tokenizer folder; trained when unset
    sample_docs_per_family: int = 400  # training sample: the first documents of every source file


@dataclass
class NearDedupConfig:
    """MinHash near-duplicate removal (datasketch LSH): a document whose estimated Jaccard
    similarity of word 5-grams with an earlier kept one is at least `threshold` is dropped."""

    threshold: float = 0.8
    num_perm: int = 64
    ngram: int = 5


@dataclass
class BuildConfig:
    output_dir: str
    sources: list[SourceConfig]
    seq_len: int = 256
    total_tokens: int = 1_000_000  # training tokens in the mixture, drawn by `ratios`; 0: all available once
    # family -> weight; empty = natural proportions; "from FILE": a YAML/JSON mapping, e.g. the one
    # `python -m training.scaling_laws optimal-mix` writes
    ratios: dict[str, float] | str = field(default_factory=dict)
    temperature: float | None = None  # with no ratios: sample families with p ~ tokens^(1/T)
    dedup: bool = True  # drop exact duplicate documents (by content hash)
    near_dedup: NearDedupConfig | None = None
    packing: str = "concat"  # concat (cut documents at sequence ends, no padding) | best_fit (whole documents)
    valid_docs_per_family: int = 20  # held out before mixing, packed into per-family `valid` shards
    sequences_per_shard: int = 1024
    families_file: str | None = None
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    workers: int = 0  # processes (local engine); 0 = every core, 1 = in this process
    engine: str = "local"  # local (a process pool) | ray (tasks on a Ray cluster); same output either way
    ray_address: str | None = None  # engine ray: "auto", "HOST:PORT", or None for a Ray started here
    staging_dir: str | None = None  # output_dir on an object store: build here, then upload (default: temp)
    batch_docs: int = 1024  # documents per tokenizer call in a worker (and at most BATCH_CHARS: bounds its memory)
    seed: int = 0
    # No family is repeated more than this many times to meet its ratio (data-constrained scaling:
    # up to about 4 epochs is worth nearly as much as new data); its share then falls short, with a
    # warning. None: no cap.
    max_epochs: float | None = 4.0

    def __post_init__(self):
        if self.seq_len < 2:
            raise ConfigError(f"seq_len must be >= 2, got {self.seq_len}")
        if self.total_tokens < 0 or self.sequences_per_shard <= 0:
            raise ConfigError("total_tokens must be >= 0 and sequences_per_shard positive")
        if self.packing not in PACKINGS:
            raise ConfigError(f"packing {self.packing!r} is not one of {PACKINGS}")
        if self.engine not in ENGINES:
            raise ConfigError(f"engine {self.engine!r} is not one of {ENGINES}")
        if self.ray_address and self.engine != "ray":
            raise ConfigError(f"ray_address {self.ray_address!r} is only used with engine: ray")
        if self.max_epochs is not None and self.max_epochs <= 0:
            raise ConfigError(f"max_epochs must be > 0 (or null for no cap), got {self.max_epochs}")
        if self.total_tokens == 0 and (self.ratios or self.temperature is not None):
            raise ConfigError(
                "total_tokens: 0 takes every token once, in the data's own proportions; "
                "ratios or temperature would resample it (set total_tokens to mix)"
            )


def read_ratios(ratios: dict[str, float] | str) -> dict[str, float]:
    if isinstance(ratios, dict):
        return ratios
    if not ratios.startswith("from "):
        raise ConfigError(f"ratios: {ratios!r} is neither a mapping nor 'from FILE'")
    path = Path(ratios[5:].strip())
    if not path.is_file():
        raise ConfigError(f"ratios: file {path} not found")
    loaded = yaml.safe_load(path.read_text())
    if not isinstance(loaded, dict) or not all(isinstance(v, (int, float)) for v in loaded.values()):
        raise ConfigError(f"ratios: {path} must map family names to numbers")
    return {str(k): float(v) for k, v in loaded.items()}


# ---- pass 1: tokenize -------------------------------------------------------------------------
@dataclass
class Unit:
    index: int
    source: SourceConfig
    path: str  # an absolute local path or an fsspec URL


_WORKER: dict = {}
# Scripts written without spaces between words: Han, Hiragana, Katakana, Thai, Lao, Myanmar, Khmer.
UNSPACED_SCRIPTS = re.compile(
    r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\u0e00-\u0eff\u1000-\u109f\u1780-\u17ff]"
)


def _init_worker(tokenizer_file: str, families_file: str | None, near_dedup: NearDedupConfig | None) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one process per core already
    spec = json.loads(Path(tokenizer_file).read_text(encoding="utf-8"))  # the build's own copy, checked when written
    _WORKER.update(tokenizer=text_only(spec), fast=fast_encoder(spec), table=language_table(families_file))
    _WORKER.update(near=near_dedup, identify=None)


def _minhash(text: str, near: NearDedupConfig) -> np.ndarray:
    from datasketch import MinHash

    grams = shingles(text, near.ngram)
    # The seed's permutations made once per process (datasketch draws them again per MinHash: a third of the time).
    permutations = _minhash_permutations(near.num_perm)
    signature = MinHash(num_perm=near.num_perm, seed=1, scheme=MINHASH_SCHEME, permutations=permutations)
    signature.update_batch([g.encode() for g in grams])
    return signature.hashvalues.astype(np.uint64)


@functools.cache
def _minhash_permutations(num_perm: int):
    from datasketch import MinHash

    return MinHash(num_perm=num_perm, seed=1, scheme=MINHASH_SCHEME).permutations


def shingles(text: str, n: int) -> set[str]:
    """Word n-grams, or character n-grams for text mostly in scripts written without spaces between
    words (Chinese, Japanese, Thai): whitespace splits such text into a handful of sentence-long
    "words", and no two near-duplicates would share a shingle."""
    words = text.split()
    unspaced = len(UNSPACED_SCRIPTS.findall(text))
    letters = sum(c.isalpha() for c in text) if unspaced else 0  # one by one: only where it can matter
    if letters and unspaced > 0.3 * letters:
        chars = "".join(words)
        return {chars[i : i + n] for i in range(max(1, len(chars) - n + 1))}
    return {" ".join(words[i : i + n]) for i in range(max(1, len(words) - n + 1))}


def tokenize_unit(unit: Unit, out_file: str, batch_docs: int) -> dict:
    """Tokenize one source file into an Arrow file of documents; returns its statistics."""
    tokenizer, table, near = _WORKER["tokenizer"], _WORKER["table"], _WORKER["near"]
    if unit.source.lang == "auto" and _WORKER["identify"] is None:
        _WORKER["identify"] = LanguageIdentifier(table)
    columns = defaultdict(list)
    tokens = 0

    def flush(docs):
        nonlocal tokens
        # tiktoken is checked against the tokenizer once per file (per batch, the check cost 10%)
        ids, lengths, agreed = encode_batch(tokenizer, _WORKER["fast"], [d.text for d in docs], check=not tokens)
        if not agreed:  # tiktoken disagreed with the tokenizer: use the tokenizer itself from now on
            _WORKER["fast"] = None
        for doc in docs:
            columns["family"].append(doc.family)
            columns["lang"].append(doc.lang.lower().replace("_", "-"))
            columns["confidence"].append(doc.confidence)
            columns["key"].append(hashlib.blake2b(doc.text.encode(), digest_size=16).digest())
            if near is not None:
                columns["minhash"].append(_minhash(doc.text, near))
        columns["lengths"].append(lengths)  # one flat array per batch: an array per document cost as much as encoding
        columns["values"].append(ids)
        tokens += len(ids)

    batch, chars = [], 0
    for doc in read_file(unit.path, unit.source, table, _WORKER["identify"]):
        batch.append(doc)
        chars += len(doc.text)
        if len(batch) == batch_docs or chars >= BATCH_CHARS:
            flush(batch)
            batch, chars = [], 0
    flush(batch)
    arrays = {
        "family": arrow.dictionary_strings(columns["family"]),
        "lang": arrow.dictionary_strings(columns["lang"]),
        "confidence": arrow.from_numpy(np.array(columns["confidence"], np.float32)),
        "tokens": _list_array(columns["values"], columns["lengths"]),
        "key": arrow.fixed_binary(columns["key"], 16),
    }
    if near is not None:
        signatures = np.concatenate(columns["minhash"]) if columns["minhash"] else np.zeros(0, np.uint64)
        arrays["minhash"] = pa.FixedSizeListArray.from_arrays(arrow.from_numpy(signatures), near.num_perm)
    table_ = pa.table(arrays)
    tmp = out_file + ".tmp"
    with pa.OSFile(tmp, "wb") as sink, pa.ipc.new_file(sink, table_.schema) as writer:
        writer.write_table(table_)
    os.replace(tmp, out_file)
    return {"documents": table_.num_rows, "tokens": tokens}


def _list_array(values: list[np.ndarray], lengths: list[np.ndarray]) -> pa.ListArray:
    """An Arrow list<int32> column from flat token values and per-document lengths."""
    lengths = np.concatenate(lengths) if lengths else np.zeros(0, np.int64)
    offsets = np.zeros(len(lengths) + 1, np.int32)
    np.cumsum(lengths, out=offsets[1:])
    flat = np.concatenate(values) if values else np.zeros(0, np.int32)
    return pa.ListArray.from_arrays(arrow.from_numpy(offsets), arrow.from_numpy(flat.astype(np.int32, copy=False)))


def _sample_texts(units: list[Unit], table: dict[str, str], per_family: int) -> list[str]:
    """Tokenizer training sample: the first documents of every file, up to `per_family` per family."""
    counts: dict[str, int] = defaultdict(int)
    texts = []
    identify = None
    for unit in units:
        if unit.source.lang == "auto" and identify is None:
            identify = LanguageIdentifier(table)
        taken = 0
        for doc in read_file(unit.path, unit.source, table, identify):
            if counts[doc.family] < per_family:
                counts[doc.family] += 1
                texts.append(doc.text)
            taken += 1
            if taken >= per_family:
                break
    if not texts:
        raise ConfigError("sources: no documents found")
    return texts


def tokenize_all(config: BuildConfig, units: list[Unit], staging: Path, tokenizer_file: Path, engine) -> list[Path]:
    out_dir = staging / "tokenized"
    out_dir.mkdir(exist_ok=True)
    outputs = [out_dir / f"unit_{u.index:05d}.arrow" for u in units]
    todo = [(u, str(o), config.batch_docs) for u, o in zip(units, outputs, strict=True) if not o.is_file()]
    if len(todo) < len(units):
        tqdm.write(f"resuming: {len(units) - len(todo)} of {len(units)} source files already tokenized")
    init = (str(tokenizer_file), config.families_file, config.near_dedup)
    bar = tqdm(total=len(units), initial=len(units) - len(todo), desc="tokenize", unit="file")
    start, tokens = time.perf_counter(), 0
    for _, stats in engine.map_unordered(tokenize_unit, todo, _init_worker, init):
        tokens += stats["tokens"]
        bar.set_postfix(tok_s=f"{tokens / (time.perf_counter() - start):,.0f}")
        bar.update(1)
    bar.close()
    return outputs


# ---- pass 2: select ---------------------------------------------------------------------------
@dataclass
class Selection:
    """Per family: (unit, row, language id) references and token counts of the training and validation
    documents."""

    train: dict[str, np.ndarray]
    train_lengths: dict[str, np.ndarray]
    valid: dict[str, np.ndarray]
    duplicates: int
    near_duplicates: int
    languages: dict[str, dict]  # per language of the kept documents: family, documents, tokens, confidence


def deduplicate(config: BuildConfig, unit_files: list[Path], staging: Path, engine) -> Path:
    """Exact and near duplicates as shuffles over the engine's workers (`data_pipeline.dedup`);
    returns the file of dropped documents. Steps whose outputs exist are not run again."""
    folder = staging / "dedup"
    folder.mkdir(exist_ok=True)
    dropped = folder / "dropped.npz"
    if dropped.is_file():
        return dropped
    near = config.near_dedup
    bands = dedup.lsh_bands(near.threshold, near.num_perm) if near is not None else None
    partitions = max(1, min(64, len(unit_files)))
    maps = [(u, str(f), str(folder), partitions, config.dedup, bands) for u, f in enumerate(unit_files)
            if not (folder / f"map_u{u:05d}_p{partitions - 1:03d}.npz").is_file()]  # fmt: skip
    reduces = [(p, len(unit_files), str(folder)) for p in range(partitions)]
    for name, fn, items in (("hash", dedup.partition_unit, maps), ("group", dedup.resolve_partition, reduces)):
        for _ in tqdm(engine.map_unordered(fn, items), total=len(items), desc=f"deduplicate: {name}", leave=False):
            pass
    next(engine.map_unordered(dedup.resolve_near, [(partitions, str(folder))]))
    return dropped


def _strings(column: pa.ChunkedArray) -> np.ndarray:
    """A dictionary-encoded string column as an object array (its to_pylist would import pandas)."""
    array = arrow.one_chunk(column)
    return np.array(array.dictionary.to_pylist(), dtype=object)[arrow.to_numpy(array.indices)]


def select_documents(config: BuildConfig, unit_files: list[Path], dropped_file: Path) -> Selection:
    """The documents the shuffles kept, per family, with validation documents held out."""
    dropped = np.load(dropped_file)
    exact, near_dropped = dropped["exact"], dropped["near"]
    dropped_codes = np.union1d(exact, near_dropped)  # sorted: each unit's are one slice of it
    refs: dict[str, list[np.ndarray]] = defaultdict(list)  # per family: (unit, row, length, language) blocks
    languages: dict[str, dict] = {}
    first_seen: dict[str, int] = {}
    for u, path in enumerate(unit_files):
        table = pa.ipc.open_file(pa.memory_map(str(path))).read_all()
        lo, hi = np.searchsorted(dropped_codes, dedup.doc_codes(u, np.array([0, table.num_rows])))
        rows = np.setdiff1d(np.arange(table.num_rows), dedup.code_rows(dropped_codes[lo:hi]))
        families, langs = (_strings(table.column(name))[rows] for name in ("family", "lang"))
        confidences = arrow.to_numpy(table.column("confidence"))[rows].tolist()
        lengths = np.diff(arrow.to_numpy(arrow.one_chunk(table.column("tokens")).offsets))[rows].astype(np.int64)
        for lang, family in zip(langs.tolist(), families.tolist(), strict=True):  # in document order
            if lang not in first_seen:
                first_seen[lang] = len(first_seen)  # renumbered in sorted order below
                languages[lang] = {"family": family, "documents": 0, "tokens": 0, "confidence": 0.0}
        lang_ids = np.array([first_seen[lang] for lang in langs.tolist()], dtype=np.int64)
        for lang in dict.fromkeys(langs.tolist()):
            mine = np.flatnonzero(langs == lang)
            stats = languages[lang]
            stats["documents"] += len(mine)
            stats["tokens"] += int(lengths[mine].sum())
            for i in mine.tolist():  # one by one, in document order: the same float sum on every engine
                stats["confidence"] += confidences[i]
        for family in dict.fromkeys(families.tolist()):
            mine = families == family
            refs[family].append(np.stack([np.full(int(mine.sum()), u), rows[mine], lengths[mine], lang_ids[mine]], 1))
    if not refs:
        raise ConfigError("sources: no documents found")
    train, train_lengths, valid = {}, {}, {}
    for position, family in enumerate(sorted(refs)):
        array = np.concatenate(refs[family]).astype(np.int64)
        order = np.random.default_rng([config.seed, position]).permutation(len(array))
        held = min(config.valid_docs_per_family, len(array) // 5)
        valid[family] = array[order[:held]][:, [0, 1, 3]]
        kept = array[np.sort(order[held:])]
        train[family], train_lengths[family] = kept[:, [0, 1, 3]], kept[:, 2]
    for stats in languages.values():  # mean identification probability (1 where records gave it)
        stats["confidence"] = round(stats["confidence"] / stats["documents"], 4)
    order = sorted(languages)  # language ids in the shards: positions in the manifest's sorted table
    renumber = np.array([order.index(lang) for lang in first_seen], dtype=np.int64)
    for rows in (*train.values(), *valid.values()):
        rows[:, 2] = renumber[rows[:, 2]]
    selected = {lang: languages[lang] for lang in order}
    return Selection(train, train_lengths, valid, len(exact), len(near_dropped), selected)


# ---- pass 3: mix and pack ---------------------------------------------------------------------
class TokenStore:
    """Zero-copy access to the tokenized documents: memory-mapped token values and offsets per unit."""

    def __init__(self, unit_files: list[Path]):
        self._values, self._offsets = [], []
        for path in unit_files:
            column = arrow.one_chunk(pa.ipc.open_file(pa.memory_map(str(path))).read_all().column("tokens"))
            self._values.append(arrow.to_numpy(column.values))
            self._offsets.append(arrow.to_numpy(column.offsets))

    def get(self, unit: int, row: int) -> np.ndarray:
        offsets = self._offsets[unit]
        return self._values[unit][offsets[row] : offsets[row + 1]]


class ShardWriter:
    """Writes a split's shards in order as blocks arrive."""

    def __init__(self, staging: Path, split: str, family: str | None = None):
        self.staging, self.split, self.family = staging, split, family
        self.entries: list[dict] = []
        self.padding = 0

    def write(self, packed: PackedSequences) -> None:
        self.padding += packed.padding_tokens
        index = len(self.entries)
        name = f"shard_{index:05d}" if self.family is None else f"{self.family}_{index:05d}"
        entry = write_shard(self.staging, self.split, name, packed)
        if self.family is not None:
            entry["family"] = self.family
        self.entries.append(entry)

    def write_all(self, packed: PackedSequences, rows: int) -> None:
        """`packed` as shards of `rows` sequences (the last one shorter)."""
        for start in range(0, len(packed), rows):
            self.write(packed.take(slice(start, start + rows)))


@dataclass(frozen=True)
class FamilyLabels:
    """Documents are packed with their language id as label; this turns such sequences into ones
    with family ids (what the loss is split by) and language ids (recorded in the shards)."""

    family_of_language: tuple[int, ...]

    @classmethod
    def of(cls, languages: dict[str, dict], families: list[str]) -> FamilyLabels:
        return cls(tuple(families.index(s["family"]) for s in languages.values()))

    def __call__(self, packed: PackedSequences) -> PackedSequences:
        langs = packed.family_ids.astype(np.int16, copy=False)
        family_of = np.array([*self.family_of_language, -1], dtype=np.int8)  # padding's -1 picks the last: -1
        return dataclasses.replace(packed, family_ids=family_of[langs], lang_ids=langs)


def _save_array(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".tmp.npy")
    np.save(tmp, array)
    os.replace(tmp, path)


def mixture_refs(selection: Selection, mixture: np.ndarray, drawn_families: list[str]):
    """The mixture as (unit, row, language id, tokens kept or -1) rows, and each one's tokens in the
    packed stream (EOS included)."""
    refs = np.empty((len(mixture), 4), np.int64)
    sizes = np.empty(len(mixture), np.int64)
    for position, family in enumerate(drawn_families):
        mine = mixture[:, 0] == position
        docs, keep = mixture[mine, 1], mixture[mine, 2]
        refs[mine, :3] = selection.train[family][docs]
        refs[mine, 3] = keep
        sizes[mine] = np.where(keep < 0, selection.train_lengths[family][docs], keep) + 1
    return refs, sizes


def _documents(store: TokenStore, refs) -> Iterator[tuple[int, np.ndarray]]:
    for unit, row, lang, keep in refs:
        tokens = store.get(unit, row)
        yield lang, tokens if keep < 0 else tokens[:keep]


def pack_best_fit_train(config, refs: np.ndarray, store: TokenStore, label, eos, pad, writer: ShardWriter) -> int:
    """Best fit inside windows of documents (bounded memory); returns the documents split into
    sequence-long pieces."""
    split, rows = 0, config.sequences_per_shard
    window = max(1, rows * config.seq_len // 64)
    for start in tqdm(range(0, len(refs), window), desc="pack (best fit)", unit="window", leave=False):
        docs = list(_documents(store, refs[start : start + window].tolist()))
        pieces = split_long_documents(docs, config.seq_len)
        split += sum(len(t) >= config.seq_len for _, t in docs)
        bins = best_fit_bins([len(p[1]) + p[2] for p in pieces], config.seq_len)
        writer.write_all(label(pack_bins(pieces, config.seq_len, eos, pad, bins)), rows)
    return split


def plan_build(config: BuildConfig, unit_files: list[str], staging: str, eos: int, pad: int) -> dict:
    """The build's one sequential unit, run by the engine (on Ray a worker, not the driver; the local
    engine runs a lone unit in its own process): the kept documents per family, validation held out,
    the mixture, then for concat the shard plan (each shard's documents, packed later by many
    workers), for best_fit the train shards themselves, and the validation shards. Writes
    `plan/summary.json` (what the manifest needs) and returns it."""
    staging_dir, files = Path(staging), [Path(f) for f in unit_files]
    plan_dir = staging_dir / "plan"
    plan_dir.mkdir(exist_ok=True)
    selection = select_documents(config, files, staging_dir / "dedup" / "dropped.npz")
    families = sorted(set(selection.train) | set(selection.valid))
    available = {f: int(selection.train_lengths[f].sum() + len(selection.train_lengths[f])) for f in selection.train}
    ratios = normalize_ratios(read_ratios(config.ratios), {f: n for f, n in available.items() if n}, config.temperature)
    lengths = {f: selection.train_lengths[f] for f in ratios}
    total = config.total_tokens or sum(int(n.sum()) + len(n) for n in lengths.values())
    mixture, draws = draw_documents(lengths, ratios, total, config.seed, config.max_epochs)
    refs, sizes = mixture_refs(selection, mixture, sorted(ratios))
    label = FamilyLabels.of(selection.languages, families)
    store = TokenStore(files)
    summary: dict = {"families": families, "languages": selection.languages, "split_docs": 0}
    if config.packing == "concat":
        _save_array(plan_dir / "train_refs.npy", refs)
        plan = np.array(concat_shard_plan(sizes, config.seq_len, config.sequences_per_shard), np.int64)
        _save_array(plan_dir / "train_plan.npy", plan.reshape(-1, 3))
        summary["train_shards"] = len(plan)
    else:
        writer = ShardWriter(staging_dir, "train")
        summary["split_docs"] = pack_best_fit_train(config, refs, store, label, eos, pad, writer)
        summary["train"] = {"entries": writer.entries, "padding": writer.padding}
    valid_entries, valid_padding = [], 0
    for family in families:  # one set of validation shards per family
        docs = [(lang, store.get(u, r)) for u, r, lang in selection.valid[family]]
        if not docs:
            continue
        writer = ShardWriter(staging_dir, "valid", family)
        writer.write_all(label(pack_documents(docs, config.seq_len, eos, pad)), config.sequences_per_shard)
        valid_entries += writer.entries
        valid_padding += writer.padding
    drawn = sum(d.drawn_tokens for d in draws)
    summary["family_stats"] = {
        d.family: {
            "ratio": round(d.ratio, 6),
            "share": round(d.drawn_tokens / max(1, drawn), 6),
            "available_tokens": d.available_tokens,
            "tokens": d.drawn_tokens,
            "documents": d.drawn_docs,
            "epochs": round(d.epochs, 4),
            "valid_documents": len(selection.valid[d.family]),
        }
        for d in draws
    }
    summary.update(
        valid={"entries": valid_entries, "padding": valid_padding},
        warnings=mixture_warnings(config, draws, drawn, selection),
        duplicates=selection.duplicates,
        near_duplicates=selection.near_duplicates,
    )
    atomic_write_text(plan_dir / "summary.json", json.dumps(summary))
    return summary


_STORES: dict[tuple[str, ...], TokenStore] = {}  # per worker process: the memory-mapped unit files


def write_concat_shard(staging: str, unit_files: tuple[str, ...], index: int, shape: tuple[int, int, int, int],
                       label: FamilyLabels) -> dict:  # fmt: skip
    """Pack and write train shard `index` of a concat build from its plan (runs on a worker);
    `shape` is (seq_len, eos, pad, rows per shard)."""
    if unit_files not in _STORES:
        _STORES.clear()
        _STORES[unit_files] = TokenStore([Path(f) for f in unit_files])
    plan_dir = Path(staging) / "plan"
    first, offset, last = np.load(plan_dir / "train_plan.npy", mmap_mode="r")[index].tolist()
    refs = np.load(plan_dir / "train_refs.npy", mmap_mode="r")[first:last].tolist()
    seq_len, eos, pad, rows = shape
    packed = pack_concat_shard(list(_documents(_STORES[unit_files], refs)), offset, seq_len, eos, pad, rows)
    return write_shard(Path(staging), "train", f"shard_{index:05d}", label(packed))


def write_train_shards(config, summary: dict, unit_files, staging: Path, engine, progress: dict, eos, pad):
    """Concat train shards, packed and written by the engine's workers as the plan says; a shard in
    `progress.json` is not written again. Returns their entries and padding."""
    if "train" in summary:  # best fit: written by the planning unit
        return summary["train"]["entries"], summary["train"]["padding"]
    count = summary["train_shards"]
    done = progress.setdefault("train_shards", {})
    files = tuple(str(f) for f in unit_files)
    label = FamilyLabels.of(summary["languages"], summary["families"])
    shape = (config.seq_len, eos, pad, config.sequences_per_shard)
    todo = [(str(staging), files, k, shape, label) for k in range(count) if str(k) not in done]
    bar = tqdm(total=count, initial=count - len(todo), desc="pack", unit="shard")
    for i, entry in engine.map_unordered(write_concat_shard, todo):
        done[str(todo[i][2])] = entry
        atomic_write_text(staging / "progress.json", json.dumps(progress))
        bar.update(1)
    bar.close()
    entries = [done[str(k)] for k in range(count)]
    return entries, sum(e["sequences"] * config.seq_len - e["tokens"] for e in entries)


def mixture_warnings(config: BuildConfig, draws, total: int, selection) -> list[str]:
    """What the user asked for and did not get: a family capped at `max_epochs` short of its ratio,
    and families too small to hold out `valid_docs_per_family` documents."""
    warnings = []
    for d in draws:
        if config.max_epochs is not None and d.epochs >= config.max_epochs - 1e-9 and d.drawn_tokens / total < d.ratio:
            warnings.append(
                f"family {d.family!r}: capped at max_epochs={config.max_epochs:g} ({d.available_tokens:,} tokens); "
                f"share {d.drawn_tokens / total:.2%} instead of the {d.ratio:.2%} asked"
            )
    for family, held in selection.valid.items():
        if len(held) < config.valid_docs_per_family:
            warnings.append(
                f"family {family!r}: {len(held)} validation document(s) held out of the {config.valid_docs_per_family} "
                f"asked (a family holds out at most a fifth of its documents); its validation loss is noisy"
            )
    return warnings


def output_config(config: BuildConfig) -> dict:
    """The config without the knobs that change only where and how fast it runs (`SPEED_KNOBS`), as
    the manifest records it: the same build gives the same manifest on any engine and batch size."""
    return {k: v for k, v in to_dict(config).items() if k not in SPEED_KNOBS}


def _build_key(config: BuildConfig, units: list[Unit]) -> str:
    """What decides the output: the config without the knobs that only change speed, and the
    source files as they are now (a file changed since an interrupted build restarts it)."""
    relevant = {k: v for k, v in output_config(config).items() if k != "output_dir"}
    relevant["files"] = [file_identity(u.path) for u in units]
    return hashlib.sha256(json.dumps(relevant, sort_keys=True, default=str).encode()).hexdigest()[:16]


def build(config: BuildConfig) -> dict:
    out = local_output(config)
    staging = out.with_name(out.name + ".building")
    if is_url(config.output_dir):
        refuse_to_replace(config.output_dir)
    files = ((s, p) for s in config.sources for p in source_files(s))
    units = [Unit(i, source, path) for i, (source, path) in enumerate(files)]
    if not units:
        raise ConfigError("sources: no files")
    check_config(config)
    try:
        manifest = _build(config, units, out, staging)
    except (ConfigError, ValueError, OSError):
        # Bad input or a full disk: nothing half-built is kept (an interrupt keeps it to resume).
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if is_url(config.output_dir):
        publish(out, config.output_dir)
        shutil.rmtree(out)
    return manifest


def local_output(config: BuildConfig) -> Path:
    """Where the dataset is built: `output_dir` itself (made absolute: workers, Ray's on other nodes
    too, do not run in this process's folder), or for an object-store URL a folder under
    `staging_dir` (default: this machine's temp folder; give a shared one for Ray on several nodes)
    named after the URL, so an interrupted build resumes."""
    if not is_url(config.output_dir):
        return Path(config.output_dir).absolute()
    root = Path(config.staging_dir or Path(tempfile.gettempdir()) / "data_pipeline_builds").absolute()
    return root / hashlib.sha256(config.output_dir.encode()).hexdigest()[:16]


def refuse_to_replace(url: str) -> None:
    import fsspec

    fs, root = fsspec.core.url_to_fs(url)
    if fs.exists(f"{root}/manifest.json"):
        raise ConfigError(
            f"output_dir {url}: holds a dataset (manifest.json); an object store cannot replace one in a single "
            "step (no rename), so the build does not overwrite it: choose a new prefix, or delete that one first"
        )


def publish(local: Path, url: str) -> None:
    """Upload a finished dataset: every file, then `manifest.json` last, so a reader that finds the
    manifest finds every file it names (an object store has no rename; each object appears whole)."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(url)
    files = sorted(p for p in local.rglob("*") if p.is_file() and p.name != "manifest.json")
    for path in tqdm(files, desc=f"upload to {url}", unit="file"):
        fs.put_file(str(path), f"{root}/{path.relative_to(local).as_posix()}")
    fs.put_file(str(local / "manifest.json"), f"{root}/manifest.json")


def check_config(config: BuildConfig) -> None:
    """What can be checked before a document is read: ratio families and source languages against the
    family table, with the nearest name for a misspelling."""
    table = language_table(config.families_file)
    known = sorted(set(table.values()))
    ratios = read_ratios(config.ratios)
    for family in ratios:
        if family not in known:
            near = difflib.get_close_matches(family, known, n=1)
            hint = f"; did you mean {near[0]!r}?" if near else f" (families: {', '.join(known)})"
            raise ConfigError(f"ratios.{family}: no such language family{hint}")
    for i, source in enumerate(config.sources):
        if source.lang and source.lang != "auto":
            try:
                family_of(source.lang, table)
            except KeyError as err:
                near = difflib.get_close_matches(source.lang.lower(), list(table), n=1)
                hint = f"; did you mean {near[0]!r}?" if near else ""
                raise ConfigError(f"sources[{i}].lang: {err.args[0]}{hint}") from None


def _build(config: BuildConfig, units: list[Unit], out: Path, staging: Path) -> dict:
    key = _build_key(config, units)
    progress_file = staging / "progress.json"
    progress = json.loads(progress_file.read_text()) if progress_file.is_file() else {}
    if progress.get("config_key") != key:  # a different (or no) build was interrupted: start over
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        progress = {"config_key": key}
        atomic_write_text(progress_file, json.dumps(progress))

    table = language_table(config.families_file)
    tokenizer_file = staging / TOKENIZER_FILE
    if not tokenizer_file.is_file():
        if config.tokenizer.path:
            tokenizer = load_tokenizer(config.tokenizer.path)
        else:
            tokenizer = train_bpe(
                _sample_texts(units, table, config.tokenizer.sample_docs_per_family), config.tokenizer.vocab_size
            )
        tmp = tokenizer_file.with_name(TOKENIZER_FILE + ".tmp")
        tokenizer.save(str(tmp))
        os.replace(tmp, tokenizer_file)
    tokenizer = load_tokenizer(tokenizer_file)
    engine = make_engine(config.engine, config.workers, config.ray_address)
    try:
        return _run_passes(config, units, out, staging, engine, progress, tokenizer_file, tokenizer)
    finally:
        engine.close()


def _run_passes(config, units, out, staging, engine: LocalEngine | RayEngine, progress, tokenizer_file, tokenizer):
    """Tokenize, deduplicate, plan, pack: each a set of units the engine runs; the driver keeps
    file names, shard entries and per-family and per-language totals."""
    eos, pad = special_ids(tokenizer)
    unit_files = tokenize_all(config, units, staging, tokenizer_file, engine)
    deduplicate(config, unit_files, staging, engine)
    summary_file = staging / "plan" / "summary.json"
    if summary_file.is_file():
        summary = json.loads(summary_file.read_text())
    else:
        plan = (config, [str(f) for f in unit_files], str(staging), eos, pad)
        _, summary = next(engine.map_unordered(plan_build, [plan]))
    train_entries, train_padding = write_train_shards(config, summary, unit_files, staging, engine, progress, eos, pad)
    for warning in summary["warnings"]:
        print(f"warning: {warning}")
    train_slots = sum(e["sequences"] for e in train_entries) * config.seq_len
    manifest = {
        **manifest_header(tokenizer, config.seq_len, summary["families"]),
        "family_stats": summary["family_stats"],
        "padding_tokens": {"train": train_padding, "valid": summary["valid"]["padding"]},
        "packing": {
            "strategy": config.packing,
            "padding_fraction": round(train_padding / max(1, train_slots), 6),
            "truncated_docs": 0,  # best_fit splits long documents; concat cuts at sequence ends
            "split_docs": summary["split_docs"],  # best_fit: documents longer than a sequence, packed as pieces
        },
        "languages": summary["languages"],
        "warnings": summary["warnings"],
        "duplicates_removed": summary["duplicates"],
        "near_duplicates_removed": summary["near_duplicates"],
        "splits": {"train": train_entries, "valid": summary["valid"]["entries"]},
        "config": output_config(config),
    }
    for folder in ("tokenized", "dedup", "plan"):
        shutil.rmtree(staging / folder)
    (staging / "progress.json").unlink()
    finish_dataset(staging, out, manifest)
    return manifest
