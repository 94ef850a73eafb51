"""The run config: one tree loaded from YAML with dotted overrides (`common.config`). The sections of
objectives (`dpo:`, `grpo:`) are not here: each objective owns its own (`training.objectives`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from common.config import check_fields
from data_pipeline.mixed import MixConfig
from training.integrity import CheckConfig
from training.models.phi import PhiConfig
from training.optim import OptimConfig
from training.parallel.mesh import ParallelConfig
from training.parallel.replicas import FaultToleranceConfig
from training.parallel.transforms import AC_MODES
from training.precision import PRECISIONS


@dataclass
class DataConfig:
    path: str = "data/default"  # a folder written by `python -m data_pipeline build`, or its s3:// (fsspec) URL
    cache_dir: str = "~/.cache/polyglot-train/datasets"  # where each node keeps its copy of a URL's dataset
    global_batch_size: int = 16  # sequences per optimizer step, over all data-parallel replicas
    seed: int = 0
    # How the build's token store is mixed and packed at load time (`data_pipeline.mixed`): ratios,
    # temperature, total_tokens, max_epochs, seq_len, packing, seed; unset ones (or None) as the build planned.
    mix: MixConfig | None = None

    def __post_init__(self):
        check_fields(self, global_batch_size=">= 1")


@dataclass
class CheckpointConfig:
    save_every: int = 0  # steps between saves; 0 saves only at the end
    keep_last: int = 2
    resume: str = "auto"  # auto (latest in this run's folder, if any) | none | a step_* folder
    async_save: bool = False  # write in the background while training continues (multi-rank runs)

    def __post_init__(self):
        check_fields(self, save_every=">= 0", keep_last=">= 0")


@dataclass
class TrainConfig:
    name: str = "tiny"
    out_dir: str = "runs"
    steps: int = 300  # length of the LR schedule and of the run
    stop_after: int | None = None  # stop (and save) at this step, e.g. to split a run into jobs
    seed: int = 0
    log_every: int = 10
    eval_every: int = 0  # steps between evaluations on the `valid` split; 0: only at the end
    eval_batches: int = 0  # global batches per evaluation; 0: the whole split
    dist_timeout_s: int = 600
    # a rank with no progress for this long reports where it waits and which ranks stopped responding,
    # and exits (training/watchdog.py); 0: no watchdog. Keep it below dist_timeout_s.
    hang_timeout_s: int = 480
    init_from: str | None = None  # start from weights: a checkpoint (or run's checkpoints/), HF Phi3 folder or .pt
    precision: str = "fp32"  # fp32 | bf16 | fp16 (autocast over fp32 master weights; fp16 adds loss scaling)
    activation_checkpointing: str = "none"  # none | full (every block) | selective (core attention)
    compile: bool = False  # torch.compile each block
    nonfinite: str = "stop"  # on a NaN/inf loss or gradient: stop (report step and batch) | skip (and count)
    loss_spike_factor: float = 3.0  # log a spike when the loss exceeds this multiple of its running mean
    # what is optimised, by name (training.objectives): lm (pretraining, CoT mid-training, SFT) | dpo
    # (preference pairs) | grpo (RL with verifier rewards); an objective's settings are its own section
    objective: str = "lm"
    model: PhiConfig = field(default_factory=PhiConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    check: CheckConfig = field(default_factory=CheckConfig)  # silent-corruption checks (training/integrity.py)
    # replica groups that survive a lost peer (training/parallel/replicas.py)
    fault_tolerance: FaultToleranceConfig = field(default_factory=FaultToleranceConfig)

    def __post_init__(self):
        check_fields(self, steps=">= 1", stop_after=">= 1", log_every=">= 1", eval_every=">= 0",
                     eval_batches=">= 0", dist_timeout_s="> 0", hang_timeout_s=">= 0", loss_spike_factor="> 0",
                     precision=tuple(PRECISIONS), activation_checkpointing=AC_MODES,
                     nonfinite=("stop", "skip"))  # fmt: skip

    @property
    def run_dir(self) -> Path:
        """The run's folder; each fault-tolerant replica group keeps its own (logs, checkpoints, lock)."""
        ft = self.fault_tolerance
        return Path(self.out_dir) / self.name / (f"replica_{ft.replica_id}" if ft.enable else "")
