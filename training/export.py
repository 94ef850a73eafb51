"""python -m training.export CHECKPOINT {torch,hf} OUT [--dtype D] [--max-shard-gb G]

Consolidates a sharded DCP checkpoint (any layout) into one `torch.save` file of model weights, or
into a `transformers` Phi3 folder (sharded safetensors + index, config.json keeping every field of
an imported checkpoint's config, the dataset's tokenizer). Runs in one process; the HF export
streams one safetensors shard at a time from the checkpoint, never the whole model.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import PreTrainedTokenizerFast

from common.files import atomic_write
from data_pipeline.tokenizer import EOS, PAD, TOKENIZER_FILE
from training.model_setup import checkpoint_model_config, checkpoint_tensors, load_model_weights
from training.models.hf import DEFAULT_SHARD_BYTES, export_hf


def save_tokenizer(tokenizer_file: str | Path, out_dir: Path) -> None:
    """The dataset's tokenizer as an HF tokenizer: a folder's own files are copied as they are (chat
    template included); a bare tokenizer.json gets our EOS/PAD tokens."""
    source = Path(tokenizer_file)
    if source.is_dir():
        for file in source.iterdir():
            if file.name.startswith("tokenizer") or file.name in ("special_tokens_map.json", "chat_template.jinja"):
                shutil.copy2(file, out_dir / file.name)
        return
    PreTrainedTokenizerFast(tokenizer_file=str(source), eos_token=EOS, pad_token=PAD).save_pretrained(out_dir)


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
        found, model_config, run_config = checkpoint_model_config(args.checkpoint)
        if args.format == "torch":
            weights = load_model_weights(found, model_config)
            atomic_write(out, lambda tmp: torch.save(weights, tmp))
        else:
            tokenizer = Path(run_config["data"]["path"]) / TOKENIZER_FILE
            export_hf(
                checkpoint_tensors(found, model_config),
                model_config,
                out,
                (lambda folder: save_tokenizer(tokenizer, folder)) if tokenizer.is_file() else None,
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
