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

import difflib
import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from common.config import ConfigError, check_fields
from common.locks import waiting
from data_pipeline.build_config import PACKINGS
from data_pipeline.loader import Batch, batch_of
from data_pipeline.mixing import draw_summary, mix_documents
from data_pipeline.packing import PackedSequences, best_fit_bins, best_fit_window
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
    packing: str | None = None  # concat (documents cut at row ends) | best_fit (whole documents, rows padded)
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
        if out.packing not in PACKINGS:
            near = difflib.get_close_matches(str(out.packing), PACKINGS, n=1)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            raise ConfigError(
                f"data.mix.packing: {out.packing!r} is not one of {list(PACKINGS)}{hint}", "data.mix.packing"
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


def _assemble(store: _Documents, gid, begin, end, closes, local_doc, real: list[int], seq_len: int, eos: int,
              pad: int) -> PackedSequences:  # fmt: skip
    """Rows from segments, in row order: segment i is tokens [begin[i], end[i]) of document gid[i]'s
    part, then its EOS if `closes[i]`, numbered `local_doc[i]` in its row; row r holds real[r] tokens,
    then padding. Each segment is one slice copy: the cost per token is a copy, not an index."""
    eos_piece = np.array([eos], store.tokens[0].dtype if store.tokens else np.int32)
    pieces = []
    for k, a, b, c in zip(store.part[gid].tolist(), begin.tolist(), end.tolist(), closes.tolist(), strict=True):
        pieces.append(store.tokens[k][a:b])
        if c:
            pieces.append(eos_piece)
    length = end - begin + closes
    values = np.concatenate(pieces) if pieces else np.zeros(0, np.int32)
    doc_values = np.repeat(local_doc.astype(np.int32), length)
    family_values = np.repeat(store.family[gid].astype(np.int16), length)
    shape = (len(real), seq_len)
    tokens = np.full(shape, pad, np.int32)
    doc_ids, family = np.full(shape, -1, np.int32), np.full(shape, -1, np.int16)
    if sum(real) == tokens.size:  # no padding
        tokens[:], doc_ids[:], family[:] = (v.reshape(shape) for v in (values, doc_values, family_values))
    else:
        offset = 0
        for r, n in enumerate(real):
            tokens[r, :n] = values[offset : offset + n]
            doc_ids[r, :n] = doc_values[offset : offset + n]
            family[r, :n] = family_values[offset : offset + n]
            offset += n
    return PackedSequences(tokens=tokens, doc_ids=doc_ids, family_ids=family)


class _Stream:
    """Documents laid end to end, each closed by EOS, cut into rows of `seq_len` tokens, the last one
    padded: `pack_concat_shard`'s rows, assembled for any set of rows from the memory-mapped parts.
    `sizes` are the documents' tokens in the stream (EOS included), `ends` their running sum."""

    def __init__(self, docs: np.ndarray, sizes: np.ndarray, ends: np.ndarray, store: _Documents, seq_len: int):
        self.docs, self.sizes, self.ends, self.store, self.seq_len = docs, sizes, ends, store, seq_len
        self.total = int(ends[-1]) if len(ends) else 0
        self.rows = -(-self.total // seq_len)

    def sequences(self, rows: np.ndarray, eos: int, pad: int) -> PackedSequences:
        """Rows `rows`: each row's stretch of the stream cut into one segment per document it
        touches, by array operations per segment."""
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
        gid = self.docs[doc]
        begin = self.store.start[gid] + low
        end = self.store.start[gid] + np.minimum(high, self.sizes[doc] - 1)
        closes = (high == self.sizes[doc]).astype(np.int64)
        real = (stops - starts).tolist()
        return _assemble(self.store, gid, begin, end, closes, doc - first[segment_row], real, self.seq_len, eos, pad)


def best_fit_rows(docs: np.ndarray, sizes: np.ndarray, seq_len: int, window: int) -> dict[str, np.ndarray]:
    """The rows `build_plan.pack_best_fit_train` packs from documents `docs` of `sizes` (EOS
    included), as segments: best-fit decreasing inside windows of `window` documents, a document
    longer than a row first cut into row-long pieces (no EOS) and a closing piece. Per segment its
    document, first token, tokens and whether its EOS follows; per row its segments' end and its
    tokens."""
    doc, offset, count, closes, row_ends, real = [], [], [], [], [], []
    for start in range(0, len(docs), window):
        pieces = []
        for d, size in zip(docs[start : start + window].tolist(), sizes[start : start + window].tolist(), strict=True):
            tokens, at = size - 1, 0
            while tokens >= seq_len:
                pieces.append((d, at, seq_len, 0))
                at, tokens = at + seq_len, tokens - seq_len
            pieces.append((d, at, tokens, 1))
        for members in best_fit_bins([n + c for _, _, n, c in pieces], seq_len):
            for m in members:
                for column, value in zip((doc, offset, count, closes), pieces[m], strict=True):
                    column.append(value)
            row_ends.append(len(doc))
            real.append(sum(pieces[m][2] + pieces[m][3] for m in members))
    return {name: np.array(values, np.int64) for name, values in
            (("doc", doc), ("offset", offset), ("count", count), ("closes", closes), ("row_ends", row_ends),
             ("real", real))}  # fmt: skip


class _Bins:
    """Rows of whole documents (`best_fit_rows`), each padded, assembled from the memory-mapped parts."""

    def __init__(self, table: dict[str, np.ndarray], store: _Documents, seq_len: int):
        self.table, self.store, self.seq_len = table, store, seq_len
        self.rows = len(table["row_ends"])

    def sequences(self, rows: np.ndarray, eos: int, pad: int) -> PackedSequences:
        t, rows = self.table, np.asarray(rows, np.int64)
        first = np.where(rows > 0, t["row_ends"][rows - 1], 0)
        per_row = t["row_ends"][rows] - first
        segment = np.repeat(first - np.cumsum(per_row) + per_row, per_row) + np.arange(int(per_row.sum()))
        gid = t["doc"][segment]
        begin = self.store.start[gid] + t["offset"][segment]
        local = segment - np.repeat(first, per_row)
        closes = t["closes"][segment]
        real = t["real"][rows].tolist()
        return _assemble(self.store, gid, begin, begin + t["count"][segment], closes, local, real, self.seq_len, eos,
                         pad)  # fmt: skip


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
        self._sequences_per_shard = built["config"]["sequences_per_shard"]
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
        self.streams: list[_Stream | _Bins] = [
            _Stream(arrays[f"stream{i}.docs"], arrays[f"stream{i}.sizes"], arrays[f"stream{i}.ends"], documents,
                    self.mix.seq_len)
            for i in range(meta["streams"])
        ]  # fmt: skip
        if meta["bins"]:
            bins = {name[5:]: values for name, values in arrays.items() if name.startswith("bins.")}
            self.streams.append(_Bins(bins, documents, self.mix.seq_len))
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
        meta: dict = {"family_stats": {}, "warnings": [], "bins": False}
        arrays = {name: table[name] for name in ("family", "part", "start")}
        if self.split == "train" and self.mix.packing == "best_fit":
            docs, sizes = self._draw(table, meta)
            window = best_fit_window(self._sequences_per_shard, self.mix.seq_len)  # as the build's best fit
            bins = best_fit_rows(docs, sizes, self.mix.seq_len, window)
            arrays.update({f"bins.{name}": values for name, values in bins.items()})
            meta.update(bins=True, streams=0)
            return arrays, meta
        if self.split == "train":
            streams = [self._draw(table, meta)]
        else:
            streams = [
                (docs, table["length"][docs] + 1)
                for docs in (np.flatnonzero(table["family"] == f) for f in range(len(self.families)))
                if len(docs)
            ]
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
        with waiting(folder.parent / f"{folder.name}.lock"):
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
                try:
                    shutil.rmtree(tmp, ignore_errors=True)
                    tmp.mkdir()
                    for name, array in arrays.items():
                        np.save(tmp / f"{name}.npy", array)
                    (tmp / "meta.json").write_text(json.dumps(meta))
                    os.replace(tmp, folder)
                except OSError as err:  # a full or read-only cache: this process keeps the index in memory
                    shutil.rmtree(tmp, ignore_errors=True)
                    note = (
                        f"could not cache the data index in {folder.parent} ({err}); it stays in this process's memory"
                    )
                    meta = {**meta, "warnings": [*meta["warnings"], note]}
                    return parts, arrays, meta
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
