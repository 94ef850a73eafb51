"""The build on its two engines: tokens/s and peak memory per process, local process pool against
Ray, 1 and 2 workers, on one generated corpus; and the driver's peak memory as the corpus grows 4x
(the Ray engine's driver holds file names and shard entries, never per-document data).

    python benchmarks/data_engines.py [--megabytes 160] [--out benchmarks/results/data_engines.json]

Each build runs in its own process (the driver); a sampler thread there reads the resident memory
of the driver and of every process under it (pool workers, or Ray's raylet and workers, which a
local Ray started by the build runs as the driver's descendants) every 50 ms. Same tokenizer, same
corpus, exact and near dedup on, concat packing, every token once.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.data_build import FILE_MB, in_subprocess, save_summary, write_corpus  # noqa: E402


class MemorySampler(threading.Thread):
    """Peak RSS of this process and of each process under it, sampled until stopped."""

    def __init__(self, period: float = 0.05):
        super().__init__(daemon=True)
        import psutil

        self.me, self.period, self.peaks = psutil.Process(), period, {}
        self.names: dict[int, str] = {}
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            for process in [self.me, *self.me.children(recursive=True)]:
                try:
                    rss = process.memory_info().rss
                    self.names.setdefault(process.pid, process.name())
                except Exception:  # the process ended between listing and reading
                    continue
                self.peaks[process.pid] = max(self.peaks.get(process.pid, 0), rss)
            time.sleep(self.period)

    def stop(self) -> dict:
        self._stop_event.set()
        self.join()
        driver = self.peaks.pop(self.me.pid, 0)
        workers = [rss for pid, rss in self.peaks.items() if "ray::" in self.names[pid] or "python" in self.names[pid]]
        return {
            "driver_peak_mib": driver / 2**20,
            "worker_peak_mib": max(workers, default=0) / 2**20,
            "processes": len(self.peaks),
        }


def run_build(files: list[str], tokenizer: str, out: str, engine: str, workers: int) -> dict:
    from data_pipeline.build import BuildConfig, NearDedupConfig, TokenizerConfig, build
    from data_pipeline.sources import SourceConfig

    config = BuildConfig(
        output_dir=out,
        sources=[SourceConfig(paths=files)],
        seq_len=2048,
        total_tokens=0,
        tokenizer=TokenizerConfig(path=tokenizer),
        sequences_per_shard=512,
        near_dedup=NearDedupConfig(),
        engine=engine,
        workers=workers,
    )
    sampler = MemorySampler()
    sampler.start()
    start = time.perf_counter()
    manifest = build(config)
    seconds = time.perf_counter() - start
    tokens = sum(lang["tokens"] for lang in manifest["languages"].values())
    shards = [entry["sha256"] for entry in manifest["store"]["splits"]["train"]]  # the token store's parts
    return {"seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds, **sampler.stop(),
            "shards": len(shards), "train_sha256": shards}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--megabytes", type=int, default=160)
    parser.add_argument("--work", default="/tmp/data_build_bench")
    parser.add_argument("--out", default="benchmarks/results/data_engines.json")
    args = parser.parse_args()
    work = Path(args.work)
    files = [str(p) for p in write_corpus(work / "corpus", args.megabytes)]
    quarter = files[: max(1, len(files) // 4)]

    from data_pipeline.build_tokenize import Unit, sample_texts
    from data_pipeline.languages import language_table
    from data_pipeline.sources import SourceConfig
    from data_pipeline.tokenizer import train_bpe

    tokenizer = work / "tokenizer_engines"
    tokenizer.mkdir(parents=True, exist_ok=True)
    units = [Unit(i, SourceConfig(paths=[f]), f) for i, f in enumerate(files)]
    train_bpe(sample_texts(units, language_table(), 400), 32000).save(str(tokenizer / "tokenizer.json"))

    runs = [("local", 1, files), ("local", 2, files), ("ray", 1, files), ("ray", 2, files), ("ray", 2, quarter)]
    rows = []
    for engine, workers, subset in runs:
        out = work / f"out_{engine}{workers}_{len(subset)}"
        subprocess.run(["rm", "-rf", str(out), str(out) + ".building"], check=True)
        row = {"engine": engine, "workers": workers, "megabytes": len(subset) * FILE_MB,
               **in_subprocess("run_build", subset, str(tokenizer), str(out), engine, workers,
                               module="benchmarks.data_engines")}  # fmt: skip
        rows.append(row)
        print(f"{engine} x{workers}, {row['megabytes']} MB: {row['tokens_per_s']:,.0f} tokens/s", flush=True)
    full = [r for r in rows if r["megabytes"] == len(files) * FILE_MB]
    identical = len({tuple(r["train_sha256"]) for r in full}) == 1
    ray_full, ray_quarter = rows[3], rows[4]
    driver_growth = ray_full["driver_peak_mib"] / ray_quarter["driver_peak_mib"]
    print(f"\n{'engine':<7} {'workers':>7} {'MB':>5} {'tokens/s':>11} {'vs local x1':>11} {'driver MiB':>10} "
          f"{'worker MiB':>10} {'processes':>9}")  # fmt: skip
    for r in rows:
        r["vs_local_1"] = r["tokens_per_s"] / rows[0]["tokens_per_s"]
        print(f"{r['engine']:<7} {r['workers']:>7} {r['megabytes']:>5} {r['tokens_per_s']:>11,.0f} "
              f"{r['vs_local_1']:>11.2f} {r['driver_peak_mib']:>10.0f} {r['worker_peak_mib']:>10.0f} "
              f"{r['processes']:>9}")  # fmt: skip
    print(f"\nsame token-store parts from every engine and worker count: {identical}")
    print(
        f"Ray driver peak, {ray_full['megabytes']} MB / {ray_quarter['megabytes']} MB: {driver_growth:.2f} (flat ~ 1)"
    )
    for r in rows:
        r.pop("train_sha256")
    summary = {"rows": rows, "identical_shards": identical, "ray_driver_peak_4x_over_1x": driver_growth}
    save_summary(args.out, summary)


if __name__ == "__main__":
    main()
