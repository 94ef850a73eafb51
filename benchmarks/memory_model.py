"""The planner's memory model (training/plan/cost.py) against the peaks benchmarks/memory.py measured.

    python benchmarks/memory_model.py [MEMORY_JSON ...] [--markdown FILE]

Each measured row (a model, a layout, every rank's peak resident memory minus its baseline) is
predicted with `memory_per_rank` as that benchmark ran it: fp32 on CPU, micro-batch 1 of 64
tokens, 2 micro-batches per replica when there is more than one rank, default or lean FSDP units.
The worst rank is compared with the prediction for the fullest rank. `CPU_RESERVED` stands for what
a CPU rank holds besides the model (gloo buffers, the allocator's slack): one constant for every
row, read off the single-rank and TP2 rows (so those are not an independent check of it).
Defaults: every raw measurement recorded in docs/measurements/cpu-*/.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common.files import atomic_write_text  # noqa: E402
from training.models.phi import PhiConfig  # noqa: E402
from training.plan.cost import CPU_RESERVED, GIB, Layout, memory_per_rank  # noqa: E402

RECORDED = sorted((ROOT / "docs" / "measurements").glob("cpu-*/memory_*.json"))
SEQ_LEN = 64


def model_of(name: str) -> PhiConfig:
    """The model a row of benchmarks/memory.py names."""
    if name.startswith("phi-4-mini"):
        preset = PhiConfig.PRESETS["phi-4-mini"]
        return PhiConfig(**{**preset, "n_layers": int(re.search(r"(\d+) layers", name)[1])})
    layers = int(re.search(r"(\d+) layers", name)[1])
    return PhiConfig.from_preset("phi-3-mini", n_layers=layers, max_seq_len=SEQ_LEN)


def layout_of(name: str) -> Layout:
    """'1 rank', 'TP2', 'PP2', 'FSDP2', 'TP2xPP2', 'FSDP2xTP2', '... lean' -> a Layout."""
    sizes = {kind: int(n) for kind, n in re.findall(r"(TP|PP|FSDP|CP)(\d+)", name)}
    lean = "lean" in name
    dp = sizes.get("FSDP", 1)
    return Layout(tp=sizes.get("TP", 1), pp=sizes.get("PP", 1), cp=sizes.get("CP", 1), dp=dp,
                  dp_mode="fsdp" if "FSDP" in sizes else "allreduce", micro_batch=1, recompute="none",
                  sequence_parallel=False, fsdp_unit="linear" if lean else "block", vocab_over_dp=lean)  # fmt: skip


def recorded_rows(paths: list[Path]):
    """(file, row, its layout, world size, global batch) of every measured row (failed cases have no ranks)."""
    for path in paths:
        for r in json.loads(path.read_text())["rows"]:
            if "ranks" not in r:
                continue
            layout = layout_of(r["layout"])
            world = layout.tp * layout.pp * layout.cp * layout.dp
            batch = r.get("global_batch", layout.dp * (2 if world > 1 else 1))  # older files: the benchmark's rule
            yield path, r, layout, world, batch


def compare(paths: list[Path]) -> list[dict]:
    rows = []
    for path, r, layout, _, batch in recorded_rows(paths):
        micro_batches = batch // layout.dp
        model = model_of(r["model"])
        predicted = memory_per_rank(model, layout, SEQ_LEN, micro_batches, "fp32", CPU_RESERVED)
        measured = max(rank["used_gib"] for rank in r["ranks"]) * GIB
        parts = {k: v / GIB for k, v in predicted.items()}
        rows.append({"model": r["model"], "layout": r["layout"], "measured_gib": measured / GIB,
                     "predicted_gib": parts["total"], "error": predicted["total"] / measured - 1,
                     "parts_gib": parts, "source": f"{path.parent.name}/{path.name}"})  # fmt: skip
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| model | layout | measured GiB (worst rank) | predicted GiB | error |", "|---|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['layout']} | {r['measured_gib']:.2f} | {r['predicted_gib']:.2f} "
                     f"| {r['error']:+.1%} |")  # fmt: skip
    worst = max(abs(r["error"]) for r in rows)
    lines += ["", f"{len(rows)} measured rows; largest error {worst:.1%}; CPU reserve {CPU_RESERVED / GIB:.2f} GiB."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="*", type=Path, default=RECORDED)
    parser.add_argument("--markdown", default=None)
    args = parser.parse_args(argv)
    rows = compare(args.files)
    table = markdown(rows)
    print(table)
    if args.markdown:
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(Path(args.markdown), table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
