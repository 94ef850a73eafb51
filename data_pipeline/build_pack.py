"""Pass 4 of the build, pack: every concat train shard packed and written by its own unit as the
plan says, recorded in `progress.json` as it completes, so a resumed build skips finished shards."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from tqdm import tqdm

from common.files import atomic_write_text
from data_pipeline.build_plan import FamilyLabels, TokenStore, documents_of
from data_pipeline.packing import pack_concat_shard
from data_pipeline.shards import write_shard

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
    packed = pack_concat_shard(list(documents_of(_STORES[unit_files], refs)), offset, seq_len, eos, pad, rows)
    return write_shard(Path(staging), "train", f"shard_{index:05d}", label(packed))


def write_train_shards(config, summary: dict, unit_files, staging: Path, engine, progress: dict, eos, pad):
    """Concat train shards, packed and written by the engine's workers as the plan says; a shard in
    `progress.json` is not written again. Returns their entries and padding."""
    if "train" in summary:  # best fit: written by the planning unit (or no shards at all)
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
