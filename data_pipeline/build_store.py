"""Pass 5 of the build, store: the kept documents of every tokenized unit written to the token
store (`data_pipeline.store`) by its own engine unit, train and validation split as the plan
held them out, recorded in `progress.json` as each completes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from tqdm import tqdm

from common.files import atomic_write_text
from data_pipeline.store import store_section, write_part

SPLITS = ("train", "valid")


def write_unit_parts(staging: str, unit: int, unit_file: str, vocab_size: int, slices: list[list[int]]) -> list:
    """One unit's store parts (a worker's task): its `slices` (per split) of the plan's `store_refs.npy`."""
    refs = np.load(Path(staging) / "plan" / "store_refs.npy", mmap_mode="r")
    entries = []
    for split, (lo, hi) in zip(SPLITS, slices, strict=True):
        if hi > lo:
            part = write_part(Path(staging), split, unit, unit_file, np.asarray(refs[lo:hi, 2:]), vocab_size)
            entries.append({"split": split, **part})
    return entries


def write_store(summary: dict, unit_files: list[Path], sources: list[str], staging: Path, engine, progress: dict,
                vocab: int) -> dict:  # fmt: skip
    """Every unit's parts, by the engine's workers; a unit in `progress.json` is not written again.
    Returns the manifest's `store` section."""
    done = progress.setdefault("store_units", {})
    slices = summary["store_slices"]
    todo = [(str(staging), u, str(f), vocab, [slices[0][u], slices[1][u]])
            for u, f in enumerate(unit_files) if str(u) not in done]  # fmt: skip
    bar = tqdm(total=len(unit_files), initial=len(unit_files) - len(todo), desc="token store", unit="file")
    for i, entries in engine.map_unordered(write_unit_parts, todo):
        done[str(todo[i][1])] = entries
        atomic_write_text(staging / "progress.json", json.dumps(progress))
        bar.update(1)
    bar.close()
    splits = {split: [] for split in SPLITS}
    for u in range(len(unit_files)):
        for entry in done[str(u)]:
            splits[entry["split"]].append({k: v for k, v in entry.items() if k != "split"})
    return store_section(vocab, sources, splits)
