"""python -m data_pipeline {corpus,gettext-corpus,build,inspect} ..."""

from __future__ import annotations

import argparse
import errno
import os
import shutil
import sys
from pathlib import Path

import numpy as np

from common.cli import print_error
from common.config import ConfigError, load_config
from common.files import atomic_write_text
from common.locks import LockedError
from data_pipeline.build import BuildConfig, local_output
from data_pipeline.build import build as run_build
from data_pipeline.shards import read_manifest


def summarize(data_dir: str | Path) -> str:
    manifest = read_manifest(data_dir)
    lines = [
        f"dataset {data_dir}: seq_len {manifest['seq_len']}, vocab {manifest['vocab_size']}, "
        f"tokenizer {manifest['tokenizer_hash']}",
    ]
    for split, shards in manifest["splits"].items():
        seqs = sum(s["sequences"] for s in shards)
        tokens = sum(s["tokens"] for s in shards)
        lines.append(
            f"  {split:5s}: {len(shards)} shards, {seqs} sequences, {tokens} tokens, "
            f"{manifest['padding_tokens'][split]} padding"
        )
    packing = manifest.get("packing")
    if packing:
        lines.append(
            f"  packing {packing['strategy']}: {100 * packing['padding_fraction']:.2f}% of train slots are padding, "
            f"{packing['truncated_docs']} documents truncated, {packing.get('split_docs', 0)} split"
        )
    store = manifest.get("store")
    if store:
        docs = {split: sum(e["documents"] for e in entries) for split, entries in store["splits"].items()}
        tokens = sum(e["tokens"] for entries in store["splits"].values() for e in entries)
        lines.append(
            f"  token store: {docs['train']} train and {docs['valid']} valid documents, {tokens} tokens as "
            f"{store['token_type']}, {store['bytes_per_token']:.2f} bytes per token (index included)"
        )
    removed = (manifest.get("duplicates_removed", 0), manifest.get("near_duplicates_removed", 0))
    lines.append(f"  removed {removed[0]} exact and {removed[1]} near duplicates")
    lines.append(
        f"  {'family':14s} {'asked':>7s} {'share':>7s} {'tokens':>10s} {'docs':>7s} {'epochs':>7s} {'valid':>6s}"
    )
    for family, s in manifest["family_stats"].items():
        share = f"{s['share']:7.3f}" if "share" in s else f"{'-':>7s}"
        lines.append(
            f"  {family:14s} {s['ratio']:7.3f} {share} {s['tokens']:10d} {s['documents']:7d} {s['epochs']:7.2f} "
            f"{s.get('valid_documents', 0):6d}"
        )
    if manifest.get("languages"):
        lines += language_table_lines(manifest["languages"], manifest.get("tokenizer_sample") or {})
    lines += [f"  warning: {w}" for w in manifest.get("warnings", [])]
    return "\n".join(lines)


def language_table_lines(languages: dict[str, dict], sample: dict[str, dict]) -> list[str]:
    """Per language: documents, tokens, characters per token (how fairly the tokenizer cuts it) and
    the characters the tokenizer's sample held; then the worst language against the median."""
    lines = [
        f"  {'language':9s} {'family':14s} {'docs':>7s} {'tokens':>10s} {'chars/tok':>9s} "
        f"{'in sample':>10s} {'id conf.':>8s}"
    ]
    for lang, s in languages.items():
        cpt = f"{s['chars_per_token']:9.2f}" if "chars_per_token" in s else f"{'-':>9s}"
        sampled = f"{sample[lang]['characters']:10d}" if lang in sample else f"{'-':>10s}"
        counts = f"{s['documents']:7d} {s['tokens']:10d}"
        lines.append(f"  {lang:9s} {s['family']:14s} {counts} {cpt} {sampled} {s['confidence']:8.3f}")
    ratios = {lang: s["chars_per_token"] for lang, s in languages.items() if "chars_per_token" in s}
    if len(ratios) > 1:
        median = float(np.median(list(ratios.values())))
        worst = min(ratios, key=ratios.get)
        lines.append(
            f"  characters per token: worst {worst} {ratios[worst]:.2f} = {ratios[worst] / median:.2f}x the median "
            f"{median:.2f}"
        )
    return lines


