"""One job per run folder: rank 0 holds `common.locks`' lock on `<run_dir>/run.lock` while it trains,
so a second job on the same folder is refused naming the holder's host and pid, and a killed job
leaves nothing stale."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch.distributed as dist

from common import locks

LOCK_FILE = "run.lock"


class RunLockedError(locks.LockedError):
    pass


def acquire(run_dir: Path) -> None:
    """Take the run folder's lock, or raise naming who holds it."""
    refusal = (
        f"{Path(run_dir).resolve()} is in use by another job ({{holder}}); two jobs would write the same "
        "checkpoints and logs. Wait for it, stop it, or give this run another name or out_dir"
    )
    try:
        locks.acquire(Path(run_dir) / LOCK_FILE, refusal)
    except locks.LockedError as err:
        raise RunLockedError(str(err)) from None


def release(run_dir: Path) -> None:
    locks.release(Path(run_dir) / LOCK_FILE)


@contextlib.contextmanager
def held_by_job(run_dir: Path, is_main: bool):
    """Rank 0 holds the run folder's lock for the block; every rank of a refused job raises with its message."""
    refusal = [None]
    if is_main:
        try:
            acquire(run_dir)
        except RunLockedError as err:
            refusal[0] = str(err)
    if dist.is_initialized():
        dist.broadcast_object_list(refusal, src=0)
    if refusal[0] is not None:
        raise RunLockedError(refusal[0])
    try:
        yield
    finally:
        if is_main:
            release(run_dir)
