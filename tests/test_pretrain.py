"""The default job end to end through the real launcher, and the CLI's refusals."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from common.config import load_config
from data_pipeline.build import BuildConfig, build

ROOT = Path(__file__).resolve().parents[1]
STEPS = 40


def env_with_venv() -> dict[str, str]:
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}


def test_default_job_trains_with_tp2_pp2_through_deepspeed(corpus_dir, tmp_path):
    data = tmp_path / "data"
    build(
        load_config(
            BuildConfig,
            ROOT / "configs/data/default.yaml",
            [
                f"output_dir={data}",
                f"sources=[{{paths: ['{corpus_dir}/*.jsonl']}}]",
                "total_tokens=200000",
            ],
        )
    )
    cmd = [
        "bash",
        "launch/pretrain.sh",
        "--config",
        "configs/pretrain/tiny.yaml",
        f"data.path={data}",
        f"out_dir={tmp_path / 'runs'}",
        f"steps={STEPS}",
        "log_every=10",
        "optim.warmup_steps=5",
    ]
    result = subprocess.run(
        cmd, cwd=ROOT, env={**env_with_venv(), "NPROC": "4"}, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout + result.stderr
    assert "germanic=" in out and "synthetic=" in out, "per-family losses on the console"

    run = tmp_path / "runs" / "tiny"
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, STEPS + 1))
    first, last = (sum(m["loss"] for m in ms) / 5 for ms in (metrics[:5], metrics[-5:]))
    assert last < first - 1.0, f"loss should fall: first steps {first:.3f}, last steps {last:.3f}"
    assert any((run / "tensorboard").glob("events.out.tfevents.*"))
    assert (run / "checkpoints" / "latest").read_text().strip() == f"step_{STEPS:08d}"


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in env_with_venv().items() if k not in ("WORLD_SIZE", "RANK")}
    return subprocess.run(
        [sys.executable, "-m", "training.pretrain", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_refuses_unknown_key_with_suggestion():
    result = run_cli("configs/pretrain/tiny.yaml", "optim.lrr=1e-3")
    assert result.returncode == 2
    assert "command line 'optim.lrr=1e-3': unknown key 'optim.lrr'; did you mean 'lr'" in result.stderr


def test_cli_refuses_layout_that_does_not_fit_world():
    result = run_cli("--config", "configs/pretrain/tiny.yaml")
    assert result.returncode == 2
    assert "tp=2 x pp=2" in result.stderr and "world size 1" in result.stderr
