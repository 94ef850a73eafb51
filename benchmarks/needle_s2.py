"""Needle in a haystack for a small model whose attention layers are all S2-Attention.

One needle token (from a vocabulary the filler never uses) hides at some depth of a random haystack;
the sequence ends with a query token and the model must answer with the needle. Every layer is S2,
so the model can only read a far needle through its heads' strided shards. Controls: the same
model all dense (what S2 must match), and the same local window without the shards (what S2 must
beat). Reports accuracy by needle depth; prints a table and writes JSON.

    python benchmarks/needle_s2.py [--steps 600] [--seq-len 256] [--backend sdpa] [--cp 2]
    python benchmarks/needle_s2.py --device cuda --backend triton --seq-len 4096 --block-size 64  # a GPU
    python benchmarks/needle_s2.py --smoke   # the path at toy size on the CPU

`--cp N` trains and evaluates the same models under context parallelism on N gloo ranks: every
sequence is split over the ranks (training/parallel/context.py), S2 layers receive only the key
rows their heads read, and the answer is read on the rank that holds the last position.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common.files import atomic_write_text  # noqa: E402
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


def patterns(block_size: int = 16) -> dict[str, S2Pattern | None]:
    return {
        # 4 KV heads, stride 4: each head reads a quarter of the far blocks, together all of them.
        "s2": S2Pattern(block_size=block_size, local_blocks=2, vert_stride=4),
        # Controls: every layer dense; the same local window without the strided shards.
        "dense": None,
        "local-only": S2Pattern(block_size=block_size, local_blocks=2, vert_stride=1 << 30),
    }


def build_model(seq_len: int, backend: str, pattern: S2Pattern | None) -> PhiModel:
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
    steps: int,
    seq_len: int,
    backend: str,
    pattern: str = "s2",
    seed: int = 0,
    batch: int = 32,
    block_size: int = 16,
    device: str = "cpu",
    eval_batch: int = 256,
) -> dict:
    """Train one model on random haystacks, then its accuracy at each needle depth (`eval_batch` haystacks).
    On a GPU it trains in bf16 autocast; haystacks are drawn on the CPU, so every device sees the same."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)  # every rank draws the same haystacks
    model = build_model(seq_len, backend, patterns(block_size)[pattern]).to(device)
    forward = context_parallel(model, seq_len)

    def answer_logits(tokens):
        with torch.autocast("cuda", torch.bfloat16, enabled=device == "cuda"):
            logits, holds = forward(tokens.to(device))
        return logits.float(), holds

    started = time.perf_counter()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    for _ in range(steps):
        tokens, answers = haystacks(batch, seq_len, gen)
        logits, holds_answer = answer_logits(tokens)
        # A rank without the last position still runs the backward: its attention's exchanges pair with peers'.
        loss = F.cross_entropy(logits, answers.to(device)) if holds_answer else logits.sum() * 0
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
            tokens, answers = haystacks(eval_batch, seq_len, eval_gen, depth=depth)
            logits, holds_answer = answer_logits(tokens)
            hits = (logits.argmax(-1).cpu() == answers).float().mean() if holds_answer else None
            results[depth] = shared_float(hits)
    loss = torch.tensor(shared_float(loss.detach().cpu() if holds_answer else None))
    return {
        "pattern": pattern,
        "steps": steps,
        "seq_len": seq_len,
        "backend": backend,
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "block_size": block_size,
        "batch": batch,
        "seconds": time.perf_counter() - started,
        "final_train_loss": float(loss.detach()),
        "accuracy_by_depth": results,
        "chance": 1 / NEEDLES,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--backend", default="sdpa")
    parser.add_argument("--cp", type=int, default=1, help="context-parallel ranks (gloo, CPU)")
    parser.add_argument("--block-size", type=int, default=16, help="S2 block size (64 or more on a GPU)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--patterns", nargs="+", default=list(patterns()), choices=list(patterns()))
    parser.add_argument("--smoke", action="store_true", help="toy size on the CPU: checks the path, learns nothing")
    parser.add_argument("--out", default="benchmarks/results/needle_s2.json")
    args = parser.parse_args()
    options = dict(batch=args.batch, block_size=args.block_size, device=args.device, eval_batch=256)
    if args.smoke:  # the loop and the JSON at toy size (the kernels' own smoke runs are elsewhere)
        args.steps, args.seq_len, args.device, args.backend = 2, 64, "cpu", "sdpa"
        options.update(batch=2, block_size=16, device="cpu", eval_batch=4)
    if args.device == "cuda" and args.cp > 1:
        parser.error("--cp runs gloo ranks on the CPU; on a GPU run --cp 1")
    from tests.distributed import run_ranks

    run = [args.steps, args.seq_len, args.backend]
    results = []
    for pattern in args.patterns:
        if args.cp > 1:
            results.append(run_ranks(args.cp, train_and_evaluate, *run, pattern, 0, *options.values(), timeout=7200)[0])
        else:
            results.append(train_and_evaluate(*run, pattern, **options))
        results[-1]["cp"] = args.cp
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(Path(args.out), json.dumps(results, indent=2))  # a cut run keeps the finished ones
    print(f"{'needle depth':>12s} | " + " | ".join(f"{r['pattern']:>10s}" for r in results))
    for depth in results[0]["accuracy_by_depth"]:
        print(f"{depth:12.2f} | " + " | ".join(f"{r['accuracy_by_depth'][depth]:10.3f}" for r in results))
    print(
        f"chance {results[0]['chance']:.3f}; final train loss "
        + ", ".join(f"{r['pattern']} {r['final_train_loss']:.3f}" for r in results)
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
