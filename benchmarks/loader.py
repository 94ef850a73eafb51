"""Loader throughput and memory: packed shards against mixing and packing at load time.

    python benchmarks/loader.py [--data data/default] [--batch 64] [--seq-lens 128 1024]

On a built dataset (with its token store): global batches drawn as the trainer draws them
(`DataLoader.batch_at`), tokens per second for
- `packed shards`: the build's shards (`loader.PackedDataset`);
- `store, build's mix`: `mixed.MixedDataset` with `data.mix={}` (the same sequences);
- `store, new mix`: other ratios and each `--seq-lens` value, with no rebuild;
and the resident memory each adds when opened, at 1x and 4x the corpus (the corpus written four
times as separate sources). With `--s3`, the dataset is also uploaded to a local S3 server (moto's,
over HTTP) and read as training reads a URL (`remote.cached_dataset`): one pass over the store's
training tokens, fetch included (cold cache), and from the warm cache, against local disk.
Prints a table, writes benchmarks/results/loader.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common.config import from_dict  # noqa: E402
from data_pipeline.build import BuildConfig, build  # noqa: E402
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


def rss_mib() -> float:
    """Resident memory now (Linux)."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def opened_mib(open_dataset) -> tuple[object, float]:
    before = rss_mib()
    dataset = open_dataset()
    return dataset, rss_mib() - before


def corpus_times(data: Path, copies: int, out: Path) -> Path:
    """The dataset's sources built again with its tokenizer, `copies` times over (exact dedup off)."""
    config = read_manifest(data)["config"]
    sources = [source for _ in range(copies) for source in config["sources"]]
    built = {**config, "sources": sources, "output_dir": str(out / "data"), "dedup": False,
             "tokenizer": {"path": str(data)}}  # fmt: skip
    build(from_dict(BuildConfig, built))
    return out / "data"


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
        from_s3 = lambda: cached_dataset("s3://bench/data", cache, mixed=True)  # noqa: E731
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
    parser.add_argument("--batch", type=int, default=64, help="sequences per global batch")
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[128, 1024])
    parser.add_argument("--s3", action="store_true", help="also read the dataset from a local S3 server")
    args = parser.parse_args()
    data = Path(args.data)
    manifest = read_manifest(data)
    if "store" not in manifest:
        sys.exit(f"{data}: no token store; rebuild it (python -m data_pipeline build ...)")
    families = [f for f, s in manifest["family_stats"].items() if s["tokens"]]
    new_ratios = {f: 1.0 for f in families}
    rows = []
    packed, mib = opened_mib(lambda: PackedDataset(data))
    rows.append({"source": "packed shards", "seq_len": manifest["seq_len"], "opened_mib": mib,
                 "tokens_per_s": tokens_per_second(packed, args.batch)})  # fmt: skip
    same, mib = opened_mib(lambda: MixedDataset(data, MixConfig()))
    rows.append({"source": "store, build's mix", "seq_len": manifest["seq_len"], "opened_mib": mib,
                 "tokens_per_s": tokens_per_second(same, args.batch)})  # fmt: skip
    for seq_len in args.seq_lens:
        mix = MixConfig(ratios=new_ratios, seq_len=seq_len)
        mixed, mib = opened_mib(lambda mix=mix: MixedDataset(data, mix))
        batch = max(1, args.batch * manifest["seq_len"] // seq_len)  # the same tokens per batch
        rows.append({"source": "store, new mix", "seq_len": seq_len, "opened_mib": mib,
                     "tokens_per_s": tokens_per_second(mixed, batch)})  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        bigger = corpus_times(data, 4, Path(tmp))
        _, mib = opened_mib(lambda: MixedDataset(bigger, MixConfig(ratios=new_ratios)))
        tokens = sum(e["tokens"] for e in read_manifest(bigger)["store"]["splits"]["train"])
        rows.append({"source": "store 4x corpus, new mix", "seq_len": manifest["seq_len"], "opened_mib": mib,
                     "tokens_per_s": None, "store_tokens": tokens})  # fmt: skip
        shutil.rmtree(bigger)
    print(f"{'source':26s} {'seq_len':>7s} {'M tokens/s':>10s} {'opened MiB':>10s}")
    for r in rows:
        speed = f"{r['tokens_per_s'] / 1e6:10.2f}" if r["tokens_per_s"] else f"{'-':>10s}"
        print(f"{r['source']:26s} {r['seq_len']:7d} {speed} {r['opened_mib']:10.1f}")
    record = {"data": str(data), "batch": args.batch, "peak_rss_bytes": peak_rss_bytes(), "rows": rows}
    if args.s3:
        record["s3"] = s3_rows(data, args.batch)
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
