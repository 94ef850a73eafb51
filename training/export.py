"""python -m training.export CHECKPOINT {torch,hf} OUT [--dtype D] [--max-shard-gb G]

Consolidates a sharded DCP checkpoint (any layout) into one `torch.save` file of model weights, or
into a `transformers` Phi3 folder (sharded safetensors + index, config.json keeping every field of
an imported checkpoint's config, the dataset's tokenizer). Runs in one process; the HF export
streams one safetensors shard at a time from the checkpoint, never the whole model.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from data_pipeline.config import from_dict
from data_pipeline.tokenizer import TOKENIZER_FILE
from training.checkpoint import LATEST, TRAINER_STATE, checkpoint_tensors, find_checkpoint, load_model_weights
from training.models.hf import DEFAULT_SHARD_BYTES, export_hf
from training.trainer import TrainConfig


def checkpoint_config(checkpoint: str | Path) -> tuple[Path, TrainConfig]:
    """A complete checkpoint folder (or a run's `checkpoints/`, meaning its latest) and its run config."""
    found = find_checkpoint(checkpoint)
    if found is None:
        raise FileNotFoundError(f"{checkpoint} is not a complete checkpoint (no {TRAINER_STATE} or {LATEST})")
    state_file = found / TRAINER_STATE
    return found, from_dict(TrainConfig, json.loads(state_file.read_text())["config"], where=str(state_file))


def load_consolidated(checkpoint: str | Path) -> tuple[TrainConfig, dict[str, torch.Tensor]]:
    """The run config and full model's weights of a checkpoint, whatever layout wrote it."""
    found, config = checkpoint_config(checkpoint)
    return config, load_model_weights(found, config.model)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.export", description=__doc__)
    parser.add_argument("checkpoint", help="a step_XXXXXXXX folder, or a checkpoints folder (its latest)")
    parser.add_argument("format", choices=["torch", "hf"])
    parser.add_argument("out", help="a .pt file (torch) or a folder (hf)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                        help="hf: weights dtype (default: the imported checkpoint's, else float32)")  # fmt: skip
    parser.add_argument("--max-shard-gb", type=float, default=DEFAULT_SHARD_BYTES / 1024**3, help="hf: shard size")
    args = parser.parse_args(argv)
    out = Path(args.out)
    try:
        found, config = checkpoint_config(args.checkpoint)
        if args.format == "torch":
            tmp = out.with_name(out.name + ".tmp")
            torch.save(load_model_weights(found, config.model), tmp)
            os.replace(tmp, out)
        else:
            tokenizer = Path(config.data.path) / TOKENIZER_FILE
            export_hf(
                checkpoint_tensors(found, config.model),
                config.model,
                out,
                tokenizer if tokenizer.is_file() else None,
                dtype=getattr(torch, args.dtype) if args.dtype else None,
                max_shard_bytes=int(args.max_shard_gb * 1024**3),
                progress=lambda shards: tqdm(shards, desc="safetensors shards", unit="shard"),
            )
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
