"""`build`: sources -> families -> tokenizer -> dedup -> mixture -> packed sequences -> Arrow shards + manifest.

Streaming and resumable, in passes over `<output_dir>.building/`, each a set of units that an
engine (`data_pipeline.engine`: this machine's process pool, or a Ray cluster) runs:
1. tokenize (`build_tokenize`): every source file is one unit, tokenized into
   `tokenized/unit_XXXXX.arrow` (family, token ids, content hash, MinHash), renamed into place;
2. deduplicate (`build_select`): exact and near duplicates as hash and band shuffles (`dedup`);
3. plan (`build_plan`): one unit selects the kept documents, holds out validation documents per
   family, draws the mixture by family ratios and cuts the packed stream into shards (`plan/`),
   writing the validation shards (and best-fit train shards) itself;
4. pack (`build_pack`): every concat train shard is packed and written by its own unit, recorded in
   `progress.json` as it completes;
5. store (`build_store`): every unit's kept documents written to the token store (`store`), compact
   and unpacked, for mixing at training time.
This module orders the passes. An interrupted build redoes only unfinished units, on either engine.
The finished folder replaces `output_dir` in one rename. The driver holds file names, shard entries
and per-family and per-language totals; a worker holds one tokenization batch, one shard, or (the
plan unit) a few integers per document.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path

from tqdm import tqdm

from common import locks
from common.config import ConfigError
from common.files import atomic_write, atomic_write_text
from data_pipeline.build_config import BuildConfig, NearDedupConfig, TokenizerConfig, check_config, output_config
from data_pipeline.build_pack import write_train_shards
from data_pipeline.build_plan import plan_build
from data_pipeline.build_select import deduplicate
from data_pipeline.build_store import write_store
from data_pipeline.build_tokenize import Unit, tokenize_all, train_tokenizer
from data_pipeline.engine import make_engine
from data_pipeline.shards import finish_dataset, manifest_header
from data_pipeline.sources import file_identity, is_url, source_files
from data_pipeline.tokenizer import TOKENIZER_FILE, load_tokenizer, special_ids

__all__ = ["BuildConfig", "NearDedupConfig", "TokenizerConfig", "build"]  # the build's public API


def _build_key(config: BuildConfig, units: list[Unit]) -> str:
    """What decides the output: the config without the knobs that only change speed, and the
    source files as they are now (a file changed since an interrupted build restarts it)."""
    relevant = {k: v for k, v in output_config(config).items() if k != "output_dir"}
    relevant["files"] = [file_identity(u.path) for u in units]
    return hashlib.sha256(json.dumps(relevant, sort_keys=True, default=str).encode()).hexdigest()[:16]


def build(config: BuildConfig) -> dict:
    out = local_output(config)
    staging = out.with_name(out.name + ".building")
    if is_url(config.output_dir):
        refuse_to_replace(config.output_dir)
    files = ((s, p) for s in config.sources for p in source_files(s))
    units = [Unit(i, source, path) for i, (source, path) in enumerate(files)]
    if not units:
        raise ConfigError("sources: no files")
    check_config(config)
    lock_build(out)
    try:
        try:
            manifest = _build(config, units, out, staging)
        except (ConfigError, ValueError, OSError):
            # Bad input or a full disk: nothing half-built is kept (an interrupt keeps it to resume).
            shutil.rmtree(staging, ignore_errors=True)
            raise
        if is_url(config.output_dir):
            publish(out, config.output_dir)
            shutil.rmtree(out)
            build_lock_file(out).unlink()  # nothing of an uploaded build stays in staging_dir, its lock neither
    finally:
        locks.release(build_lock_file(out))
    return manifest


def build_lock_file(out: Path) -> Path:
    """Beside the output (not in it, nor in its staging folder: both are replaced by a build)."""
    return out.with_name(out.name + ".lock")


def lock_build(out: Path) -> None:
    """One build per output folder: a second one would remove the first one's staging folder."""
    refusal = (
        f"{out} is being built by another process ({{holder}}); two builds into one folder would remove each "
        "other's files. Wait for it, stop it, or choose another output_dir"
    )
    locks.acquire(build_lock_file(out), refusal)


def local_output(config: BuildConfig) -> Path:
    """Where the dataset is built: `output_dir` itself (made absolute: workers, Ray's on other nodes
    too, do not run in this process's folder), or for an object-store URL a folder under
    `staging_dir` (default: this machine's temp folder; give a shared one for Ray on several nodes)
    named after the URL, so an interrupted build resumes."""
    if not is_url(config.output_dir):
        return Path(config.output_dir).absolute()
    root = Path(config.staging_dir or Path(tempfile.gettempdir()) / "data_pipeline_builds").absolute()
    return root / hashlib.sha256(config.output_dir.encode()).hexdigest()[:16]


