"""`make gpu-check`: everything a GPU can tell us, in one command, the first time it meets one.

    python benchmarks/gpu_check.py [--results DIR] [--docs docs/benchmarks.md] [--smoke]

1. the bf16 kernel tests (`pytest -m gpu`): Triton kernels, every tile configuration, FlexAttention;
2. `python -m kernels.bench`: Triton dense and S2 against flash-attn 2, SDPA and FlexAttention,
   2K-128K tokens, forward and forward+backward, TFLOP/s and memory;
3. `benchmarks/mfu.py`: MFU of a ~1B Phi-style model at seq 4096 in bf16, per attention backend;
4. the same model with layers alternating dense and S2 (stride 16) at 32K tokens on the Triton
   kernels, step time against the model all dense on SDPA (`mfu.py --s2-stride 16`);
5. needle retrieval at 4K tokens: an all-S2 model against all-dense and local-only controls
   (`benchmarks/needle_s2.py --device cuda`), accuracy by depth;
6. the tables between the `gpu-check` markers of docs/benchmarks.md, rewritten from the JSON.

A step that fails is recorded and the others still run; the exit status is 1 if any failed. The
kernel tests run without tests/conftest.py (its data fixtures need packages a GPU image may lack).
`--smoke` runs steps 2-6 on the CPU at toy sizes (the Triton kernels in the interpreter), to check
the path without a GPU; it writes tables only where `--docs` names a file. `--quick` fits a short GPU
lease (about 8 minutes on an H100): three lengths, FlexAttention dense and at one S2 stride only (each
length and mask is a compile), fewer MFU steps; `--step-timeout` caps each step, and the kernel
benchmark keeps every length it finished.
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

from common.files import atomic_write_text  # noqa: E402

MARKERS = {"kernels": "gpu-check:kernels", "mfu": "gpu-check:mfu", "hybrid": "gpu-check:hybrid",
           "needle": "gpu-check:needle"}  # fmt: skip
QUICK = {
    "kernel benchmark": ["--seq-lens", "4096", "32768", "131072",
                         "--kernels", "triton-*", "sdpa", "flash-attn2", "flex-dense", "flex-s2-stride16"],
    "MFU benchmark": ["--steps", "5", "--warmup", "2"],
    "dense+S2 at 32K": ["--steps", "3", "--warmup", "1", "--modes", "eager"],
    "needle at 4K": ["--steps", "300"],
}  # fmt: skip


def run_step(name: str, command: list[str], env: dict, timeout: float | None = None) -> dict:
    print(f"== {name}: {' '.join(command)}", flush=True)
    try:
        code = subprocess.run(command, cwd=ROOT, env=env, timeout=timeout).returncode
    except subprocess.TimeoutExpired:
        code = None
    if code is None:
        status = f"timed out after {timeout:.0f} s"
    else:
        status = {0: "passed", 5: "skipped (no tests collected)"}.get(code, f"failed (exit {code})")
    print(f"== {name}: {status}", flush=True)
    return {"step": name, "status": status, "ok": code in (0, 5)}


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
    """Markdown: one row per (backend, layers, mode) of `benchmarks/mfu.py`; S2 rows with their
    step-time speed-up over the all-dense row."""
    lines = ["| attention | layers | torch.compile | params | seq | batch | step s | tokens/s | TFLOP/s | MFU "
             "| peak GiB | vs all-dense |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for r in result["rows"]:
        compiled, layers = "yes" if r.get("compiled") else "no", r.get("layers", "dense")
        if "error" in r:
            error = r["error"].replace("\n", " ").replace("|", "/")
            lines.append(f"| {r['attn_backend']} | {layers} | {compiled} | {error} | | | | | | | | |")
            continue
        speedup = f"{r['speedup_vs_dense']:.2f}x ({r['dense_baseline']})" if "speedup_vs_dense" in r else ""
        cells = [r["attn_backend"], layers, compiled, f"{r['params'] / 1e9:.2f}B", str(r["seq_len"]), str(r["batch"]),
                 f"{r['step_s']:.3f}", f"{r['tokens_per_s']:,.0f}", f"{r['tflops']:.1f}", fmt(r["mfu"], ".1%"),
                 fmt(r["peak_mem_gib"], ".1f"), speedup]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def needle_table(results: list[dict]) -> str:
    """Markdown: retrieval accuracy by needle depth, one column per model (`benchmarks/needle_s2.py`)."""
    first = results[0]
    lines = [f"{first['seq_len']:,} tokens, {first['steps']} steps of {first['batch']}, "
             f"S2 block {first['block_size']}, attention {first['backend']}; chance {first['chance']:.3f}.", "",
             "| needle depth | " + " | ".join(r["pattern"] for r in results) + " |",
             "|---:|" + "---:|" * len(results)]  # fmt: skip
    for depth in first["accuracy_by_depth"]:
        cells = [f"{r['accuracy_by_depth'][depth]:.3f}" for r in results]
        lines.append(f"| {float(depth):.2f} | " + " | ".join(cells) + " |")
    lines.append("| train s | " + " | ".join(f"{r['seconds']:.0f}" for r in results) + " |")
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
    renders = {"kernels": kernels_table, "mfu": mfu_table, "hybrid": mfu_table, "needle": needle_table}
    for name, render in renders.items():
        path = results / f"{name}.json"
        if not path.is_file():
            continue
        result = json.loads(path.read_text())
        raw = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
        device = result[0]["device"] if isinstance(result, list) else result["device"]
        body = f"Measured on {device} ({stamp}); raw: `{raw}`.\n\n{render(result)}"
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
    parser.add_argument("--quick", action="store_true", help="fewer lengths and kernels, to fit a short lease")
    parser.add_argument("--step-timeout", type=float, default=None, help="seconds each step may run")
    args = parser.parse_args(argv)
    import torch

    if not torch.cuda.is_available() and not args.smoke:
        parser.error(f"no CUDA device visible to {sys.executable} (torch {torch.__version__}); "
                     "run it with a CUDA build of PyTorch (GPU_PYTHON=...), or --smoke for the CPU path")  # fmt: skip
    results = (ROOT / args.results).resolve()
    results.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    smoke = ["--smoke"] if args.smoke else []
    extra = QUICK if args.quick and not args.smoke else {}
    timeout = args.step_timeout
    if args.smoke:
        env["TRITON_INTERPRET"] = "1"
    steps = []
    if args.smoke:
        steps.append({"step": "bf16 kernel tests", "status": "skipped (smoke: needs a GPU)", "ok": True})
    elif importlib.util.find_spec("pytest") is None:
        steps.append({"step": "bf16 kernel tests", "status": "failed (pytest is not installed here)", "ok": False})
    else:
        tests = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "--noconftest", "tests/test_kernels.py"]
        steps.append(run_step("bf16 kernel tests", tests, env, timeout))
    commands = {
        "kernel benchmark": [sys.executable, "-m", "kernels.bench", "--out", str(results / "kernels.json")],
        "MFU benchmark": [sys.executable, "benchmarks/mfu.py", "--out", str(results / "mfu.json")],
        "dense+S2 at 32K": [sys.executable, "benchmarks/mfu.py", "--out", str(results / "hybrid.json"),
                            "--seq-len", "32768", "--batch", "1", "--s2-stride", "16", "--attn-backend", "triton",
                            "--activation-checkpointing", "selective"],
        "needle at 4K": [sys.executable, "benchmarks/needle_s2.py", "--out", str(results / "needle.json"),
                         "--device", "cuda", "--backend", "triton", "--seq-len", "4096", "--block-size", "64"],
    }  # fmt: skip
    for name, command in commands.items():
        steps.append(run_step(name, [*command, *smoke, *extra.get(name, [])], env, timeout))
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
