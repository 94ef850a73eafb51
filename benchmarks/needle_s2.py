"""Needle in a haystack for a small model whose attention layers are all S2-Attention.

One needle token (from a vocabulary the filler never uses) hides at some depth of a random haystack;
the sequence ends with a query token and the model must answer with the needle. Every layer is S2,
so the model can only read a far needle through its heads' strided shards; the control has the same
local window without the shards. Reports accuracy by needle depth; prints a table and writes JSON.

    python benchmarks/needle_s2.py [--steps 600] [--seq-len 256] [--backend sdpa] [--cp 2]

`--cp N` trains and evaluates the same models under context parallelism on N gloo ranks: every
sequence is split over the ranks (training/parallel/context.py), S2 layers receive only the key
rows their heads read, and the answer is read on the rank that holds the last position.
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

from kernels.patterns import S2Pattern  # noqa: E402
from training.models.phi import PhiConfig, PhiModel  # noqa: E402

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


def context_parallel(model: PhiModel, seq_len: int):
    """A function tokens -> (logits at the last position, True), or (this rank's logits, False) on a
    rank that does not hold it. Without a process group it is the plain model; with one, the model
    runs context parallel."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return lambda tokens: (model(tokens)[:, -1], True)
    from training.parallel.context import apply_context_parallel, shard_sequence

    positions = apply_context_parallel(model, dist.group.WORLD, seq_len)
    last = (positions == seq_len - 1).nonzero().flatten()

    def answer_logits(tokens):
        logits = model(shard_sequence(tokens, positions), positions=positions, seq_len=seq_len)
        return (logits[:, last[0]], True) if len(last) else (logits, False)

    return answer_logits


def sum_gradients(model: PhiModel) -> None:
    """Under context parallelism each rank holds the gradients of its share of the tokens."""
    import torch.distributed as dist

    if dist.is_initialized():
        for p in model.parameters():
            dist.all_reduce(p.grad)


def shared_float(value: torch.Tensor | None) -> float:
    """The value the rank holding the last position computed, on every rank (0-d tensors)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return float(value)
    total = torch.zeros(()) if value is None else value.detach().float().clone()
    dist.all_reduce(total)
    return float(total)


def train_and_evaluate(
    steps: int, seq_len: int, backend: str, pattern: str = "s2", seed: int = 0, batch: int = 32
) -> dict:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)  # every rank draws the same haystacks
    model = build_model(seq_len, backend, PATTERNS[pattern])
    answer_logits = context_parallel(model, seq_len)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    for _ in range(steps):
        tokens, answers = haystacks(batch, seq_len, gen)
        logits, holds_answer = answer_logits(tokens)
        # A rank without the last position still runs the backward: its attention's exchanges pair with peers'.
        loss = F.cross_entropy(logits, answers) if holds_answer else logits.sum() * 0
        loss.backward()
        sum_gradients(model)
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
            logits, holds_answer = answer_logits(tokens)
            results[depth] = shared_float((logits.argmax(-1) == answers).float().mean() if holds_answer else None)
    loss = torch.tensor(shared_float(loss if holds_answer else None))
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
    parser.add_argument("--cp", type=int, default=1, help="context-parallel ranks (gloo)")
    parser.add_argument("--out", default="benchmarks/results/needle_s2.json")
    args = parser.parse_args()
    from tests.distributed import run_ranks

    run = [args.steps, args.seq_len, args.backend]
    results = [run_ranks(args.cp, train_and_evaluate, *run, pattern, timeout=7200)[0] for pattern in PATTERNS]
    for r in results:
        r["cp"] = args.cp
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
