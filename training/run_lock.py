"""One job per run folder: rank 0 holds an advisory lock on `<run_dir>/run.lock` while it trains.

A second job on the same folder (this node or another sharing the filesystem) is refused with the
holder's host and pid. The lock is the kernel's (`flock`), so a job that crashes or is killed
releases it with its process: nothing stale to clean up. Within one process the lock is re-entrant
(a resume in the same process is the same job)."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from pathlib import Path

import torch.distributed as dist

LOCK_FILE = "run.lock"
_HELD: dict[Path, int] = {}  # lock path -> open descriptor, in this process


class RunLockedError(RuntimeError):
    pass


def acquire(run_dir: Path) -> None:
    """Take the run folder's lock, or raise naming who holds it."""
    path = (Path(run_dir) / LOCK_FILE).resolve()
    if path in _HELD:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise RunLockedError(
            f"{path.parent} is in use by another job ({holder}); two jobs would write the same checkpoints "
            "and logs. Wait for it, stop it, or give this run another name or out_dir"
        ) from None
    os.ftruncate(fd, 0)
    holder = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    os.pwrite(fd, json.dumps(holder).encode(), 0)
    _HELD[path] = fd


def release(run_dir: Path) -> None:
    fd = _HELD.pop((Path(run_dir) / LOCK_FILE).resolve(), None)
    if fd is not None:
        os.close(fd)  # closing the descriptor releases the lock


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
