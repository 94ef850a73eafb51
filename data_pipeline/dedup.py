"""Exact and MinHash near-duplicate removal as shuffles, so that no process holds every document.

The result is the sequential rule's, document for document: walking the documents in (source file,
row) order, a document is an exact duplicate when an earlier one has its content hash, and a near
duplicate when it shares an LSH band bucket of its MinHash with an earlier document that was kept
and their shingles' Jaccard similarity, computed exactly, is at least the threshold (the bands are
chosen for recall, `lsh_bands`; the exact check gives precision). Three steps, each a set of
independent units an engine runs:

1. `partition_unit`, per tokenized file: its content hashes and band values, split by hash into
   `partitions` files (the shuffle's map side);
2. `resolve_partition`, per partition: exact duplicates are the later copies of each hash; the
   band buckets that hold two or more documents are written as collision groups;
3. `resolve_near`, once: the greedy walk over the documents that share a bucket with another
   (usually a small fraction), which needs their order and, for the exact check, their tokens.

Everything travels through files in the build's staging folder, so a resumed build skips the
steps whose outputs exist and the engine only moves file names.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
from collections import defaultdict
from pathlib import Path

import numpy as np
import pyarrow as pa

from common.config import ConfigError
from data_pipeline import arrow
from data_pipeline.tokenizer import text_only

LSH_RECALL = 0.95  # a pair of documents at the threshold is a candidate with at least this probability

# Scripts written without spaces between words: Han, Hiragana, Katakana, Thai, Lao, Myanmar, Khmer.
UNSPACED_SCRIPTS = re.compile(
    r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\u0e00-\u0eff\u1000-\u109f\u1780-\u17ff]"
)


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


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


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


def doc_codes(unit: int, rows: np.ndarray) -> np.ndarray:
    """One int64 per document that sorts in (unit, row) order."""
    return (np.int64(unit) << 32) | rows.astype(np.int64)


def code_rows(codes: np.ndarray) -> np.ndarray:
    """The rows in their unit of documents given by `doc_codes`."""
    return codes & np.int64(0xFFFFFFFF)


def lsh_bands(threshold: float, num_perm: int) -> list[tuple[int, int]]:
    """The (start, end) hash ranges of the LSH bands: the most rows per band (fewest candidates below
    the threshold) and the fewest bands that still make a pair at `threshold` a candidate with
    probability `LSH_RECALL`, 1 - (1 - threshold^rows)^bands. Candidates are then checked exactly
    (`resolve_near`), so the bands decide recall and cost, never precision."""
    for rows in range(num_perm, 0, -1):
        hit = threshold**rows
        bands = math.ceil(math.log(1 - LSH_RECALL) / math.log(1 - hit)) if hit < 1 else 1
        if bands * rows <= num_perm:
            return [(b * rows, (b + 1) * rows) for b in range(bands)]
    raise ConfigError(
        f"near_dedup: num_perm {num_perm} cannot make a pair at threshold {threshold} a candidate with probability "
        f"{LSH_RECALL}; raise num_perm"
    )


def candidate_probability(similarity: float, bands: int, rows: int) -> float:
    """The S-curve: the probability that two documents of Jaccard `similarity` share a band bucket."""
    return 1 - (1 - similarity**rows) ** bands


def _save(path: Path, **arrays: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def partition_unit(unit: int, unit_file: str, out_dir: str, partitions: int, exact: bool, bands: list | None) -> None:
    """Map side: this unit's hashes (exact) and band values (bands) split into partitions."""
    out = Path(out_dir)
    table = pa.ipc.open_file(pa.memory_map(unit_file)).read_all()
    rows = np.arange(table.num_rows, dtype=np.int64)
    codes = doc_codes(unit, rows)
    parts: dict[int, dict[str, np.ndarray]] = {p: {} for p in range(partitions)}
    if exact:
        keys = np.frombuffer(arrow.one_chunk(table.column("key")).buffers()[1], np.uint8)[: 16 * len(rows)]
        keys = keys.reshape(-1, 16)
        where = keys[:, :8].copy().view(np.uint64)[:, 0] % np.uint64(partitions)
        for p in range(partitions):
            parts[p].update(keys=keys[where == p], key_docs=codes[where == p])
    if bands:
        signatures = arrow.to_numpy(arrow.one_chunk(table.column("minhash")).values)
        signatures = signatures.reshape(len(rows), table.column("minhash").type.list_size)  # 0 rows too
        width = bands[0][1] - bands[0][0]
        values = np.stack([signatures[:, start:end] for start, end in bands], axis=1)  # docs, bands, width
        band_ids = np.broadcast_to(np.arange(len(bands), dtype=np.int64), (len(rows), len(bands)))
        flat_values, flat_bands = values.reshape(-1, width), band_ids.reshape(-1)
        flat_docs = np.repeat(codes, len(bands))
        where = (flat_values[:, 0] ^ flat_bands.astype(np.uint64)) % np.uint64(partitions)
        for p in range(partitions):
            mine = where == p
            parts[p].update(band_values=flat_values[mine], band_ids=flat_bands[mine], band_docs=flat_docs[mine])
    for p, arrays in parts.items():
        _save(out / f"map_u{unit:05d}_p{p:03d}.npz", **arrays)


