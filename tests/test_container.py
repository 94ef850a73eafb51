"""The CPU image builds and runs the default job, where a Docker engine is available."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def docker_engine() -> bool:
    if shutil.which("docker") is None:
        return False
    return subprocess.run(["docker", "info"], capture_output=True, timeout=30).returncode == 0


@pytest.mark.slow
@pytest.mark.skipif(not docker_engine(), reason="no Docker engine on this machine")
def test_cpu_image_builds_and_runs_the_default_job():
    subprocess.run(["docker", "build", "-t", "polyglot-train:test", "."], cwd=ROOT, check=True, timeout=3600)
    run = subprocess.run(
        ["docker", "run", "--rm", "polyglot-train:test", "make", "pretrain", "NPROC=4"],
        capture_output=True, text=True, timeout=3600,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "saved checkpoint runs/tiny/checkpoints/step_00000300" in run.stdout + run.stderr
