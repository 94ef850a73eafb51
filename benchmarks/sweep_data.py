"""What a language-mix sweep spends on data, before and after mixing moved into the loader.

    python benchmarks/sweep_data.py [--sweep SWEEP.yaml] [--data-config DATA.yaml]

(defaults: configs/sweeps/multilingual_tiny.yaml and configs/data/default.yaml)

Before (the sweep's old `build_mixes`): one full build of the data config per mix, tokenizer
included. After: each mix is a `data.mix` setting, so a run opens the base dataset's token store
with it (`MixedDataset`, its index made in that process, as the first rank of a run does). The
training runs themselves are the same either way. Prints a table, writes
benchmarks/results/sweep_data.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common.config import from_dict, load_config, to_dict  # noqa: E402
from data_pipeline.build import BuildConfig, build  # noqa: E402
from data_pipeline.mixed import MixConfig, MixedDataset  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sweep", default="configs/sweeps/multilingual_tiny.yaml")
    parser.add_argument("--data-config", default="configs/data/default.yaml")
    args = parser.parse_args()
    mixes = yaml.safe_load(Path(args.sweep).read_text())["mixes"]
    base = load_config(BuildConfig, args.data_config)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        build(load_config(BuildConfig, args.data_config, [f"output_dir={tmp}/base"]))
        base_seconds = time.perf_counter() - start
        for name, changes in mixes.items():
            start = time.perf_counter()
            config = {**to_dict(base), **changes}
            config["output_dir"] = f"{tmp}/{name}"
            build(from_dict(BuildConfig, config))
            rebuilt = time.perf_counter() - start
            start = time.perf_counter()
            MixedDataset(f"{tmp}/base", MixConfig(**changes), cache_dir=f"{tmp}/cache")
            mixed = time.perf_counter() - start
            rows.append({"mix": name, "rebuild_s": rebuilt, "load_time_mix_s": mixed})
    print(f"base dataset build (both ways): {base_seconds:.2f} s")
    print(f"{'mix':10s} {'rebuild s':>9s} {'mix at load s':>13s}")
    for r in rows:
        print(f"{r['mix']:10s} {r['rebuild_s']:9.2f} {r['load_time_mix_s']:13.3f}")
    before, after = sum(r["rebuild_s"] for r in rows), sum(r["load_time_mix_s"] for r in rows)
    print(f"{'all':10s} {before:9.2f} {after:13.3f}")
    out = ROOT / "benchmarks" / "results" / "sweep_data.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps({"base_build_s": base_seconds, "rows": rows, "before_s": before, "after_s": after}, indent=1)
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
