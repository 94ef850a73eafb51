"""KV-cache bytes of S2 decoding at long context: each KV head keeps only the key blocks its pattern
lets a later query read (`kernels.s2_attention.S2LayerCache`) against every position (dense).

    python benchmarks/s2_kv_cache.py [--seq-len 32768] [--markdown FILE]

Phi-4-mini's attention shape (32 layers, 8 KV heads of 128, bf16), batch 1, S2 on every other layer
(Phi-3-small's alternation), block 64 with a local window of 16 blocks. Each S2 layer's cache is
filled to the length for real (prefill in chunks, then one decoded token) and its allocated and
used bytes read back; dense layers hold every position. Prints a table, writes
benchmarks/results/s2_kv_cache.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kernels.patterns import S2Pattern  # noqa: E402
from kernels.s2_attention import S2Heads, S2LayerCache  # noqa: E402

LAYERS, KV_HEADS, HEAD_DIM, HEADS = 32, 8, 128, 24


def filled_cache(pattern: S2Pattern, seq_len: int, chunk: int = 4096) -> S2LayerCache:
    """One S2 layer's reduced cache after `seq_len` tokens (keys and values are zeros: only the
    shapes and positions matter here)."""
    cache = S2LayerCache(seq_len, S2Heads(pattern, KV_HEADS))
    kv = torch.zeros(1, chunk, KV_HEADS, HEAD_DIM, dtype=torch.bfloat16)
    for start in range(0, seq_len - 1, chunk):
        n = min(chunk, seq_len - 1 - start)
        cache.append(kv[:, :n], kv[:, :n])
    cache.decode(torch.zeros(1, 1, HEADS, HEAD_DIM, dtype=torch.bfloat16), kv[:, :1], kv[:, :1])
    return cache


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-len", type=int, default=32768)
    parser.add_argument("--markdown", help="also write the table here")
    args = parser.parse_args(argv)
    dense_layer = 2 * args.seq_len * KV_HEADS * HEAD_DIM * 2  # keys and values, bf16
    rows = [{"pattern": "dense (every layer)", "layer_bytes": dense_layer, "used_bytes": dense_layer,
             "model_bytes": LAYERS * dense_layer}]  # fmt: skip
    for stride in (8, 16, 32):
        pattern = S2Pattern(block_size=64, local_blocks=16, vert_stride=stride)
        cache = filled_cache(pattern, args.seq_len)
        used = 2 * max(cache.counts) * KV_HEADS * HEAD_DIM * 2
        rows.append({"pattern": f"S2 stride {stride}, local 16 x 64, every other layer", "layer_bytes": cache.bytes,
                     "used_bytes": used, "model_bytes": LAYERS // 2 * (dense_layer + cache.bytes)})  # fmt: skip
    for row in rows:
        row["model_vs_dense"] = row["model_bytes"] / rows[0]["model_bytes"]
    lines = [f"| cache at {args.seq_len:,} tokens | per S2 layer, allocated | used | whole model | vs dense |",
             "|---|---:|---:|---:|---:|"]  # fmt: skip
    for r in rows:
        lines.append(f"| {r['pattern']} | {r['layer_bytes'] / 2**20:.0f} MiB | {r['used_bytes'] / 2**20:.0f} MiB | "
                     f"{r['model_bytes'] / 2**30:.2f} GiB | {r['model_vs_dense']:.2f}x |")  # fmt: skip
    table = "\n".join(lines) + "\n"
    print(table)
    out = ROOT / "benchmarks" / "results" / "s2_kv_cache.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"seq_len": args.seq_len, "rows": rows}, indent=1))
    if args.markdown:
        Path(args.markdown).write_text(table)
    return rows


if __name__ == "__main__":
    main()
