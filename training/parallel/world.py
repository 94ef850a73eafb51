"""Who am I: rank discovery for every launcher, and process-group start-up.

torchrun and the DeepSpeed launcher set RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT.
Under SLURM (`srun`) and MPI (`mpirun`) they are derived from the scheduler's variables, or from
mpi4py when only MPI knows (the rank-0 host is broadcast as the rendezvous address).
"""

from __future__ import annotations

import datetime
import os
import socket
import time
from collections.abc import Mapping

import torch
import torch.distributed as dist

from data_pipeline.engine import usable_cores
from training.parallel import flight_recorder

DEFAULT_PORT = "29500"


def rank_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The torch.distributed variables implied by a launcher's environment ({} when not distributed)."""
    if "RANK" in environ and "WORLD_SIZE" in environ:
        return {}
    if "SLURM_PROCID" in environ and int(environ.get("SLURM_NTASKS", "1")) > 1:
        return {
            "RANK": environ["SLURM_PROCID"],
            "WORLD_SIZE": environ["SLURM_NTASKS"],
            "LOCAL_RANK": environ.get("SLURM_LOCALID", "0"),
            "LOCAL_WORLD_SIZE": environ.get("SLURM_NTASKS_PER_NODE", environ["SLURM_NTASKS"]).split("(")[0],
            "MASTER_ADDR": environ.get("MASTER_ADDR", environ.get("SLURM_LAUNCH_NODE_IPADDR", "127.0.0.1")),
            "MASTER_PORT": environ.get("MASTER_PORT", DEFAULT_PORT),
        }
    for prefix in ("OMPI_COMM_WORLD_", "PMI_", "PMIX_"):
        if f"{prefix}RANK" in environ and int(environ.get(f"{prefix}SIZE", "1")) > 1:
            return {
                "RANK": environ[f"{prefix}RANK"],
                "WORLD_SIZE": environ[f"{prefix}SIZE"],
                "LOCAL_RANK": environ.get(f"{prefix}LOCAL_RANK", "0"),
                "LOCAL_WORLD_SIZE": environ.get(f"{prefix}LOCAL_SIZE", environ[f"{prefix}SIZE"]),
                "MASTER_ADDR": environ.get("MASTER_ADDR", ""),
                "MASTER_PORT": environ.get("MASTER_PORT", DEFAULT_PORT),
            }
    return {}


def launched_world_size() -> int:
    """How many ranks the launcher started, read from its environment before any process group exists."""
    return int({**os.environ, **rank_env(os.environ)}.get("WORLD_SIZE", "1"))


def master_from_mpi() -> str:
    """Rank 0's address, broadcast over MPI (mpirun sets no rendezvous address of its own)."""
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    address = socket.gethostbyname(socket.gethostname()) if comm.Get_rank() == 0 else None
    return comm.bcast(address, root=0)


def init_distributed(timeout_s: int) -> None:
    """Start the default process group when more than one rank runs (gloo on CPU, NCCL on GPUs), with
    torch's flight recorder on (training/parallel/flight_recorder.py)."""
    found = rank_env(os.environ)
    if found and not found["MASTER_ADDR"]:
        found["MASTER_ADDR"] = master_from_mpi()
    os.environ.update(found)
    if int(os.environ.get("WORLD_SIZE", "1")) == 1 or dist.is_initialized():
        return
    backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    flight_recorder.enable()
    timeout = datetime.timedelta(seconds=timeout_s)
    store = restart_store(os.environ, timeout)
    if store is None:
        dist.init_process_group(backend, timeout=timeout)
    else:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)


def restart_store(environ: Mapping[str, str], timeout: datetime.timedelta) -> dist.Store | None:
    """Under torchrun, workers restarted by `--max-restarts` meet in the agent's store, which keeps the
    keys of the attempt before: gloo's full mesh could read a dead worker's address from it
    (`connectFullMesh ... Connection refused`, seen on every restart that lost the race). Each
    attempt gets its own key prefix. None when not launched by a torchrun agent."""
    if environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or "TORCHELASTIC_RESTART_COUNT" not in environ:
        return None
    agent = dist.TCPStore(environ["MASTER_ADDR"], int(environ["MASTER_PORT"]), int(environ["WORLD_SIZE"]),
                          is_master=False, timeout=timeout)  # fmt: skip
    return dist.PrefixStore(f"polyglot/attempt_{environ['TORCHELASTIC_RESTART_COUNT']}", agent)


# Processes that start ranks: a rank whose chain of parents passes through these ends with them.
LAUNCHERS = (
    "deepspeed",
    "torchrun",
    "torch.distributed.run",
    "mpirun",
    "mpiexec",
    "prterun",
    "orterun",
    "prted",
    "orted",
)
PR_SET_PDEATHSIG = 1


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, parent pid) of a process, None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return fields[0], int(fields[1])


def launcher_ancestors(pid: int | None = None) -> list[int]:
    """The launcher processes above this one (deepspeed's runner above its per-node launch, say)."""
    found, pid = [], os.getppid() if pid is None else pid
    while pid > 1:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                command = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            break
        if not any(name in command for name in LAUNCHERS):
            break
        found.append(pid)
        stat = _proc_stat(pid)
        if stat is None:
            break
        pid = stat[1]
    return found


def exit_with_launcher(poll_s: float = 1.0) -> None:
    """End this rank when its launcher dies, instead of training on as an orphan: the kernel's
    parent-death signal for the direct parent, and a watchdog thread for launchers further up. A
    process started from a shell (no launcher above it) is left alone: `nohup` keeps working."""
    import ctypes
    import signal
    import threading

    parent, launchers = os.getppid(), launcher_ancestors()
    if not launchers:
        return
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):  # not Linux: the watchdog alone
        pass

    def watch() -> None:
        while True:
            gone = os.getppid() != parent or any((_proc_stat(p) or ("Z", 0))[0] in "ZX" for p in launchers)
            if gone:
                print(f"rank {os.environ.get('RANK', '?')}: the launcher died; exiting", flush=True)
                os.kill(os.getpid(), signal.SIGTERM)
                return
            time.sleep(poll_s)

    threading.Thread(target=watch, name="launcher-watchdog", daemon=True).start()


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


def return_freed_memory_to_os(threshold_bytes: int = 4 * 2**20) -> None:
    """On CPU, give memory blocks above `threshold_bytes` back to the OS as soon as they are freed.

    glibc serves allocations below its mmap threshold from the heap and raises that threshold (up to
    32 MiB) each time a larger block is freed, so FSDP's shards, gathered weights and unsharded
    gradients of a few MiB stay resident after they are freed: measured on 4 CPU ranks under
    FSDP2 x TP2 at 0.42B parameters, 0.4-0.6 GiB per rank, with no step-time difference."""
    if torch.cuda.is_available():
        return
    import ctypes

    try:
        ctypes.CDLL(None).mallopt(M_MMAP_THRESHOLD, threshold_bytes)
    except (OSError, AttributeError):  # not glibc
        pass


def limit_cpu_threads() -> None:
    """Ranks sharing a CPU split the cores they may use (a SLURM or container cpuset, not the
    machine's count) instead of each spawning one thread per core. An explicit OMP_NUM_THREADS is
    left as torch read it (on a shared machine a user asks for fewer; torchrun sets 1 when unset)."""
    if not torch.cuda.is_available() and not os.environ.get("OMP_NUM_THREADS"):
        found = {**os.environ, **rank_env(os.environ)}
        local_world = int(found.get("LOCAL_WORLD_SIZE", found.get("WORLD_SIZE", "1")))
        torch.set_num_threads(max(1, usable_cores() // local_world))
