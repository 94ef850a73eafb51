"""Launch and recovery through real launchers on loopback.

- Two DeepSpeed `--no_ssh` launchers (one per simulated node, 2 ranks each), torchrun and mpirun
  all train exactly like one 4-rank DeepSpeed node.
- kill -9 of one rank: every other rank is gone within the timeout, and `resume=auto` continues
  from the last complete checkpoint with the uninterrupted run's losses.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from tests.distributed import free_port
from tests.faulty_fs import faulty_filesystem

ROOT = Path(__file__).resolve().parents[1]
STEPS = 8
EXIT_TIMEOUT_S = 60


def launcher(args: list[str], data: Path, out_dir: Path, *extra: str, program: str = "deepspeed") -> list[str]:
    train = ["--config", "configs/pretrain/tiny.yaml", f"data.path={data}", f"out_dir={out_dir}", f"steps={STEPS}"]
    return [program, *args, "launch/pretrain.sh", *train, "log_every=1", "checkpoint.save_every=2", *extra]


def start(cmd: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def losses(run_dir: Path) -> dict[int, float]:
    """Step -> loss; a later line for the same step (after a restart) wins."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows}


def wait_for_step(proc: subprocess.Popen, metrics: Path, step: int) -> None:
    deadline = time.time() + 300
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= step):
        assert proc.poll() is None and time.time() < deadline, f"training did not reach step {step}"
        time.sleep(0.2)


def run(cmd: list[str]) -> None:
    proc = start(cmd)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-4000:]


@pytest.fixture(scope="module")
def reference(tiny_data, tmp_path_factory) -> dict[int, float]:
    """Losses of one 4-rank DeepSpeed node (TP=2 x PP=2)."""
    out = tmp_path_factory.mktemp("reference")
    run(launcher(["--num_gpus", "4", "--master_port", str(free_port())], tiny_data, out))
    return losses(out / "tiny")


@pytest.mark.slow  # two launchers of 2 ranks; torchrun's equality with deepspeed stays in the default suite
def test_two_no_ssh_nodes_equal_one_node(tiny_data, reference, tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=2\nnode1 slots=2\n")
    port = str(free_port())
    nodes = [
        start(
            launcher(
                [
                    "--hostfile",
                    str(hostfile),
                    "--no_ssh",
                    "--node_rank",
                    str(rank),
                    "--master_addr",
                    "127.0.0.1",
                    "--master_port",
                    port,
                ],
                tiny_data,
                tmp_path / "multi",
            )
        )  # fmt: skip
        for rank in (0, 1)
    ]
    for node in nodes:
        out, _ = node.communicate(timeout=600)
        assert node.returncode == 0, out[-4000:]
    assert losses(tmp_path / "multi" / "tiny") == reference


@pytest.mark.parametrize("program", ["torchrun", pytest.param("mpirun", marks=pytest.mark.slow)])
def test_torchrun_and_mpirun_equal_deepspeed(program, tiny_data, reference, tmp_path):
    if program == "torchrun":
        args = ["--nproc_per_node", "4", "--master_port", str(free_port())]
    else:  # ranks found from Open MPI's variables, the rendezvous address broadcast with mpi4py
        args = ["--allow-run-as-root", "--oversubscribe", "-np", "4", "-x", f"MASTER_PORT={free_port()}", "python"]
    run(launcher(args, tiny_data, tmp_path, program=program))
    assert losses(tmp_path / "tiny") == reference


@pytest.mark.chaos  # `make chaos`; the faults file keeps killed ranks under every launcher in the default suite
def test_kill_9_of_one_rank_stops_all_and_resume_reproduces(tiny_data, reference, tmp_path):
    crashed = tmp_path / "crashed"
    proc = start(launcher(["--num_gpus", "4", "--master_port", str(free_port())], tiny_data, crashed,
                          "dist_timeout_s=30"))  # fmt: skip
    wait_for_step(proc, crashed / "tiny" / "metrics.jsonl", 5)
    ranks = [p for p in psutil.Process(proc.pid).children(recursive=True) if "--local_rank=2" in p.cmdline()]
    assert ranks, "rank 2 not found among the launcher's children"
    survivors = [p for p in psutil.Process(proc.pid).children(recursive=True) if "pretrain.sh" in " ".join(p.cmdline())]
    os.kill(ranks[0].pid, signal.SIGKILL)
    killed_at = time.time()
    proc.communicate(timeout=EXIT_TIMEOUT_S + 30)
    gone, alive = psutil.wait_procs(survivors, timeout=max(1, EXIT_TIMEOUT_S - (time.time() - killed_at)))
    assert not alive, f"ranks still running {time.time() - killed_at:.0f}s after the kill: {alive}"
    assert proc.returncode != 0

    run(launcher(["--num_gpus", "4", "--master_port", str(free_port())], tiny_data, crashed))
    assert losses(crashed / "tiny") == reference


def test_rank_discovery_from_scheduler_variables():
    from training.parallel.world import rank_env

    assert rank_env({"RANK": "3", "WORLD_SIZE": "4"}) == {}, "torchrun / deepspeed already set everything"
    slurm = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_NTASKS_PER_NODE": "4(x2)",
             "MASTER_ADDR": "node001"}  # fmt: skip
    assert rank_env(slurm) == {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4",
                               "MASTER_ADDR": "node001", "MASTER_PORT": "29500"}  # fmt: skip
    ompi = {"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "2"}
    found = rank_env(ompi)
    assert (found["RANK"], found["WORLD_SIZE"], found["LOCAL_RANK"]) == ("2", "4", "2")
    assert found["MASTER_ADDR"] == "", "left for mpi4py to broadcast"
    assert rank_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}) == {}, "a one-task job is not distributed"


