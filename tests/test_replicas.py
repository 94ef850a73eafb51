"""Replica groups that survive a lost peer (training/parallel/replicas.py: torchft on gloo). Each
replica is a process of its own meeting its peer at a real `torchft_lighthouse`; the kill is real."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from common.config import ConfigError, load_config
from tests.distributed import free_port
from tests.test_launch import losses
from training.config import TrainConfig
from training.parallel.replicas import load_local_state, local_state

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
STEPS = 80


def train_args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["--config", "configs/pretrain/tiny.yaml", f"data.path={data}", f"out_dir={out}", f"steps={STEPS}",
            "parallel.tp=1", "parallel.pp=1", "log_every=1", *extra]  # fmt: skip


def start(cmd: list[str], log: Path, **env: str) -> subprocess.Popen:
    # One thread per process: the replicas and the reference then sum in the same order.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", **env}
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log.open("a"), stderr=subprocess.STDOUT)


def replica(i: int, data: Path, out: Path, lighthouse: str, log: Path, *extra: str, tp: int = 1) -> subprocess.Popen:
    """Replica group `i` of 2: one process, or `tp` ranks under torchrun (tensor parallel inside)."""
    ft = ["fault_tolerance.enable=true", "fault_tolerance.replicas=2", f"fault_tolerance.replica_id={i}"]
    train = ["-m", "training.pretrain", *train_args(data, out, *ft, f"parallel.tp={tp}", *extra)]
    if tp == 1:
        return start([sys.executable, *train], log, TORCHFT_LIGHTHOUSE=lighthouse)
    torchrun = [str(BIN / "torchrun"), "--nproc_per_node", str(tp), "--master_port", str(free_port())]
    return start([*torchrun, *train], log, TORCHFT_LIGHTHOUSE=lighthouse)


def kill_a_rank(proc: subprocess.Popen, run_dir: Path, tp: int) -> None:
    """`kill -9` of the replica's process, or of its last rank (torchrun then ends the group)."""
    if tp == 1:
        proc.send_signal(signal.SIGKILL)
    else:
        beats = [json.loads(p.read_text()) for p in (run_dir / "heartbeats").glob("*.json")]
        os.kill(next(b["pid"] for b in beats if b["rank"] == tp - 1), signal.SIGKILL)
    proc.wait(timeout=120)


def rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def steps_alone(run_dir: Path, after: int) -> list[int]:
    """The steps after `after` this replica trained as the only live one."""
    return [r["step"] for r in rows(run_dir) if r.get("replicas") == 1 and r["step"] > after]


def wait_until(condition, what: str, *procs: subprocess.Popen, limit_s: float = 180) -> None:
    deadline = time.time() + limit_s
    while not condition():
        assert all(p.poll() is None for p in procs), f"a replica exited before {what}"
        assert time.time() < deadline, f"no {what} within {limit_s} s"
        time.sleep(0.1)


def saved_state(run_dir: Path, step: int, tmp_path: Path) -> dict:
    out = tmp_path / f"{run_dir.name}_{step}.pt"
    dcp_to_torch_save(run_dir / "checkpoints" / f"step_{step:08d}", out)
    return torch.load(out, weights_only=False)


def run_lighthouse(tmp_path: Path, min_replicas: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [str(BIN / "torchft_lighthouse"), "--min_replicas", str(min_replicas), "--join_timeout_ms", "1000",
           "--bind", f"[::]:{port}"]  # fmt: skip
    return start(cmd, tmp_path / "lighthouse.log"), f"http://localhost:{port}"


def same_states(runs: list[Path], step: int, tmp_path: Path) -> None:
    """The checkpoints both replicas saved at `step` hold bit-identical weights and optimizer states."""
    states = [saved_state(run, step, tmp_path) for run in runs]
    for part in ("model", "optim"):
        for key, value in states[0][part].items():
            other = states[1][part][key]
            assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other, key


def test_two_replicas_train_exactly_as_two_data_parallel_ranks(tiny_data, tmp_path):
    """With both replicas in every quorum (the lighthouse asks for 2), each step's loss equals a 2-rank
    data-parallel run's bit for bit: the global batch is split alike and the gradient is the same sum."""
    reference = tmp_path / "reference"
    torchrun = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()), "-m",
                "training.pretrain", *train_args(tiny_data, reference, "steps=8")]  # fmt: skip
    lighthouse, address = run_lighthouse(tmp_path, min_replicas=2)
    out, logs = tmp_path / "ft", [tmp_path / f"replica_{i}.log" for i in (0, 1)]
    try:
        replicas = [replica(i, tiny_data, out, address, logs[i], "steps=8") for i in (0, 1)]
        for proc, log in zip(replicas, logs, strict=True):
            assert proc.wait(timeout=300) == 0, log.read_text()[-3000:]
    finally:
        lighthouse.kill()
    assert start(torchrun, tmp_path / "reference.log").wait(timeout=300) == 0, (tmp_path / "reference.log").read_text()
    runs = [out / "tiny" / f"replica_{i}" for i in (0, 1)]
    expected = losses(reference / "tiny")
    assert len(expected) == 8 and all(losses(run) == expected for run in runs)
    same_states(runs, 8, tmp_path)


