"""Context parallelism on this machine: activation memory per rank against sequence length, and
the bytes an S2-aware exchange sends against a dense ring's.

    python benchmarks/context_parallel.py [--seq-lens 1024 2048 4096] [--cp 1 2 4]

1. Peak memory a rank adds for one forward and backward of a small Phi-style model (2 layers, one
   dense and one S2), gloo ranks on the CPU: it must fall as 1 / CP.
2. Key/value rows an S2 layer's exchange sends (from the exchange plans every rank derives), over a
   dense ring's (every rank's keys to every peer), next to the pattern's computed share.
3. Time of one S2 attention layer's forward and backward on CP 2 with the S2-aware exchange, against
   the same layer fed by a dense exchange (every rank's K/V gathered, the pattern applied as a mask).
Prints tables, writes benchmarks/results/context_parallel.json and a plot.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kernels.bench import counted_density  # noqa: E402
from kernels.patterns import S2Pattern, block_mask  # noqa: E402
from kernels.s2_attention import S2Heads  # noqa: E402
from tests.distributed import run_ranks  # noqa: E402
from training.metrics import peak_rss_bytes  # noqa: E402
from training.models.phi import PhiConfig, PhiModel  # noqa: E402
from training.parallel.context import (  # noqa: E402
    apply_context_parallel,
    balanced_positions,
    context_parallel_attention,
    gathered_attention,
    s2_exchange_plan,
    shard_sequence,
)

STEP_PATTERN = S2Pattern(block_size=64, local_blocks=16, vert_stride=16)


def activation_peak(seq_len: int, cp: int) -> int:
    """Bytes this rank's peak memory rises by during one forward and backward."""
    import torch.distributed as dist

    pattern = S2Pattern(block_size=64, local_blocks=4, vert_stride=8)
    config = PhiConfig(vocab_size=512, dim=128, n_layers=2, n_heads=8, n_kv_heads=2, ffn_dim=256,
                       max_seq_len=seq_len, attn_backend="reference", s2=pattern)  # fmt: skip
    torch.manual_seed(0)
    model = PhiModel(config)
    tokens = torch.randint(0, 512, (1, seq_len + 1))
    inputs, labels, extra = tokens[:, :-1], tokens[:, 1:], {}
    if cp > 1:
        positions = apply_context_parallel(model, dist.group.WORLD, seq_len)
        inputs, labels = shard_sequence(inputs, positions), shard_sequence(labels, positions)
        extra = dict(positions=positions, seq_len=seq_len)
    before = peak_rss_bytes()
    loss = F.cross_entropy(model(inputs, **extra).flatten(0, 1), labels.flatten())
    loss.backward()
    return peak_rss_bytes() - before


def dense_exchange_s2(q, k, v, shares, rank, group, s2: S2Heads) -> torch.Tensor:
    """The S2 layer as a dense ring would run it: every rank's K/V gathered, the pattern a mask."""
    s2_block = s2.mask(k.shape[2], sum(len(p) for p in shares))
    docs = [None] * len(shares)
    return gathered_attention(q, k, v, None, docs, shares, rank, group, None, s2_block, s2.pattern.block_size)


