"""Trainer overhead and layout scaling on this machine.

1. The framework's step (Trainer.train_step at TP=PP=1) against a plain single-process PyTorch
   loop on the same model and batches, timed alternately in one process. Target: <= 1.1x.
2. Median step time of the same model under TP/PP layouts (report only; on a 2-core CPU the extra
   ranks share the cores).

    python benchmarks/trainer_step.py [--data data/default] [--steps 30]

Prints a table and writes benchmarks/results/trainer_step.json.
"""

from __future__ import annotations

import argparse
import dataclasses
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

from common.config import load_config  # noqa: E402
from data_pipeline.loader import IGNORE_INDEX  # noqa: E402
from tests.distributed import run_ranks  # noqa: E402
from training.config import TrainConfig  # noqa: E402
from training.models.phi import PhiModel  # noqa: E402
from training.objectives import trainer_for  # noqa: E402
from training.optim import build_optimizer  # noqa: E402


def tiny_config(data: str, **parallel) -> TrainConfig:
    config = load_config(
        TrainConfig, ROOT / "configs/pretrain/tiny.yaml", [f"data.path={data}", "checkpoint.resume=none"]
    )
    return dataclasses.replace(config, parallel=dataclasses.replace(config.parallel, tp=1, pp=1, **parallel))


def plain_step(model, optimizer, batch, grad_clip: float) -> None:
    """What a user would write by hand: forward, mean cross-entropy, backward, clip, AdamW."""
    for mb in batch.split(4):
        logits = model(mb.tokens, doc_ids=mb.doc_ids)
        loss = F.cross_entropy(logits.flatten(0, 1), mb.labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
        (loss / (batch.labels != IGNORE_INDEX).sum()).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def overhead(data: str, steps: int) -> dict:
    torch.set_num_threads(max(1, torch.get_num_threads()))
    trainer = trainer_for(tiny_config(data))
    torch.manual_seed(0)
    model = PhiModel(trainer.config.model)
    optimizer = build_optimizer(model, trainer.config.optim, 3e-3)
    times = {"framework": [], "plain": []}
    for step in range(steps + 3):
        batch = trainer.loader.batch_at(step)
        t0 = time.perf_counter()
        trainer.train_step(batch)
        t1 = time.perf_counter()
        plain_step(model, optimizer, batch, trainer.config.optim.grad_clip)
        t2 = time.perf_counter()
        if step >= 3:  # warm-up excluded
            times["framework"].append(t1 - t0)
            times["plain"].append(t2 - t1)
    framework, plain = (statistics.median(times[k]) for k in ("framework", "plain"))
    return {"framework_step_s": framework, "plain_step_s": plain, "ratio": framework / plain}


def layout_step_time(config: TrainConfig, steps: int) -> float:
    trainer = trainer_for(config)
    times = []
    for step in range(steps + 3):
        t0 = time.perf_counter()
        trainer.train_step(trainer.loader.batch_at(step))
        times.append(time.perf_counter() - t0)
    return statistics.median(times[3:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="data/default")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--out", default="benchmarks/results/trainer_step.json")
    args = parser.parse_args()

    result = {"machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"}
    result["overhead"] = overhead(args.data, args.steps)
    layouts = {"tp1-pp1": {}, "tp2": dict(tp=2), "pp2": dict(pp=2), "tp2-pp2": dict(tp=2, pp=2)}
    result["layouts"] = {}
    for name, layout in layouts.items():
        config = dataclasses.replace(
            tiny_config(args.data), parallel=dataclasses.replace(tiny_config(args.data).parallel, **layout)
        )
        world = layout.get("tp", 1) * layout.get("pp", 1)
        result["layouts"][name] = run_ranks(world, layout_step_time, config, args.steps)[0]

    o = result["overhead"]
    print(f"{'measure':<34s} | {'value':>10s}")
    print(f"{'plain PyTorch loop step (s)':<34s} | {o['plain_step_s']:10.4f}")
    print(f"{'framework step, TP=PP=1 (s)':<34s} | {o['framework_step_s']:10.4f}")
    print(f"{'framework / plain (target <= 1.1)':<34s} | {o['ratio']:10.3f}")
    for name, seconds in result["layouts"].items():
        print(f"{'step time ' + name + ' (s)':<34s} | {seconds:10.4f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
