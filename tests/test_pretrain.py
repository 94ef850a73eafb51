"""The default job end to end through the real launcher, and the CLI's refusals."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

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
    file = "configs/pretrain/tiny.yaml"
    assert f"set by: parallel.tp in {file}, parallel.pp in {file}" in result.stderr


BAD_VALUES = [  # override, what the one line says after "error: command line '<override>': "
    ("steps=-5", "steps must be >= 1, got -5"),
    ("steps=0", "steps must be >= 1, got 0"),
    ("steps=many", "steps: expected an integer, got 'many'"),
    ("stop_after=0", "stop_after must be >= 1, got 0"),
    ("log_every=0", "log_every must be >= 1, got 0"),
    ("eval_every=-1", "eval_every must be >= 0, got -1"),
    ("eval_batches=-2", "eval_batches must be >= 0, got -2"),
    ("dist_timeout_s=0", "dist_timeout_s must be > 0, got 0"),
    ("precision=fp8", "precision must be one of fp32, bf16, fp16, got 'fp8'"),
    ("activation_checkpointing=some", "activation_checkpointing must be one of none, full, selective, got 'some'"),
    ("nonfinite=ignore", "nonfinite must be one of stop, skip, got 'ignore'"),
    ("objective=dpx", "objective 'dpx' is not one of ['dpo', 'grpo', 'lm']; did you mean 'dpo'?"),
    ("data.global_batch_size=-16", "data: global_batch_size must be >= 1, got -16"),
    ("parallel.micro_batch_size=0", "parallel: micro_batch_size must be >= 1, got 0"),
    ("parallel.tp=0", "parallel: tp must be >= 1, got 0"),
    ("parallel.pp=-1", "parallel: pp must be >= 1, got -1"),
    ("parallel.cp=0", "parallel: cp must be >= 1, got 0"),
    ("parallel.dp=0", "parallel: dp must be >= 1 (or -1: what the world size leaves), got 0"),
    ("parallel.virtual_stages=0", "parallel: virtual_stages must be >= 1, got 0"),
    ("parallel.dp_mode=zero3", "parallel: dp_mode must be one of allreduce, fsdp, got 'zero3'"),
    ("parallel.fsdp_unit=layer", "parallel: fsdp_unit must be one of block, linear, got 'layer'"),
    ("checkpoint.keep_last=-1", "checkpoint: keep_last must be >= 0, got -1"),
    ("checkpoint.save_every=-2", "checkpoint: save_every must be >= 0, got -2"),
    ("optim.lr=-1e-3", "optim: lr must be > 0 (or 'auto'), got -0.001"),
    ("optim.beta2=1.5", "optim: beta2 must be in [0, 1), got 1.5"),
    ("dpo.beta=high", "dpo.beta: expected a number, got 'high'"),
]


@pytest.mark.parametrize("override,message", BAD_VALUES, ids=[o for o, _ in BAD_VALUES])
def test_a_bad_value_is_one_line_naming_the_key_and_where_it_was_written(override, message, capsys):
    """In-process (each refusal comes before any rank starts): exit 2, one line, no traceback."""
    from training.pretrain import main

    assert main(["configs/pretrain/tiny.yaml", override]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [f"error: command line {override!r}: {message}"]


def test_an_empty_config_file_is_refused(tmp_path, capsys):
    from training.pretrain import main

    (tmp_path / "empty.yaml").write_text("# nothing but a comment\n")
    assert main([str(tmp_path / "empty.yaml")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: {tmp_path / 'empty.yaml'}: the config file is empty; "
        "give the keys to set (or no file for every default)"
    ]


def test_a_backend_that_cannot_train_here_is_refused_before_any_model_is_built(capsys):
    import torch

    from training.pretrain import main

    if torch.cuda.is_available():
        pytest.skip("flex trains on a GPU")
    assert main(["configs/pretrain/tiny.yaml", "model.attn_backend=flex"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: model.attn_backend=flex cannot train on CPU"), err


@pytest.mark.slow  # four ranks through deepspeed; the refusals' texts are checked in process in the default suite
def test_a_layout_refusal_is_one_line_on_every_rank(tmp_path):
    """`parallel.tp=2 parallel.pp=3` on 4 ranks of the DeepSpeed launcher: every rank refuses before any
    process group starts, so each says the same one line and none dies in a collective (no traceback)."""
    cmd = ["bash", "launch/pretrain.sh", "--config", "configs/pretrain/tiny.yaml", "parallel.tp=2", "parallel.pp=3",
           f"out_dir={tmp_path}"]  # fmt: skip
    result = subprocess.run(
        cmd, cwd=ROOT, env={**env_with_venv(), "NPROC": "4"}, capture_output=True, text=True, timeout=300
    )
    out = result.stdout + result.stderr
    refusals = [line for line in out.splitlines() if "error: parallel layout tp=2 x pp=3" in line]
    assert result.returncode != 0 and len(refusals) == 4, out[-3000:]
    assert all("parallel.pp in command line 'parallel.pp=3'" in line for line in refusals), refusals
    assert "Traceback" not in out and "gloo" not in out.lower(), out[-3000:]
