"""`make gpu-check` must work the first time it meets a GPU: everything it does that a CPU can do
is exercised here (argument parsing, the timing loops at toy sizes with the Triton kernels in the
interpreter, the JSON it writes, the Markdown tables it renders into docs/benchmarks.md)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def test_smoke_path_writes_results_and_rewrites_only_the_marked_tables(tmp_path):
    docs = tmp_path / "benchmarks.md"
    shutil.copy(ROOT / "docs" / "benchmarks.md", docs)
    before = docs.read_text()
    results = tmp_path / "results"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    command = [sys.executable, "benchmarks/gpu_check.py", "--smoke", "--results", str(results), "--docs", str(docs)]
    run = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]

    kernels = json.loads((results / "kernels.json").read_text())
    names = {row["kernel"] for row in kernels["timings"]}
    assert {"triton-dense", "sdpa", "flex-dense", "triton-s2-smoke", "flex-s2-smoke"} <= names
    assert all("fwd_ms" in row for row in kernels["timings"]), kernels["timings"]
    assert all("fwd_bwd_ms" in row for row in kernels["timings"] if not row["kernel"].startswith("flex"))
    mfu = json.loads((results / "mfu.json").read_text())
    assert [row["attn_backend"] for row in mfu["rows"]] == ["sdpa", "triton"]
    assert all("error" not in row for row in mfu["rows"]), mfu["rows"]
    hybrid = json.loads((results / "hybrid.json").read_text())["rows"]
    assert [(r["attn_backend"], r["layers"]) for r in hybrid] == [
        ("sdpa", "dense"), ("sdpa", "dense+S2/16"), ("triton", "dense+S2/16")
    ]  # fmt: skip
    assert all(r["speedup_vs_dense"] > 0 for r in hybrid[1:]), hybrid
    needle = json.loads((results / "needle.json").read_text())
    assert [r["pattern"] for r in needle] == ["s2", "dense", "local-only"]
    assert all(len(r["accuracy_by_depth"]) == 5 for r in needle)
    summary = json.loads((results / "gpu_check.json").read_text())
    assert [s["ok"] for s in summary["steps"]] == [True] * 6, summary

    after = docs.read_text()
    assert "| 128 | triton-s2-smoke |" in after and "| sdpa | dense | no | 0.00B | 64 | 1 |" in after
    assert "| triton | dense+S2/16 | no | 0.00B | 64 | 1 |" in after
    assert "| needle depth | s2 | dense | local-only |" in after

    def outside_the_markers(text: str) -> list[str]:
        return [part.split("<!-- /gpu-check")[-1] for part in text.split("<!-- gpu-check")]

    assert outside_the_markers(after) == outside_the_markers(before), "nothing else in the file changes"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_without_a_gpu_it_refuses_naming_the_python_and_the_way_out():
    run = subprocess.run([sys.executable, "benchmarks/gpu_check.py"], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 2 and sys.executable in run.stderr and "GPU_PYTHON" in run.stderr, run.stderr


def test_markers_are_required():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import gpu_check

    with pytest.raises(ValueError, match="gpu-check:mfu"):
        gpu_check.replace_between_markers("no markers here", "gpu-check:mfu", "table")
    text = "a\n<!-- m -->\nold\n<!-- /m -->\nb"
    assert gpu_check.replace_between_markers(text, "m", "new") == "a\n<!-- m -->\nnew\n<!-- /m -->\nb"


def test_a_step_past_its_timeout_is_recorded_and_the_kernel_filter_names_what_exists():
    """A short lease: a step cut at --step-timeout is a failed step saying so, not a lost run; a
    --kernels pattern matching nothing lists the names it could have matched."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import gpu_check

    from kernels.bench import select

    step = gpu_check.run_step("sleeper", [sys.executable, "-c", "import time; time.sleep(30)"], dict(os.environ), 1)
    assert step == {"step": "sleeper", "status": "timed out after 1 s", "ok": False}
    kernels = {"triton-dense": None, "sdpa": None, "flex-s2-stride16": None}
    assert list(select(kernels, ["triton-*", "flex-s2-*"])) == ["triton-dense", "flex-s2-stride16"]
    with pytest.raises(ValueError, match="matches none of: triton-dense, sdpa"):
        select(kernels, ["flash*"])