def exchange_step_seconds(seq_len: int, heads: int = 4, head_dim: int = 64, repeats: int = 3) -> dict:
    """Median seconds of one S2 layer's forward and backward on this rank, S2-aware and dense exchange."""
    import statistics
    import time

    import torch.distributed as dist

    group, cp, rank = dist.group.WORLD, dist.get_world_size(), dist.get_rank()
    shares = [balanced_positions(seq_len, cp, r) for r in range(cp)]
    s2 = S2Heads(STEP_PATTERN, heads)
    g = torch.Generator().manual_seed(rank)
    q, k, v = (torch.randn(1, seq_len // cp, heads, head_dim, generator=g, requires_grad=True) for _ in range(3))
    runs = {
        "s2_aware": lambda: context_parallel_attention(q, k, v, None, shares, rank, group, s2, None),
        "dense": lambda: dense_exchange_s2(q, k, v, shares, rank, group, s2),
    }
    seconds = {}
    for name, run in runs.items():
        times = []
        for _ in range(repeats + 1):  # the first is a warm-up
            dist.barrier()
            start = time.perf_counter()
            run().square().sum().backward()
            dist.barrier()
            times.append(time.perf_counter() - start)
        seconds[name] = statistics.median(times[1:])
    return seconds


def exchange_table(seq_lens, cps, strides=(8, 16, 32), heads: int = 8) -> list[dict]:
    rows = []
    for seq in seq_lens:
        for stride in strides:
            pattern = S2Pattern(block_size=64, local_blocks=16, vert_stride=stride)
            mask = block_mask(pattern, heads, seq // 64)
            for cp in cps:
                shares = [balanced_positions(seq, cp, rank) for rank in range(cp)]
                plans = [s2_exchange_plan(mask, shares, 64, rank)[0] for rank in range(cp)]
                sent = sum(len(rows) for plan in plans for per_head in plan.values() for rows in per_head)
                ratio = sent / (cp * (cp - 1) * (seq // cp) * heads)
                share = counted_density(pattern, seq, heads)
                rows.append({"seq_len": seq, "vert_stride": stride, "cp": cp, "bytes_vs_dense_ring": ratio,
                             "computed_share": share, "bytes_over_share": ratio / share})  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="benchmarks/context_parallel.py", description=__doc__)
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--cp", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--exchange-seq-lens", type=int, nargs="+", default=[8192, 32768, 131072])
    parser.add_argument("--step-seq-lens", type=int, nargs="+", default=[4096, 8192])
    parser.add_argument("--out", default="benchmarks/results/context_parallel.json")
    args = parser.parse_args(argv)
    memory = []
    for seq in args.seq_lens:
        for cp in args.cp:
            peaks = run_ranks(cp, activation_peak, seq, cp)
            memory.append({"seq_len": seq, "cp": cp, "peak_gib_per_rank": max(peaks) / 2**30})
    base = {r["seq_len"]: r["peak_gib_per_rank"] for r in memory if r["cp"] == 1}
    print(f"{'seq':>6s} {'cp':>3s} {'GiB/rank':>9s} {'vs cp1':>7s}")
    for r in memory:
        r["vs_cp1"] = r["peak_gib_per_rank"] / base[r["seq_len"]] if r["seq_len"] in base else None
        print(f"{r['seq_len']:6d} {r['cp']:3d} {r['peak_gib_per_rank']:9.3f} {r['vs_cp1'] or float('nan'):7.2f}")
    exchange = exchange_table(args.exchange_seq_lens, [c for c in args.cp if c > 1] or [2])
    print(f"{'seq':>7s} {'stride':>6s} {'cp':>3s} {'bytes/dense':>11s} {'share':>6s} {'ratio':>6s}")
    for r in exchange:
        print(f"{r['seq_len']:7d} {r['vert_stride']:6d} {r['cp']:3d} {r['bytes_vs_dense_ring']:11.3f} "
              f"{r['computed_share']:6.3f} {r['bytes_over_share']:6.2f}")  # fmt: skip
    steps = []
    for seq in args.step_seq_lens:
        seconds = run_ranks(2, exchange_step_seconds, seq)[0]
        steps.append({"seq_len": seq, "cp": 2, "vert_stride": STEP_PATTERN.vert_stride, **seconds,
                      "s2_aware_over_dense": seconds["s2_aware"] / seconds["dense"]})  # fmt: skip
    print(f"{'seq':>6s} {'S2-aware s':>10s} {'dense s':>8s} {'ratio':>6s}")
    for r in steps:
        print(f"{r['seq_len']:6d} {r['s2_aware']:10.3f} {r['dense']:8.3f} {r['s2_aware_over_dense']:6.2f}")
    result = {"machine": "cpu, gloo", "memory": memory, "exchange": exchange, "step_time": steps}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    plot(memory, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return result


def plot(memory: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for cp in sorted({r["cp"] for r in memory}):
        rows = [r for r in memory if r["cp"] == cp]
        ax.plot([r["seq_len"] for r in rows], [r["peak_gib_per_rank"] for r in rows], marker="o", label=f"CP {cp}")
    ax.set_xlabel("sequence length")
    ax.set_ylabel("activation peak per rank (GiB)")
    ax.set_xscale("log", base=2)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
