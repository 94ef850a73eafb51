"""AdamW, the learning-rate schedule, and gradient clipping that is correct under TP and PP."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from common.config import ConfigError
from training.models.init import canonical_name


@dataclass
class OptimConfig:
    lr: float | str = 3e-3  # peak LR, or "auto": from the fitted LR law in `lr_law` for this run's N and D
    lr_law: str | None = None  # JSON written by `python -m training.scaling_laws fit-lr`
    min_lr_ratio: float = 0.1  # final lr = lr * min_lr_ratio
    warmup_steps: int = 20
    schedule: str = "cosine"  # cosine | linear | wsd (warmup-stable-decay) | constant
    decay_fraction: float = 0.2  # wsd: share of the steps spent decaying at the end
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 disables clipping

    def __post_init__(self):
        checks = {
            "lr": self.lr == "auto" or (isinstance(self.lr, (int, float)) and self.lr > 0),
            "min_lr_ratio": 0 <= self.min_lr_ratio <= 1,
            "warmup_steps": self.warmup_steps >= 0,
            "decay_fraction": 0 <= self.decay_fraction <= 1,
            "weight_decay": self.weight_decay >= 0,
            "beta1": 0 <= self.beta1 < 1,
            "beta2": 0 <= self.beta2 < 1,
            "eps": self.eps > 0,
            "grad_clip": self.grad_clip >= 0,
        }
        rules = {"lr": "> 0 (or 'auto')", "min_lr_ratio": "in [0, 1]", "decay_fraction": "in [0, 1]",
                 "beta1": "in [0, 1)", "beta2": "in [0, 1)", "eps": "> 0"}  # fmt: skip
        for key, ok in checks.items():
            if not ok:
                raise ConfigError(f"{key} must be {rules.get(key, '>= 0')}, got {getattr(self, key)!r}", key)


def lr_from_law(path: str | Path, nparams: int, tokens: int) -> tuple[float, str]:
    """Peak LR from a fitted token-horizon law: LR = C * N^-alpha * D^-beta (or B * D^-beta)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"optim.lr_law: no LR law file at {path}")
    law = json.loads(path.read_text())
    try:
        if "C" in law:
            lr = law["C"] * nparams ** -law["alpha"] * tokens ** -law["beta"]
            why = f"C={law['C']:.4g} * N^-{law['alpha']:.4g} * D^-{law['beta']:.4g}"
        else:
            lr = law["B"] * tokens ** -law["beta"]
            why = f"B={law['B']:.4g} * D^-{law['beta']:.4g}"
    except KeyError as err:
        raise ValueError(f"{path}: LR law lacks field {err.args[0]!r} (need C, alpha, beta or B, beta)") from None
    return lr, f"lr=auto: {lr:.3e} from {path} ({why}) at N={nparams:.3e} params, D={tokens:.3e} tokens"


def resolve_lr(config: OptimConfig, nparams: int, tokens: int) -> tuple[float, str | None]:
    if config.lr == "auto":
        if not config.lr_law:
            raise ValueError("optim.lr=auto needs optim.lr_law (a JSON fit from the scaling-laws tool)")
        return lr_from_law(config.lr_law, nparams, tokens)
    if isinstance(config.lr, str):
        raise ValueError(f"optim.lr must be a number or 'auto', got {config.lr!r}")
    return config.lr, None


def build_optimizer(model: torch.nn.Module, config: OptimConfig, lr: float) -> torch.optim.AdamW:
    """No weight decay on norms and embeddings, as in Megatron-LM and torchtitan."""
    groups: dict[tuple[float, bool], list] = {}
    for name, param in model.named_parameters():
        # A pipeline's last stage names its copy of tied embeddings `output.weight`.
        no_decay = param.ndim < 2 or "embeddings" in canonical_name(model, name)
        decay = 0.0 if no_decay else config.weight_decay
        # The fused kernel takes a group of plain tensors or of DTensors, not both (TP leaves norms plain).
        groups.setdefault((decay, isinstance(param, DTensor)), []).append(param)
    groups = [{"params": params, "weight_decay": decay} for (decay, _), params in groups.items()]
    return torch.optim.AdamW(groups, lr=lr, betas=(config.beta1, config.beta2), eps=config.eps, fused=True)


def lr_multiplier(step: int, total_steps: int, config: OptimConfig) -> float:
    """Linear warmup to 1, then decay to `min_lr_ratio` at `total_steps`."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    progress = min(1.0, (step - config.warmup_steps) / max(1, total_steps - config.warmup_steps))
    floor = config.min_lr_ratio
    if config.schedule == "cosine":
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    if config.schedule == "linear":
        return floor + (1 - floor) * (1 - progress)
    if config.schedule == "wsd":
        decay_start = total_steps - int(config.decay_fraction * total_steps)
        if step < decay_start:
            return 1.0
        return floor + (1 - floor) * (1 - min(1.0, (step - decay_start) / max(1, total_steps - decay_start)))
    if config.schedule == "constant":
        return 1.0
    raise ValueError(f"optim.schedule {config.schedule!r} is not one of cosine, linear, wsd, constant")


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, config: OptimConfig):
    lr_multiplier(0, total_steps, config)  # validates the schedule name before training starts
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_multiplier(step, total_steps, config))


def clip_grad_norm(
    parameters: list[torch.nn.Parameter],
    max_norm: float,
    pp_group: dist.ProcessGroup | None = None,
    counted_elsewhere: list[torch.nn.Parameter] = (),
) -> torch.Tensor:
    """Global L2 norm over every rank's piece of every gradient, then scale grads if above max_norm.

    A DTensor gradient's squared norm is summed over the mesh dims it is sharded on (TP, and DP under
    FSDP) and counted once over the dims it is replicated on; pipeline stages add up over the PP group.
    `counted_elsewhere`: copies of a parameter another stage holds too (tied embeddings), scaled but not
    counted twice."""
    skip = {id(p) for p in counted_elsewhere}
    device = next(iter(parameters)).device
    squares: dict[tuple[str, ...], torch.Tensor] = {}
    groups: dict[tuple[str, ...], list[dist.ProcessGroup]] = {}
    grads = []
    for p in parameters:
        if p.grad is None:
            continue
        g, key = p.grad, ()
        if isinstance(g, DTensor):
            dims = [i for i, pl in enumerate(g.placements) if not (pl.is_replicate() or pl.is_partial())]
            key = tuple(g.device_mesh.mesh_dim_names[i] for i in dims)
            groups[key] = [g.device_mesh.get_group(i) for i in dims]
            g = g.to_local()
        grads.append(g)
        if id(p) in skip:
            continue
        squares[key] = squares.get(key, torch.zeros((), device=device)) + g.detach().float().pow(2).sum()
    total = torch.zeros((), device=device)
    for key in sorted(squares):  # the same order on every rank of a stage
        for group in groups.get(key, []):
            dist.all_reduce(squares[key], group=group)
        total = total + squares[key]
    if pp_group is not None:
        dist.all_reduce(total, group=pp_group)
    norm = total.sqrt()
    if max_norm > 0:
        scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        for g in grads:
            g.mul_(scale)
    return norm
