"""python -m kernels.bench [--seq-lens ...] [--out FILE]

On a GPU: forward and forward+backward time, TFLOP/s and peak memory of the Triton dense GQA kernel,
flash-attn 2 (when installed), PyTorch SDPA, and the S2 kernel at several sparsities, side by side
in one run. Without a GPU: the share of attention FLOPs each S2 setting skips, counted from the
block lists the kernel iterates (timings need a GPU). Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from kernels.patterns import S2Pattern, block_lists, block_mask

HEADS, KV_HEADS, HEAD_DIM, BLOCK = 32, 8, 128, 64
S2_SETTINGS = {  # name -> pattern; local window 16 blocks (1K tokens) as in DKernel's examples
    "s2-stride8": S2Pattern(block_size=BLOCK, local_blocks=16, vert_stride=8),
    "s2-stride16": S2Pattern(block_size=BLOCK, local_blocks=16, vert_stride=16),
    "s2-stride32": S2Pattern(block_size=BLOCK, local_blocks=16, vert_stride=32),
}


def counted_density(pattern: S2Pattern, seq_len: int) -> float:
    """Computed blocks / dense causal blocks, from the kernel's own block lists."""
    n = math.ceil(seq_len / BLOCK)
    _, count = block_lists(block_mask(pattern, KV_HEADS, n))
    return float(count.sum()) / (KV_HEADS * n * (n + 1) / 2)


def causal_flops(seq_len: int, batch: int = 1) -> float:
    """Forward FLOPs of dense causal attention (QK^T and PV, half the square)."""
    return 4 * batch * HEADS * HEAD_DIM * seq_len * seq_len / 2


def flop_table(seq_lens: list[int]) -> list[dict]:
    rows = []
    for s in seq_lens:
        for name, pattern in S2_SETTINGS.items():
            dens = counted_density(pattern, s)
            rows.append(
                {
                    "seq_len": s,
                    "kernel": name,
                    "computed_share": dens,
                    "flops_skipped": 1 - dens,
                    "ideal_speedup": 1 / dens,
                }
            )
    return rows


def gpu_table(seq_lens: list[int]) -> list[dict]:
    from triton.testing import do_bench

    from kernels.attention import flash_attn_attention, sdpa_attention
    from kernels.flash_gqa import flash_attention
    from kernels.s2_attention import S2Heads, s2_attention

    kernels = {
        "triton-dense": lambda q, k, v: flash_attention(q, k, v),
        "sdpa": lambda q, k, v: sdpa_attention(q, k, v, None),
    }
    try:
        import flash_attn  # noqa: F401

        kernels["flash-attn2"] = lambda q, k, v: flash_attn_attention(q, k, v, None)
    except ImportError:
        pass
    for name, pattern in S2_SETTINGS.items():
        heads = S2Heads(pattern, KV_HEADS)
        kernels[name] = lambda q, k, v, heads=heads: s2_attention(q, k, v, heads)
    rows = []
    for s in seq_lens:
        q = torch.randn(1, s, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        k, v = (
            torch.randn(1, s, KV_HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            for _ in range(2)
        )
        for name, fn in kernels.items():
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            try:
                fwd = do_bench(lambda: fn(q, k, v), warmup=5, rep=20)
                out = fn(q, k, v)
                grad = torch.randn_like(out)
                fwd_bwd = do_bench(lambda: torch.autograd.grad(fn(q, k, v), (q, k, v), grad), warmup=5, rep=20)
            except torch.OutOfMemoryError:
                rows.append({"seq_len": s, "kernel": name, "error": "out of memory"})
                continue
            flops = causal_flops(s)  # backward is 2.5x the forward's matmul FLOPs
            rows.append(
                {
                    "seq_len": s,
                    "kernel": name,
                    "fwd_ms": fwd,
                    "fwd_bwd_ms": fwd_bwd,
                    "fwd_tflops_dense_equiv": flops / fwd / 1e9,
                    "fwd_bwd_tflops_dense_equiv": 3.5 * flops / fwd_bwd / 1e9,
                    "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30,
                }
            )
        base = {r["kernel"]: r for r in rows if r["seq_len"] == s and "fwd_ms" in r}
        ref = base.get("flash-attn2") or base.get("sdpa")
        for r in rows:
            if r["seq_len"] == s and "fwd_ms" in r and ref:
                r["fwd_speedup_vs_" + ref["kernel"]] = ref["fwd_ms"] / r["fwd_ms"]
                r["fwd_bwd_speedup_vs_" + ref["kernel"]] = ref["fwd_bwd_ms"] / r["fwd_bwd_ms"]
    return rows


def print_table(rows: list[dict]) -> None:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    print(" | ".join(f"{k:>14s}" for k in keys))
    for r in rows:
        cells = [f"{r[k]:14.4g}" if isinstance(r.get(k), float) else f"{r.get(k, ''):>14}" for k in keys]
        print(" | ".join(cells))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m kernels.bench", description=__doc__)
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[2048, 8192, 32768, 131072])
    parser.add_argument("--out", default="benchmarks/results/kernels.json")
    args = parser.parse_args(argv)
    gpu = torch.cuda.is_available()
    rows = gpu_table(args.seq_lens) if gpu else flop_table(args.seq_lens)
    print_table(rows)
    device = torch.cuda.get_device_name() if gpu else "cpu (FLOP counts only; timings need a GPU)"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(
        json.dumps(
            {
                "device": device,
                "heads": HEADS,
                "kv_heads": KV_HEADS,
                "head_dim": HEAD_DIM,
                "block": BLOCK,
                "rows": rows,
            },
            indent=2,
        )
    )
    print(f"wrote {args.out} ({device})")


if __name__ == "__main__":
    main()