def test_ranks_split_the_cores_they_may_use_not_the_machines():
    """Under a cpuset (here `taskset` pins the process to one core; SLURM and containers do the
    same), torch's threads and the data build's workers count the cores the process may use."""
    probe = ("from training.parallel.world import limit_cpu_threads; import torch; "
             "from data_pipeline.engine import LocalEngine; limit_cpu_threads(); "
             "print(torch.get_num_threads(), LocalEngine().workers)")  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    env.update(LOCAL_WORLD_SIZE="1", CUDA_VISIBLE_DEVICES="")
    pinned = subprocess.run(["taskset", "-c", "0", sys.executable, "-c", probe], env=env, capture_output=True,
                            text=True, check=True, cwd=Path(__file__).parents[1])  # fmt: skip
    assert pinned.stdout.split() == ["1", "1"], pinned.stdout + pinned.stderr
    if (os.cpu_count() or 1) > 1:  # unpinned: the rank takes every core it may use
        free = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True,
                              cwd=Path(__file__).parents[1])  # fmt: skip
        assert free.stdout.split() == [str(len(os.sched_getaffinity(0)))] * 2, free.stdout + free.stderr
    # An explicit OMP_NUM_THREADS is respected (a user lowering it on a shared machine).
    asked = subprocess.run([sys.executable, "-c", probe], env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True,
                           text=True, check=True, cwd=Path(__file__).parents[1])  # fmt: skip
    assert asked.stdout.split()[0] == "1", asked.stdout + asked.stderr


def launch_of_four(program: str, tiny_data: Path, out_dir: Path, *extra: str) -> subprocess.Popen:
    """4 ranks of the tiny job under `program` (deepspeed, torchrun or mpirun), on a fresh port."""
    port = str(free_port())
    args = {
        "deepspeed": ["--num_gpus", "4", "--master_port", port],
        "torchrun": ["--nproc_per_node", "4", "--master_port", port],
        "mpirun": ["--allow-run-as-root", "--oversubscribe", "-np", "4", "-x", f"MASTER_PORT={port}", "python"],
    }[program]
    return start(launcher(args, tiny_data, out_dir, *extra, program=program))


def ranks_of(proc: subprocess.Popen) -> tuple[list[psutil.Process], list[psutil.Process]]:
    """(the launcher's process family, the 4 training ranks among it)."""
    family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    commands = {p.pid: p.cmdline() for p in family}
    ranks = [p for p in family if "launch/pretrain.sh" in commands[p.pid] and not any(
        name in " ".join(commands[p.pid][:4]) for name in ("deepspeed", "torchrun", "mpirun", "prterun"))]  # fmt: skip
    assert len(ranks) == 4, [p.cmdline() for p in family]
    return family, ranks


@pytest.mark.parametrize("program", ["torchrun", pytest.param("mpirun", marks=pytest.mark.chaos)])
def test_a_killed_rank_fails_the_launch(program, tiny_data, tmp_path):
    """`kill -9` of one rank: the launcher stops the others and exits non-zero (deepspeed: above)."""
    proc = launch_of_four(program, tiny_data, tmp_path, "steps=100000", "dist_timeout_s=30")
    wait_for_step(proc, tmp_path / "tiny" / "metrics.jsonl", 2)
    _, ranks = ranks_of(proc)
    os.kill(ranks[2].pid, signal.SIGKILL)
    proc.communicate(timeout=EXIT_TIMEOUT_S + 30)
    gone, alive = psutil.wait_procs(ranks, timeout=EXIT_TIMEOUT_S)
    assert not alive and proc.returncode != 0, (proc.returncode, alive)


