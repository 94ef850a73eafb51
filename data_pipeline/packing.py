"""Pack tokenized documents into fixed-length sequences with per-token document ids.

Each document ends with EOS. Documents are concatenated and cut every `seq_len` tokens; a document
cut at a boundary continues in the next sequence. Document ids restart at 0 in every sequence and
padding (only in the last sequence) has document id -1, so attention masks built from ids never
cross a document and never read padding.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class PackedSequences:
    tokens: np.ndarray  # [n, seq_len] int32
    doc_ids: np.ndarray  # [n, seq_len] int32, -1 on padding
    family_ids: np.ndarray  # [n, seq_len] int8, -1 on padding

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def padding_tokens(self) -> int:
        return int((self.doc_ids < 0).sum())


def pack_documents(docs: list[tuple[int, list[int]]], seq_len: int, eos_id: int, pad_id: int) -> PackedSequences:
    """`docs` is a list of (family index, token ids without EOS)."""
    lengths = np.array([len(tokens) + 1 for _, tokens in docs], dtype=np.int64)
    total = int(lengths.sum())
    stream = np.empty(total, dtype=np.int32)
    doc_index = np.repeat(np.arange(len(docs), dtype=np.int64), lengths)
    family = np.repeat(np.array([f for f, _ in docs], dtype=np.int8), lengths)
    ends = np.cumsum(lengths)
    starts = ends - lengths
    for (_, tokens), start, end in zip(docs, starts, ends, strict=True):
        stream[start : end - 1] = tokens
        stream[end - 1] = eos_id

    n = -(-total // seq_len)
    pad = n * seq_len - total
    tokens = np.concatenate([stream, np.full(pad, pad_id, np.int32)]).reshape(n, seq_len)
    doc_index = np.concatenate([doc_index, np.full(pad, -1, np.int64)]).reshape(n, seq_len)
    family = np.concatenate([family, np.full(pad, -1, np.int8)]).reshape(n, seq_len)
    # Renumber documents from 0 inside each sequence.
    first = np.where(doc_index[:, :1] >= 0, doc_index[:, :1], 0)
    doc_ids = np.where(doc_index >= 0, doc_index - first, -1).astype(np.int32)
    return PackedSequences(tokens=tokens, doc_ids=doc_ids, family_ids=family)
