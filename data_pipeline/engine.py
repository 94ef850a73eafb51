"""Where a build's work units run: a process pool on this machine, or the workers of a Ray cluster.

Both engines run the same functions (tokenize a source file, a step of the dedup shuffles, the
plan, pack and write a shard) on the same inputs, each writing its output under a temp name and
renaming it, so the output does not depend on the engine, on the number of workers, or on a worker
dying and its unit being run again.
The driver only submits units and collects their small results (statistics, shard entries).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from typing import Any

ENGINES = ("local", "ray")
RAY_TASK_RETRIES = 3  # a unit whose worker (or node) dies is run again elsewhere, up to this often


class LocalEngine:
    """A pool of `workers` spawned processes (spawn, not fork: the parent may hold threads, from
    tokenizers or torch, that fork would copy mid-state), started once and kept for every pass of
    the build; one worker, or one unit, runs in this process."""

    def __init__(self, workers: int = 0):
        self.workers = workers or usable_cores()
        self._pool: ProcessPoolExecutor | None = None

    def map_unordered(
        self, fn: Callable, items: Sequence[tuple], setup: Callable | None = None, setup_args: tuple = ()
    ) -> Iterator[tuple[int, Any]]:
        """(position in `items`, fn(*item)) as each finishes; `setup(*setup_args)` runs once per worker."""
        if self.workers == 1 or len(items) <= 1:
            if setup is not None and items:  # every time: this process outlives the build
                setup(*setup_args)
            for i, item in enumerate(items):
                yield i, fn(*item)
            return
        if self._pool is None:
            self._pool = ProcessPoolExecutor(self.workers, get_context("spawn"))
        futures = {self._pool.submit(_run_with_setup, fn, setup, setup_args, item): i for i, item in enumerate(items)}
        try:
            for future in as_completed(futures):
                yield futures[future], future.result()
        finally:
            for future in futures:
                future.cancel()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None


def usable_cores() -> int:
    """The cores this process may run on: its affinity (a SLURM or container cpuset, `taskset`),
    which `os.cpu_count()` ignores (it counts the machine's)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity on this platform (macOS)
        return os.cpu_count() or 1


_SETUP_DONE: set = set()  # per worker process (pool or Ray, living one build): which setups ran there


def _run_with_setup(fn: Callable, setup: Callable | None, setup_args: tuple, item: tuple):
    key = (setup, repr(setup_args))
    if setup is not None and key not in _SETUP_DONE:
        setup(*setup_args)
        _SETUP_DONE.add(key)
    return fn(*item)


class RayEngine:
    """Ray tasks, one per unit, on the cluster at `address` ("auto": the one this machine belongs
    to; None: a local one started for this build). Every node must see the build's folders
    (a shared filesystem), since units read and write files there."""

    def __init__(self, address: str | None = None, workers: int = 0):
        try:
            import ray
        except ImportError as err:
            raise ImportError("engine 'ray' needs Ray: pip install -e .[ray]") from err
        self.ray = ray
        self._started = not ray.is_initialized()
        if self._started:
            root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
            # Workers import this package: started outside the checkout, they find it on PYTHONPATH.
            env = {"env_vars": {"PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}}
            ray.init(address=address, runtime_env=env, log_to_driver=False, configure_logging=False,
                     **({"num_cpus": workers} if workers and address is None else {}))  # fmt: skip
        self._task = ray.remote(max_retries=RAY_TASK_RETRIES, retry_exceptions=False)(_run_with_setup)

    def map_unordered(
        self, fn: Callable, items: Sequence[tuple], setup: Callable | None = None, setup_args: tuple = ()
    ) -> Iterator[tuple[int, Any]]:
        refs = {self._task.remote(fn, setup, setup_args, item): i for i, item in enumerate(items)}
        pending = list(refs)
        while pending:
            done, pending = self.ray.wait(pending, num_returns=1)
            try:
                result = self.ray.get(done[0])
            except self.ray.exceptions.RayTaskError as err:  # the unit's own error (bad input), as local raises it
                for ref in pending:
                    self.ray.cancel(ref)
                raise err.cause from None
            yield refs[done[0]], result

    def close(self) -> None:
        if self._started:
            self.ray.shutdown()


def make_engine(name: str, workers: int = 0, address: str | None = None) -> LocalEngine | RayEngine:
    if name == "ray":
        return RayEngine(address, workers)
    if address:
        raise ValueError(f"ray_address {address!r} is only for engine 'ray', not {name!r}")
    return LocalEngine(workers)
