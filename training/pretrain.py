"""python -m training.pretrain CONFIG [key=value ...]

Runs under deepspeed, torchrun, srun or mpirun (see `training.parallel.world`), or alone as a single
process. `--local_rank=N`, which the deepspeed launcher appends, is accepted and LOCAL_RANK from the
environment is used.
"""

from __future__ import annotations

import argparse
import sys

import torch.distributed as dist

from common.cli import print_error
from common.config import ConfigError, keys_given, written_at
from training.checkpoint import CheckpointError
from training.components import build_trainer, check_run
from training.integrity import ReplicaDivergence
from training.objectives import load_run_config
from training.parallel.mesh import LayoutError
from training.parallel.world import (
    exit_with_launcher,
    init_distributed,
    launched_world_size,
    limit_cpu_threads,
    return_freed_memory_to_os,
)
from training.run_lock import RunLockedError
from training.trainer import NonFiniteLossError


def layout_written_at(config, path: str | None, overrides: list[str]) -> str:
    """Where each layout size the user set was written, for a layout refusal."""
    given = keys_given(config.parallel) or frozenset()
    keys = [f"parallel.{k}" for k in ("tp", "pp", "cp", "dp") if k in given]
    if not keys:
        return "every parallel size at its default"
    return "set by: " + ", ".join(f"{key} in {written_at(key, path, overrides)}" for key in keys)


def parse_args(argv: list[str] | None) -> tuple[str | None, list[str]]:
    parser = argparse.ArgumentParser(
        prog="python -m training.pretrain", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("config_path", nargs="?", help="YAML config (or use --config)")
    parser.add_argument("--config", dest="config_flag")
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. optim.lr=1e-3")
    args = parser.parse_args(argv)
    path, overrides = args.config_flag, list(args.overrides)
    if args.config_path and "=" in args.config_path:
        overrides.insert(0, args.config_path)
    elif args.config_path:
        if path:
            parser.error("give the config once: as a positional path or with --config")
        path = args.config_path
    return path, overrides


def main(argv: list[str] | None = None) -> int:
    path, overrides = parse_args(argv)
    try:
        config, objective = load_run_config(path, overrides)
    except ConfigError as err:
        print_error(str(err))
        return 2
    try:  # before any process group: a refusal is one line on every rank, with no peer left waiting
        check_run(config, objective, launched_world_size())
    except LayoutError as err:
        print_error(f"{err} ({layout_written_at(config, path, overrides)})")
        return 2
    except ValueError as err:
        print_error(str(err))
        return 2
    limit_cpu_threads()
    return_freed_memory_to_os()
    exit_with_launcher()
    init_distributed(config.dist_timeout_s)
    try:
        build_trainer(config, objective).fit()
    except (LayoutError, FileNotFoundError, ValueError) as err:
        print_error(str(err))
        return 2
    except (NonFiniteLossError, CheckpointError, ReplicaDivergence) as err:
        print_error(str(err))
        return 3
    except RunLockedError as err:
        print_error(str(err))
        return 4
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
