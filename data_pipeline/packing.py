"""Pack tokenized documents into fixed-length sequences with per-token document ids.

Each document ends with EOS. Two strategies:
- `pack_documents` (pretraining): documents are concatenated and cut every `seq_len` tokens; a
  document cut at a boundary continues in the next sequence. No padding except at the very end.
- `pack_best_fit` (SFT, or `packing: best_fit`): whole documents go into the fullest sequence they
  still fit (best-fit decreasing), so none is split; longer ones are truncated and counted.
Document ids restart at 0 in every sequence and padding has document id -1, so attention masks built
from ids never cross a document and never read padding. An optional per-token loss mask (SFT: the
assistant turns) travels with the tokens.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import numpy as np


@dataclass
class PackedSequences:
    tokens: np.ndarray  # [n, seq_len] int32
    doc_ids: np.ndarray  # [n, seq_len] int32, -1 on padding
    family_ids: np.ndarray  # [n, seq_len] int8, -1 on padding (packers: any int16 document label)
    loss_mask: np.ndarray | None = None  # [n, seq_len] int8, 1 where the token is a training target
    truncated_docs: int = 0
    lang_ids: np.ndarray | None = None  # [n, seq_len] int16, each token's language (manifest "languages")

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def padding_tokens(self) -> int:
        return int((self.doc_ids < 0).sum())

    def take(self, rows: slice) -> PackedSequences:
        """The sequences in `rows` (a shard's worth, say), loss mask included."""
        mask = self.loss_mask[rows] if self.loss_mask is not None else None
        langs = self.lang_ids[rows] if self.lang_ids is not None else None
        return PackedSequences(self.tokens[rows], self.doc_ids[rows], self.family_ids[rows], mask, lang_ids=langs)

    @staticmethod
    def concatenate(parts: list[PackedSequences]) -> PackedSequences:
        """Sequences of `parts` one after another (without loss masks: all parts are plain LM data)."""
        return PackedSequences(
            *(np.concatenate([getattr(p, name) for p in parts]) for name in ("tokens", "doc_ids", "family_ids"))
        )


def _stream(docs, eos_id: int, masks):
    """Documents laid end to end, each closed by EOS (a piece `(family, tokens, False)` of a longer
    document is not): tokens, document index, family and loss mask per token."""
    closed = np.array([doc[2] if len(doc) > 2 else True for doc in docs], dtype=np.int64)
    lengths = np.array([len(doc[1]) for doc in docs], dtype=np.int64) + closed
    total = int(lengths.sum())
    stream = np.empty(total, dtype=np.int32)
    mask = np.ones(total, dtype=np.int8)
    doc_index = np.repeat(np.arange(len(docs), dtype=np.int64), lengths)
    family = np.repeat(np.array([doc[0] for doc in docs], dtype=np.int16), lengths)
    ends = np.cumsum(lengths)
    for i, (doc, end) in enumerate(zip(docs, ends, strict=True)):
        start = end - lengths[i]
        stream[start : start + len(doc[1])] = doc[1]
        if closed[i]:
            stream[end - 1] = eos_id
        if masks is not None:
            mask[start : start + len(doc[1])] = masks[i]
            mask[start + len(doc[1]) : end] = 0  # the chat template's end marker is the target; EOS only separates
    return stream, doc_index, family, mask


def split_long_documents(docs: list[tuple[int, np.ndarray]], seq_len: int) -> list[tuple[int, np.ndarray, bool]]:
    """Documents that do not fit one sequence with their EOS, cut into sequence-long pieces (which
    fill a sequence each and carry no EOS) and a closing piece; the rest unchanged. For best-fit
    packing, so a long document is spread over sequences instead of cut to its first tokens."""
    pieces = []
    for family, tokens in docs:
        while len(tokens) >= seq_len:
            pieces.append((family, tokens[:seq_len], False))
            tokens = tokens[seq_len:]
        pieces.append((family, tokens, True))
    return pieces


def _renumber(doc_index: np.ndarray) -> np.ndarray:
    """Document ids from 0 inside each sequence, -1 on padding."""
    first = np.where(doc_index[:, :1] >= 0, doc_index[:, :1], 0)
    return np.where(doc_index >= 0, doc_index - first, -1).astype(np.int32)


def pack_documents(
    docs: list[tuple[int, list[int]]],
    seq_len: int,
    eos_id: int,
    pad_id: int,
    masks: list[list[bool]] | None = None,
) -> PackedSequences:
    """`docs` is a list of (family index, token ids without EOS); `masks` the loss mask per document."""
    stream, doc_index, family, mask = _stream(docs, eos_id, masks)
    total = len(stream)
    n = -(-total // seq_len)
    pad = n * seq_len - total

    def fill(values, value, dtype):
        return np.concatenate([values.astype(dtype), np.full(pad, value, dtype)]).reshape(n, seq_len)

    return PackedSequences(
        tokens=fill(stream, pad_id, np.int32),
        doc_ids=_renumber(fill(doc_index, -1, np.int64)),
        family_ids=fill(family, -1, np.int16),
        loss_mask=fill(mask, 0, np.int8) if masks is not None else None,
    )


def concat_shard_plan(lengths: np.ndarray, seq_len: int, rows: int) -> list[tuple[int, int, int]]:
    """Where each shard of `rows` sequences of the concat stream of documents of `lengths` (EOS
    included) begins and ends, without packing: per shard (first document, its tokens already in
    earlier shards, one past the last document). Each shard can then be packed on its own."""
    cumulative = np.cumsum(np.asarray(lengths, np.int64))
    total = int(cumulative[-1]) if len(cumulative) else 0
    size = rows * seq_len
    plan = []
    for start in range(0, total, size):
        first = int(np.searchsorted(cumulative, start, side="right"))
        offset = start - (int(cumulative[first - 1]) if first else 0)
        last = int(np.searchsorted(cumulative, min(start + size, total), side="left")) + 1
        plan.append((first, offset, last))
    return plan


def pack_concat_shard(
    docs: list[tuple[int, np.ndarray]], offset: int, seq_len: int, eos_id: int, pad_id: int, rows: int
) -> PackedSequences:
    """One shard of `concat_shard_plan`: rows of the stream `pack_documents` makes of all the
    documents, from the shard's documents alone (the first without its `offset` tokens already in
    earlier shards). Only the last shard can be short: it is padded to whole sequences. Written
    for speed (a shard is millions of tokens): tokens concatenated in place, document indices and
    labels repeated per document (sequential writes, no per-token gathers)."""
    label, first = docs[0]
    docs = [(label, first[offset:]), *docs[1:]]
    counts = np.fromiter((len(tokens) + 1 for _, tokens in docs), np.int64, len(docs))  # tokens with EOS
    stream = int(counts.sum())
    total = min(stream, rows * seq_len)
    counts[-1] -= stream - total  # the last document runs on into the next shard
    size = -(-total // seq_len) * seq_len
    eos = np.array([eos_id], np.int32)
    parts = [part for _, tokens in docs for part in (tokens, eos)]
    parts[-2:] = parts[-2:] if stream == total else [parts[-2][: counts[-1]]]
    tokens = np.empty(size, np.int32)
    np.concatenate(parts, out=tokens[:total])
    tokens[total:] = pad_id
    padding = size - total
    document = np.repeat(np.arange(len(docs), dtype=np.int32), counts)
    labels = np.fromiter((label for label, _ in docs), np.int16, len(docs))
    family = np.concatenate([np.repeat(labels, counts), np.full(padding, -1, np.int16)])
    shape = (size // seq_len, seq_len)
    doc_ids = np.concatenate([document, np.zeros(padding, np.int32)]).reshape(shape)
    doc_ids -= doc_ids[:, :1].copy()  # numbered from 0 in every sequence
    doc_ids.reshape(-1)[total:] = -1
    return PackedSequences(tokens=tokens.reshape(shape), doc_ids=doc_ids, family_ids=family.reshape(shape))


def best_fit_window(sequences_per_shard: int, seq_len: int) -> int:
    """Documents bin-packed together by best fit: a shard's worth of tokens in documents of 64 or so
    (bounded memory, and the same windows at build and load time)."""
    return max(1, sequences_per_shard * seq_len // 64)


def best_fit_bins(lengths: list[int], capacity: int) -> list[list[int]]:
    """Best-fit decreasing: document indices per bin, each bin's total length <= capacity."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    bins: list[list[int]] = []
    free: list[int] = []  # room left per bin, kept in step with `bins`
    by_room: list[tuple[int, int]] = []  # (room, bin) sorted, for a binary search of the tightest fit
    for i in order:
        size = min(lengths[i], capacity)
        k = bisect.bisect_left(by_room, (size, -1))
        if k == len(by_room):
            bins.append([i])
            free.append(capacity - size)
            bisect.insort(by_room, (free[-1], len(bins) - 1))
            continue
        room, b = by_room.pop(k)
        bins[b].append(i)
        free[b] = room - size
        bisect.insort(by_room, (free[b], b))
    return bins


def pack_best_fit(
    docs: list[tuple[int, list[int]]],
    seq_len: int,
    eos_id: int,
    pad_id: int,
    masks: list[list[bool]] | None = None,
) -> PackedSequences:
    """Whole documents per sequence (best-fit decreasing)."""
    return pack_bins(docs, seq_len, eos_id, pad_id, best_fit_bins([len(t) + 1 for _, t in docs], seq_len), masks)


def pack_bins(
    docs: list[tuple[int, list[int]]],
    seq_len: int,
    eos_id: int,
    pad_id: int,
    bins: list[list[int]],
    masks: list[list[bool]] | None = None,
) -> PackedSequences:
    """One sequence per bin of document indices, padded; a document longer than `seq_len` - 1 keeps
    its first tokens and is counted in `truncated_docs`. DPO uses one document per bin."""
    if not docs:
        raise ValueError("no documents to pack")
    limit = seq_len - 1
    truncated = sum(len(doc[1]) > limit for doc in docs if len(doc) < 3 or doc[2])
    docs = [(doc[0], doc[1][:limit], *doc[2:]) if len(doc) < 3 or doc[2] else doc for doc in docs]
    masks = [m[:limit] for m in masks] if masks is not None else None
    rows = []
    for members in bins:
        sub_masks = [masks[i] for i in members] if masks is not None else None
        stream, doc_index, family, mask = _stream([docs[i] for i in members], eos_id, sub_masks)
        pad = seq_len - len(stream)
        rows.append(
            (
                np.concatenate([stream, np.full(pad, pad_id, np.int32)]),
                np.concatenate([doc_index, np.full(pad, -1, np.int64)]),
                np.concatenate([family, np.full(pad, -1, np.int16)]),
                np.concatenate([mask, np.zeros(pad, np.int8)]),
            )
        )
    tokens, doc_index, family, mask = (np.stack(column) for column in zip(*rows, strict=True))
    return PackedSequences(
        tokens=tokens.astype(np.int32),
        doc_ids=_renumber(doc_index),
        family_ids=family.astype(np.int16),
        loss_mask=mask.astype(np.int8) if masks is not None else None,
        truncated_docs=truncated,
    )
