"""Training sequences mixed by family ratios and packed at load time from a build's token store
(`data_pipeline.store`): a new mixture, total or sequence length needs no rebuild.

The draw is the build's own (`mixing.mix_documents` over the same documents in the same order),
so a `MixConfig` that changes nothing gives exactly the build's packed sequences; every setting left
unset (None) is the build's. Sequence `i` is positions [i * seq_len, (i + 1) * seq_len) of the
concat stream of the drawn documents, each closed by EOS (the last sequence padded), assembled from
the memory-mapped store when asked for: the batch of a step depends only on (config, seed, step).
Validation sequences are each family's held-out documents, one stream per family, as in the build.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from common.config import ConfigError, check_fields
from data_pipeline.loader import Batch, batch_of
from data_pipeline.mixing import draw_summary, mix_documents
from data_pipeline.packing import PackedSequences
from data_pipeline.shards import read_manifest
from data_pipeline.store import open_part


@dataclass
class MixConfig:
    """How the loader mixes and packs a token store; None: as the build did."""

    ratios: dict[str, float] | str | None = None  # family -> weight, or "from FILE" (optimal-mix's output)
    temperature: float | None = None  # with no ratios: p ~ tokens^(1/T)
    total_tokens: int | None = None  # training tokens drawn; 0: every token once
    max_epochs: float | None = None  # no family repeated more often (its share then falls short)
    seq_len: int | None = None
    packing: str | None = None  # concat (the loader packs concat only, for now)
    seed: int | None = None

    def __post_init__(self):
        check_fields(self, total_tokens=">= 0", max_epochs="> 0", seq_len=">= 2", temperature="> 0")

    def resolved(self, built: dict) -> MixConfig:
        """Unset settings from the build's config; ratios and temperature come as a pair (setting one
        drops the build's other)."""
        own_weights = self.ratios is not None or self.temperature is not None
        out = replace(
            self,
            ratios=self.ratios if own_weights else built.get("ratios") or {},
            temperature=self.temperature if own_weights else built.get("temperature"),
            **{k: built.get(k) for k in ("total_tokens", "max_epochs", "seq_len", "packing", "seed")
               if getattr(self, k) is None},
        )  # fmt: skip
        out.ratios = out.ratios or {}
        if out.packing != "concat":
            raise ConfigError(
                f"data.mix.packing: the loader packs 'concat' only, got {out.packing!r} (the build's, unless set); "
                "set data.mix.packing=concat",
                "data.mix.packing",
            )
        if out.total_tokens == 0 and (out.ratios or out.temperature is not None):
            raise ConfigError(
                "data.mix.total_tokens: 0 (every token once, in the data's own proportions) cannot be mixed by ratios "
                "or temperature; set data.mix.total_tokens",
                "data.mix.total_tokens",
            )
        return out


class _Documents:
    """A split of the token store: its parts' tokens (memory-mapped) and per document its family,
    part and first token's position in that part."""

    def __init__(self, tokens: list[np.ndarray], family: np.ndarray, part: np.ndarray, start: np.ndarray):
        self.tokens, self.family, self.part, self.start = tokens, family, part, start


