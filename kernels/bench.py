"""python -m kernels.bench [--seq-lens ...] [--out FILE] [--smoke]

On a GPU: forward and forward+backward time, dense-equivalent TFLOP/s and peak memory of the Triton
dense GQA kernel, flash-attn 2 (when installed), PyTorch SDPA, FlexAttention, and the S2 kernel at
several sparsities (with FlexAttention under the same S2 block masks), side by side in one run, with
speed-ups against flash-attn 2 (or SDPA without it). Also the share of attention FLOPs each S2
setting skips, counted from the block lists the kernel iterates (that part needs no GPU).

`--smoke` runs the same timing loop on the CPU at toy sizes in fp32 (the Triton kernels under
TRITON_INTERPRET=1, FlexAttention forward only): it checks the path, not the speed.
Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import math
import os
import time
from pathlib import Path

import torch

from common.files import atomic_write_text
from kernels.patterns import S2Pattern, block_lists, block_mask

HEADS, KV_HEADS, HEAD_DIM, BLOCK = 32, 8, 128, 64
S2_SETTINGS = {  # name -> pattern; local window 16 blocks (1K tokens) as in DKernel's examples
    "s2-stride8": S2Pattern(block_size=BLOCK, local_blocks=16, vert_stride=8),
    "s2-stride16": S2Pattern(block_size=BLOCK, local_blocks=16, vert_stride=16),
    "s2-stride32": S2Pattern(block_size=BLOCK, local_blocks=16, vert_stride=32),
}
SMOKE = dict(heads=4, kv_heads=2, head_dim=32, seq_lens=[128], pattern=S2Pattern(block_size=32, local_blocks=1))


def counted_density(pattern: S2Pattern, seq_len: int, kv_heads: int = KV_HEADS) -> float:
    """Computed blocks / dense causal blocks, from the kernel's own block lists."""
    n = math.ceil(seq_len / pattern.block_size)
    _, count = block_lists(block_mask(pattern, kv_heads, n))
    return float(count.sum()) / (kv_heads * n * (n + 1) / 2)


def causal_flops(seq_len: int, heads: int = HEADS, head_dim: int = HEAD_DIM, batch: int = 1) -> float:
    """Forward FLOPs of dense causal attention (QK^T and PV, half the square)."""
    return 4 * batch * heads * head_dim * seq_len * seq_len / 2


def flop_table(seq_lens: list[int]) -> list[dict]:
    rows = []
    for s in seq_lens:
        for name, pattern in S2_SETTINGS.items():
            dens = counted_density(pattern, s)
            rows.append({"seq_len": s, "kernel": name, "computed_share": dens, "flops_skipped": 1 - dens,
                         "ideal_speedup": 1 / dens})  # fmt: skip
    return rows


def implementations(patterns: dict[str, S2Pattern], kv_heads: int) -> dict:
    """Name -> attention(q, k, v) for every implementation this machine has."""
    from kernels.attention import flash_attn_attention, sdpa_attention
    from kernels.flash_gqa import flash_attention
    from kernels.flex import flex_attention_bshd
    from kernels.s2_attention import S2Heads, s2_attention

    found = {
        "triton-dense": lambda q, k, v: flash_attention(q, k, v),
        "sdpa": lambda q, k, v: sdpa_attention(q, k, v, None),
        "flex-dense": lambda q, k, v: flex_attention_bshd(q, k, v),
    }
    try:
        import flash_attn  # noqa: F401

        found["flash-attn2"] = lambda q, k, v: flash_attn_attention(q, k, v, None)
    except ImportError:
        pass
    for name, pattern in patterns.items():
        heads = S2Heads(pattern, kv_heads)
        found[f"triton-{name}"] = lambda q, k, v, heads=heads: s2_attention(q, k, v, heads)
        found[f"flex-{name}"] = lambda q, k, v, heads=heads: flex_attention_bshd(
            q, k, v, s2_block=heads.mask(k.shape[2], q.shape[1]), s2_block_size=heads.pattern.block_size
        )
    return found


