"""Needle in a haystack for a small model whose attention layers are all S2-Attention.

One needle token (from a vocabulary the filler never uses) hides at some depth of a random haystack;
the sequence ends with a query token and the model must answer with the needle. Every layer is S2,
so the model can only read a far needle through its heads' strided shards; the control has the same
local window without the shards. Reports accuracy by needle depth; prints a table and writes JSON.

    python benchmarks/needle_s2.py [--steps 600] [--seq-len 256] [--backend sdpa]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from kernels.patterns import S2Pattern
from training.models.phi import PhiConfig, PhiModel

FILLER, NEEDLES = 64, 16
QUERY = FILLER + NEEDLES
VOCAB = QUERY + 1


def haystacks(batch: int, seq_len: int, generator: torch.Generator, depth: float | None = None):
    """Token batches [batch, seq_len] ending with the query token, and the needles to answer.
    `depth` in [0, 1) places the needle."""
    tokens = torch.randint(0, FILLER, (batch, seq_len), generator=generator)
    room = seq_len - 1
    if depth is None:
        pos = torch.randint(0, room, (batch,), generator=generator)
    else:
        pos = torch.full((batch,), int(depth * room))
    needles = torch.randint(0, NEEDLES, (batch,), generator=generator) + FILLER
    tokens[torch.arange(batch), pos] = needles
    tokens[:, -1] = QUERY
    return tokens, needles


PATTERNS = {
    # 4 KV heads, stride 4: each head reads a quarter of the far blocks, together all of them.
    "s2": S2Pattern(block_size=16, local_blocks=2, vert_stride=4),
    # Control: the same local window without the strided shards.
    "local-only": S2Pattern(block_size=16, local_blocks=2, vert_stride=1 << 30),
}


def build_model(seq_len: int, backend: str, pattern: S2Pattern) -> PhiModel:
    config = PhiConfig(
        vocab_size=VOCAB,
        dim=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=4,
        ffn_dim=128,
        max_seq_len=seq_len,
        attn_backend=backend,
        dense_every=0,
        s2=pattern,
    )
    return PhiModel(config)


def train_and_evaluate(
    steps: int, seq_len: int, backend: str, pattern: str = "s2", seed: int = 0, batch: int = 32
) -> dict:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = build_model(seq_len, backend, PATTERNS[pattern])
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    for _ in range(steps):
        tokens, answers = haystacks(batch, seq_len, gen)
        loss = F.cross_entropy(model(tokens)[:, -1], answers)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()
    results = {}
    eval_gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for depth in (0.0, 0.25, 0.5, 0.75, 0.95):
            tokens, answers = haystacks(256, seq_len, eval_gen, depth=depth)
            results[depth] = float((model(tokens)[:, -1].argmax(-1) == answers).float().mean())
    return {
        "pattern": pattern,
        "steps": steps,
        "seq_len": seq_len,
        "backend": backend,
        "final_train_loss": float(loss.detach()),
        "accuracy_by_depth": results,
        "chance": 1 / NEEDLES,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--backend", default="sdpa")
    parser.add_argument("--out", default="benchmarks/results/needle_s2.json")
    args = parser.parse_args()
    results = [train_and_evaluate(args.steps, args.seq_len, args.backend, pattern) for pattern in PATTERNS]
    print(f"{'needle depth':>12s} | " + " | ".join(f"{r['pattern']:>10s}" for r in results))
    for depth in results[0]["accuracy_by_depth"]:
        print(f"{depth:12.2f} | " + " | ".join(f"{r['accuracy_by_depth'][depth]:10.3f}" for r in results))
    print(
        f"chance {results[0]['chance']:.3f}; final train loss "
        + ", ".join(f"{r['pattern']} {r['final_train_loss']:.3f}" for r in results)
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