def document_table(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Per document of the parts, in order: family, length (tokens, EOS excluded), part, start."""

    def joined(arrays) -> np.ndarray:
        return np.concatenate([a.astype(np.int64) for a in arrays]) if parts else np.zeros(0, np.int64)

    return {
        "family": joined(p["family"] for p in parts),
        "length": joined(np.diff(p["offsets"]) for p in parts),
        "part": joined(np.full(len(p["family"]), k) for k, p in enumerate(parts)),
        "start": joined(p["offsets"][:-1] for p in parts),
    }


class _Stream:
    """Documents laid end to end, each closed by EOS, cut into rows of `seq_len` tokens, the last one
    padded: `pack_concat_shard`'s rows, assembled for any set of rows from the memory-mapped parts.
    `sizes` are the documents' tokens in the stream (EOS included), `ends` their running sum."""

    def __init__(self, docs: np.ndarray, sizes: np.ndarray, ends: np.ndarray, store: _Documents, seq_len: int):
        self.docs, self.sizes, self.ends, self.store, self.seq_len = docs, sizes, ends, store, seq_len
        self.total = int(ends[-1]) if len(ends) else 0
        self.rows = -(-self.total // seq_len)

    def sequences(self, rows: np.ndarray, eos: int, pad: int) -> PackedSequences:
        """Rows `rows`: each row's stretch of the stream cut into one segment per document it touches
        (array operations per segment), then every segment's tokens copied as one slice of its
        memory-mapped part: the cost per token is a copy, not an index computation."""
        rows = np.asarray(rows, np.int64)
        starts = rows * self.seq_len
        stops = np.minimum(starts + self.seq_len, self.total)
        first = np.searchsorted(self.ends, starts, side="right")  # the document at each row's start
        per_row = np.searchsorted(self.ends, stops - 1, side="right") - first + 1
        segment_row = np.repeat(np.arange(len(rows)), per_row)
        doc = np.repeat(first - np.cumsum(per_row) + per_row, per_row) + np.arange(int(per_row.sum()))
        doc_start = self.ends[doc] - self.sizes[doc]
        low = np.maximum(doc_start, starts[segment_row]) - doc_start  # the segment's offsets in its document,
        high = np.minimum(self.ends[doc], stops[segment_row]) - doc_start  # whose last position is its EOS
        closes = high == self.sizes[doc]
        gid = self.docs[doc]
        begin = self.store.start[gid] + low
        end = self.store.start[gid] + np.minimum(high, self.sizes[doc] - 1)
        parts, closing = self.store.part[gid].tolist(), closes.tolist()
        eos_piece = np.array([eos], self.store.tokens[0].dtype if self.store.tokens else np.int32)
        pieces = []
        for k, a, b, c in zip(parts, begin.tolist(), end.tolist(), closing, strict=True):
            pieces.append(self.store.tokens[k][a:b])
            if c:
                pieces.append(eos_piece)
        length = high - low
        values = np.concatenate(pieces) if pieces else np.zeros(0, np.int32)
        doc_values = np.repeat((doc - first[segment_row]).astype(np.int32), length)
        family_values = np.repeat(self.store.family[gid].astype(np.int16), length)
        shape = (len(rows), self.seq_len)
        tokens = np.full(shape, pad, np.int32)
        doc_ids, family = np.full(shape, -1, np.int32), np.full(shape, -1, np.int16)
        real = (stops - starts).tolist()
        if sum(real) == tokens.size:  # no row reaches the stream's padded end
            tokens[:], doc_ids[:], family[:] = (v.reshape(shape) for v in (values, doc_values, family_values))
        else:
            offset = 0
            for r, n in enumerate(real):
                tokens[r, :n] = values[offset : offset + n]
                doc_ids[r, :n] = doc_values[offset : offset + n]
                family[r, :n] = family_values[offset : offset + n]
                offset += n
        return PackedSequences(tokens=tokens, doc_ids=doc_ids, family_ids=family)


class MixedDataset:
    """The sequences of one split, mixed and packed from the token store; the interface of
    `loader.PackedDataset` (length, `get`, `manifest`, `families`, `fingerprint`).

    With `cache_dir`, the split's index (which documents, in which order, where each one's tokens
    are: O(documents) arrays) is made once per store and mix, by the first process to open it, and
    memory-mapped by every process after, as Megatron caches its dataset indices: a process's
    resident memory then does not grow with the corpus, and the parts' checksums are read once,
    when the index is made (later opens check each part's size)."""

    has_loss_mask = False

    def __init__(self, data_dir: str | Path, mix: MixConfig, split: str = "train", tokenizer_hash: str | None = None,
                 verify_checksums: bool = True, cache_dir: str | Path | None = None):  # fmt: skip
        self.data_dir = Path(data_dir)
        built = read_manifest(self.data_dir)
        if tokenizer_hash is not None and built["tokenizer_hash"] != tokenizer_hash:
            raise ValueError(
                f"{self.data_dir / 'manifest.json'}: the token store was tokenized with tokenizer "
                f"{built['tokenizer_hash']}, not {tokenizer_hash}"
            )
        store = built.get("store")
        if store is None:
            raise ValueError(
                f"{self.data_dir / 'manifest.json'}: no token store (built before stores were written): rebuild it "
                "to mix at load time, or drop data.mix to train on its packed shards"
            )
        self.mix = mix.resolved(built["config"])
        self.families: list[str] = built["families"]
        self.eos, self.pad = built["eos_id"], built["pad_id"]
        self.split, entries = split, store["splits"][split]
        digests = "".join(e["sha256"] for e in entries)
        mixture = json.dumps(asdict(self.mix), sort_keys=True, default=str)
        self.fingerprint = hashlib.sha256((digests + mixture).encode()).hexdigest()[:16]
        if cache_dir is None:
            parts = [open_part(self.data_dir, e, verify_checksums) for e in entries]
            arrays, meta = self._make_index(parts)
        else:
            folder = Path(cache_dir).expanduser() / "index" / f"{split}-{self.fingerprint}"
            parts, arrays, meta = self._cached_index(folder, entries, verify_checksums)
        documents = _Documents([p["tokens"] for p in parts], arrays["family"], arrays["part"], arrays["start"])
        self.streams = [
            _Stream(arrays[f"stream{i}.docs"], arrays[f"stream{i}.sizes"], arrays[f"stream{i}.ends"], documents,
                    self.mix.seq_len)
            for i in range(meta["streams"])
        ]  # fmt: skip
        self.warnings: list[str] = meta["warnings"]
        self._row_ends = np.cumsum([s.rows for s in self.streams])
        self.manifest = {**built, "seq_len": self.mix.seq_len}
        if split == "train":  # the build's per-family sizes, with this draw's shares (none for a family left out)
            undrawn = {"ratio": 0.0, "share": 0.0, "tokens": 0, "documents": 0, "epochs": 0.0}
            self.manifest["family_stats"] = {
                f: {**stats, **meta["family_stats"].get(f, undrawn)} for f, stats in built["family_stats"].items()
            }

    def _make_index(self, parts: list[dict]) -> tuple[dict[str, np.ndarray], dict]:
        """The split's index arrays: per document family, part and start; per stream (train: the
        drawn mixture; valid: each family's held-out documents in store order) its documents, their
        sizes in the stream and the running end."""
        table = document_table(parts)
        meta: dict = {"family_stats": {}, "warnings": []}
        if self.split == "train":
            streams = [self._draw(table, meta)]
        else:
            streams = [
                (docs, table["length"][docs] + 1)
                for docs in (np.flatnonzero(table["family"] == f) for f in range(len(self.families)))
                if len(docs)
            ]
        arrays = {name: table[name] for name in ("family", "part", "start")}
        for i, (docs, sizes) in enumerate(streams):
            arrays.update({f"stream{i}.docs": docs, f"stream{i}.sizes": sizes, f"stream{i}.ends": np.cumsum(sizes)})
        meta["streams"] = len(streams)
        return arrays, meta

    def _draw(self, table: dict[str, np.ndarray], meta: dict) -> tuple[np.ndarray, np.ndarray]:
        """The build's draw (`mixing.mix_documents`) over the store's training documents: the
        documents in training order, and each one's tokens in the stream (a cut one's kept tokens)."""
        by_family = {f: np.flatnonzero(table["family"] == i) for i, f in enumerate(self.families)}
        lengths = {f: table["length"][docs] for f, docs in by_family.items()}
        m = self.mix
        mixture = mix_documents(lengths, m.ratios, m.temperature, m.total_tokens, m.seed, m.max_epochs,
                                key="data.mix.ratios", where=str(self.data_dir))  # fmt: skip
        rows = mixture.rows
        docs = np.empty(len(rows), np.int64)
        for position, family in enumerate(mixture.families):
            mine = rows[:, 0] == position
            docs[mine] = by_family[family][rows[mine, 1]]
        meta["family_stats"], meta["warnings"] = draw_summary(mixture.draws), mixture.warnings
        return docs, np.where(rows[:, 2] < 0, table["length"][docs], rows[:, 2]) + 1

    def _cached_index(self, folder: Path, entries: list[dict], verify: bool):
        """The index in `folder`, made there first if absent (one process per cache at a time: the
        others wait, then map what it wrote; a folder appears whole, by rename)."""
        folder.parent.mkdir(parents=True, exist_ok=True)
        with open(folder.parent / f"{folder.name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            made = not (folder / "meta.json").is_file()
            if not made:  # the checksums were read when the index was made; here, that no part was replaced
                for entry in entries:
                    path = self.data_dir / entry["file"]
                    if path.is_file() and path.stat().st_size != entry["bytes"]:
                        raise ValueError(f"token store part {path} is {path.stat().st_size} bytes, the manifest says "
                                         f"{entry['bytes']}: it changed since {folder} was made")  # fmt: skip
            parts = [open_part(self.data_dir, e, verify and made) for e in entries]
            if made:
                arrays, meta = self._make_index(parts)
                tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir()
                for name, array in arrays.items():
                    np.save(tmp / f"{name}.npy", array)
                (tmp / "meta.json").write_text(json.dumps(meta))
                os.replace(tmp, folder)
        meta = json.loads((folder / "meta.json").read_text())
        arrays = {f.stem: np.load(f, mmap_mode="r") for f in folder.glob("*.npy")}
        return parts, arrays, meta

    def __len__(self) -> int:
        return int(self._row_ends[-1]) if len(self._row_ends) else 0

    def sequences(self, indices: np.ndarray) -> PackedSequences:
        """Rows `indices` of the split, packed as the build packs them."""
        indices = np.asarray(indices, np.int64)
        stream = np.searchsorted(self._row_ends, indices, side="right")
        first_row = np.concatenate([[0], self._row_ends[:-1]])
        out = None
        for s in np.unique(stream).tolist():
            mine = np.flatnonzero(stream == s)
            packed = self.streams[s].sequences(indices[mine] - first_row[s], self.eos, self.pad)
            if out is None:
                shape = (len(indices), packed.tokens.shape[1])
                out = PackedSequences(*(np.empty(shape, a.dtype) for a in (packed.tokens, packed.doc_ids,
                                                                           packed.family_ids)))  # fmt: skip
            out.tokens[mine], out.doc_ids[mine], out.family_ids[mine] = packed.tokens, packed.doc_ids, packed.family_ids
        return out

    def get(self, indices: np.ndarray) -> Batch:
        packed = self.sequences(indices)
        return batch_of(packed.tokens, packed.doc_ids, packed.family_ids, None, indices)
