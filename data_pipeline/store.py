"""The token store: the build's documents after deduplication, tokenized once and kept compactly,
so a mixture or a sequence length can change without tokenizing again.

One Arrow IPC file per source file and split, `store/{train,valid}/part_XXXXX.arrow` (validation
documents are the build's held-out ones), each immutable and checksummed in the manifest's `store`
section, with one row per document:
- `tokens`: the document's token ids without EOS, as `list<uint16>` when the vocabulary fits
  (<= 65,536 ids) or `list<uint32>`: 2 or 4 bytes per token, where a packed shard takes 11;
- `family` (uint8) and `lang` (uint16): positions in the manifest's `families` and `languages`;
- `source` (uint32): the position of the document's source file in `store.sources`.
Per document that is 11 bytes besides its tokens (the list offset included).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa

from common.files import sha256_file
from data_pipeline import arrow

STORE = "store"
FORMAT = 1


def token_type(vocab_size: int) -> pa.DataType:
    """The narrowest unsigned type that holds every token id."""
    return pa.uint16() if vocab_size <= 1 << 16 else pa.uint32()


def write_part(out_dir: Path, split: str, unit: int, unit_file: str, refs: np.ndarray, vocab_size: int) -> dict:
    """Write the documents `refs` (rows of (row, family, language), in row order) of one tokenized
    unit as `store/{split}/part_{unit}.arrow`; returns its manifest entry."""
    table = pa.ipc.open_file(pa.memory_map(unit_file)).read_all()
    column = arrow.one_chunk(table.column("tokens"))
    values, offsets = arrow.to_numpy(column.values), arrow.to_numpy(column.offsets)
    rows = refs[:, 0]
    starts, lengths = offsets[rows].astype(np.int64), (offsets[rows + 1] - offsets[rows]).astype(np.int64)
    new_offsets = np.zeros(len(rows) + 1, np.int64)
    np.cumsum(lengths, out=new_offsets[1:])
    # Each output token's position in the unit's values: its document's start, plus its place in it.
    gather = np.repeat(starts - new_offsets[:-1], lengths) + np.arange(new_offsets[-1])
    dtype = token_type(vocab_size)
    tokens = arrow.from_numpy(values[gather].astype(dtype.to_pandas_dtype()))
    part = pa.table(
        {
            "tokens": pa.ListArray.from_arrays(arrow.from_numpy(new_offsets.astype(np.int32)), tokens),
            "family": arrow.from_numpy(refs[:, 1].astype(np.uint8)),
            "lang": arrow.from_numpy(refs[:, 2].astype(np.uint16)),
            "source": arrow.from_numpy(np.full(len(rows), unit, np.uint32)),
        }
    )
    rel = f"{STORE}/{split}/part_{unit:05d}.arrow"
    path = out_dir / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, part.schema) as writer:
        writer.write_table(part)
    os.replace(tmp, path)
    return {"file": rel, "documents": len(rows), "tokens": int(new_offsets[-1]), "bytes": path.stat().st_size,
            "sha256": sha256_file(path)}  # fmt: skip


def open_part(data_dir: str | Path, entry: dict, verify: bool = True) -> dict[str, np.ndarray]:
    """One store part as numpy arrays (memory-mapped): `tokens` flat, `offsets` (documents + 1), and
    per document `family`, `lang`, `source`; the checksum checked first."""
    path = Path(data_dir) / entry["file"]
    if not path.is_file():
        raise FileNotFoundError(f"token store part {path} listed in the manifest is missing")
    if verify and sha256_file(path) != entry["sha256"]:
        raise ValueError(
            f"token store part {path} is corrupt: its sha256 differs from the manifest's {entry['sha256']}"
        )
    try:
        table = pa.ipc.open_file(pa.memory_map(str(path))).read_all()
    except pa.ArrowInvalid as err:
        raise ValueError(f"token store part {path} is not a readable Arrow file: {err}") from err
    column = arrow.one_chunk(table.column("tokens"))
    out = {"tokens": arrow.to_numpy(column.values), "offsets": arrow.to_numpy(column.offsets)}
    out.update({name: arrow.to_numpy(arrow.one_chunk(table.column(name))) for name in ("family", "lang", "source")})
    return out


def store_section(vocab_size: int, sources: list[str], splits: dict[str, list[dict]]) -> dict:
    """The manifest's `store` section, with its size per token (index and metadata included)."""
    tokens = sum(e["tokens"] for entries in splits.values() for e in entries)
    size = sum(e["bytes"] for entries in splits.values() for e in entries)
    return {
        "format": FORMAT,
        "token_type": str(token_type(vocab_size)),
        "sources": sources,
        "splits": splits,
        "bytes_per_token": round(size / max(1, tokens), 4),
    }