@pytest.mark.parametrize(
    "target",
    [
        "deepspeed",
        pytest.param("torchrun", marks=pytest.mark.slow),
        # the same watchdog under two more launchers: `make chaos`
        pytest.param("deepspeed.launcher.launch", marks=pytest.mark.chaos),
        pytest.param("mpirun", marks=pytest.mark.chaos),
    ],
)
def test_ranks_exit_when_their_launcher_is_killed(target, tiny_data, tmp_path):
    """`kill -9` of the launcher (deepspeed's runner, its per-node launch process, torchrun or
    mpirun): every rank is gone within seconds instead of training on as an orphan."""
    program = target.split(".")[0]
    proc = launch_of_four(program, tiny_data, tmp_path, "steps=100000")
    wait_for_step(proc, tmp_path / "tiny" / "metrics.jsonl", 2)
    family, ranks = ranks_of(proc)
    victim = proc.pid if target != "deepspeed.launcher.launch" else next(
        p.pid for p in family if "deepspeed.launcher.launch" in " ".join(p.cmdline())
    )  # fmt: skip
    os.kill(victim, signal.SIGKILL)
    killed_at = time.time()
    gone, alive = psutil.wait_procs(ranks, timeout=30)
    for p in alive:
        p.kill()
    proc.kill()
    proc.communicate()
    assert not alive, f"{len(alive)} ranks still running {time.time() - killed_at:.0f}s after the launcher was killed"


@pytest.mark.chaos
def test_a_writer_killed_mid_save_leaves_nothing_behind(tiny_data, reference, tmp_path):
    """`kill -9` of rank 0 while an async checkpoint is being written (a slow FUSE disk makes the
    save last seconds): the launch fails, the relaunch removes the partial folder and says so,
    resumes from the previous checkpoint and reproduces the uninterrupted run's losses."""
    run_dir = tmp_path / "tiny"
    partial = run_dir / "checkpoints" / "step_00000004"
    with faulty_filesystem(run_dir / "checkpoints", write_delay_s=0.005):
        proc = launch_of_four("deepspeed", tiny_data, tmp_path, "checkpoint.async_save=true")
        deadline = time.time() + 300
        while not any(partial.glob("*.distcp")):
            assert proc.poll() is None and time.time() < deadline, "the save of step 4 never started"
            time.sleep(0.02)
        _, ranks = ranks_of(proc)
        os.kill(next(p.pid for p in ranks if "--local_rank=0" in p.cmdline()), signal.SIGKILL)
        proc.communicate(timeout=EXIT_TIMEOUT_S + 30)
        assert proc.returncode != 0 and partial.is_dir() and not (partial / "trainer_state.json").exists()

        relaunch = launch_of_four("deepspeed", tiny_data, tmp_path)
        out, _ = relaunch.communicate(timeout=600)
        assert relaunch.returncode == 0, out[-4000:]
    assert f"removing {partial}: a save that never completed" in out, out[-4000:]
    assert "resumed from" in out and "step_00000002 at step 2" in out, out[-4000:]
    assert losses(run_dir) == reference


@pytest.mark.chaos  # 4 ranks launched twice (a minute); a relaunch's resume is in the default suite (test_resume.py)
@pytest.mark.parametrize("rendezvous", ["--standalone", "--master_port"])
def test_torchrun_restarts_the_workers_after_a_killed_rank_and_the_run_ends_as_uninterrupted(
    rendezvous, tiny_data, reference, tmp_path
):
    """`kill -9` of rank 1 after step 3 under `torchrun --max-restarts 1` (c10d and static rendezvous):
    the agent restarts every worker, they re-form the gloo mesh, resume from the newest checkpoint
    (step 2) and finish; every step's loss (the last run of it) equals the uninterrupted run's."""
    args = ["--nproc_per_node", "4", "--max-restarts", "1", rendezvous]
    if rendezvous == "--master_port":
        args.append(str(free_port()))
    proc = start(launcher(args, tiny_data, tmp_path, program="torchrun"))
    run_dir = tmp_path / "tiny"
    wait_for_step(proc, run_dir / "metrics.jsonl", 3)
    beats = [json.loads(p.read_text()) for p in (run_dir / "heartbeats").glob("*.json")]
    os.kill(next(b["pid"] for b in beats if b["rank"] == 1), signal.SIGKILL)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-4000:]
    assert "connectFullMesh" not in out and "resumed from" in out, out[-4000:]
    assert losses(run_dir) == reference