def cpu_timer(fn, warmup: int = 1, rep: int = 2) -> float:
    """Milliseconds per call, median of `rep` after `warmup` (the CPU stand-in for do_bench)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(rep):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[len(times) // 2]


def select(kernels: dict, patterns: list[str] | None) -> dict:
    """The implementations whose names match one of the shell-style `patterns` (all when None)."""
    if patterns is None:
        return kernels
    chosen = {name: fn for name, fn in kernels.items() if any(fnmatch.fnmatch(name, p) for p in patterns)}
    if not chosen:
        raise ValueError(f"--kernels {' '.join(patterns)} matches none of: {', '.join(kernels)}")
    return chosen


def time_table(seq_lens, heads, kv_heads, head_dim, patterns, device, dtype, timer, only=None, on_length=None):
    """Forward and forward+backward of every implementation at every length; OOMs are rows too.
    `on_length(rows)` is called after each length, so a run cut short keeps what it measured."""
    from tqdm import tqdm

    cuda = device == "cuda"
    kernels = select(implementations(patterns, kv_heads), only)
    rows = []
    for s in seq_lens:
        shape = lambda h: (1, s, h, head_dim)  # noqa: E731
        q = torch.randn(shape(heads), device=device, dtype=dtype, requires_grad=True)
        k, v = (torch.randn(shape(kv_heads), device=device, dtype=dtype, requires_grad=True) for _ in range(2))
        flops = causal_flops(s, heads, head_dim)
        for name, fn in tqdm(kernels.items(), desc=f"seq {s}", unit="kernel", leave=False):
            row = {"seq_len": s, "kernel": name}
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            try:
                with torch.no_grad():
                    row["fwd_ms"] = timer(lambda fn=fn: fn(q, k, v))
                row["fwd_tflops_dense_equiv"] = flops / row["fwd_ms"] / 1e9
                if cuda or not name.startswith("flex"):  # FlexAttention has no CPU backward
                    grad = torch.randn_like(q)
                    row["fwd_bwd_ms"] = timer(lambda fn=fn: torch.autograd.grad(fn(q, k, v), (q, k, v), grad))
                    row["fwd_bwd_tflops_dense_equiv"] = 3.5 * flops / row["fwd_bwd_ms"] / 1e9  # bwd: 2.5x fwd
            except torch.OutOfMemoryError:
                row["error"] = "out of memory"
            except Exception as err:  # one implementation failing must not lose the others' figures
                row["error"] = f"{type(err).__name__}: {str(err)[:200]}"
            if cuda:
                row["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
            rows.append(row)
        add_speedups([r for r in rows if r["seq_len"] == s])
        if on_length is not None:
            on_length(rows)
    return rows


def add_speedups(rows: list[dict]) -> None:
    """Each row's speed-up over flash-attn 2 (or SDPA where flash-attn is not installed)."""
    by_name = {r["kernel"]: r for r in rows}
    ref = by_name.get("flash-attn2") or by_name.get("sdpa")
    if ref is None:
        return
    for r in rows:
        for key in ("fwd_ms", "fwd_bwd_ms"):
            if key in r and key in ref:
                r[f"{key[:-3]}_speedup_vs_{ref['kernel']}"] = ref[key] / r[key]


def print_table(rows: list[dict]) -> None:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    print(" | ".join(f"{k:>14s}" for k in keys))
    for r in rows:
        cells = [f"{r[k]:14.4g}" if isinstance(r.get(k), float) else f"{r.get(k, ''):>14}" for k in keys]
        print(" | ".join(cells))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m kernels.bench", description=__doc__)
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[2048, 8192, 32768, 131072])
    parser.add_argument("--kernels", nargs="+", default=None, help="shell-style names to time (default: all)")
    parser.add_argument("--out", default="benchmarks/results/kernels.json")
    parser.add_argument("--smoke", action="store_true", help="CPU path at toy sizes (checks the code, not speed)")
    args = parser.parse_args(argv)
    gpu = torch.cuda.is_available()
    density = flop_table(args.seq_lens)
    shape = dict(heads=HEADS, kv_heads=KV_HEADS, head_dim=HEAD_DIM, seq_lens=args.seq_lens)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {"device": "cpu (FLOP counts only; timings need a GPU)", **shape, "block": BLOCK, "s2_density": density,
              "timings": []}  # fmt: skip

    def save(rows: list[dict]) -> None:
        result["timings"] = rows
        atomic_write_text(out, json.dumps(result, indent=2))

    if gpu and not args.smoke:
        from triton.testing import do_bench

        # FlexAttention compiles once per length and mask: more than dynamo's default of 8.
        torch._dynamo.config.recompile_limit = 64
        result["device"] = torch.cuda.get_device_name()
        timer = lambda fn: do_bench(fn, warmup=5, rep=20)  # noqa: E731
        time_table(**shape, patterns=S2_SETTINGS, device="cuda", dtype=torch.bfloat16, timer=timer,
                   only=args.kernels, on_length=save)  # fmt: skip
    elif args.smoke:
        if os.environ.get("TRITON_INTERPRET") != "1" and not gpu:
            parser.error("--smoke on a CPU needs TRITON_INTERPRET=1 (the Triton kernels run in its interpreter)")
        shape = {k: v for k, v in SMOKE.items() if k != "pattern"}
        result.update(shape, device="cpu (smoke: toy sizes, fp32, timings meaningless)")
        time_table(**shape, patterns={"s2-smoke": SMOKE["pattern"]}, device="cpu", dtype=torch.float32,
                   timer=cpu_timer, only=args.kernels, on_length=save)  # fmt: skip
    print_table(density)
    if result["timings"]:
        print_table(result["timings"])
    save(result["timings"])
    print(f"wrote {out} ({result['device']})")
    return result


if __name__ == "__main__":
    main()
