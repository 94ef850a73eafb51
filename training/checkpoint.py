"""Sharded checkpoints with torch.distributed.checkpoint (DCP).

Layout under `runs/<name>/checkpoints/`: one `step_XXXXXXXX/` folder per save (DCP shards plus
`trainer_state.json`) and a `latest` file naming the newest complete one. `latest` is replaced
atomically only after every rank finished writing, so an interrupted save never becomes `latest`.
Parameters are stored under their full-model names, so a checkpoint is independent of the layout.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint._nested_dict import flatten_state_dict, unflatten_state_dict
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from common.files import atomic_write_text, sha256_file
from training.models.init import TIED_COPY, TIED_SOURCE

LATEST = "latest"
TRAINER_STATE = "trainer_state.json"

# A single-process run saves without a process group, which is what we want.
warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
# Optimizer state keyed per parameter name (not by group index), so each pipeline stage saves and loads
# only its own parameters' state and a checkpoint can be loaded under another layout.
OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


class CheckpointError(RuntimeError):
    """A save that could not complete; the previous checkpoint and `latest` are untouched."""


class NoIntactCheckpointError(ValueError):
    """`resume: auto` found checkpoints, every one damaged; the message names each and why."""


class Checkpointer:
    """Saves `step_XXXXXXXX/` folders and moves `latest` once a save is complete on every rank.

    With `async_save`, DCP stages the state and writes it in the background while training goes on;
    the save is finalised (trainer state, `latest`, pruning) by the next `save` or by `wait`."""

    def __init__(self, ckpt_dir: Path, keep_last: int = 2, async_save: bool = False):
        self.ckpt_dir, self.keep_last = ckpt_dir, keep_last
        self.async_save = async_save and dist.is_initialized()  # one process has nothing to overlap with
        # The background save runs collectives while training runs its own: on the same group their
        # order would interleave differently on each rank (a deadlock), so it gets a group of its own.
        self._group = dist.new_group(backend="gloo") if self.async_save else None
        self._pending = None

    def save(self, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer, trainer_state: dict) -> Path:
        self.wait()
        path = self.ckpt_dir / f"step_{step:08d}"
        model_state, optim_state = get_state_dict(model, optimizer, options=OPTIONS)
        state = {"model": model_state, "optim": optim_state}
        try:
            if self.async_save:
                future = dcp.async_save(state, checkpoint_id=str(path), process_group=self._group)
                self._pending = (future, path, {"step": step, **trainer_state})
            else:
                dcp.save(state, checkpoint_id=str(path))
                self._finalize(path, {"step": step, **trainer_state})
        except (Exception, CheckpointException) as err:  # DCP's exception is a BaseException
            self._fail(path, err)
        return path

    def wait(self) -> None:
        if self._pending is not None:
            future, path, trainer_state = self._pending
            self._pending = None
            try:
                future.result()
                self._finalize(path, trainer_state)
            except (Exception, CheckpointException) as err:
                self._fail(path, err)

    def _fail(self, path: Path, err: BaseException) -> None:
        """Remove the half-written folder (it never had `trainer_state.json`, so nothing points to it)."""
        free = shutil.disk_usage(self.ckpt_dir).free  # before the partial folder gives its room back
        refused = probe_write(self.ckpt_dir)
        _barrier_quietly()  # every rank has measured before rank 0 removes the folder
        if _is_main():
            shutil.rmtree(path, ignore_errors=True)
        pointer = self.ckpt_dir / LATEST
        previous = pointer.read_text().strip() if pointer.is_file() else "none"
        cause = save_failure_cause(err)
        if free < FULL_BELOW_BYTES and "No space left" not in cause:  # torch's writer says "unexpected pos"
            cause += f" (No space left on device: {free:,} bytes were free on the filesystem of {self.ckpt_dir})"
        elif refused and refused not in cause:  # torch's zip writer drops the errno of a failed write
            cause += f" (the filesystem of {self.ckpt_dir} refuses writes: {refused})"
        raise CheckpointError(
            f"could not write checkpoint {path}: {cause}. The previous checkpoint ({previous}) and `latest` are intact"
        ) from err

    def _finalize(self, path: Path, trainer_state: dict) -> None:
        if _is_main():  # every rank's shards are written (DCP's save ends in a collective)
            state_text = json.dumps(trainer_state, indent=2)
            atomic_write_text(path / CHECKSUMS, checksums_text(path, state_text))
            atomic_write_text(path / TRAINER_STATE, state_text)  # the completion marker, covered by the checksums
        _barrier()  # every rank's shards are on disk before `latest` moves
        if _is_main():
            atomic_write_text(self.ckpt_dir / LATEST, path.name + "\n")
            complete = sorted(p for p in self.ckpt_dir.glob("step_*") if (p / TRAINER_STATE).is_file())
            for old in complete[: -self.keep_last] if self.keep_last > 0 else []:
                shutil.rmtree(old, ignore_errors=True)
        _barrier()


CHECKSUMS = "checksums.json"
FULL_BELOW_BYTES = 16 * 2**20  # a save failing with less free space than this ran out of room


def _barrier_quietly() -> None:
    try:
        _barrier()
    except Exception:  # a rank that died takes the barrier with it; the message matters more
        pass


def probe_write(folder: Path, size: int = 1 << 16) -> str | None:
    """The error a fresh write into `folder` meets now, if any (EIO from a failing disk, ...)."""
    probe = folder / f".write_probe.{os.getpid()}"
    try:
        with open(probe, "wb") as f:
            f.write(b"\0" * size)
            f.flush()
            os.fsync(f.fileno())
    except OSError as err:
        return err.strerror or str(err)
    finally:
        probe.unlink(missing_ok=True)
    return None


def save_failure_cause(err: BaseException) -> str:
    """One line for what stopped a save: DCP wraps each rank's error with its traceback."""
    if isinstance(err, CheckpointException) and err.failures:
        rank, (cause, _) = next(iter(sorted(err.failures.items())))
        return f"{type(cause).__name__} on rank {rank}: {cause}"
    return f"{type(err).__name__}: {err}"


