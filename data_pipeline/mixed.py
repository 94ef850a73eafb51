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

import hashlib
import json
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
    """A split of the token store: per document its family, token count, part and first token's
    position in that part (the parts' tokens stay memory-mapped)."""

    def __init__(self, data_dir: Path, entries: list[dict], verify: bool):
        parts = [open_part(data_dir, e, verify) for e in entries]
        self.tokens = [p["tokens"] for p in parts]

        def joined(arrays) -> np.ndarray:
            return np.concatenate([a.astype(np.int64) for a in arrays]) if parts else np.zeros(0, np.int64)

        self.family = joined(p["family"] for p in parts)
        self.length = joined(np.diff(p["offsets"]) for p in parts)
        self.part = joined(np.full(len(p["family"]), k) for k, p in enumerate(parts))
        self.start = joined(p["offsets"][:-1] for p in parts)


class _Stream:
    """Documents laid end to end, each closed by EOS (`keep` >= 0: only its first `keep` tokens), cut
    into rows of `seq_len` tokens, the last one padded: `pack_concat_shard`'s rows, assembled for
    any set of rows by array operations over the memory-mapped parts."""

    def __init__(self, docs: np.ndarray, keep: np.ndarray, store: _Documents, seq_len: int):
        self.docs, self.store, self.seq_len = docs, store, seq_len
        self.sizes = np.where(keep < 0, store.length[docs], keep) + 1
        self.ends = np.cumsum(self.sizes)
        self.total = int(self.ends[-1]) if len(self.sizes) else 0
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
    `loader.PackedDataset` (length, `get`, `manifest`, `families`, `fingerprint`)."""

    has_loss_mask = False

    def __init__(self, data_dir: str | Path, mix: MixConfig, split: str = "train", tokenizer_hash: str | None = None,
                 verify_checksums: bool = True):  # fmt: skip
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
        documents = _Documents(self.data_dir, store["splits"][split], verify_checksums)
        self.warnings: list[str] = []
        if split == "train":
            self.streams = [self._draw(documents)]
        else:  # one stream per family, its held-out documents in store order
            self.streams = [
                _Stream(np.flatnonzero(documents.family == f), np.full(int((documents.family == f).sum()), -1),
                        documents, self.mix.seq_len)
                for f in range(len(self.families)) if (documents.family == f).any()
            ]  # fmt: skip
        self._row_ends = np.cumsum([s.rows for s in self.streams])
        self.manifest = {**built, "seq_len": self.mix.seq_len}
        if split == "train":  # the build's per-family sizes, with this draw's shares (none for a family left out)
            undrawn = {"ratio": 0.0, "share": 0.0, "tokens": 0, "documents": 0, "epochs": 0.0}
            self.manifest["family_stats"] = {
                f: {**stats, **self._family_stats.get(f, undrawn)} for f, stats in built["family_stats"].items()
            }
        digests = "".join(e["sha256"] for e in store["splits"][split])
        mixture = json.dumps(asdict(self.mix), sort_keys=True, default=str)
        self.fingerprint = hashlib.sha256((digests + mixture).encode()).hexdigest()[:16]

    def _draw(self, documents: _Documents) -> _Stream:
        """The build's draw (`mixing.mix_documents`) over the store's training documents."""
        by_family = {f: np.flatnonzero(documents.family == i) for i, f in enumerate(self.families)}
        lengths = {f: documents.length[docs] for f, docs in by_family.items()}
        m = self.mix
        mixture = mix_documents(lengths, m.ratios, m.temperature, m.total_tokens, m.seed, m.max_epochs,
                                key="data.mix.ratios", where=str(self.data_dir))  # fmt: skip
        rows = mixture.rows
        docs = np.empty(len(rows), np.int64)
        for position, family in enumerate(mixture.families):
            mine = rows[:, 0] == position
            docs[mine] = by_family[family][rows[mine, 1]]
        self._family_stats = draw_summary(mixture.draws)
        self.warnings = mixture.warnings
        return _Stream(docs, rows[:, 2], documents, self.mix.seq_len)

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
