"""Real filesystems that fail: a small tmpfs (ENOSPC) and a FUSE passthrough whose writes are slow
or, past a budget, return EIO.

Both are mounted by the kernel, so the trainer meets the failure through ordinary system calls,
as it would on a full or dying disk. Mounting needs root (tmpfs) or /dev/fuse plus libfuse 3
(`apt-get install fuse3`) and mfusepy (the `dev` extra); tests skip with the reason when either is
missing. Run as a script, this module serves the EIO filesystem in the foreground.
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest


@contextlib.contextmanager
def small_filesystem(path: Path, size_bytes: int):
    """A real filesystem of `size_bytes` at `path` (tmpfs; needs root, as on the CI machines)."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", str(path)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(disk: Path, leave_bytes: int) -> None:
    """Take all of `disk`'s free space but `leave_bytes` with one file."""
    free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
    with open(disk / "filler", "wb") as f:
        f.write(b"\0" * max(0, free - leave_bytes))


@contextlib.contextmanager
def faulty_filesystem(path: Path, write_budget_bytes: int = 1 << 62, write_delay_s: float = 0.0):
    """A FUSE mount at `path` backed by a hidden folder beside it. Each write takes `write_delay_s`
    more (a slow disk: a save lasts long enough to be killed in the middle); the first write that
    would pass `write_budget_bytes` in all fails with EIO, and so does every write after it, as on
    a dying device (reads, renames and deletes still work)."""
    fusermount = next((f for f in ("fusermount3", "fusermount") if _which(f)), None)
    if not os.path.exists("/dev/fuse") or fusermount is None:
        pytest.skip("no FUSE here (/dev/fuse and fusermount3 from `apt-get install fuse3` are needed)")
    try:
        import mfusepy  # noqa: F401  (fails here when libfuse is missing)
    except (ImportError, OSError) as err:
        pytest.skip(f"mfusepy cannot load libfuse: {err}")
    backing = path.parent / f".{path.name}.backing"
    backing.mkdir(parents=True, exist_ok=True)
    path.mkdir(parents=True, exist_ok=True)
    server = subprocess.Popen(
        [sys.executable, __file__, str(backing), str(path), str(write_budget_bytes), str(write_delay_s)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.time() + 20
    while not os.path.ismount(path):
        if server.poll() is not None or time.time() > deadline:
            server.kill()
            pytest.skip(f"the FUSE mount did not come up: {server.communicate()[0][-2000:]}")
        time.sleep(0.05)
    try:
        yield path
    finally:
        subprocess.run([fusermount, "-u", "-z", str(path)], check=False)
        server.wait(timeout=20)


def _which(program: str) -> bool:
    return any(os.access(Path(d) / program, os.X_OK) for d in os.environ.get("PATH", "").split(os.pathsep))


def serve_faulty_filesystem(backing: str, mountpoint: str, write_budget_bytes: int, write_delay_s: float) -> None:
    import mfusepy as fuse

    class FailingWrites(fuse.Operations):
        use_ns = True

        def __init__(self):
            self.budget = write_budget_bytes

        def _real(self, path: str) -> str:
            return os.path.join(backing, path.lstrip("/"))

        def getattr(self, path, fh=None):
            try:
                st = os.lstat(self._real(path))
            except FileNotFoundError:
                raise fuse.FuseOSError(errno.ENOENT) from None
            keys = ("st_mode", "st_nlink", "st_size", "st_uid", "st_gid", "st_atime_ns", "st_mtime_ns", "st_ctime_ns")
            return {key.removesuffix("_ns"): getattr(st, key) for key in keys}

        def readdir(self, path, fh):
            return [".", "..", *os.listdir(self._real(path))]

        def mkdir(self, path, mode):
            os.mkdir(self._real(path), mode)

        def rmdir(self, path):
            os.rmdir(self._real(path))

        def unlink(self, path):
            os.unlink(self._real(path))

        def rename(self, old, new):
            os.rename(self._real(old), self._real(new))

        def chmod(self, path, mode):
            os.chmod(self._real(path), mode)

        def utimens(self, path, times=None):
            os.utime(self._real(path), ns=times)

        def create(self, path, mode, fi=None):
            return os.open(self._real(path), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)

        def open(self, path, flags):
            return os.open(self._real(path), flags & ~os.O_APPEND)

        def read(self, path, size, offset, fh):
            return os.pread(fh, size, offset)

        def write(self, path, data, offset, fh):
            time.sleep(write_delay_s)
            if len(data) > self.budget:
                self.budget = 0  # a device that failed once stays failed
                raise fuse.FuseOSError(errno.EIO)
            self.budget -= len(data)
            return os.pwrite(fh, data, offset)

        def truncate(self, path, length, fh=None):
            os.truncate(self._real(path), length)

        def flush(self, path, fh):
            return 0

        def fsync(self, path, datasync, fh):
            return 0

        def release(self, path, fh):
            os.close(fh)

        def statfs(self, path):
            st = os.statvfs(backing)
            keys = ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files", "f_ffree", "f_namemax")
            return {key: getattr(st, key) for key in keys}

    fuse.FUSE(FailingWrites(), mountpoint, foreground=True, nothreads=True)


if __name__ == "__main__":
    serve_faulty_filesystem(sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4]))