def file_checksums(folder: Path) -> dict[str, str]:
    """sha256 of every file of a checkpoint folder but the two markers, by relative path."""
    skip = {CHECKSUMS, TRAINER_STATE}
    return {
        str(f.relative_to(folder)): sha256_file(f)
        for f in sorted(folder.rglob("*"))
        if f.is_file() and f.name not in skip
    }


def _digest(files: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()


def checksums_text(folder: Path, trainer_state_text: str) -> str:
    """`checksums.json`: every file's sha256, `trainer_state.json`'s included (from the text about to be
    written), and the digest of that list, so damage to the checksum file itself is told apart from
    damage to a file it lists."""
    files = {**file_checksums(folder), TRAINER_STATE: hashlib.sha256(trainer_state_text.encode()).hexdigest()}
    return json.dumps({"files": files, "digest": _digest(files)}, indent=2)


def checkpoint_problem(path: Path) -> str | None:
    """Why `path` is not an intact checkpoint (None when it is): no completion marker, a checksum file
    that is unreadable or damaged, or a file (the trainer state too) missing, truncated or changed
    since its checksum was taken."""
    if not (path / TRAINER_STATE).is_file():
        return f"{path / TRAINER_STATE} is missing (the save never completed)"
    if not (path / CHECKSUMS).is_file():  # written before checksums were kept: the marker is all there is
        try:
            json.loads((path / TRAINER_STATE).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            return f"{path / TRAINER_STATE} is not valid JSON ({err})"
        return None
    try:
        recorded = json.loads((path / CHECKSUMS).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        return f"{path / CHECKSUMS} is damaged (not valid JSON: {err}); no file of the checkpoint can be verified"
    if isinstance(recorded, dict) and "digest" in recorded:
        expected = recorded.get("files")
        if not isinstance(expected, dict) or _digest(expected) != recorded["digest"]:
            return f"{path / CHECKSUMS} is damaged (its own digest does not match); no file can be verified"
        actual = {**file_checksums(path), TRAINER_STATE: sha256_file(path / TRAINER_STATE)}
    else:  # the first format: a flat list of the files but the markers
        expected, actual = recorded, file_checksums(path)
    for name, digest in expected.items():
        if name not in actual:
            return f"{path / name} is missing"
        if actual[name] != digest:
            return f"{path / name} is damaged (its sha256 differs from the one taken when it was saved)"
    return None


def remove_unfinished_saves(ckpt_dir: Path, note=print) -> None:
    """Remove step folders a killed save left without their completion marker. Only the job that
    holds the run's lock calls this, so no save of another job can be in progress."""
    for path in sorted(ckpt_dir.glob("step_*")):
        if path.is_dir() and not (path / TRAINER_STATE).exists():
            note(f"removing {path}: a save that never completed (its writer was killed or failed)")
            shutil.rmtree(path, ignore_errors=True)


def resolve_checkpoint(resume: str, ckpt_dir: Path, note=print) -> Path | None:
    """`none` -> None; `auto` -> the newest intact checkpoint (`latest` first), each one skipped said
    with its reason through `note`; otherwise a path that must be an intact checkpoint."""
    if resume == "none":
        return None
    if resume == "auto":
        pointer = ckpt_dir / LATEST
        named = pointer.read_text(errors="replace").strip() if pointer.is_file() else ""
        candidates = sorted(ckpt_dir.glob("step_*"), reverse=True)
        if named and (ckpt_dir / named) in candidates:
            candidates.remove(ckpt_dir / named)
            candidates.insert(0, ckpt_dir / named)
        elif named:
            note(f"{pointer} names {named!r}, which is not a checkpoint folder here; looking for the newest intact one")
        damaged = []
        for path in candidates:
            problem = checkpoint_problem(path)
            if problem is None:
                return path
            note(f"skipping checkpoint {path.name}: {problem}")
            damaged.append(f"{path.name} ({problem})")
        if damaged:
            raise NoIntactCheckpointError(
                f"checkpoint.resume=auto: no intact checkpoint in {ckpt_dir}: {'; '.join(damaged)}. Not starting "
                "over, which would write over them: restore one, or start from scratch with checkpoint.resume=none"
            )
        return None
    path = Path(resume)
    problem = checkpoint_problem(path)
    if problem is not None:
        raise FileNotFoundError(f"checkpoint.resume={resume!r}: not an intact checkpoint: {problem}")
    return path


def load_state(state: dict, path: Path, no_dist: bool = False) -> dict:
    """`dcp.load` of a nested state dict, returning it with every value loaded (tensors in place, other
    values replaced). A key the checkpoint lacks that names a pipeline's copy of tied embeddings
    (`output.weight`, also in its optimizer state) is read from the embedding's entry."""
    flat, mapping = flatten_state_dict(state)
    stored = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    renamed = {}
    for key in flat:
        if key not in stored and TIED_COPY in key:
            renamed[key] = key.replace(TIED_COPY, TIED_SOURCE)
    request = {renamed.get(key, key): value for key, value in flat.items()}
    dcp.load(request, checkpoint_id=str(path), no_dist=no_dist)
    loaded = {key: request[renamed.get(key, key)] for key in flat}
    return unflatten_state_dict(loaded, mapping)


# Optimizer options that describe this run's implementation (which kernel), not the training state:
# a checkpoint written by another layout must not switch them.
IMPLEMENTATION_OPTIONS = ("fused", "foreach", "capturable", "differentiable")


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    model_state, optim_state = get_state_dict(model, optimizer, options=OPTIONS)
    state = load_state({"model": model_state, "optim": optim_state}, path)
    implementation = [{k: g[k] for k in IMPLEMENTATION_OPTIONS if k in g} for g in optimizer.param_groups]
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"], options=OPTIONS)
    for group, options in zip(optimizer.param_groups, implementation, strict=True):
        group.update(options)
    return json.loads((path / TRAINER_STATE).read_text())


def find_checkpoint(path: str | Path) -> Path | None:
    """A complete checkpoint folder: `path` itself, or the `latest` one of a checkpoints folder."""
    path = Path(path)
    if (path / TRAINER_STATE).is_file():
        return path
    if (path / LATEST).is_file():
        return path / (path / LATEST).read_text().strip()
    return None


def saved_run_config(path: str | Path) -> tuple[Path, dict]:
    """A complete checkpoint (`path`, or the latest of a run's `checkpoints/`) and the run config it
    was saved with, as written (a mapping: each consumer reads the sections it knows)."""
    found = find_checkpoint(path)
    if found is None:
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no {TRAINER_STATE} or {LATEST})")
    return found, json.loads((found / TRAINER_STATE).read_text())["config"]
