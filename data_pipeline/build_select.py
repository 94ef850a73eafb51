"""Pass 2 of the build, deduplicate (exact and near duplicates as hash and band shuffles over the
engine's workers), and the selection the plan starts from: the kept documents per family, with
validation documents held out."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
from tqdm import tqdm

from common.config import ConfigError
from data_pipeline import arrow, dedup
from data_pipeline.build_config import BuildConfig
from data_pipeline.tokenizer import TOKENIZER_FILE


@dataclass
class Selection:
    """Per family: (unit, row, language id) references and token counts of the training and validation
    documents."""

    train: dict[str, np.ndarray]
    train_lengths: dict[str, np.ndarray]
    valid: dict[str, np.ndarray]
    valid_size: dict[str, dict[str, int]]  # per family: tokens (an end-of-text each included) and characters
    duplicates: int
    near_duplicates: int
    languages: dict[str, dict]  # per language of the kept documents: family, documents, tokens, characters, ...
    empty_sources: list[str]  # source files with no document left after the length filters


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
    if near is not None:
        tokenizer_file = str(staging / TOKENIZER_FILE)
        near_args = ([str(f) for f in unit_files], tokenizer_file, near.ngram, near.threshold)
    else:
        near_args = ([], "", 0, 1.0)  # no bands: no bucket is shared, nothing decoded
    next(engine.map_unordered(dedup.resolve_near, [(partitions, str(folder), *near_args)]))
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
    refs: dict[str, list[np.ndarray]] = defaultdict(list)  # per family: (unit, row, length, language, chars) blocks
    languages: dict[str, dict] = {}
    first_seen: dict[str, int] = {}
    empty_sources = []
    for u, path in enumerate(unit_files):
        table = pa.ipc.open_file(pa.memory_map(str(path))).read_all()
        if table.num_rows == 0:
            empty_sources.append(table.schema.metadata[b"source"].decode())
        lo, hi = np.searchsorted(dropped_codes, dedup.doc_codes(u, np.array([0, table.num_rows])))
        rows = np.setdiff1d(np.arange(table.num_rows), dedup.code_rows(dropped_codes[lo:hi]))
        families, langs = (_strings(table.column(name))[rows] for name in ("family", "lang"))
        confidences = arrow.to_numpy(table.column("confidence"))[rows].tolist()
        lengths = np.diff(arrow.to_numpy(arrow.one_chunk(table.column("tokens")).offsets))[rows].astype(np.int64)
        chars = arrow.to_numpy(table.column("chars"))[rows]
        for lang, family in zip(langs.tolist(), families.tolist(), strict=True):  # in document order
            if lang not in first_seen:
                first_seen[lang] = len(first_seen)  # renumbered in sorted order below
                languages[lang] = {"family": family, "documents": 0, "tokens": 0, "characters": 0, "confidence": 0.0}
        lang_ids = np.array([first_seen[lang] for lang in langs.tolist()], dtype=np.int64)
        for lang in dict.fromkeys(langs.tolist()):
            mine = np.flatnonzero(langs == lang)
            stats = languages[lang]
            stats["documents"] += len(mine)
            stats["tokens"] += int(lengths[mine].sum())
            stats["characters"] += int(chars[mine].sum())
            for i in mine.tolist():  # one by one, in document order: the same float sum on every engine
                stats["confidence"] += confidences[i]
        for family in dict.fromkeys(families.tolist()):
            mine = families == family
            block = [np.full(int(mine.sum()), u), rows[mine], lengths[mine], lang_ids[mine], chars[mine]]
            refs[family].append(np.stack(block, 1))
    if not refs:
        raise ConfigError("sources: no documents found")
    train, train_lengths, valid, valid_size = {}, {}, {}, {}
    for position, family in enumerate(sorted(refs)):
        array = np.concatenate(refs[family]).astype(np.int64)
        order = np.random.default_rng([config.seed, position]).permutation(len(array))
        held = min(config.valid_docs_per_family, len(array) // 5)
        held_out = array[np.sort(order[:held])]  # in document order, as the token store keeps them
        valid[family] = held_out[:, [0, 1, 3]]
        held_lengths, held_chars = held_out[:, 2], held_out[:, 4]
        valid_size[family] = {"tokens": int(held_lengths.sum()) + held, "characters": int(held_chars.sum())}
        kept = array[np.sort(order[held:])]
        train[family], train_lengths[family] = kept[:, [0, 1, 3]], kept[:, 2]
    for stats in languages.values():  # mean identification probability (1 where records gave it)
        stats["confidence"] = round(stats["confidence"] / stats["documents"], 4)
        stats["chars_per_token"] = round(stats["characters"] / max(1, stats["tokens"]), 4)
    order = sorted(languages)  # language ids in the shards: positions in the manifest's sorted table
    renumber = np.array([order.index(lang) for lang in first_seen], dtype=np.int64)
    for rows in (*train.values(), *valid.values()):
        rows[:, 2] = renumber[rows[:, 2]]
    selected = {lang: languages[lang] for lang in order}
    return Selection(train, train_lengths, valid, valid_size, len(exact), len(near_dropped), selected, empty_sources)
