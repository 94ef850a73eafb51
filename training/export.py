"""python -m training.export CHECKPOINT {torch,hf} OUT [--dtype D] [--max-shard-gb G]

Consolidates a sharded DCP checkpoint (any layout) into one `torch.save` file of model weights, or
into a `transformers` Phi3 folder (sharded safetensors + index, config.json keeping every field of
an imported checkpoint's config, the dataset's tokenizer with the chat template the model was
trained with, generation_config.json stopping at the end of a turn). Runs in one process; the HF export
streams one safetensors shard at a time from the checkpoint, never the whole model.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch
from tokenizers import Tokenizer
from tqdm import tqdm
from transformers import GenerationConfig, PreTrainedTokenizerFast

from common.cli import print_error
from common.files import atomic_write
from data_pipeline.shards import read_manifest
from data_pipeline.tokenizer import CHAT_MARKERS, EOS, PAD, TOKENIZER_FILE, special_ids
from training.model_setup import checkpoint_model_config, checkpoint_tensors, load_model_weights
from training.models.hf import DEFAULT_SHARD_BYTES, export_hf
from training.posttrain.chat import END, PHI_CHAT_TEMPLATE

HF_TOKENIZER_FILES = ("special_tokens_map.json", "chat_template.jinja", "generation_config.json")


def save_tokenizer(tokenizer_file: str | Path, out_dir: Path, template_folder: str | Path | None = None) -> None:
    """The model's tokenizer as an HF tokenizer, with the chat template the model was trained with
    and a `generation_config.json` that stops at the end of a turn. An HF folder's own files (the
    dataset's tokenizer, or the folder whose template formatted its conversations) are copied as
    they are; a bare tokenizer.json gets our EOS/PAD tokens, the chat markers it has as special
    tokens and the built-in template, in tokenizer_config.json (readable by older transformers)."""
    source = Path(template_folder or tokenizer_file)
    if source.is_dir():
        for file in source.iterdir():
            if file.name.startswith("tokenizer") or file.name in HF_TOKENIZER_FILES:
                shutil.copy2(file, out_dir / file.name)
        return
    tokenizer = Tokenizer.from_file(str(source))
    special = {t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special}
    markers = [m for m in CHAT_MARKERS if m in special]
    hf = PreTrainedTokenizerFast(
        tokenizer_file=str(source), eos_token=EOS, pad_token=PAD, extra_special_tokens=markers,
        chat_template=PHI_CHAT_TEMPLATE,
    )  # fmt: skip
    hf.save_pretrained(out_dir, save_jinja_files=False)
    eos, pad = special_ids(tokenizer)
    stops = [tokenizer.token_to_id(END), eos] if END in markers else [eos]
    GenerationConfig(eos_token_id=stops, pad_token_id=pad).save_pretrained(out_dir)
    config_file = out_dir / "config.json"  # the model's own config: its end-of-text and padding ids
    config = json.loads(config_file.read_text())
    config.update(eos_token_id=eos, pad_token_id=pad)
    config_file.write_text(json.dumps(config, indent=2) + "\n")


def hf_tokenizer_folder(build_config: dict) -> Path | None:
    """The HF folder a dataset's conversations were formatted with (`chat_template`), else the one its
    tokenizer came from (`tokenizer.path`), where it is still on this machine: its files (template,
    generation config) are the model's."""
    for path in (build_config.get("chat_template"), (build_config.get("tokenizer") or {}).get("path")):
        if path and Path(path).is_dir():
            return Path(path)
    return None


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
            data = Path(run_config["data"]["path"])
            tokenizer = data / TOKENIZER_FILE
            template = hf_tokenizer_folder(read_manifest(data).get("config", {})) if tokenizer.is_file() else None
            export_hf(
                checkpoint_tensors(found, model_config),
                model_config,
                out,
                (lambda folder: save_tokenizer(tokenizer, folder, template)) if tokenizer.is_file() else None,
                dtype=getattr(torch, args.dtype) if args.dtype else None,
                max_shard_bytes=int(args.max_shard_gb * 1024**3),
                progress=lambda shards: tqdm(shards, desc="safetensors shards", unit="shard"),
            )
    except (FileNotFoundError, ValueError) as err:
        print_error(str(err))
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
