"""Data build throughput and memory: `python -m data_pipeline build` against honest peers on the
same generated corpus, the same encoder (tiktoken's encoding of the trained BPE, called per text) and
the same number of worker processes; and the loader's sample rate against the trainer's token rate.

    python benchmarks/data_build.py [--megabytes 200] [--repeat 3] [--only raw_encoder,ours]
                                    [--work DIR] [--out benchmarks/results/data_build.json]

Peers (`pip install -e .[bench]` for datatrove):
- raw encoder: each worker reads its JSONL files and encodes every text with tiktoken; nothing is
  kept. The physical limit of a build with that encoder on these cores.
- raw encoder, word-cached: the same with the build's own encoder (tiktoken behind a word cache,
  `data_pipeline.tokenizer.WordCachedEncoder`): the limit of this build, which the others could reach
  with the same cache.
- `datasets.map`: load_dataset("json") -> map(encode, batched, num_proc) writing Arrow.
- datatrove: its JsonlReader and LocalPipelineExecutor, one task per file, a step that encodes.
Ours does more (language families, exact dedup, mixing, packing, shards). Each build runs
in its own process so its peak memory (the process and its workers) is its own; ours also runs at
half the corpus size: flat memory means the two peaks are close.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from data_pipeline.engine import usable_cores  # noqa: E402  (the checkout, put on the path above)

SEQ_LEN = 2048
FILE_MB = 10


def write_corpus(folder: Path, megabytes: int) -> list[Path]:
    """`megabytes` of JSONL in 10 MB files: documents of random words from faker's word lists of
    the default corpus's languages (fast to make, same scripts as the bundled corpus)."""
    from faker import Faker

    from data_pipeline.corpus import LOCALES

    folder.mkdir(parents=True, exist_ok=True)
    words = {lang: np.array(Faker(locale).get_words_list()) for lang, locale in LOCALES.items()}
    langs = sorted(words)
    paths = []
    for i in range(megabytes // FILE_MB):
        path = folder / f"part_{i:04d}.jsonl"
        paths.append(path)
        if path.is_file():
            continue
        rng = np.random.default_rng(i)
        size, lines = 0, []
        while size < FILE_MB * 2**20:
            lang = langs[rng.integers(len(langs))]
            text = " ".join(rng.choice(words[lang], size=int(rng.integers(50, 400))))
            line = json.dumps({"text": text, "lang": lang}, ensure_ascii=False)
            lines.append(line)
            size += len(line.encode())
        tmp = path.with_suffix(".tmp")
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    return paths


def peak_rss_mib() -> float:
    """Peak resident memory of this process plus its largest worker (Linux reports KiB)."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return (own + children) / 1024


def run_ours(files: list[str], tokenizer: str, out: str) -> dict:
    from data_pipeline.build import BuildConfig, TokenizerConfig, build
    from data_pipeline.sources import SourceConfig

    config = BuildConfig(
        output_dir=out,
        sources=[SourceConfig(paths=files)],
        seq_len=SEQ_LEN,
        total_tokens=0,  # every token once, natural ratios: the same work as the HF pipeline
        tokenizer=TokenizerConfig(path=tokenizer),
        sequences_per_shard=2048,
    )
    start = time.perf_counter()
    manifest = build(config)
    seconds = time.perf_counter() - start
    tokens = sum(lang["tokens"] for lang in manifest["languages"].values())  # encoded, as the peers count
    return {"seconds": seconds, "tokens": tokens, "peak_rss_mib": peak_rss_mib()}


def encoder(tokenizer: str):
    """The build's encoder for this tokenizer folder: `.encode` is tiktoken's encoding of the same
    BPE, `.encode_texts` the build's word cache in front of it."""
    from data_pipeline.tokenizer import fast_encoder, load_tokenizer

    fast = fast_encoder(load_tokenizer(tokenizer))
    if fast is None:
        raise RuntimeError(f"{tokenizer}: not a byte-level BPE tiktoken can run; the peers need one encoder")
    return fast


def _encode_files(args: tuple[list[str], str, bool]) -> int:
    files, tokenizer, cached = args
    fast, tokens = encoder(tokenizer), 0
    for path in files:
        with open(path, encoding="utf-8") as f:
            texts = [json.loads(line)["text"] for line in f]
        for start in range(0, len(texts), 1000):
            batch = texts[start : start + 1000]
            tokens += len(fast.encode_texts(batch)[0]) if cached else sum(len(fast.encode(text)) for text in batch)
    return tokens


def run_raw(files: list[str], tokenizer: str, out: str, cached: bool = False) -> dict:
    """Read and encode every text on one process per usable core, keeping nothing."""
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    workers = usable_cores()
    start = time.perf_counter()
    with ProcessPoolExecutor(workers, get_context("spawn")) as pool:
        tokens = sum(pool.map(_encode_files, [(files[w::workers], tokenizer, cached) for w in range(workers)]))
    return {"seconds": time.perf_counter() - start, "tokens": tokens, "peak_rss_mib": peak_rss_mib()}


def run_raw_cached(files: list[str], tokenizer: str, out: str) -> dict:
    return run_raw(files, tokenizer, out, cached=True)


def run_hf(files: list[str], tokenizer: str, out: str) -> dict:
    """load_dataset("json") -> map(encode, batched, num_proc) writing Arrow, encoding with tiktoken."""
    import datasets

    datasets.disable_progress_bars()
    encode = encoder(tokenizer).encode
    eos = 0  # any id: appended per document as the build appends its EOS
    start = time.perf_counter()
    dataset = datasets.load_dataset("json", data_files=files, split="train", cache_dir=str(Path(out) / "cache"))
    tokenized = dataset.map(
        lambda batch: {"input_ids": [encode(text) + [eos] for text in batch["text"]]},
        batched=True,
        num_proc=usable_cores(),
        remove_columns=dataset.column_names,
    )
    tokenized.save_to_disk(str(Path(out) / "tokenized"))
    seconds = time.perf_counter() - start
    tokens = sum(pa_lengths(tokenized.data.column("input_ids"))) - len(tokenized)
    return {"seconds": seconds, "tokens": tokens, "peak_rss_mib": peak_rss_mib()}


def pa_lengths(column) -> list[int]:
    return [int(n) for chunk in column.chunks for n in chunk.value_lengths().to_numpy()]


def run_datatrove(files: list[str], tokenizer: str, out: str) -> dict:
    """datatrove's reader and local executor, one task per file, each writing its token ids."""
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.base import PipelineStep
    from datatrove.pipeline.readers import JsonlReader

    class Encode(PipelineStep):
        name = "encode (tiktoken, per text)"

        def run(self, data, rank: int = 0, world_size: int = 1):
            encode, batch, tokens = encoder(tokenizer).encode, [], 0
            with open(Path(out) / f"tokens_{rank:05d}.bin", "wb") as sink:

                def flush():
                    nonlocal tokens
                    for document in batch:
                        ids = encode(document.text)
                        np.asarray(ids, np.uint32).tofile(sink)
                        tokens += len(ids)
                    batch.clear()

                for document in data:
                    batch.append(document)
                    if len(batch) == 1000:
                        flush()
                flush()
            (Path(out) / f"count_{rank:05d}").write_text(str(tokens))
            yield from ()

    Path(out).mkdir(parents=True, exist_ok=True)
    folder = str(Path(files[0]).parent)
    reader = JsonlReader(folder, glob_pattern="part_*.jsonl", text_key="text", doc_progress=False)
    names = {Path(f).name for f in files}
    reader.data_folder.list_files = _only(reader.data_folder.list_files, names)
    start = time.perf_counter()
    LocalPipelineExecutor([reader, Encode()], tasks=len(files), workers=usable_cores(),
                          logging_dir=str(Path(out) / "logs")).run()  # fmt: skip
    seconds = time.perf_counter() - start
    tokens = sum(int(p.read_text()) for p in Path(out).glob("count_*"))
    return {"seconds": seconds, "tokens": tokens, "peak_rss_mib": peak_rss_mib()}


def _only(list_files, names: set[str]):
    """The folder's listing restricted to `names` (the half-corpus run)."""

    def listed(*args, **kwargs):
        return [f for f in list_files(*args, **kwargs) if Path(f).name in names]

    return listed


def run_loader(data_dir: str, batch_size: int = 16, steps: int = 200) -> dict:
    from data_pipeline.loader import DataLoader
    from data_pipeline.mixed import MixConfig, MixedDataset

    loader = DataLoader(MixedDataset(data_dir, MixConfig(), "train"), batch_size)
    loader.batch_at(0)
    start = time.perf_counter()
    for step in range(steps):
        batch = loader.batch_at(step)
    seconds = time.perf_counter() - start
    return {"samples_per_s": steps * batch_size / seconds, "tokens_per_s": steps * batch.tokens.numel() / seconds}


def in_subprocess(function: str, *args, module: str = "benchmarks.data_build") -> dict:
    """`module.function(*args)` in a fresh process (its own peak memory), returning its JSON result."""
    code = f"import json, {module} as b; print(json.dumps(b.{function}(*{list(args)!r})))"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{function}{args[3:]} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--megabytes", type=int, default=200)
    parser.add_argument("--work", default="/tmp/data_build_bench")
    parser.add_argument(
        "--trainer-tokens-per-s",
        type=float,
        default=10_000.0,
        help="tiny preset, one CPU process (benchmarks/trainer_step.py measures it)",
    )
    parser.add_argument("--out", default="benchmarks/results/data_build.json")
    parser.add_argument("--repeat", type=int, default=1, help="trials per run, interleaved; the median is kept")
    parser.add_argument("--only", help="comma-separated runs (default: all): " + ",".join(RUNS))
    args = parser.parse_args()
    only = args.only.split(",") if args.only else list(RUNS)
    if unknown := set(only) - set(RUNS):
        parser.error(f"--only: no runs {sorted(unknown)} (runs: {', '.join(RUNS)})")
    work = Path(args.work)
    files = [str(p) for p in write_corpus(work / "corpus", args.megabytes)]
    half = files[: len(files) // 2]

    from data_pipeline.build_tokenize import Unit, sample_texts
    from data_pipeline.languages import language_table
    from data_pipeline.sources import SourceConfig
    from data_pipeline.tokenizer import train_bpe

    tokenizer_dir = work / "tokenizer"
    tokenizer_dir.mkdir(exist_ok=True)
    units = [Unit(i, SourceConfig(paths=[f]), f) for i, f in enumerate(files)]
    train_bpe(sample_texts(units, language_table(), 400), 32000).save(str(tokenizer_dir / "tokenizer.json"))

    runs = [(name, kind, half if name == "ours_half" else files) for name, kind in RUNS.items() if name in only]
    trials: dict[str, list[dict]] = {name: [] for name, _, _ in runs}
    for trial in range(args.repeat):  # interleaved, so that a slow spell of the machine hits every run alike
        for name, kind, subset in runs:
            out = work / f"out_{name}"
            subprocess.run(["rm", "-rf", str(out), str(out) + ".building"], check=True)
            result = in_subprocess(f"run_{kind}", subset, str(tokenizer_dir), str(out))
            result.update(megabytes=len(subset) * FILE_MB, tokens_per_s=result["tokens"] / result["seconds"])
            trials[name].append(result)
            print(f"{name} (trial {trial + 1}): {result}", flush=True)
    results = {name: median_trial(runs) for name, runs in trials.items()}
    if "ours" in results:
        results["loader"] = in_subprocess("run_loader", str(work / "out_ours"))
    print_summary(results, trials, args)


RUNS = {"raw_encoder": "raw", "raw_encoder_cached": "raw_cached", "ours": "ours", "ours_half": "ours",
        "hf_datasets_map": "hf", "datatrove": "datatrove"}  # fmt: skip


def median_trial(trials: list[dict]) -> dict:
    """The trial of median time, with every trial's seconds."""
    middle = sorted(trials, key=lambda t: t["seconds"])[len(trials) // 2]
    return {**middle, "seconds_per_trial": [round(t["seconds"], 3) for t in trials]}


def print_summary(results: dict, trials: dict[str, list[dict]], args) -> None:
    """The table, the ratios the issue's targets are about (where their runs were made), and the JSON."""
    summary: dict = {"seq_len": SEQ_LEN, "trials": args.repeat, "results": results}
    raw = results.get("raw_encoder", {}).get("tokens_per_s")
    print(f"\n{'build':<18} {'MB':>5} {'tokens':>12} {'seconds':>8} {'tokens/s':>12} {'vs raw':>7} {'peak MiB':>9}")
    for name, r in results.items():
        if "megabytes" not in r:  # the loader
            continue
        r["vs_raw_encoder"] = r["tokens_per_s"] / raw if raw else None
        versus = f"{r['vs_raw_encoder']:>7.2f}" if raw else f"{'-':>7}"
        print(f"{name:<18} {r['megabytes']:>5} {r['tokens']:>12,} {r['seconds']:>8.1f} {r['tokens_per_s']:>12,.0f} "
              f"{versus} {r['peak_rss_mib']:>9.0f}")  # fmt: skip
    ours = results.get("ours")
    if ours and raw:
        # Each trial's two runs were made one after the other: the median of their ratios is the
        # least sensitive to the machine's slow spells.
        paired = [r["seconds"] / o["seconds"] for r, o in zip(trials["raw_encoder"], trials["ours"], strict=True)]
        summary["ours_over_raw_encoder"] = ours["vs_raw_encoder"]
        summary["ours_over_raw_encoder_per_trial"] = [round(x, 3) for x in paired]
        summary["ours_over_raw_encoder_paired_median"] = float(np.median(paired))
        print(f"\nours / raw encoder: {ours['vs_raw_encoder']:.2f} (medians); per trial "
              f"{', '.join(f'{x:.2f}' for x in paired)}, median {np.median(paired):.2f} (target >= 0.9)")  # fmt: skip
    if ours and "raw_encoder_cached" in results:
        summary["ours_over_raw_cached_encoder"] = ours["tokens_per_s"] / results["raw_encoder_cached"]["tokens_per_s"]
        print(f"ours / raw word-cached encoder: {summary['ours_over_raw_cached_encoder']:.2f}")
    if ours and "ours_half" in results:
        summary["memory_full_over_half"] = ours["peak_rss_mib"] / results["ours_half"]["peak_rss_mib"]
        print(f"peak memory, full / half corpus: {summary['memory_full_over_half']:.2f} (flat ~ 1)")
    if "loader" in results:
        loader = results["loader"]
        summary["loader_over_trainer"] = loader["tokens_per_s"] / args.trainer_tokens_per_s
        print(
            f"loader: {loader['samples_per_s']:,.0f} samples/s, {loader['tokens_per_s']:,.0f} tokens/s = "
            f"{summary['loader_over_trainer']:,.0f}x the tiny trainer's {args.trainer_tokens_per_s:,.0f} tokens/s "
            "(target >= 10)"
        )
    save_summary(args.out, summary)


def save_summary(out: str, summary: dict) -> None:
    """The results as JSON, with the machine they were measured on."""
    machine = f"{platform.processor() or platform.machine()}, {usable_cores()} of {os.cpu_count()} cores"
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps({"machine": machine, **summary}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