def _group_starts(sorted_columns: np.ndarray) -> np.ndarray:
    """Where a new group begins in rows sorted so that equal rows are adjacent."""
    if len(sorted_columns) == 0:
        return np.zeros(0, bool)
    starts = np.ones(len(sorted_columns), bool)
    starts[1:] = np.any(sorted_columns[1:] != sorted_columns[:-1], axis=1)
    return starts


def resolve_partition(partition: int, units: int, out_dir: str) -> dict:
    """Reduce side: the later copies of each hash (exact duplicates) and the band buckets shared by
    two or more documents, for the hashes and buckets of this partition."""
    out = Path(out_dir)
    maps = [np.load(out / f"map_u{u:05d}_p{partition:03d}.npz") for u in range(units)]
    result = {"exact_dropped": np.zeros(0, np.int64), "group_docs": np.zeros(0, np.int64),
              "group_ids": np.zeros(0, np.int64)}  # fmt: skip
    if maps and "keys" in maps[0]:
        keys = np.concatenate([m["keys"] for m in maps])
        docs = np.concatenate([m["key_docs"] for m in maps])
        order = np.lexsort((docs, *keys.T[::-1]))  # by key, then document order
        result["exact_dropped"] = np.sort(docs[order][~_group_starts(keys[order])])
    if maps and "band_values" in maps[0]:
        values = np.concatenate([m["band_values"] for m in maps])
        bands = np.concatenate([m["band_ids"] for m in maps])
        docs = np.concatenate([m["band_docs"] for m in maps])
        columns = np.concatenate([bands[:, None].astype(np.uint64), values], axis=1)
        order = np.lexsort((docs, *columns.T[::-1]))
        group = np.cumsum(_group_starts(columns[order])) - 1
        sizes = np.bincount(group)
        shared = sizes[group] >= 2
        result["group_docs"], result["group_ids"] = docs[order][shared], group[shared]
    _save(out / f"reduce_p{partition:03d}.npz", **result)
    return {"exact": len(result["exact_dropped"]), "colliding": len(np.unique(result["group_docs"]))}


def resolve_near(partitions: int, out_dir: str, unit_files: list[str], tokenizer_file: str, ngram: int,
                 threshold: float) -> int:  # fmt: skip
    """The sequential rule over the documents in shared buckets: in document order, a document is
    dropped when a kept document that shares a bucket with it has exact Jaccard similarity of
    shingles >= `threshold` (texts decoded from their tokens: byte-level BPE gives them back
    exactly); exact duplicates take no part."""
    out = Path(out_dir)
    reduced = [np.load(out / f"reduce_p{p:03d}.npz") for p in range(partitions)]
    exact = np.concatenate([r["exact_dropped"] for r in reduced])
    docs, groups, offset = [], [], 0
    for r in reduced:  # group ids made unique across partitions
        docs.append(r["group_docs"])
        groups.append(r["group_ids"] + offset)
        offset += int(r["group_ids"].max()) + 1 if len(r["group_ids"]) else 0
    docs, groups = np.concatenate(docs), np.concatenate(groups)
    live = ~np.isin(docs, exact)
    docs, groups = docs[live], groups[live]
    order = np.argsort(docs, kind="stable")
    docs, groups = docs[order], groups[order]
    boundaries = np.flatnonzero(np.diff(docs)) + 1
    dropped = []
    if len(docs):  # documents share buckets: decode them for the exact check
        store = TokenStore([Path(f) for f in unit_files])
        tokenizer = text_only(json.loads(Path(tokenizer_file).read_text(encoding="utf-8")))

        @functools.lru_cache(maxsize=1 << 16)
        def grams(doc: int) -> frozenset:
            tokens = store.get(doc >> 32, doc & 0xFFFFFFFF)
            return frozenset(shingles(tokenizer.decode(tokens.tolist(), skip_special_tokens=False), ngram))

        kept_in: dict[int, list[int]] = defaultdict(list)  # bucket -> kept documents in it, in order
        for doc, doc_groups in zip(docs[np.r_[0, boundaries]].tolist(), np.split(groups, boundaries), strict=True):
            candidates = sorted({kept for g in doc_groups.tolist() for kept in kept_in[g]})
            if any(jaccard(grams(doc), grams(kept)) >= threshold for kept in candidates):
                dropped.append(doc)
            else:
                for g in doc_groups.tolist():
                    kept_in[g].append(doc)
    near = np.array(dropped, np.int64)
    _save(out / "dropped.npz", exact=np.sort(exact), near=near)
    return len(near)
