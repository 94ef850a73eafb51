"""The objectives the trainer can optimise, by the name a run config gives (`objective: dpo`).

Adding one: a module here with an `Objective` subclass (its own config dataclass as `config_class`,
read from the config section of its name) and a line in `OBJECTIVES`; no core file changes.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

from common.config import ConfigError, load_sections, written_at
from training.components import build_trainer
from training.config import TrainConfig
from training.objective import Objective
from training.objectives.dpo import DPO
from training.objectives.grpo import GRPO
from training.objectives.lm import LanguageModeling
from training.trainer import Trainer

OBJECTIVES: dict[str, type[Objective]] = {cls.name: cls for cls in (LanguageModeling, DPO, GRPO)}


def load_run_config(path: str | Path | None, overrides: list[str] | None = None) -> tuple[TrainConfig, Objective]:
    """The run config and its objective, from a YAML file and dotted overrides (`dpo.beta=0.2`). Every
    objective's section is checked, so a typo in one that is not chosen is refused too."""
    sections = {name: cls.config_class for name, cls in OBJECTIVES.items() if cls.config_class is not None}
    config, built = load_sections(TrainConfig, sections, path, overrides)
    return config, objective_for(config, built, written_at("objective", path, overrides))


def objective_for(config: TrainConfig, sections: dict[str, Any] | None = None, where: str = "config") -> Objective:
    """The objective `config.objective` names, with its section from `sections` (or its defaults)."""
    cls = OBJECTIVES.get(config.objective)
    if cls is None:
        near = difflib.get_close_matches(config.objective, OBJECTIVES, n=1)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        raise ConfigError(
            f"{where}: objective {config.objective!r} is not one of {sorted(OBJECTIVES)}{hint}", "objective"
        )
    if cls.config_class is None:
        return cls()
    return cls((sections or {}).get(cls.name) or cls.config_class())


def trainer_for(config: TrainConfig, **sections: Any) -> Trainer:
    """The trainer of `config.objective`, its settings given by name (`dpo=DPOConfig(beta=0.2)`) or defaulted."""
    return build_trainer(config, objective_for(config, sections))
