"""Deterministic, resumable batches from the Arrow shards, sharded across data-parallel ranks only.

Tensor- and pipeline-parallel ranks of one replica get the same batch. The order is a seeded
permutation per epoch, so the batch of step `s` depends only on (seed, s): resuming is exact.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from data_pipeline.shards import open_shard, read_manifest

IGNORE_INDEX = -100


@dataclass
class Batch:
    tokens: torch.Tensor  # [b, s] int64 inputs
    labels: torch.Tensor  # [b, s] int64 next tokens, IGNORE_INDEX where nothing to predict
    doc_ids: torch.Tensor  # [b, s] int32
    family_ids: torch.Tensor  # [b, s] int64, -1 on padding

    def split(self, chunks: int) -> list[Batch]:
        parts = zip(*(t.chunk(chunks) for t in (self.tokens, self.labels, self.doc_ids, self.family_ids)), strict=True)
        return [Batch(*p) for p in parts]


class PackedDataset:
    """All sequences of one split, memory-mapped; checks the manifest against what the trainer expects."""

    def __init__(
        self,
        data_dir: str | Path,
        split: str = "train",
        seq_len: int | None = None,
        tokenizer_hash: str | None = None,
        verify_checksums: bool = True,
    ):
        self.data_dir = Path(data_dir)
        self.manifest = read_manifest(self.data_dir)
        where = self.data_dir / "manifest.json"
        if seq_len is not None and self.manifest["seq_len"] != seq_len:
            raise ValueError(
                f"{where}: shards hold sequences of {self.manifest['seq_len']} tokens, "
                f"but the model is configured for {seq_len} (model.max_seq_len / data.seq_len)"
            )
        if tokenizer_hash is not None and self.manifest["tokenizer_hash"] != tokenizer_hash:
            raise ValueError(
                f"{where}: shards were tokenized with tokenizer {self.manifest['tokenizer_hash']}, not {tokenizer_hash}"
            )
        if split not in self.manifest["splits"]:
            raise ValueError(f"{where}: no split {split!r} (have {sorted(self.manifest['splits'])})")
        self._shards = [open_shard(self.data_dir, e, verify_checksums) for e in self.manifest["splits"][split]]
        sizes = [len(s["tokens"]) for s in self._shards]
        self._ends = np.cumsum(sizes)
        self._starts = self._ends - np.array(sizes)
        self.families: list[str] = self.manifest["families"]

    def __len__(self) -> int:
        return int(self._ends[-1])

    def _rows(self, name: str, indices: np.ndarray) -> np.ndarray:
        shard = np.searchsorted(self._ends, indices, side="right")
        return np.stack([self._shards[k][name][i - self._starts[k]] for k, i in zip(shard, indices, strict=True)])

    def get(self, indices: np.ndarray) -> Batch:
        """Rows `indices` as a batch; labels are the next token, ignored on and before padding."""
        tokens = torch.from_numpy(self._rows("tokens", indices).astype(np.int64))
        doc_ids = torch.from_numpy(self._rows("doc_ids", indices))
        families = torch.from_numpy(self._rows("family_ids", indices).astype(np.int64))
        labels = torch.full_like(tokens, IGNORE_INDEX)
        real = doc_ids >= 0
        labels[:, :-1] = torch.where(real[:, 1:] & real[:, :-1], tokens[:, 1:], IGNORE_INDEX)
        return Batch(tokens=tokens, labels=labels, doc_ids=doc_ids, family_ids=families)


class DataLoader:
    def __init__(
        self, dataset: PackedDataset, global_batch_size: int, dp_rank: int = 0, dp_size: int = 1, seed: int = 0
    ):
        if global_batch_size % dp_size:
            raise ValueError(f"global_batch_size {global_batch_size} is not divisible by data-parallel size {dp_size}")
        if len(dataset) < global_batch_size:
            raise ValueError(
                f"{dataset.data_dir}: {len(dataset)} sequences, fewer than one global batch ({global_batch_size})"
            )
        self.dataset, self.seed = dataset, seed
        self.global_batch_size, self.dp_rank, self.dp_size = global_batch_size, dp_rank, dp_size
        self.steps_per_epoch = len(dataset) // global_batch_size

    def _order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.dataset))

    def global_rows(self, step: int) -> np.ndarray:
        """Dataset rows of the whole global batch of `step` (all replicas)."""
        epoch, position = divmod(step, self.steps_per_epoch)
        start = position * self.global_batch_size
        return self._order(epoch)[start : start + self.global_batch_size]

    def batch_at(self, step: int) -> Batch:
        rows = self.global_rows(step)
        local = self.global_batch_size // self.dp_size
        return self.dataset.get(np.sort(rows[self.dp_rank * local : (self.dp_rank + 1) * local]))

    def state_dict(self) -> dict:
        """What fixes the order; the position is the trainer's step."""
        return {"seed": self.seed, "global_batch_size": self.global_batch_size, "dp_size": self.dp_size}
