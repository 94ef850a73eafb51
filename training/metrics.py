"""Console (progress bar + periodic lines), TensorBoard and `metrics.jsonl`, written by rank 0 only.

A full or failing disk never stops training from here: a line that cannot be written is cut back
(no half line is left), said once, and retried with the next line; TensorBoard stops at its first
failure. The checkpoint, which must be written, is what stops a run on a full disk.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import torch
from tqdm import tqdm

# Dense bf16 peak per device, for MFU; CPUs have no meaningful entry and report no MFU.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


def peak_rss_bytes() -> int:
    """This process's peak resident memory. Linux's `ru_maxrss` survives `exec`, so a rank spawned
    from a large parent would report the parent's size; VmHWM belongs to the process's own image."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def peak_memory_gib() -> float:
    """Peak GPU memory allocated, or the process's peak resident memory on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return peak_rss_bytes() / 2**30


def device_peak_tflops() -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((peak for key, peak in PEAK_TFLOPS.items() if key in name), None)


class JsonLines:
    """An append-only JSON-lines file whose lines are whole or absent, even on a full disk."""

    def __init__(self, path: Path, note):
        self.path, self.note, self.failing = path, note, False

    def append(self, row: dict) -> None:
        line = (json.dumps(row) + "\n").encode()
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError as err:
            return self._failed(err)
        start = os.fstat(fd).st_size
        try:
            written = 0
            while written < len(line):  # a short write is followed by the one that says why
                written += os.write(fd, line[written:])
        except OSError as err:
            os.ftruncate(fd, start)  # frees what the half line took; works on a full disk
            return self._failed(err)
        finally:
            os.close(fd)
        if self.failing:
            self.failing = False
            self.note(f"{self.path}: writable again; lines from the failing period are missing")

    def _failed(self, err: OSError) -> None:
        if not self.failing:
            self.failing = True
            self.note(f"{self.path}: cannot write ({err.strerror or err}); training goes on, lines are skipped")


def _tensorboard_thread_errors_are_reported_by_the_logger() -> None:
    """TensorBoard writes from a thread; a failed write there (a full disk) would print a raw
    traceback from that thread before the logger reports it, in one line, at its next write."""
    previous = threading.excepthook
    if getattr(previous, "tensorboard_quiet", False):
        return

    def hook(args):
        if type(args.thread).__name__ == "_AsyncWriterThread" and issubclass(args.exc_type, OSError):
            return
        previous(args)

    hook.tensorboard_quiet = True
    threading.excepthook = hook


class MetricsLogger:
    """`console`: the objective's metrics shown next to the loss (DPO's reward accuracy and margin)."""

    def __init__(
        self, run_dir: Path, families: list[str], flops_per_token: int, enabled: bool = True, console: tuple = ()
    ):
        self.run_dir, self.families, self.enabled, self.console = run_dir, families, enabled, console
        self.flops_per_token, self.peak = flops_per_token, device_peak_tflops()
        self.bar = self.writer = self.jsonl = self.eval_jsonl = None

    def start(self, step: int, end: int, nparams: int) -> None:
        if not self.enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = JsonLines(self.run_dir / "metrics.jsonl", self.note)
        self.eval_jsonl = JsonLines(self.run_dir / "eval.jsonl", self.note)
        _tensorboard_thread_errors_are_reported_by_the_logger()
        try:
            self.writer = SummaryWriter(str(self.run_dir / "tensorboard"))
        except OSError as err:
            self.note(f"TensorBoard off: cannot create its event file ({err.strerror or err})")
        self.note(f"training {nparams / 1e6:.2f}M parameters from step {step} to {end}; logs in {self.run_dir}")
        self.bar = tqdm(total=end, initial=step, desc="train", unit="step", dynamic_ncols=True)

    def note(self, text: str) -> None:
        if self.enabled:
            tqdm.write(text)

    def log(self, metrics: dict[str, float], console: bool) -> None:
        if not self.enabled:
            return
        step = int(metrics["step"])
        metrics["memory_gib"] = peak_memory_gib()
        if self.peak:
            metrics["mfu"] = self.flops_per_token * metrics["tokens_per_s"] / (self.peak * 1e12)
        self._tensorboard({k if "/" in k else f"train/{k}": v for k, v in metrics.items() if k != "step"}, step)
        self.jsonl.append(metrics)
        self.bar.set_postfix(
            loss=f"{metrics['loss']:.3f}", lr=f"{metrics['lr']:.1e}", tok_s=f"{metrics['tokens_per_s']:.0f}"
        )
        self.bar.update(1)
        if console:
            families = " ".join(f"{f}={metrics[f'loss/{f}']:.2f}" for f in self.families if f"loss/{f}" in metrics)
            families += " ".join(f"{k}={metrics[k]:.3f}" for k in self.console if k in metrics)
            self.note(
                f"step {step:5d} | loss {metrics['loss']:.4f} | grad_norm {metrics['grad_norm']:.3f} | "
                f"lr {metrics['lr']:.2e} | {metrics['tokens_per_s']:.0f} tok/s | {families}"
            )

    def log_eval(self, step: int, metrics: dict[str, float]) -> None:
        evals = {k: v for k, v in metrics.items() if k.startswith("val/")}
        if not self.enabled or not evals:  # no valid split large enough for a global batch
            return
        self._tensorboard(evals, step)
        self.eval_jsonl.append({"step": step, **evals})
        families = " ".join(f"{k[9:]}={v:.2f}" for k, v in evals.items() if k.startswith("val/loss/"))
        families += " ".join(f"{k}={evals['val/' + k]:.3f}" for k in self.console if "val/" + k in evals)
        self.note(f"eval {step:5d} | val loss {evals['val/loss']:.4f} | {families}")

    def _tensorboard(self, scalars: dict[str, float], step: int) -> None:
        """TensorBoard's writer thread reports a failed write at the next add; it is then dropped."""
        if self.writer is None:
            return
        try:
            for key, value in scalars.items():
                self.writer.add_scalar(key, value, step)
        except Exception as err:  # tensorboard re-raises its thread's error as it was (OSError or other)
            self.note(f"TensorBoard off from step {step}: {err}; metrics.jsonl goes on")
            self.writer = None

    def close(self) -> None:
        if self.enabled and self.bar is not None:
            self.bar.close()
            try:
                if self.writer is not None:
                    self.writer.close()
            except Exception as err:
                self.note(f"TensorBoard's last events were not written: {err}")


class SpikeWatcher:
    """Flags a loss far above its running mean (a spike) in the metrics and the log, changing nothing."""

    def __init__(self, factor: float, note):
        self.factor, self.note, self.mean = factor, note, None

    def watch(self, step: int, metrics: dict[str, float]) -> None:
        loss = metrics["loss"]
        if metrics["skipped"]:
            return
        if self.mean is not None and loss > self.factor * self.mean:
            metrics["loss_spike"] = 1.0
            self.note(f"loss spike at step {step}: {loss:.4f} vs running mean {self.mean:.4f}")
        if loss == loss:
            self.mean = loss if self.mean is None else 0.9 * self.mean + 0.1 * loss