def refuse_to_replace(url: str) -> None:
    import fsspec

    fs, root = fsspec.core.url_to_fs(url)
    if fs.exists(f"{root}/manifest.json"):
        raise ConfigError(
            f"output_dir {url}: holds a dataset (manifest.json); an object store cannot replace one in a single "
            "step (no rename), so the build does not overwrite it: choose a new prefix, or delete that one first"
        )


def publish(local: Path, url: str) -> None:
    """Upload a finished dataset: every file, then `manifest.json` last, so a reader that finds the
    manifest finds every file it names (an object store has no rename; each object appears whole)."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(url)
    files = sorted(p for p in local.rglob("*") if p.is_file() and p.name != "manifest.json")
    for path in tqdm(files, desc=f"upload to {url}", unit="file"):
        fs.put_file(str(path), f"{root}/{path.relative_to(local).as_posix()}")
    fs.put_file(str(local / "manifest.json"), f"{root}/manifest.json")


def _build(config: BuildConfig, units: list[Unit], out: Path, staging: Path) -> dict:
    key = _build_key(config, units)
    progress_file = staging / "progress.json"
    progress = json.loads(progress_file.read_text()) if progress_file.is_file() else {}
    if progress.get("config_key") != key:  # a different (or no) build was interrupted: start over
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        progress = {"config_key": key}
        atomic_write_text(progress_file, json.dumps(progress))

    engine = make_engine(config.engine, config.workers, config.ray_address)
    try:
        tokenizer_file, sample_record = staging / TOKENIZER_FILE, staging / "tokenizer_sample.json"
        if not tokenizer_file.is_file():
            if config.tokenizer.path:
                tokenizer, sample = load_tokenizer(config.tokenizer.path), None
            else:
                tokenizer, sample = train_tokenizer(config, units, engine)
            report = {"languages": sample.report, "warnings": sample.warnings()} if sample else None
            atomic_write_text(sample_record, json.dumps(report))
            atomic_write(tokenizer_file, lambda tmp: tokenizer.save(str(tmp)))
        tokenizer = load_tokenizer(tokenizer_file)
        sample = json.loads(sample_record.read_text())
        return _run_passes(config, units, out, staging, engine, progress, tokenizer_file, tokenizer, sample)
    finally:
        engine.close()


def _run_passes(config, units, out, staging, engine, progress, tokenizer_file, tokenizer, sample):
    """Tokenize, deduplicate, plan, pack: each a set of units the engine (local or Ray) runs; the driver keeps
    file names, shard entries and per-family and per-language totals. `sample`: what the tokenizer
    was trained on (None for a given tokenizer)."""
    eos, pad = special_ids(tokenizer)
    unit_files = tokenize_all(config, units, staging, tokenizer_file, engine)
    deduplicate(config, unit_files, staging, engine)
    summary_file = staging / "plan" / "summary.json"
    if summary_file.is_file():
        summary = json.loads(summary_file.read_text())
    else:
        plan = (config, [str(f) for f in unit_files], str(staging), eos, pad)
        _, summary = next(engine.map_unordered(plan_build, [plan]))
    train_entries, train_padding = write_train_shards(config, summary, unit_files, staging, engine, progress, eos, pad)
    sources = [u.path for u in units]
    store = write_store(summary, unit_files, sources, staging, engine, progress, tokenizer.get_vocab_size())
    warnings = (sample["warnings"] if sample else []) + summary["warnings"]
    for warning in warnings:
        print(f"warning: {warning}")
    train_slots = sum(e["sequences"] for e in train_entries) * config.seq_len
    manifest = {
        **manifest_header(tokenizer, config.seq_len, summary["families"]),
        "family_stats": summary["family_stats"],
        "languages": summary["languages"],
        "tokenizer_sample": sample and sample["languages"],
        "warnings": warnings,
        "duplicates_removed": summary["duplicates"],
        "near_duplicates_removed": summary["near_duplicates"],
        "splits": {},  # packed shards: only with `shards: true`
        "store": store,
        "config": output_config(config),
    }
    if config.shards:
        manifest["splits"] = {"train": train_entries, "valid": summary["valid"]["entries"]}
        manifest["padding_tokens"] = {"train": train_padding, "valid": summary["valid"]["padding"]}
        manifest["packing"] = {
            "strategy": config.packing,
            "padding_fraction": round(train_padding / max(1, train_slots), 6),
            "truncated_docs": 0,  # best_fit splits long documents; concat cuts at sequence ends
            "split_docs": summary["split_docs"],  # best_fit: documents longer than a sequence, packed as pieces
        }
    for folder in ("tokenized", "dedup", "plan"):
        shutil.rmtree(staging / folder)
    (staging / "progress.json").unlink()
    finish_dataset(staging, out, manifest)
    return manifest
