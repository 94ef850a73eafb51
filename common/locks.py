"""One writer per folder: an advisory lock (`flock`) on a lock file, holding the holder's host and pid.

A second process asking for the same lock (this node or another sharing the filesystem) is refused
with the holder's host, pid and start time. The kernel releases the lock with the process, so a job
that crashes or is killed (`kill -9`) leaves nothing stale to clean up. Within one process the lock
is re-entrant (a resume in the same process is the same job)."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

_HELD: dict[Path, int] = {}  # lock file -> open descriptor, in this process


class LockedError(RuntimeError):
    """The lock is held by another process; the message names it."""


def acquire(lock_file: str | Path, refusal: str) -> None:
    """Take the lock, or raise `LockedError` with `refusal` formatted with the holder (`{holder}`)."""
    path = Path(lock_file).resolve()
    if path in _HELD:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise LockedError(refusal.format(holder=holder)) from None
    os.ftruncate(fd, 0)
    holder = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    os.pwrite(fd, json.dumps(holder).encode(), 0)
    _HELD[path] = fd


def release(lock_file: str | Path) -> None:
    fd = _HELD.pop(Path(lock_file).resolve(), None)
    if fd is not None:
        os.close(fd)  # closing the descriptor releases the lock


@contextlib.contextmanager
def waiting(lock_file: str | Path) -> Iterator[None]:
    """Hold the lock for a block, waiting while another process holds it: for work that processes
    share and one does (a node's cached copy, a data index), the others then finding it done."""
    path = Path(lock_file)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # released when the file closes, or the process dies
        yield
