"""Pass 3 of the build, plan (one unit): the kept documents and where each goes in the token store,
the mixture drawn by family ratios from the selection, and with `shards: true` the packed plan: the
concat shard plan (which documents each train shard holds, packed later by many workers) or the
best-fit train shards themselves, and the validation shards."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from common.files import atomic_write_text
from data_pipeline.build_config import BuildConfig
from data_pipeline.build_select import Selection, select_documents
from data_pipeline.dedup import TokenStore
from data_pipeline.mixing import draw_summary, mix_documents
from data_pipeline.packing import (
    PackedSequences,
    best_fit_bins,
    best_fit_window,
    concat_shard_plan,
    pack_bins,
    pack_documents,
    split_long_documents,
)
from data_pipeline.shards import write_shard


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


def documents_of(store: TokenStore, refs) -> Iterator[tuple[int, np.ndarray]]:
    for unit, row, lang, keep in refs:
        tokens = store.get(unit, row)
        yield lang, tokens if keep < 0 else tokens[:keep]


def pack_best_fit_train(config, refs: np.ndarray, store: TokenStore, label, eos, pad, writer: ShardWriter) -> int:
    """Best fit inside windows of documents (bounded memory); returns the documents split into
    sequence-long pieces."""
    split, rows = 0, config.sequences_per_shard
    window = best_fit_window(rows, config.seq_len)
    for start in tqdm(range(0, len(refs), window), desc="pack (best fit)", unit="window", leave=False):
        docs = list(documents_of(store, refs[start : start + window].tolist()))
        pieces = split_long_documents(docs, config.seq_len)
        split += sum(len(t) >= config.seq_len for _, t in docs)
        bins = best_fit_bins([len(p[1]) + p[2] for p in pieces], config.seq_len)
        writer.write_all(label(pack_bins(pieces, config.seq_len, eos, pad, bins)), rows)
    return split


def plan_build(config: BuildConfig, unit_files: list[str], staging: str, eos: int, pad: int) -> dict:
    """The build's one sequential unit, run by the engine (on Ray a worker, not the driver; the local
    engine runs a lone unit in its own process): the kept documents per family, validation held out,
    where each goes in the token store, the mixture's per-family draw (the manifest's family_stats;
    the loader draws the same one), and with `shards: true` the packed shards' plan. Writes
    `plan/summary.json` (what the manifest needs) and returns it."""
    staging_dir, files = Path(staging), [Path(f) for f in unit_files]
    plan_dir = staging_dir / "plan"
    plan_dir.mkdir(exist_ok=True)
    selection = select_documents(config, files, staging_dir / "dedup" / "dropped.npz")
    families = sorted(set(selection.train) | set(selection.valid))
    mixture = mix_documents(selection.train_lengths, config.ratios, config.temperature, config.total_tokens,
                            config.seed, config.max_epochs)  # fmt: skip
    store = TokenStore(files)
    summary: dict = {"families": families, "languages": selection.languages, "split_docs": 0}
    refs_for_store = store_refs(selection, families)
    _save_array(plan_dir / "store_refs.npy", refs_for_store)
    summary["store_slices"] = store_slices(refs_for_store, len(files))
    summary["valid"] = {"entries": [], "padding": 0}
    summary["train"] = {"entries": [], "padding": 0}
    if config.shards:
        plan_shards(config, selection, mixture, store, families, staging_dir, eos, pad, summary)
    summary["family_stats"] = {
        family: {
            **stats,
            "valid_documents": len(selection.valid[family]),
            "valid_tokens": selection.valid_size[family]["tokens"],
            "valid_characters": selection.valid_size[family]["characters"],
        }
        for family, stats in draw_summary(mixture.draws).items()
    }
    summary.update(
        warnings=mixture.warnings + selection_warnings(config, selection),
        duplicates=selection.duplicates,
        near_duplicates=selection.near_duplicates,
    )
    atomic_write_text(plan_dir / "summary.json", json.dumps(summary))
    return summary


def plan_shards(config, selection: Selection, mixture, store: TokenStore, families, staging_dir: Path, eos: int,
                pad: int, summary: dict) -> None:  # fmt: skip
    """With `shards: true`, the plan packed: for concat the train shard plan (each shard's documents,
    packed later by many workers), for best_fit the train shards themselves, and the validation
    shards, one set per family. Fills `summary`'s train and valid entries."""
    refs, sizes = mixture_refs(selection, mixture.rows, mixture.families)
    label = FamilyLabels.of(selection.languages, families)
    plan_dir = staging_dir / "plan"
    if config.packing == "concat":
        _save_array(plan_dir / "train_refs.npy", refs)
        plan = np.array(concat_shard_plan(sizes, config.seq_len, config.sequences_per_shard), np.int64)
        _save_array(plan_dir / "train_plan.npy", plan.reshape(-1, 3))
        summary["train_shards"] = len(plan)
        del summary["train"]  # written by `build_pack.write_train_shards`
    else:
        writer = ShardWriter(staging_dir, "train")
        summary["split_docs"] = pack_best_fit_train(config, refs, store, label, eos, pad, writer)
        summary["train"] = {"entries": writer.entries, "padding": writer.padding}
    for family in families:
        docs = [(lang, store.get(u, r)) for u, r, lang in selection.valid[family]]
        if not docs:
            continue
        writer = ShardWriter(staging_dir, "valid", family)
        writer.write_all(label(pack_documents(docs, config.seq_len, eos, pad)), config.sequences_per_shard)
        summary["valid"]["entries"] += writer.entries
        summary["valid"]["padding"] += writer.padding


def store_refs(selection: Selection, families: list[str]) -> np.ndarray:
    """Every kept document as (split: 0 train / 1 valid, unit, row, family position, language id),
    sorted, so each (split, unit) of the token store is one slice."""
    blocks = [
        np.column_stack([np.full(len(refs), split), refs[:, 0], refs[:, 1], np.full(len(refs), families.index(f)),
                         refs[:, 2]])
        for split, by_family in enumerate((selection.train, selection.valid))
        for f, refs in by_family.items()
    ]  # fmt: skip
    refs = np.concatenate(blocks).astype(np.int64)
    return refs[np.lexsort(refs[:, ::-1].T)]


def store_slices(refs: np.ndarray, units: int) -> list[list[list[int]]]:
    """Per split and unit, the [start, end) of its rows in `store_refs`."""
    keys = refs[:, 0] * (1 << 40) + refs[:, 1]
    bounds = np.searchsorted(keys, [split * (1 << 40) + u for split in (0, 1) for u in range(units + 1)])
    bounds = bounds.reshape(2, units + 1)
    return [[[int(b[u]), int(b[u + 1])] for u in range(units)] for b in bounds]


def selection_warnings(config: BuildConfig, selection: Selection) -> list[str]:
    """What the sources could not give: files the filters emptied, and families too small to hold out
    `valid_docs_per_family` documents."""
    warnings = []
    for source in selection.empty_sources:
        warnings.append(
            f"{source}: no document left after the length filters (min_chars, max_chars) or blank records; "
            "nothing of it is in the dataset"
        )
    for family, held in selection.valid.items():
        if len(held) < config.valid_docs_per_family:
            warnings.append(
                f"family {family!r}: {len(held)} validation document(s) held out of the {config.valid_docs_per_family} "
                f"asked (a family holds out at most a fifth of its documents); its validation loss is noisy"
            )
    return warnings
