"""Sweeps: expand a grid of overrides into training runs, run them (locally, or as a SLURM job array),
skip finished runs, and collect one results table (CSV) for the fits.

Spec (YAML):
    base: configs/pretrain/tiny.yaml
    out_dir: runs/sweeps/lr
    overrides: [parallel.tp=1, parallel.pp=1]      # for every run
    grid: {steps: [50, 100, 200], optim.lr: [1e-3, 3e-3, 1e-2], model.dim: [64, 128]}
    parallel: 1                                    # local runs at a time
    mixes: {default: {}, flat: {ratios: {}, temperature: 5}, romance_heavy: {ratios: {romance: 4, ...}}}
`mixes` maps a name to `data.mix` settings (`data_pipeline.mixed.MixConfig`: ratios, temperature,
total_tokens, max_epochs, seq_len): every mix draws from the one token store of the base config's
`data.path` at load time, nothing is rebuilt; the mix is one more grid axis (`mix`), and the
results table has the family ratios each run drew.
Each run is `python -m training.pretrain BASE overrides...`, resumable (`checkpoint.resume=auto`),
so an interrupted sweep picks up where it stopped.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from tqdm import tqdm

from common.files import atomic_write_text
from data_pipeline.shards import read_manifest
from training.config import TrainConfig
from training.models.phi import count_params_and_flops
from training.objectives import load_run_config


@dataclass
class SweepSpec:
    base: str
    out_dir: str
    grid: dict[str, list] = field(default_factory=dict)
    overrides: list[str] = field(default_factory=list)
    parallel: int = 1
    mixes: dict[str, dict] = field(default_factory=dict)

    def mix_overrides(self, mix: str) -> list[str]:
        """`data.mix` for a mix: an empty one is the build's own mixture, drawn at load time."""
        settings = [
            f"data.mix.{k}={yaml.safe_dump(v, default_flow_style=True).strip()}" for k, v in self.mixes[mix].items()
        ]
        return ["data.mix={}", *settings]


@dataclass
class Run:
    name: str
    overrides: list[str]

    def command(self, spec: SweepSpec) -> list[str]:
        return [sys.executable, "-m", "training.pretrain", spec.base, *spec.overrides, *self.overrides,
                f"name={self.name}", f"out_dir={spec.out_dir}/runs", "checkpoint.resume=auto"]  # fmt: skip


def expand(spec: SweepSpec) -> list[Run]:
    grid = {**spec.grid, **({"mix": sorted(spec.mixes)} if spec.mixes else {})}
    keys = sorted(grid)
    runs = []
    for values in itertools.product(*(grid[k] for k in keys)):
        overrides = [o for k, v in zip(keys, values, strict=True)
                     for o in (spec.mix_overrides(v) if k == "mix" else [f"{k}={v}"])]  # fmt: skip
        name = "-".join(f"{k.split('.')[-1]}{v}" for k, v in zip(keys, values, strict=True)).replace("/", "_")
        runs.append(Run(name, overrides))
    return runs


def run_config(spec: SweepSpec, run: Run) -> TrainConfig:
    overrides = [*spec.overrides, *run.overrides, f"name={run.name}", f"out_dir={spec.out_dir}/runs"]
    return load_run_config(spec.base, overrides)[0]


def final_eval(config: TrainConfig) -> dict | None:
    """The evaluation written at the run's last step, if the run finished."""
    path = config.run_dir / "eval.jsonl"
    if not path.is_file():
        return None
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    done = [r for r in rows if r["step"] == config.steps]
    return done[-1] if done else None


def execute(spec: SweepSpec) -> list[Run]:
    """Run every unfinished run, `parallel` at a time; returns the runs that failed."""
    todo = [r for r in expand(spec) if final_eval(run_config(spec, r)) is None]
    failed = []
    bar = tqdm(total=len(expand(spec)), initial=len(expand(spec)) - len(todo), desc="sweep", unit="run")
    Path(spec.out_dir, "logs").mkdir(parents=True, exist_ok=True)
    running: list[tuple[Run, subprocess.Popen]] = []
    while todo or running:
        while todo and len(running) < spec.parallel:
            run = todo.pop(0)
            log = open(Path(spec.out_dir, "logs", f"{run.name}.log"), "w")
            running.append((run, subprocess.Popen(run.command(spec), stdout=log, stderr=subprocess.STDOUT)))
        run, proc = running.pop(0)
        if proc.wait() != 0:
            failed.append(run)
        bar.update(1)
    bar.close()
    return failed


def collect(spec: SweepSpec) -> Path:
    """One row per finished run: N, D, lr, seed, ratio/<family> (the mixture it drew), loss
    (validation), loss/<family>, and
    loss_per_char/<family> (comparable across families whose tokens differ in length)."""
    rows = []
    for run in expand(spec):
        config = run_config(spec, run)
        evaluation = final_eval(config)
        if evaluation is None:
            continue
        manifest = read_manifest(config.data.path)
        nparams, _ = count_params_and_flops(config.model, manifest["seq_len"])
        row = {"run": run.name, "N": nparams, "D": config.steps * config.data.global_batch_size * manifest["seq_len"],
               "lr": config.optim.lr, "seed": config.seed, "loss": evaluation["val/loss"]}  # fmt: skip
        drawn = json.loads((config.run_dir / "config.json").read_text()).get("data_mixture")
        row.update({f"ratio/{f}": s["ratio"] for f, s in (drawn or manifest["family_stats"]).items()})
        row.update({k[4:]: v for k, v in evaluation.items() if k.startswith(("val/loss/", "val/loss_per_char/"))})
        rows.append(row)
    out = Path(spec.out_dir) / "results.csv"
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(out, buffer.getvalue())
    return out


def write_slurm_array(spec: SweepSpec) -> Path:
    """A job array, one task per unfinished run (same commands as the local executor)."""
    runs = [r for r in expand(spec) if final_eval(run_config(spec, r)) is None]
    if not runs:
        raise ValueError(f"every run of the sweep in {spec.out_dir} has finished: nothing to submit")
    commands = Path(spec.out_dir) / "commands.txt"
    commands.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(commands, "".join(" ".join(r.command(spec)) + "\n" for r in runs))
    script = Path(spec.out_dir) / "sweep.sbatch"
    atomic_write_text(
        script,
        f"""#!/usr/bin/env bash
#SBATCH --job-name=sweep
#SBATCH --array=0-{len(runs) - 1}
#SBATCH --ntasks=1
#SBATCH --output={spec.out_dir}/logs/%A_%a.log
set -euo pipefail
eval "$(sed -n "$((SLURM_ARRAY_TASK_ID + 1))p" {commands})"
""",
    )
    return script
