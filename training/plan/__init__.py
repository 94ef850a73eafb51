"""Plan a run before renting the cluster: `cost` predicts one layout's memory per GPU and step time,
`search` enumerates the layouts of a cluster and picks (`parallel: auto`), `cli` is
`python -m training.plan`."""

from training.plan.cli import main
from training.plan.cost import GIB, PRESETS, RESERVED, Cluster, Layout, memory_per_rank, parse_memory, predict
from training.plan.search import choose_layout, plan

__all__ = [
    "GIB",
    "PRESETS",
    "RESERVED",
    "Cluster",
    "Layout",
    "choose_layout",
    "main",
    "memory_per_rank",
    "parse_memory",
    "plan",
    "predict",
]
