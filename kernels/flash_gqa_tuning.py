"""Launch configurations of the attention kernels: tile sizes, warps and stages per kernel and head
dim (`CANDIDATES`), timed once per shape on a GPU and the fastest remembered; the first elsewhere."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import torch
import triton


@dataclass(frozen=True)
class Tiles:
    """One launch configuration of one kernel: query and key tile sizes, warps, pipeline stages."""

    block_m: int
    block_n: int
    num_warps: int = 4
    num_stages: int = 2
    pack_gqa: bool = False  # forward only: the rows of a query tile are the group's heads (see fwd_kernel)
    atomic_dq: bool = False  # dK/dV only: dQ added with atomics in the same pass (no dQ kernel)

    def fit(self, cap: int) -> Tiles:
        """Tiles no larger than `cap` (the S2 block size: a tile must not straddle two S2 blocks)."""
        return dataclasses.replace(self, block_m=min(self.block_m, cap), block_n=min(self.block_n, cap))

    def fits_group(self, group: int) -> bool:
        """Packed GQA needs the group to be a power of two that divides the query tile."""
        return not self.pack_gqa or (group & (group - 1) == 0 and self.block_m % group == 0)

    @staticmethod
    def encode(tiles: dict[str, Tiles] | None) -> str:
        """{"fwd", "dkdv", "dq"} -> Tiles as a string a custom operator can take ("": none)."""
        if not tiles:
            return ""
        return ",".join(str(int(x)) for name in KERNELS for x in dataclasses.astuple(tiles[name]))

    @staticmethod
    def decode(encoded: str) -> dict[str, Tiles]:
        if not encoded:
            return {}
        flat = [int(x) for x in encoded.split(",")]
        width = len(dataclasses.fields(Tiles))
        rows = [flat[i : i + width] for i in range(0, len(flat), width)]
        return {name: Tiles(*row[:4], *map(bool, row[4:])) for name, row in zip(KERNELS, rows, strict=True)}


KERNELS = ("fwd", "dkdv", "dq")


# What the autotuner may pick, per kernel and padded head dim; the first is used untuned (CPU, or
# KERNELS_AUTOTUNE=0). The forward and dQ hold a query tile and stream key tiles; dK/dV holds a key
# tile and streams query tiles, so its query tile is small. `python -m kernels.compile_report`
# compiles every one for sm_80 and sm_90 and fails on spills or shared memory over the limit; these
# were chosen from a sweep of that report (with 4 warps at head dim 128, or K/V tiles of 64 keys at
# head dim 64, dK/dV spilled 100-500 bytes per thread; since the query offset, 32x32 with 4 warps spilled
# 8 at head dim 64, and one-pass 64x32 16-32). dK/dV candidates with atomic_dq are the
# one-pass backward; the tuner weighs them against the best dK/dV + dQ pair (`backward_plans`).
CANDIDATES: dict[tuple[str, int], list[Tiles]] = {
    ("fwd", 64): [Tiles(64, 64, 4, 3), Tiles(128, 64, 8, 3), Tiles(64, 32, 4, 3), Tiles(64, 64, 4, 3, True)],
    ("fwd", 128): [Tiles(64, 64, 8, 3), Tiles(128, 64, 8, 2), Tiles(128, 32, 8, 2), Tiles(64, 64, 8, 3, True)],
    ("dkdv", 64): [
        Tiles(64, 32, 8, 1),
        Tiles(32, 32, 8, 1),
        Tiles(64, 32, 8, 2),
        Tiles(32, 64, 8, 2, atomic_dq=True),
        Tiles(32, 32, 4, 1, atomic_dq=True),
    ],
    ("dkdv", 128): [
        Tiles(32, 64, 8, 2),
        Tiles(64, 64, 8, 2),
        Tiles(16, 64, 8, 2),
        Tiles(16, 32, 4, 2),
        Tiles(32, 64, 8, 2, atomic_dq=True),
        Tiles(16, 64, 8, 2, atomic_dq=True),
    ],
    ("dq", 64): [Tiles(64, 32, 4, 2), Tiles(128, 32, 8, 2), Tiles(64, 64, 8, 2)],
    ("dq", 128): [Tiles(64, 64, 8, 2), Tiles(32, 32, 8, 2)],  # (128, 32) spills once fitted to 64-token S2 blocks
}
_TUNED: dict[tuple, Tiles] = {}


def candidates(kernel: str, block_d: int, cap: int, group: int = 1) -> list[Tiles]:
    """The distinct candidates of `kernel` at padded head dim `block_d`, fitted under `cap`, that
    suit GQA groups of `group` query heads."""
    listed = CANDIDATES[(kernel, 64 if block_d <= 64 else 128)]
    return list(dict.fromkeys(t.fit(cap) for t in listed if t.fit(cap).fits_group(group)))


def pick_tiles(kernel: str, key: tuple, options: list[Tiles], launch, tune: bool, timer=None) -> Tiles:
    """The fastest of `options` for this shape, timed once per `key` and remembered (tune), or the first."""
    if not tune or len(options) == 1:
        return options[0]
    if (kernel, *key) not in _TUNED:
        if timer is None:
            from triton.testing import do_bench as timer
        times = {t: timer(lambda t=t: launch(t)) for t in options}
        _TUNED[(kernel, *key)] = min(times, key=times.get)
    return _TUNED[(kernel, *key)]


def autotune_enabled(device: torch.device) -> bool:
    return device.type == "cuda" and os.environ.get("KERNELS_AUTOTUNE", "1") != "0"


def tuning_key(q: torch.Tensor, k: torch.Tensor, has_doc: bool, sparse: bool, cap: int) -> tuple:
    hq, hkv, sq, sk = q.shape[2], k.shape[2], q.shape[1], k.shape[1]
    pow2 = triton.next_power_of_2
    return (q.dtype, pow2(q.shape[3]), hq // hkv, has_doc, sparse, cap, pow2(sq), pow2(sk))


def backward_plans(dkdv: Tiles, dq: Tiles, one_pass: list[Tiles]) -> list[tuple[Tiles, ...]]:
    """The backward launches to choose from: the chosen dK/dV + dQ pair first (deterministic: used
    untuned, and alone under torch.use_deterministic_algorithms), then each one-pass candidate."""
    if torch.are_deterministic_algorithms_enabled():
        one_pass = []
    return [(dkdv, dq)] + [(t,) for t in one_pass]


def launch_options(kernel: str, tiles: str, block_d: int, cap: int, group: int = 1) -> list[Tiles]:
    """The fixed configuration of `kernel` when `tiles` (Tiles.encode) names one, else the candidates."""
    fixed = Tiles.decode(tiles)
    return [fixed[kernel].fit(cap)] if fixed else candidates(kernel, block_d, cap, group)
