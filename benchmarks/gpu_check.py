"""`make gpu-check`: everything a GPU can tell us, in one command, the first time it meets one.

    python benchmarks/gpu_check.py [--results DIR] [--docs docs/benchmarks.md] [--smoke]

1. the bf16 kernel tests (`pytest -m gpu`): Triton kernels, every tile configuration, FlexAttention;
2. `python -m kernels.bench`: Triton dense and S2 against flash-attn 2, SDPA and FlexAttention,
   2K-128K tokens, forward and forward+backward, TFLOP/s and memory;
3. `benchmarks/mfu.py`: MFU of a ~1B Phi-style model at seq 4096 in bf16, per attention backend;
4. the tables between the `gpu-check` markers of docs/benchmarks.md, rewritten from the JSON.

A step that fails is recorded and the others still run; the exit status is 1 if any failed. The
kernel tests run without tests/conftest.py (its data fixtures need packages a GPU image may lack).
`--smoke` runs steps 2-4 on the CPU at toy sizes (the Triton kernels in the interpreter), to check
the path without a GPU; it writes tables only where `--docs` names a file.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data_pipeline.shards import atomic_write_text  # noqa: E402

MARKERS = {"kernels": "gpu-check:kernels", "mfu": "gpu-check:mfu"}


def run_step(name: str, command: list[str], env: dict) -> dict:
    print(f"== {name}: {' '.join(command)}", flush=True)
    result = subprocess.run(command, cwd=ROOT, env=env)
    status = {0: "passed", 5: "skipped (no tests collected)"}.get(
        result.returncode, f"failed (exit {result.returncode})"
    )
    print(f"== {name}: {status}", flush=True)
    return {"step": name, "status": status, "ok": result.returncode in (0, 5)}


def fmt(value, spec: str) -> str:
    return "" if value is None else format(value, spec)


def kernels_table(result: dict) -> str:
    """Markdown: one row per (length, implementation) of `python -m kernels.bench`'s timings."""
    speedup = next((k for r in result["timings"] for k in r if k.startswith("fwd_speedup_vs_")), "fwd_speedup_vs_")
    ref = speedup.removeprefix("fwd_speedup_vs_")
    lines = [
        "| seq len | kernel | fwd ms | fwd+bwd ms | fwd TFLOP/s | fwd+bwd TFLOP/s "
        f"| fwd vs {ref} | fwd+bwd vs {ref} | peak GiB |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["timings"]:
        if "error" in r:
            lines.append(f"| {r['seq_len']:,} | {r['kernel']} | {r['error']} | | | | | | |")
            continue
        cells = [f"{r['seq_len']:,}", r["kernel"], fmt(r.get("fwd_ms"), ".3f"), fmt(r.get("fwd_bwd_ms"), ".3f"),
                 fmt(r.get("fwd_tflops_dense_equiv"), ".1f"), fmt(r.get("fwd_bwd_tflops_dense_equiv"), ".1f"),
                 fmt(r.get(speedup), ".2f"), fmt(r.get(f"fwd_bwd_speedup_vs_{ref}"), ".2f"),
                 fmt(r.get("peak_mem_gib"), ".2f")]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def mfu_table(result: dict) -> str:
    lines = ["| attention | params | seq | batch | step s | tokens/s | TFLOP/s | MFU | peak GiB |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"| {r['attn_backend']} | {r['error']} | | | | | | | |")
            continue
        cells = [r["attn_backend"], f"{r['params'] / 1e9:.2f}B", str(r["seq_len"]), str(r["batch"]),
                 f"{r['step_s']:.3f}", f"{r['tokens_per_s']:,.0f}", f"{r['tflops']:.1f}", fmt(r["mfu"], ".1%"),
                 fmt(r["peak_mem_gib"], ".1f")]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def replace_between_markers(text: str, marker: str, body: str) -> str:
    """The text with what lies between `<!-- marker -->` and `<!-- /marker -->` replaced by `body`."""
    start, end = f"<!-- {marker} -->", f"<!-- /{marker} -->"
    if start not in text or end not in text:
        raise ValueError(f"markers {start} ... {end} not found")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{start}\n{body}\n{end}{tail}"


def update_docs(docs: Path, results: Path) -> list[str]:
    """Rewrite the tables of docs/benchmarks.md from the results folder; the sections written."""
    text, written = docs.read_text(), []
    stamp = f"{datetime.date.today()}, torch {_version('torch')}, triton {_version('triton')}"
    for name, render in (("kernels", kernels_table), ("mfu", mfu_table)):
        path = results / f"{name}.json"
        if not path.is_file():
            continue
        result = json.loads(path.read_text())
        raw = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
        body = f"Measured on {result['device']} ({stamp}); raw: `{raw}`.\n\n{render(result)}"
        text = replace_between_markers(text, MARKERS[name], body)
        written.append(name)
    atomic_write_text(docs, text)
    return written


def _version(package: str) -> str:
    try:
        return __import__(package).__version__
    except ImportError:
        return "absent"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/gpu_check.py", description=__doc__)
    parser.add_argument("--results", default="benchmarks/results/gpu")
    parser.add_argument("--docs", default=None, help="the Markdown file whose gpu-check tables to rewrite")
    parser.add_argument("--smoke", action="store_true", help="the CPU path at toy sizes")
    args = parser.parse_args(argv)
    import torch

    if not torch.cuda.is_available() and not args.smoke:
        parser.error(f"no CUDA device visible to {sys.executable} (torch {torch.__version__}); "
                     "run it with a CUDA build of PyTorch (GPU_PYTHON=...), or --smoke for the CPU path")  # fmt: skip
    results = (ROOT / args.results).resolve()
    results.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    smoke = ["--smoke"] if args.smoke else []
    if args.smoke:
        env["TRITON_INTERPRET"] = "1"
    steps = []
    if args.smoke:
        steps.append({"step": "bf16 kernel tests", "status": "skipped (smoke: needs a GPU)", "ok": True})
    elif importlib.util.find_spec("pytest") is None:
        steps.append({"step": "bf16 kernel tests", "status": "failed (pytest is not installed here)", "ok": False})
    else:
        tests = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "--noconftest", "tests/test_kernels.py"]
        steps.append(run_step("bf16 kernel tests", tests, env))
    steps.append(
        run_step(
            "kernel benchmark",
            [sys.executable, "-m", "kernels.bench", *smoke, "--out", str(results / "kernels.json")],
            env,
        )
    )
    steps.append(
        run_step(
            "MFU benchmark", [sys.executable, "benchmarks/mfu.py", *smoke, "--out", str(results / "mfu.json")], env
        )
    )
    if args.docs:
        written = update_docs(Path(args.docs).resolve(), results)
        steps.append(
            {
                "step": "docs tables",
                "status": f"rewrote {', '.join(written) or 'nothing'} in {args.docs}",
                "ok": bool(written),
            }
        )
    summary = {"python": sys.executable, "platform": platform.platform(), "torch": torch.__version__,
               "cuda": torch.version.cuda, "steps": steps}  # fmt: skip
    atomic_write_text(results / "gpu_check.json", json.dumps(summary, indent=2))
    for step in steps:
        print(f"{step['step']:>20s}: {step['status']}")
    return 0 if all(step["ok"] for step in steps) else 1


if __name__ == "__main__":
    sys.exit(main())
