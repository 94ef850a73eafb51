"""Pass 1 of the build, tokenize: every source file is one unit, read, filtered, assigned its
languages' families, tokenized in batches and written with content hashes (and MinHash signatures)
to `tokenized/unit_XXXXX.arrow`, renamed into place when complete. Before it, the tokenizer,
trained on a sample of every file (`data_pipeline.tokenizer_sample`)."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
from tokenizers import Tokenizer
from tqdm import tqdm

from common.config import ConfigError
from data_pipeline import arrow
from data_pipeline.build_config import BuildConfig, NearDedupConfig
from data_pipeline.dedup import shingles
from data_pipeline.languages import language_table
from data_pipeline.sources import LanguageIdentifier, SourceConfig, read_file
from data_pipeline.tokenizer import encode_batch, fast_encoder, text_only, train_bpe
from data_pipeline.tokenizer_sample import (
    MAX_BYTES_PER_CHAR,
    LanguageSamples,
    TokenizerSample,
    balanced_sample,
    sample_file,
)

BATCH_CHARS = 1 << 22  # characters per tokenizer call at most, whatever the documents' length
MINHASH_SCHEME = "affine32"  # datasketch's default; stored signatures are only comparable within one scheme


@dataclass
class Unit:
    index: int
    source: SourceConfig
    path: str  # an absolute local path or an fsspec URL


_WORKER: dict = {}


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
            columns["chars"].append(len(doc.text))
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
        "chars": arrow.from_numpy(np.array(columns["chars"], np.int64)),
        "tokens": _list_array(columns["values"], columns["lengths"]),
        "key": arrow.fixed_binary(columns["key"], 16),
    }
    if near is not None:
        signatures = np.concatenate(columns["minhash"]) if columns["minhash"] else np.zeros(0, np.uint64)
        arrays["minhash"] = pa.FixedSizeListArray.from_arrays(arrow.from_numpy(signatures), near.num_perm)
    table_ = pa.table(arrays).replace_schema_metadata({"source": unit.path})  # named if it ends up empty
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


def train_tokenizer(config: BuildConfig, units: list[Unit], engine) -> tuple[Tokenizer, TokenizerSample]:
    """A byte-level BPE trained on a sample fair to every language (`data_pipeline.tokenizer_sample`),
    each source file sampled by its own unit."""
    budget = config.tokenizer.sample_chars_per_language
    items = [(u.path, u.source, u.index, config.families_file, budget, config.seed) for u in units]
    samples = LanguageSamples(MAX_BYTES_PER_CHAR * budget)
    for _, sample in tqdm(engine.map_unordered(sample_file, items), total=len(items), desc="tokenizer sample"):
        samples.merge(sample)
    if not samples.heaps:
        raise ConfigError("sources: no documents found")
    sample = balanced_sample(samples.sorted(), budget)
    return train_bpe(sample.texts, config.tokenizer.vocab_size), sample


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
