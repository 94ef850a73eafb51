"""Loader throughput and memory: packed shards against mixing and packing at load time.

    python benchmarks/loader.py [--data data/default] [--batch-tokens 65536] [--seq-lens 128 1024 4096] [--s3]

On a built dataset (with its token store): global batches of `--batch-tokens` tokens drawn as the
trainer draws them (`DataLoader.batch_at`, one process), tokens per second for
- `packed shards`: the build's shards (`loader.PackedDataset`);
- `store, build's mix`: `mixed.MixedDataset` with `data.mix={}` (the same sequences);
- `store, new mix`: other ratios at each `--seq-lens` value, with no rebuild.
Memory, each case in a fresh process that opens the dataset and draws 50 batches, at each of
`--copies` times the corpus (its training files listed that many times, as hard links): the heap
(anonymous resident memory) and
the file pages mapped, for the packed shards and for the store with its index made in that process
or already cached (`MixedDataset(cache_dir=...)`, as training opens it). With `--s3`, the dataset
is also uploaded to a local S3 server (moto's, over HTTP) and read as training reads a URL
(`remote.cached_dataset`): one pass over the store's training tokens, fetch included (cold cache),
and from the warm cache, against local disk. Prints tables, writes benchmarks/results/loader.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data_pipeline.loader import DataLoader, PackedDataset  # noqa: E402
from data_pipeline.mixed import MixConfig, MixedDataset  # noqa: E402
from data_pipeline.shards import read_manifest  # noqa: E402
from training.metrics import peak_rss_bytes  # noqa: E402


def tokens_per_second(dataset, batch: int, seconds: float = 3.0) -> float:
    loader = DataLoader(dataset, batch, seed=0)
    step, tokens, start = 0, 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        tokens += loader.batch_at(step).tokens.numel()
        step += 1
    return tokens / (time.perf_counter() - start)


def memory_mib() -> dict[str, float]:
    """This process's anonymous (heap) and file-backed resident memory, and its peak (Linux)."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return {key: int(fields[name].split()[0]) / 1024 for key, name in
            (("anon_mib", "RssAnon"), ("file_mib", "RssFile"), ("peak_mib", "VmHWM"))}  # fmt: skip


def loader_memory(kind: str, data: str, ratios: dict, cache: str, batch: int) -> dict[str, float]:
    """In a fresh process: memory added by opening the dataset and drawing 50 batches (the store:
    every training token once, in `ratios`)."""
    before = memory_mib()
    if kind == "packed":
        dataset = PackedDataset(data)
    else:
        tokens = sum(e["tokens"] + e["documents"] for e in read_manifest(data)["store"]["splits"]["train"])
        dataset = MixedDataset(data, MixConfig(ratios=ratios, total_tokens=tokens), cache_dir=cache)
    loader = DataLoader(dataset, batch, seed=0)
    for step in range(50):
        loader.batch_at(step)
    after = memory_mib()
    return {key: after[key] - before[key] for key in after}


def in_fresh_process(*args) -> dict[str, float]:
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(loader_memory, args)


def tiled(data: Path, copies: int, out: Path) -> Path:
    """The dataset `copies` times over, as far as a loader can tell: every training file (store part
    and packed shard) listed `copies` times under new names, hard links to the one on disk."""
    manifest = read_manifest(data)
    out.mkdir(parents=True)
    os.link(data / manifest["tokenizer_file"], out / manifest["tokenizer_file"])

    def tile(entries: list[dict]) -> list[dict]:
        copied = []
        for copy in range(copies):
            for entry in entries:
                name = Path(entry["file"]).with_name(f"copy{copy}_{Path(entry['file']).name}").as_posix()
                (out / name).parent.mkdir(parents=True, exist_ok=True)
                os.link(data / entry["file"], out / name)
                copied.append({**entry, "file": name})
        return copied

    manifest["splits"]["train"] = tile(manifest["splits"]["train"])
    manifest["store"]["splits"]["train"] = tile(manifest["store"]["splits"]["train"])
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


def one_pass_seconds(open_dataset, batch: int) -> tuple[float, int]:
    """Seconds to open the dataset and draw every batch of one epoch; and its tokens."""
    start = time.perf_counter()
    dataset = open_dataset()
    loader = DataLoader(dataset, batch, seed=0)
    steps = len(dataset) // batch
    for step in range(steps):
        loader.batch_at(step)
    return time.perf_counter() - start, steps * batch * dataset.manifest["seq_len"]