@pytest.mark.parametrize("tp", [1, pytest.param(2, marks=pytest.mark.chaos)], ids=["one-process", "tp2"])
def test_a_killed_replica_leaves_its_peer_training_and_rejoins_with_the_current_weights(tp, tiny_data, tmp_path):
    """`kill -9` of replica 1 of 2 after step 4 (the lighthouse asks for 1): replica 0 goes on alone, in
    the same processes, on its half of each global batch; replica 1 started again joins before its next
    step with replica 0's state (it has no checkpoint to resume from), trains every step after, and
    both end with identical weights and optimizer states. Each replica one process, or two TP ranks
    under torchrun (their state sent shard by shard; `make chaos`)."""
    lighthouse, address = run_lighthouse(tmp_path, min_replicas=1)
    out, logs = tmp_path / "ft", [tmp_path / f"replica_{i}.log" for i in (0, 1)]
    runs = [out / "tiny" / f"replica_{i}" for i in (0, 1)]
    try:
        first, second = (replica(i, tiny_data, out, address, logs[i], tp=tp) for i in (0, 1))
        wait_until(lambda: len(rows(runs[1])) >= 4, "step 4 on replica 1", first, second)
        kill_a_rank(second, runs[1], tp)
        trained = [r["step"] for r in rows(runs[1]) if "loss" in r]
        first_life, killed_after = len(trained), trained[-1]
        wait_until(lambda: steps_alone(runs[0], killed_after), "a step alone", first)
        again = replica(1, tiny_data, out, address, logs[1], tp=tp)
        assert first.wait(timeout=300) == 0, logs[0].read_text()[-3000:]
        assert again.wait(timeout=300) == 0, logs[1].read_text()[-3000:]
    finally:
        lighthouse.kill()

    # Replica 0 may itself have joined at step 1 or 2 (whichever replica is ready first starts alone).
    survivor = [r["step"] for r in rows(runs[0]) if "loss" in r]
    assert survivor[0] <= killed_after and survivor == list(range(survivor[0], STEPS + 1))
    alone = steps_alone(runs[0], killed_after)
    joined = re.findall(r"joined the live replicas at step (\d+)", logs[1].read_text())  # one per life
    assert alone and joined, logs[1].read_text()[-3000:]
    at = int(joined[-1])
    second_life = [r["step"] for r in rows(runs[1]) if "loss" in r][first_life:]
    assert alone[0] <= at < STEPS and second_life == list(range(at + 1, STEPS + 1))
    assert all(r["replicas"] == 2 for r in rows(runs[0]) if r.get("step", 0) > at and "loss" in r)
    same_states(runs, STEPS, tmp_path)


def test_a_peers_state_makes_the_next_step_identical():
    """What a joining replica receives (`local_state`) makes its next optimizer step the peer's, bit for bit."""
    torch.manual_seed(0)
    models = [torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8)) for _ in range(2)]
    optims = [torch.optim.AdamW(m.parameters(), lr=1e-2, fused=True) for m in models]
    batch = torch.randn(4, 8)
    for _ in range(3):  # the peer has trained; the joining one is fresh
        models[0](batch).square().mean().backward()
        optims[0].step()
        optims[0].zero_grad()
    sent = io.BytesIO()  # as torchft's HTTP transport sends it
    torch.save(local_state(models[0], optims[0]), sent)
    load_local_state(models[1], optims[1], torch.load(io.BytesIO(sent.getvalue()), weights_only=False))
    for model, optim in zip(models, optims, strict=True):
        model(batch).square().mean().backward()
        optim.step()
    for a, b in zip(models[0].parameters(), models[1].parameters(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("fault_tolerance.replica_id=2", "replica_id must be below replicas (2), got 2"),
        ("fault_tolerance.min_replicas=3", "min_replicas must be at most replicas (2), got 3"),
    ],
)
def test_a_replica_setting_out_of_range_is_named(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)) as err:
        load_config(TrainConfig, None, ["fault_tolerance.enable=true", "fault_tolerance.replicas=2", override])
    assert "fault_tolerance" in str(err.value)


def test_replica_groups_refuse_to_start_without_a_lighthouse(tiny_data, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TORCHFT_LIGHTHOUSE"}
    args = train_args(tiny_data, tmp_path, "fault_tolerance.enable=true", "steps=1")
    done = subprocess.run([sys.executable, "-m", "training.pretrain", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 2
    assert "fault_tolerance.enable needs a lighthouse" in done.stderr + done.stdout
