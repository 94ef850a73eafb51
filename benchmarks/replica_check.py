"""What `check.replicas_every: N` costs: the fingerprints of every parameter and AdamW state
(training/integrity.py) against a training step of the same model, timed alternately in one run.

    python benchmarks/replica_check.py [--sizes tiny small medium] [--repeats 5] [--markdown FILE]

Per size: the median step (forward and backward on batch x seq random tokens, AdamW) and the median
fingerprint pass (every tensor `compare_replicas` reads); the overhead at N is check / (N x step).
The all-gather of one int64 per tensor that follows is left out: a few KiB over the DP group.
Prints a table, writes benchmarks/results/replica_check.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common.files import atomic_write_text  # noqa: E402
from training.integrity import fingerprint, state_tensors  # noqa: E402
from training.models.phi import PhiConfig, PhiModel  # noqa: E402

SIZES = {
    "tiny": dict(preset="tiny"),
    "small": dict(vocab_size=16384, dim=384, n_layers=6, n_heads=6, n_kv_heads=2, ffn_dim=1024, max_seq_len=256),
    "medium": dict(vocab_size=32064, dim=768, n_layers=8, n_heads=12, n_kv_heads=4, ffn_dim=2048, max_seq_len=256),
}
BATCH, SEQ = 8, 128


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def measure(size: str, repeats: int) -> dict:
    torch.manual_seed(0)
    fields = SIZES[size]
    config = PhiConfig.from_preset(fields["preset"]) if "preset" in fields else PhiConfig(**fields)
    model = PhiModel(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    tokens = torch.randint(config.vocab_size, (BATCH, SEQ + 1))

    def step():
        logits = model(tokens[:, :-1])
        F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def check():
        [fingerprint(t) for _, t in state_tensors(model, optimizer)]

    step()  # AdamW's states exist from here on
    steps, checks = [], []
    for _ in range(repeats):
        steps.append(timed(step))
        checks.append(timed(check))
    nparams = sum(p.numel() for p in model.parameters())
    step_s, check_s = statistics.median(steps), statistics.median(checks)
    return {"size": size, "params": nparams, "tokens_per_step": BATCH * SEQ, "step_s": step_s, "check_s": check_s,
            "overhead_at_100": check_s / (100 * step_s), "overhead_at_10": check_s / (10 * step_s)}  # fmt: skip


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--markdown", help="also write the table here")
    args = parser.parse_args(argv)
    rows = [measure(size, args.repeats) for size in args.sizes]
    lines = ["| model | parameters | step (median) | fingerprints (median) | overhead at N=100 | at N=10 |",
             "|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    for r in rows:
        step_ms, check_ms = r["step_s"] * 1e3, r["check_s"] * 1e3
        lines.append(f"| {r['size']} | {r['params'] / 1e6:.1f}M | {step_ms:.0f} ms | {check_ms:.1f} ms | "
                     f"{r['overhead_at_100']:.3%} | {r['overhead_at_10']:.2%} |")  # fmt: skip
    table = "\n".join(lines) + "\n"
    print(table)
    out = ROOT / "benchmarks" / "results" / "replica_check.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    machine = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    atomic_write_text(out, json.dumps({"machine": machine, "batch": BATCH, "seq_len": SEQ, "rows": rows}, indent=1))
    if args.markdown:
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(Path(args.markdown), table)
    return rows


if __name__ == "__main__":
    main()