def language_table_markdown(manifest: dict) -> str:
    """Per language: family, documents, tokens and characters per token, then the worst language
    against the median (the tokenizer's fairness, as docs/benchmarks.md shows it)."""
    languages = manifest["languages"]
    lines = ["| language | family | documents | tokens | chars/token |", "|---|---|---:|---:|---:|"]
    lines += [f"| {lang} | {s['family']} | {s['documents']} | {s['tokens']} | {s['chars_per_token']:.2f} |"
              for lang, s in languages.items() if "chars_per_token" in s]  # fmt: skip
    ratios = {lang: s["chars_per_token"] for lang, s in languages.items() if "chars_per_token" in s}
    median = float(np.median(list(ratios.values())))
    worst = min(ratios, key=ratios.get)
    vocab = manifest["vocab_size"]
    lines += ["", f"Worst language: {worst}, {ratios[worst]:.2f} characters per token = "
              f"**{ratios[worst] / median:.2f}x** the median {median:.2f} (vocab {vocab})."]  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_pipeline", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    corpus = sub.add_parser("corpus", help="write the default multilingual + synthetic corpus as JSONL")
    corpus.add_argument("out_dir")
    corpus.add_argument("--docs-per-language", type=int, default=600)
    corpus.add_argument("--seed", type=int, default=0)
    real = sub.add_parser("gettext-corpus", help="write real multilingual text from this machine's gettext catalogs")
    real.add_argument("out_dir")
    real.add_argument("--languages", required=True, help="locale folders, comma-separated: de,fr,ru,ja,zh_CN")
    real.add_argument("--max-chars", type=int, help="characters per language at most")
    real.add_argument("--locale-dir", default="/usr/share/locale")
    build = sub.add_parser("build", help="build Arrow shards from a data config")
    build.add_argument("config")
    build.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. seq_len=512")
    build.add_argument("--engine", choices=["local", "ray"], help="where the work runs (default: the config's)")
    build.add_argument("--address", help="engine ray: the cluster's address (auto, HOST:PORT); none starts one")
    inspect = sub.add_parser("inspect", help="summarise a built dataset")
    inspect.add_argument("data_dir")
    inspect.add_argument("--markdown", help="also write the per-language table here, as Markdown")
    args = parser.parse_args(argv)

    try:
        if args.command == "corpus":
            from data_pipeline.corpus import write_default_corpus

            paths = write_default_corpus(args.out_dir, args.docs_per_language, args.seed)
            print(f"wrote {len(paths)} files to {args.out_dir}")
        elif args.command == "gettext-corpus":
            from data_pipeline.gettext_corpus import write_gettext_corpus

            locales = [x for x in args.languages.split(",") if x]
            written = write_gettext_corpus(args.out_dir, locales, args.max_chars, locale_dir=args.locale_dir)
            for lang, s in written.items():
                print(f"{lang} ({s['locale']}): {s['documents']} documents, {s['characters']:,} characters")
        elif args.command == "build":
            overrides = list(args.overrides)
            overrides += [f"engine={args.engine}"] if args.engine else []
            overrides += [f"ray_address={args.address}"] if args.address else []
            config = load_config(BuildConfig, args.config, overrides)
            run_build(config)
            print(summarize(config.output_dir))
        else:
            print(summarize(args.data_dir))
            if args.markdown:
                atomic_write_text(args.markdown, language_table_markdown(read_manifest(args.data_dir)))
    except (ConfigError, FileNotFoundError, ValueError) as err:
        print_error(str(err))
        return 2
    except LockedError as err:  # another build writes the same folder
        print_error(str(err))
        return 4
    except OSError as err:
        if err.errno not in (errno.ENOSPC, errno.EDQUOT) or args.command != "build":
            raise
        folder = local_output(config)  # the command is build: its config was loaded before any write
        free = shutil.disk_usage(folder.parent if folder.parent.exists() else Path.cwd()).free
        message = (
            f"error: the disk is full: {os.strerror(err.errno)} while building {folder} ({free:,} bytes free on its "
            "filesystem); nothing of this build is kept and the previous output is untouched"
        )
        print(message, file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