def s3_rows(data: Path, batch: int) -> list[dict]:
    """One epoch from local disk, from a local S3 server with a cold cache, and with a warm one."""
    import fsspec
    import s3fs
    from moto.server import ThreadedMotoServer

    from data_pipeline.remote import cached_dataset

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    for key, value in {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint}.items():  # fmt: skip
        os.environ[key] = value
    fsspec.config.conf["s3"] = {"endpoint_url": endpoint}
    fs = s3fs.S3FileSystem(endpoint_url=endpoint)
    fs.mkdir("bench")
    fs.put(str(data) + "/", "bench/data/", recursive=True)
    rows = []
    with tempfile.TemporaryDirectory() as cache:
        from_s3 = lambda: cached_dataset("s3://bench/data", cache)  # noqa: E731
        cases = [("local disk", lambda: data), ("s3, cold cache", from_s3), ("s3, warm cache", from_s3)]
        for name, where in cases:
            seconds, tokens = one_pass_seconds(lambda where=where: MixedDataset(where(), MixConfig()), batch)
            rows.append({"source": f"one epoch, {name}", "seconds": seconds, "tokens_per_s": tokens / seconds})
    server.stop()
    local = rows[0]["tokens_per_s"]
    for row in rows:
        row["vs_local_disk"] = local / row["tokens_per_s"]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="data/default")
    parser.add_argument("--batch-tokens", type=int, default=65_536, help="tokens per global batch")
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[128, 1024, 4096])
    parser.add_argument("--copies", type=int, nargs="+", default=[1, 16, 64], help="corpus sizes for memory")
    parser.add_argument("--s3", action="store_true", help="also read the dataset from a local S3 server")
    args = parser.parse_args()
    data = Path(args.data)
    manifest = read_manifest(data)
    if "store" not in manifest:
        sys.exit(f"{data}: no token store; rebuild it (python -m data_pipeline build ...)")
    new_ratios = {f: 1.0 for f, s in manifest["family_stats"].items() if s["tokens"]}
    built_len = manifest["seq_len"]
    speed = []
    with tempfile.TemporaryDirectory() as cache:
        cases = [
            ("packed shards", built_len, lambda: PackedDataset(data)),
            ("store, build's mix", built_len, lambda: MixedDataset(data, MixConfig(), cache_dir=cache)),
        ]
        cases += [("store, new mix", n, lambda n=n: MixedDataset(data, MixConfig(ratios=new_ratios, seq_len=n),
                                                                 cache_dir=cache)) for n in args.seq_lens]  # fmt: skip
        for name, seq_len, open_dataset in cases:
            batch = max(1, args.batch_tokens // seq_len)
            speed.append({"source": name, "seq_len": seq_len, "batch": batch,
                          "tokens_per_s": tokens_per_second(open_dataset(), batch)})  # fmt: skip
    print(f"{'source':20s} {'seq_len':>7s} {'batch':>6s} {'M tokens/s':>10s}")
    for r in speed:
        print(f"{r['source']:20s} {r['seq_len']:7d} {r['batch']:6d} {r['tokens_per_s'] / 1e6:10.2f}")
    memory = []
    batch = max(1, args.batch_tokens // built_len)
    with tempfile.TemporaryDirectory() as tmp:
        corpora = {f"{k}x": tiled(data, k, Path(tmp) / f"data-{k}x") for k in args.copies}
        for size, where in corpora.items():
            cache = str(Path(tmp) / f"cache-{size}")
            documents = sum(e["documents"] for e in read_manifest(where)["store"]["splits"]["train"])
            for kind, name in (("packed", "packed shards"), ("store", "store, index made"),
                               ("store", "store, index cached")):  # fmt: skip
                row = in_fresh_process(kind, str(where), new_ratios, cache, batch)
                memory.append({"corpus": size, "documents": documents, "source": name, **row})
    print(f"\n{'corpus':6s} {'documents':>9s} {'opened + 50 batches':22s} {'heap MiB':>8s} {'mapped MiB':>10s}")
    for r in memory:
        print(f"{r['corpus']:6s} {r['documents']:9d} {r['source']:22s} {r['anon_mib']:8.1f} {r['file_mib']:10.1f}")
    record = {"data": str(data), "batch_tokens": args.batch_tokens, "cpus": os.cpu_count(), "speed": speed,
              "memory": memory, "peak_rss_bytes": peak_rss_bytes()}  # fmt: skip
    if args.s3:
        record["s3"] = s3_rows(data, max(1, args.batch_tokens // built_len))
        header = f"{'seconds':>8s} {'M tokens/s':>10s} {'slower than disk':>16s}"
        print(f"\n{'store over S3 (moto, localhost)':32s} {header}")
        for r in record["s3"]:
            print(f"{r['source']:32s} {r['seconds']:8.2f} {r['tokens_per_s'] / 1e6:10.2f} {r['vs_local_disk']:15.2f}x")
    out = ROOT / "benchmarks" / "results" / "loader.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