@pytest.mark.chaos  # a minute of 4 ranks; tests/test_watchdog.py checks the report in-process in the default suite
def test_a_stopped_rank_is_named_by_every_other_and_the_job_exits(tiny_data, tmp_path):
    """SIGSTOP of one rank of a TP2 x PP2 run under torchrun: every live rank reports, within the
    hang timeout plus 15 s, that this rank stopped responding (with the collective it waits in and
    its stacks, in the run folder), the job exits non-zero, and no process is left."""
    timeout = 20
    proc = launch_of_four("torchrun", tiny_data, tmp_path, "steps=100000", f"hang_timeout_s={timeout}",
                          "dist_timeout_s=300")  # fmt: skip
    run_dir = tmp_path / "tiny"
    wait_for_step(proc, run_dir / "metrics.jsonl", 2)
    _, ranks = ranks_of(proc)
    beats = [json.loads(p.read_text()) for p in (run_dir / "heartbeats").glob("*.json")]
    victim = next(p for p in ranks if any(b["pid"] == p.pid and b["rank"] == 1 for b in beats))
    os.kill(victim.pid, signal.SIGSTOP)
    stopped_at = time.time()
    try:
        output, _ = proc.communicate(timeout=timeout + 15 + 60)
        reports = {int(p.stem.split("_")[1]): p.read_text() for p in (run_dir / "hang").glob("rank_*.txt")}
        named_by = {r for r, text in reports.items() if "not responding: ranks [1]" in text}
        assert named_by == {0, 2, 3}, (reports.keys(), output[-3000:])
        assert all("waiting in" in text and "--- thread" in text for text in reports.values())
        first = min(p.stat().st_mtime for p in (run_dir / "hang").glob("rank_*.txt"))
        assert first - stopped_at < timeout + 15, f"first report {first - stopped_at:.0f} s after the stop"
        assert proc.returncode != 0 and "not responding: ranks [1]" in output
        gone, alive = psutil.wait_procs(ranks, timeout=EXIT_TIMEOUT_S)
        assert not alive, [p.pid for p in alive]
    finally:
        for p in ranks:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        proc.kill()


@pytest.mark.chaos  # 80 steps of a 2-rank job (about two minutes); the mechanism is tested above in the default suite
def test_a_rank_throttled_from_outside_is_named_within_fifty_steps(tiny_data, tmp_path):
    """Rank 1 of a DP2 torchrun job is stopped and continued by signals (half its time stopped, as a
    noisy neighbour or a throttled device would slow it) from step 10: the log names rank 1 within
    50 steps, and rank 0 is never named."""
    port = str(free_port())
    args = ["--nproc_per_node", "2", "--master_port", port]
    cmd = launcher(args, tiny_data, tmp_path, "steps=80", "check.stragglers_every=5",
                   "checkpoint.save_every=0", "parallel.tp=1", "parallel.pp=1", program="torchrun")  # fmt: skip
    proc = start(cmd)
    run_dir = tmp_path / "tiny"
    stop = threading.Event()
    try:
        wait_for_step(proc, run_dir / "metrics.jsonl", 10)
        beats = [json.loads(p.read_text()) for p in (run_dir / "heartbeats").glob("*.json")]
        victim = next(b["pid"] for b in beats if b["rank"] == 1)
        throttled_from = len((run_dir / "metrics.jsonl").read_text().splitlines())

        def throttle():
            with contextlib.suppress(ProcessLookupError):  # the job ended
                while not stop.is_set():
                    os.kill(victim, signal.SIGSTOP)
                    time.sleep(0.1)
                    os.kill(victim, signal.SIGCONT)
                    time.sleep(0.1)

        threading.Thread(target=throttle, daemon=True).start()
        output, _ = proc.communicate(timeout=600)
    finally:
        stop.set()
        proc.kill()
    assert proc.returncode == 0, output[-3000:]
    named = [line for line in output.splitlines() if "straggler at step" in line and ": rank " in line]
    assert named and all(": rank 1 (" in line for line in named), named or output[-3000:]
    at = int(named[0].split("straggler at step ")[1].split(":")[0])
    assert at - throttled_from <= 50, f"named at step {at}, throttled from step {throttled_from}"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    checked = [r for r in rows if "busy_s_p50/rank_1" in r]
    assert checked and checked[-1]["busy_s_p50/rank_1"] > 1.25 * checked[-1]["busy_s_p50/rank_0"]
