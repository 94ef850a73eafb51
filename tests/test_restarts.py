"""Restarts under SLURM: launch/slurm/pretrain.sbatch runs a failed job step again, and the run resumes
from the newest checkpoint and ends as the uninterrupted run. SLURM is not installed here: `srun` and
`scontrol` are stand-ins on PATH that run the step as one task on this host; the kill is real.
torchrun's own restarts (`--max-restarts`) are tested in tests/test_launch.py."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.test_launch import losses, wait_for_step

ROOT = Path(__file__).resolve().parents[1]
STANDINS = {
    "srun": '#!/usr/bin/env bash\nwhile [ "${1#--}" != "$1" ]; do shift; done\nexec "$@"\n',  # drop srun's options
    "scontrol": "#!/usr/bin/env bash\necho localhost\n",
}


def sbatch(tmp_path: Path, data: Path, out: Path) -> subprocess.Popen:
    bin_dir = tmp_path / "slurm-bin"
    bin_dir.mkdir(exist_ok=True)
    for name, text in STANDINS.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "SLURM_SUBMIT_DIR": str(ROOT), "SLURM_JOB_NODELIST": "localhost", "MAX_RESTARTS": "1"}  # fmt: skip
    args = ["--config", "configs/pretrain/tiny.yaml", f"data.path={data}", f"out_dir={out}", "steps=12",
            "checkpoint.save_every=2", "parallel.tp=1", "parallel.pp=1", "log_every=1"]  # fmt: skip
    cmd = ["bash", "launch/slurm/pretrain.sbatch", *args]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.chaos  # two single-process runs of the tiny job (half a minute)
def test_the_sbatch_script_reruns_a_killed_step_which_resumes_and_ends_as_uninterrupted(tiny_data, tmp_path):
    clean = sbatch(tmp_path, tiny_data, tmp_path / "clean")
    out, _ = clean.communicate(timeout=600)
    assert clean.returncode == 0, out[-3000:]

    proc = sbatch(tmp_path, tiny_data, tmp_path / "killed")
    run_dir = tmp_path / "killed" / "tiny"
    wait_for_step(proc, run_dir / "metrics.jsonl", 3)
    trainer = next(p for p in psutil.Process(proc.pid).children(recursive=True) if "launch/pretrain.sh" in p.cmdline())
    trainer.send_signal(signal.SIGKILL)
    killed_at = time.time()
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    assert "the job step failed (exit 137); restart 1 of 1" in out and "resumed from" in out, out[-3000:]
    assert time.time() - killed_at < 300
    assert losses(run_dir) == losses(tmp_path / "clean" / "tiny")
