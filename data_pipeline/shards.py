"""Arrow IPC shards plus `manifest.json`: the contract between the data pipeline and the trainer.

Every file is written under a temporary name and renamed when complete, so a reader never sees a
half-written shard or manifest.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from common.files import atomic_write_text, sha256_file
from data_pipeline import arrow
from data_pipeline.packing import PackedSequences

MANIFEST = "manifest.json"
COLUMNS = {"tokens": pa.int32(), "doc_ids": pa.int32(), "family_ids": pa.int8()}
# loss_mask (SFT / DPO): 1 where the token is a training target; lang_ids: each token's language
OPTIONAL_COLUMNS = {"loss_mask": pa.int8(), "lang_ids": pa.int16()}


def write_shard(out_dir: Path, split: str, name: str, packed: PackedSequences) -> dict:
    """Write `packed` as `{split}/{name}.arrow` (temp name, then rename); returns its manifest entry."""
    (out_dir / split).mkdir(parents=True, exist_ok=True)
    seq_len = packed.tokens.shape[1]
    columns = {**COLUMNS, **{k: v for k, v in OPTIONAL_COLUMNS.items() if getattr(packed, k) is not None}}
    values = [getattr(packed, column).ravel().astype(t.to_pandas_dtype(), copy=False) for column, t in columns.items()]
    arrays = [pa.FixedSizeListArray.from_arrays(arrow.from_numpy(v), seq_len) for v in values]
    table = pa.Table.from_arrays(arrays, names=list(columns))
    rel = f"{split}/{name}.arrow"
    tmp = out_dir / (rel + ".tmp")
    with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    os.replace(tmp, out_dir / rel)
    return {
        "file": rel,
        "sequences": table.num_rows,
        "tokens": int((packed.doc_ids >= 0).sum()),
        "sha256": sha256_file(out_dir / rel),
    }


def write_shards(out_dir: Path, split: str, packed: PackedSequences, sequences_per_shard: int) -> list[dict]:
    """Write `packed` as `{split}/shard_XXXXX.arrow` files; returns their manifest entries."""
    return [
        write_shard(out_dir, split, f"shard_{index:05d}", packed.take(slice(start, start + sequences_per_shard)))
        for index, start in enumerate(range(0, len(packed), sequences_per_shard))
    ]


def write_dataset(
    out_dir: str | Path,
    tokenizer,
    splits: dict[str, PackedSequences],
    families: list[str],
    sequences_per_shard: int,
    **fields: Any,
) -> dict[str, Any]:
    """Shards of every split, the tokenizer and `manifest.json` (plus `fields`) in `out_dir`.

    Everything is written to `<out_dir>.building` and swapped in at the end, so an earlier dataset
    at `out_dir` stays whole until the new one is complete."""
    from data_pipeline.tokenizer import TOKENIZER_FILE

    out = Path(out_dir)
    staging = out.with_name(out.name + ".building")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    tokenizer.save(str(staging / TOKENIZER_FILE))
    manifest = {
        **manifest_header(tokenizer, int(next(iter(splits.values())).tokens.shape[1]), families),
        "padding_tokens": {split: packed.padding_tokens for split, packed in splits.items()},
        **fields,
        "splits": {name: write_shards(staging, name, packed, sequences_per_shard) for name, packed in splits.items()},
    }
    finish_dataset(staging, out, manifest)
    return manifest


def manifest_header(tokenizer, seq_len: int, families: list[str]) -> dict[str, Any]:
    """What the loader checks before reading: format, sequence length, tokenizer, families."""
    from data_pipeline.tokenizer import TOKENIZER_FILE, special_ids, tokenizer_hash

    eos, pad = special_ids(tokenizer)
    return {
        "format": 1,
        "seq_len": seq_len,
        "tokenizer_hash": tokenizer_hash(tokenizer),
        "tokenizer_file": TOKENIZER_FILE,
        "vocab_size": tokenizer.get_vocab_size(),
        "eos_id": eos,
        "pad_id": pad,
        "families": families,
    }


def finish_dataset(staging: Path, out: Path, manifest: dict[str, Any]) -> None:
    """Write the manifest last, then swap the staged folder in for `out` (one rename)."""
    write_manifest(staging, manifest)
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)


def write_manifest(out_dir: Path, manifest: dict[str, Any]) -> None:
    atomic_write_text(out_dir / MANIFEST, json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")


def read_manifest(data_dir: str | Path) -> dict[str, Any]:
    path = Path(data_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(
            f"no {MANIFEST} in {data_dir}: build the dataset first "
            f"(python -m data_pipeline build configs/data/default.yaml)"
        )
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from err


def open_shard(data_dir: Path, entry: dict, verify: bool = True) -> dict[str, np.ndarray]:
    """Memory-map one shard as numpy arrays [sequences, seq_len], checking its checksum first."""
    path = data_dir / entry["file"]
    if not path.is_file():
        raise FileNotFoundError(f"shard {path} listed in the manifest is missing")
    if verify and sha256_file(path) != entry["sha256"]:
        raise ValueError(f"shard {path} is corrupt: its sha256 differs from the manifest")
    try:
        table = pa.ipc.open_file(pa.memory_map(str(path))).read_all()
    except pa.ArrowInvalid as err:
        raise ValueError(f"shard {path} is not a readable Arrow file: {err}") from err
    out = {}
    for name in [*COLUMNS, *(c for c in OPTIONAL_COLUMNS if c in table.column_names)]:
        column = arrow.one_chunk(table.column(name))
        out[name] = arrow.to_numpy(column.flatten()).reshape(len(column), column.type.list_size)
    return out
