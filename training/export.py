"""python -m training.export CHECKPOINT {torch,hf} OUT

Consolidates a sharded DCP checkpoint (any layout) into one `torch.save` file of model weights, or
into a `transformers` Phi3 folder with the dataset's tokenizer. Runs in one process.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from data_pipeline.config import from_dict
from data_pipeline.tokenizer import TOKENIZER_FILE
from training.checkpoint import LATEST, TRAINER_STATE, find_checkpoint, load_model_weights
from training.models.hf import export_hf
from training.trainer import TrainConfig


def load_consolidated(checkpoint: str | Path) -> tuple[TrainConfig, dict[str, torch.Tensor]]:
    """The run config and full model's weights of a checkpoint folder (or a run's `checkpoints/`,
    meaning its latest), whatever layout wrote it."""
    found = find_checkpoint(checkpoint)
    if found is None:
        raise FileNotFoundError(f"{checkpoint} is not a complete checkpoint (no {TRAINER_STATE} or {LATEST})")
    state_file = found / TRAINER_STATE
    config = from_dict(TrainConfig, json.loads(state_file.read_text())["config"], where=str(state_file))
    return config, load_model_weights(found, config.model)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.export", description=__doc__)
    parser.add_argument("checkpoint", help="a step_XXXXXXXX folder, or a checkpoints folder (its latest)")
    parser.add_argument("format", choices=["torch", "hf"])
    parser.add_argument("out", help="a .pt file (torch) or a folder (hf)")
    args = parser.parse_args(argv)
    try:
        config, state = load_consolidated(args.checkpoint)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = Path(args.out)
    if args.format == "torch":
        tmp = out.with_name(out.name + ".tmp")
        torch.save(state, tmp)
        os.replace(tmp, out)
    else:
        tokenizer = Path(config.data.path) / TOKENIZER_FILE
        export_hf(state, config.model, out, tokenizer if tokenizer.is_file() else None)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
