"""Deterministic, resumable batches from the Arrow shards, sharded across data-parallel ranks only.

Tensor- and pipeline-parallel ranks of one replica get the same batch. The order is a seeded
permutation per epoch, so the batch of step `s` depends only on (seed, s): resuming is exact.
"""

from __future__ import annotations

import hashlib
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
    rows: torch.Tensor  # [b] int64, the dataset rows (DPO looks up their reference log-probs)

    def split(self, chunks: int) -> list[Batch]:
        parts = zip(*(t.chunk(chunks) for t in self.tensors()), strict=True)
        return [Batch(*p) for p in parts]

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.tokens, self.labels, self.doc_ids, self.family_ids, self.rows)

    def to(self, device: torch.device) -> Batch:
        return Batch(*(t.to(device) for t in self.tensors()))


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
        if split not in self.manifest["splits"] and "store" in self.manifest:
            raise ValueError(
                f"{where}: no packed shards (the build's `shards` setting was off); its token store is read "
                "with `data_pipeline.mixed.MixedDataset`, as training reads it"
            )
        if split not in self.manifest["splits"]:
            raise ValueError(f"{where}: no split {split!r} (have {sorted(self.manifest['splits'])})")
        self._shards = [open_shard(self.data_dir, e, verify_checksums) for e in self.manifest["splits"][split]]
        sizes = [len(s["tokens"]) for s in self._shards]
        self._ends = np.cumsum(sizes)
        self._starts = self._ends - np.array(sizes)
        self.families: list[str] = self.manifest["families"]
        self.has_loss_mask = all("loss_mask" in shard for shard in self._shards)
        # What the split holds, whatever folder it sits in: a rebuild of the same data matches.
        digests = "".join(entry["sha256"] for entry in self.manifest["splits"][split])
        self.fingerprint = hashlib.sha256(digests.encode()).hexdigest()[:16]

    def __len__(self) -> int:
        return int(self._ends[-1])

    def _rows(self, name: str, indices: np.ndarray) -> np.ndarray:
        shard = np.searchsorted(self._ends, indices, side="right")
        return np.stack([self._shards[k][name][i - self._starts[k]] for k, i in zip(shard, indices, strict=True)])

    def get(self, indices: np.ndarray) -> Batch:
        """Rows `indices` as a batch; labels are the next token, ignored on and before padding."""
        mask = self._rows("loss_mask", indices) if self.has_loss_mask else None
        return batch_of(
            self._rows("tokens", indices), self._rows("doc_ids", indices), self._rows("family_ids", indices), mask,
            indices,
        )  # fmt: skip


def batch_of(tokens, doc_ids, family_ids, loss_mask, indices) -> Batch:
    """Packed rows (numpy, [rows, seq_len]) as a batch: labels are the next token, ignored across
    padding and, with a loss mask (SFT / DPO), wherever the next token is not a target."""
    tokens = torch.from_numpy(tokens.astype(np.int64))
    doc_ids = torch.from_numpy(np.ascontiguousarray(doc_ids, dtype=np.int32))
    families = torch.from_numpy(family_ids.astype(np.int64))
    labels = torch.full_like(tokens, IGNORE_INDEX)
    target = (doc_ids >= 0)[:, 1:] & (doc_ids >= 0)[:, :-1]
    if loss_mask is not None:
        target &= torch.from_numpy(loss_mask[:, 1:] > 0)
    labels[:, :-1] = torch.where(target, tokens[:, 1:], IGNORE_INDEX)
    rows = torch.from_numpy(np.asarray(indices, dtype=np.int64))
    return Batch(tokens=tokens, labels=labels, doc_ids=doc_ids, family_ids=families, rows=rows)


class DataLoader:
    """`group_size` > 1 keeps consecutive rows together (DPO: chosen, rejected) in the order, in one
    replica's share and, with an even micro-batch size, in one micro-batch."""

    def __init__(
        self,
        dataset: PackedDataset,
        global_batch_size: int,
        dp_rank: int = 0,
        dp_size: int = 1,
        seed: int = 0,
        group_size: int = 1,
    ):
        if global_batch_size % (dp_size * group_size):
            raise ValueError(
                f"global_batch_size {global_batch_size} is not divisible by data-parallel size {dp_size}"
                + (f" x group size {group_size}" if group_size > 1 else "")
            )
        if len(dataset) < global_batch_size:
            raise ValueError(
                f"{dataset.data_dir}: {len(dataset)} sequences, fewer than one global batch ({global_batch_size})"
            )
        if len(dataset) % group_size:
            raise ValueError(f"{dataset.data_dir}: {len(dataset)} rows do not form groups of {group_size}")
        self.dataset, self.seed, self.group_size = dataset, seed, group_size
        self.global_batch_size, self.dp_rank, self.dp_size = global_batch_size, dp_rank, dp_size
        self.steps_per_epoch = len(dataset) // global_batch_size
        self._epoch_order: tuple[int | None, np.ndarray] = (None, np.zeros(0, np.int64))

    def _order(self, epoch: int) -> np.ndarray:
        """The epoch's permutation of the rows, made once per epoch (not once per step)."""
        if self._epoch_order[0] != epoch:
            groups = np.random.default_rng([self.seed, epoch]).permutation(len(self.dataset) // self.group_size)
            self._epoch_order = (epoch, (groups[:, None] * self.group_size + np.arange(self.group_size)).ravel())
        return self._epoch_order[1]

    def global_rows(self, step: int) -> np.ndarray:
        """Dataset rows of the whole global batch of `step` (all replicas)."""
        epoch, position = divmod(step, self.steps_per_epoch)
        start = position * self.global_batch_size
        return self._order(epoch)[start : start + self.global_batch_size]

    def batch_at(self, step: int) -> Batch:
        rows = self.global_rows(step)
        local = self.global_batch_size // self.dp_size
        return self.dataset.get(np.sort(rows[self.dp_rank * local : (self.dp_rank + 1) * local]))

    def state_dict(self, step: int) -> dict:
        """Where the loader is after `step` steps, and what fixes the order (the step alone resumes it)."""
        epoch, position = divmod(step, self.steps_per_epoch)
        return {
            "step": step,
            "epoch": epoch,
            "position": position,
            "seed": self.seed,
            "global_batch_size": self.global_batch_size,
            "dp_size": self.dp_size,
        }

    def check_resume(self, state: dict, where: str) -> None:
        """Refuse to resume with an order other than the saved run's (the data would differ silently)."""
        for key in ("seed", "global_batch_size"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(
                    f"{where}: the run was saved with data {key}={state[key]}, this config has {getattr(self, key)}; "
                    "resuming would feed different batches (start a new run, or restore the value)"
                )
