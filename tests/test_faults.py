"""Faults: NaN/inf steps, failed checkpoint writes. Nothing lost, nothing half-written."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from tests.distributed import run_ranks
from tests.faulty_fs import faulty_filesystem, fill, small_filesystem
from tests.test_parallel import small_config
from training.checkpoint import LATEST, TRAINER_STATE, CheckpointError
from training.config import CheckpointConfig
from training.objectives import trainer_for
from training.trainer import NonFiniteLossError


def poison(trainer, at_step: int) -> None:
    """Make the gradients of step `at_step` (0-based) NaN, as a bad batch or an overflow would."""
    original = trainer.forward_backward

    def forward_backward(batch):
        original(batch)
        if trainer.step == at_step:
            next(trainer.model.parameters()).grad.view(-1)[0] = float("nan")

    trainer.forward_backward = forward_backward


def test_nonfinite_step_is_skipped_and_counted(small_dataset, tmp_path):
    trainer = trainer_for(dataclasses.replace(small_config(small_dataset, tmp_path), steps=4, nonfinite="skip"))
    poison(trainer, at_step=1)
    history = []
    for step in range(4):
        before = [p.detach().clone() for p in trainer.model.parameters()]
        history.append(trainer.train_step(trainer.loader.batch_at(step)))
        trainer.step += 1
        changed = any(not torch.equal(b, p) for b, p in zip(before, trainer.model.parameters(), strict=True))
        assert changed == (step != 1), f"step {step}: only the poisoned step leaves the weights alone"
    assert [h["skipped"] for h in history] == [0, 1, 0, 0]
    assert history[-1]["skipped_total"] == 1
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_nonfinite_step_stops_with_a_report(small_dataset, tmp_path):
    trainer = trainer_for(dataclasses.replace(small_config(small_dataset, tmp_path), steps=4, nonfinite="stop"))
    poison(trainer, at_step=2)
    with pytest.raises(NonFiniteLossError, match=r"at step 3 \(global batch rows \[\d+"):
        trainer.fit()


def folder_bytes(path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


@pytest.mark.parametrize("async_save", [pytest.param(False, marks=pytest.mark.slow), True], ids=["sync", "async"])
def test_a_full_disk_keeps_the_previous_checkpoint(async_save, small_dataset, tmp_path):
    """A real full filesystem (tmpfs with room for one checkpoint and a half) under checkpoints/:
    the second save fails with one message naming the step folder and the cause, the partial
    folder is removed, `latest` still names the first, and training resumes from it."""
    ranks = 2 if async_save else 1  # DCP's async save needs a process group
    layout = dict(dp=2) if async_save else {}
    save = CheckpointConfig(resume="auto", save_every=2, keep_last=1, async_save=async_save)
    probe = dataclasses.replace(small_config(small_dataset, tmp_path / "probe", **layout), steps=2, checkpoint=save)
    run_ranks(ranks, fit_or_error, probe)
    size = folder_bytes(probe.run_dir / "checkpoints" / "step_00000002")
    config = dataclasses.replace(probe, out_dir=str(tmp_path / "runs"), steps=4)
    ckpt_dir = config.run_dir / "checkpoints"
    with small_filesystem(ckpt_dir, int(1.5 * size)):
        errors = run_ranks(ranks, fit_or_error, config)  # saves step 2, then runs out of room at step 4
        assert (ckpt_dir / LATEST).read_text().strip() == "step_00000002"
        assert not (ckpt_dir / "step_00000004").exists(), "no half-written checkpoint left behind"
        for error in errors:
            assert error is not None and "step_00000004" in error and "No space left on device" in error, error
            assert "previous checkpoint (step_00000002)" in error and "Traceback" not in error
        assert run_ranks(ranks, resumed_step, config) == [2] * ranks


def fit_or_error(config) -> str | None:
    """Train; the CheckpointError's message if a save failed."""
    try:
        trainer_for(config).fit()
    except CheckpointError as err:
        return str(err)
    return None


def resumed_step(config) -> int:
    trainer = trainer_for(config)
    trainer.maybe_resume()
    return trainer.step


def test_an_io_error_keeps_the_previous_checkpoint(small_dataset, tmp_path):
    """A real EIO (a FUSE filesystem whose writes fail once a budget is spent) under checkpoints/:
    the same clean stop as a full disk, naming the step folder and the cause."""
    save = CheckpointConfig(resume="auto", save_every=2)
    probe = dataclasses.replace(small_config(small_dataset, tmp_path / "probe"), steps=2, checkpoint=save)
    trainer_for(probe).fit()
    size = folder_bytes(probe.run_dir / "checkpoints")
    config = dataclasses.replace(probe, out_dir=str(tmp_path / "runs"), steps=4)
    ckpt_dir = config.run_dir / "checkpoints"
    with faulty_filesystem(ckpt_dir, write_budget_bytes=int(1.5 * size)):
        error = fit_or_error(config)
        assert error is not None and "step_00000004" in error and "Input/output error" in error, error
        assert "previous checkpoint (step_00000002)" in error and "Traceback" not in error
        assert (ckpt_dir / LATEST).read_text().strip() == "step_00000002"
        assert not (ckpt_dir / "step_00000004").exists(), "no half-written checkpoint left behind"
        assert resumed_step(config) == 2


def test_a_full_disk_under_the_metrics_does_not_stop_training(small_dataset, tmp_path, capsys):
    """The whole run folder on a tmpfs that fills up mid-run: metrics.jsonl and TensorBoard say so
    once and training goes on (no half line is left); the final checkpoint is what stops the run,
    cleanly. Freed space, a relaunch trains again from the start (no checkpoint was written)."""
    config = dataclasses.replace(
        small_config(small_dataset, tmp_path / "runs"), steps=12, checkpoint=CheckpointConfig(resume="auto")
    )
    with small_filesystem(tmp_path / "runs", 4 << 20) as disk:
        config.run_dir.mkdir(parents=True)
        fill(disk, leave_bytes=5 * 4096)
        error = fit_or_error(config)
        out = capsys.readouterr().out
        assert error is not None and "step_00000012" in error and "No space left on device" in error, error
        assert "metrics.jsonl: cannot write (No space left on device); training goes on" in out, out[-3000:]
        rows = [json.loads(line) for line in (config.run_dir / "metrics.jsonl").read_text().splitlines()]
        steps = [row["step"] for row in rows]
        # Rows stop when the disk fills; one may land again once the failed save frees its partial
        # files. Every line is whole (parsed above) and in order, and some steps are missing.
        assert 0 < len(steps) < 12 and steps[0] == 1 and steps == sorted(set(steps)), steps
        assert "step    12 | loss" in out, "training reached its last step"
        (disk / "filler").unlink()
        assert fit_or_error(config) is None
        rows = [json.loads(line) for line in (config.run_dir / "metrics.jsonl").read_text().splitlines()]
        assert [row["step"] for row in rows][-12:] == list(range(1, 13))


def copy_dataset(src, dst):
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("damage", ["corrupt", "truncate", "delete"])
def test_damaged_shard_is_named(damage, small_dataset, tmp_path):
    from data_pipeline.loader import PackedDataset

    data = copy_dataset(small_dataset, tmp_path / "data")
    shard = data / "train" / "shard_00000.arrow"
    if damage == "corrupt":
        raw = bytearray(shard.read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        shard.write_bytes(bytes(raw))
    elif damage == "truncate":
        shard.write_bytes(shard.read_bytes()[:100])
    else:
        shard.unlink()
    expected = "is missing" if damage == "delete" else "is corrupt"
    with pytest.raises((ValueError, FileNotFoundError), match=rf"shard_00000\.arrow.*{expected}"):
        PackedDataset(data, "train")


def test_tokenizer_and_sequence_length_mismatches_are_refused(small_dataset, tmp_path):
    from data_pipeline.loader import PackedDataset
    from data_pipeline.tokenizer import load_tokenizer, tokenizer_hash

    with pytest.raises(ValueError, match="sequences of 32 tokens, but the model is configured for 64"):
        PackedDataset(small_dataset, "train", seq_len=64)
    with pytest.raises(ValueError, match="tokenized with tokenizer .* not deadbeef"):
        PackedDataset(small_dataset, "train", tokenizer_hash="deadbeef")
    data = copy_dataset(small_dataset, tmp_path / "data")
    tokenizer = load_tokenizer(data)
    tokenizer.add_tokens(["<|extra|>"])  # a different tokenizer file next to the shards
    tokenizer.save(str(data / "tokenizer.json"))
    with pytest.raises(ValueError, match=f"not {tokenizer_hash(tokenizer)}"):
        trainer_for(small_config(data, tmp_path / "run"))


def test_missing_checkpoint_is_refused(small_dataset, tmp_path):
    config = dataclasses.replace(
        small_config(small_dataset, tmp_path), checkpoint=CheckpointConfig(resume=str(tmp_path / "nope"))
    )
    with pytest.raises(FileNotFoundError, match=r"not an intact checkpoint: .*nope.*trainer_state.json is missing"):
        trainer_for(config).fit()


def two_checkpoints(small_dataset, tmp_path):
    config = dataclasses.replace(
        small_config(small_dataset, tmp_path),
        steps=4,
        checkpoint=CheckpointConfig(resume="auto", save_every=2, keep_last=2),
    )
    trainer_for(config).fit()
    return config, config.run_dir / "checkpoints"


def flip_bytes(path):
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 8] = bytes(b ^ 0xFF for b in data[middle : middle + 8])
    path.write_bytes(bytes(data))


DAMAGES = {  # what is damaged -> the file the skip names
    "flipped-bytes": "shard",  # same size, silently different weights without a checksum
    "truncated-shard": "shard",
    "flipped-metadata": ".metadata",  # DCP's index of the shards
    "bad-trainer-state": TRAINER_STATE,  # not JSON
    "trainer-state-step-changed": TRAINER_STATE,  # valid JSON, another step: only its checksum tells
    "broken-checksums-json": "checksums.json",
    "checksums-hex-digit-changed": "checksums.json",  # the checksum file, not the intact shard it lists
    "garbage-latest": None,
}


def damage_checkpoint(folder, damage: str):
    """Real bytes changed on disk, as a failing disk or a careless edit would."""
    shard = max(folder.glob("*.distcp"), key=lambda f: f.stat().st_size)
    checksums = folder / "checksums.json"
    if damage == "flipped-bytes":
        flip_bytes(shard)
    elif damage == "truncated-shard":
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    elif damage == "flipped-metadata":
        flip_bytes(folder / ".metadata")
    elif damage == "bad-trainer-state":
        (folder / TRAINER_STATE).write_text('{"step": 4, "data": {')
    elif damage == "trainer-state-step-changed":
        state = folder / TRAINER_STATE
        state.write_text(state.read_text().replace('"step": 4', '"step": 5', 1))
    elif damage == "broken-checksums-json":
        checksums.write_text(checksums.read_text().replace('":', '" ', 1))
    elif damage == "checksums-hex-digit-changed":
        text = checksums.read_text()
        digit = text.index(shard.name) + len(shard.name) + 4  # the first hex digit of the shard's sha256
        checksums.write_text(text[:digit] + ("0" if text[digit] != "0" else "1") + text[digit + 1 :])
    return shard


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_resume_falls_back_from_a_damaged_latest_checkpoint(damage, small_dataset, tmp_path, capsys):
    """Real damage on disk (no mock) to each kind of file: `resume: auto` verifies the newest
    checkpoint against its checksums (which verify themselves), says which file is wrong, and
    resumes from the newest intact one."""
    config, ckpt_dir = two_checkpoints(small_dataset, tmp_path)
    newest = ckpt_dir / "step_00000004"
    if damage == "garbage-latest":
        (ckpt_dir / LATEST).write_bytes(b"\x00\xff garbage")
    else:
        shard = damage_checkpoint(newest, damage)
    capsys.readouterr()
    resumed = trainer_for(config)
    resumed.maybe_resume()
    said = capsys.readouterr()
    if damage == "garbage-latest":
        assert resumed.step == 4, "a bad pointer does not hide an intact checkpoint"
        assert "not a checkpoint folder" in said.out + said.err
    else:
        assert resumed.step == 2
        named = shard.name if DAMAGES[damage] == "shard" else DAMAGES[damage]
        skip = next(line for line in (said.out + said.err).splitlines() if "skipping checkpoint step_00000004" in line)
        assert named in skip, skip
        if damage == "checksums-hex-digit-changed":
            assert shard.name not in skip, "an intact shard is not blamed"


def test_when_every_checkpoint_is_damaged_the_run_stops_naming_each(small_dataset, tmp_path):
    """`resume: auto` never starts over on top of damaged checkpoints: every one is named, the run
    stops (exit 2 from the command line), and the folders and `latest` are left as they were."""
    from training.checkpoint import NoIntactCheckpointError

    config, ckpt_dir = two_checkpoints(small_dataset, tmp_path)
    damage_checkpoint(ckpt_dir / "step_00000004", "flipped-bytes")
    damage_checkpoint(ckpt_dir / "step_00000002", "broken-checksums-json")
    before = {f: f.read_bytes() for f in ckpt_dir.rglob("*") if f.is_file()}
    with pytest.raises(NoIntactCheckpointError, match=r"no intact checkpoint .*step_00000004 .*step_00000002 "):
        trainer_for(config).fit()
    assert {f: f.read_bytes() for f in ckpt_dir.rglob("*") if f.is_file()} == before
    fresh = dataclasses.replace(config, checkpoint=CheckpointConfig(resume="none"), steps=1)
    assert trainer_for(fresh).fit()[-1]["step"] == 1, "starting over is there when asked for"


def test_resuming_on_data_from_another_tokenizer_is_refused(small_dataset, corpus_dir, tmp_path):
    from data_pipeline.build import BuildConfig, TokenizerConfig, build
    from data_pipeline.shards import read_manifest
    from data_pipeline.sources import SourceConfig
    from tests.conftest import SMALL_SEQ_LEN, SMALL_VOCAB

    config, _ = two_checkpoints(small_dataset, tmp_path)
    other = tmp_path / "other-tokenizer"
    build(
        BuildConfig(
            output_dir=str(other), sources=[SourceConfig(paths=[str(corpus_dir / "*.jsonl")])], seq_len=SMALL_SEQ_LEN,
            total_tokens=60_000, valid_docs_per_family=5, sequences_per_shard=500,
            tokenizer=TokenizerConfig(vocab_size=SMALL_VOCAB, sample_chars_per_language=5000),  # another BPE, same size
        )
    )  # fmt: skip
    assert read_manifest(other)["tokenizer_hash"] != read_manifest(small_dataset)["tokenizer_hash"]
    moved = dataclasses.replace(config, data=dataclasses.replace(config.data, path=str(other)))
    with pytest.raises(ValueError, match="tokenized with .* was tokenized with"):
        trainer_for(moved).maybe_resume()


def test_resuming_on_other_data_is_refused_and_a_rebuild_is_not(small_dataset, corpus_dir, tmp_path):
    """Same tokenizer, other sequences (a build of fewer tokens): refused naming both datasets. The
    same build written to another folder holds the same sequences, and resumes."""
    from data_pipeline.build import BuildConfig, TokenizerConfig, build
    from data_pipeline.mixed import MixConfig, MixedDataset
    from data_pipeline.sources import SourceConfig
    from tests.conftest import SMALL_SEQ_LEN

    config, _ = two_checkpoints(small_dataset, tmp_path)

    def build_with_the_same_tokenizer(folder: str, total_tokens: int):
        build(
            BuildConfig(
                output_dir=str(tmp_path / folder), sources=[SourceConfig(paths=[str(corpus_dir / "*.jsonl")])],
                seq_len=SMALL_SEQ_LEN, total_tokens=total_tokens, valid_docs_per_family=5, sequences_per_shard=500,
                tokenizer=TokenizerConfig(path=str(small_dataset / "tokenizer.json")),
            )
        )  # fmt: skip
        return dataclasses.replace(config, data=dataclasses.replace(config.data, path=str(tmp_path / folder)))

    other = build_with_the_same_tokenizer("fewer-tokens", 50_000)
    refusal = rf"trained on {small_dataset} \(training data \w+\); .*fewer-tokens holds other sequences"
    with pytest.raises(ValueError, match=refusal):
        trainer_for(other).maybe_resume()
    again = build_with_the_same_tokenizer("rebuilt", 60_000)
    assert (
        MixedDataset(tmp_path / "rebuilt", MixConfig()).fingerprint
        == MixedDataset(small_dataset, MixConfig()).fingerprint
    )
    resumed = trainer_for(again)
    resumed.maybe_resume()
    assert resumed.step == 4


def test_one_job_per_run_folder_and_no_stale_lock_after_a_kill(small_dataset, tmp_path):
    """Two real jobs on one run folder: the second is refused naming the first's host and pid (exit 4);
    after `kill -9` of the first, a new job starts (the kernel released its lock)."""
    import json
    import os
    import signal
    import sys
    import time

    from common.config import to_dict

    config = dataclasses.replace(small_config(small_dataset, tmp_path), steps=100_000, log_every=1000)
    path = tmp_path / "run.yaml"
    path.write_text(json.dumps(to_dict(config)))
    command = [sys.executable, "-m", "training.pretrain", str(path)]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    first = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    lock = config.run_dir / "run.lock"
    try:
        deadline = time.monotonic() + 120
        while not (lock.is_file() and str(first.pid) in lock.read_text()):
            assert time.monotonic() < deadline and first.poll() is None, "the first job never took the lock"
            time.sleep(0.2)
        second = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
        assert second.returncode == 4, second.stderr
        assert f'"pid": {first.pid}' in second.stderr and "in use by another job" in second.stderr
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    third = subprocess.run([*command, "steps=1"], env=env, capture_output=True, text=True, timeout=300)
    assert third.returncode == 0, third.stderr


def test_a_full_disk_in_a_data_build_is_one_line_and_keeps_the_previous_output(tmp_path, capsys):
    """A real full filesystem (a small tmpfs) under the build's output: exit 3, one line naming the
    folder and the free space, no traceback; the previous dataset and nothing half-built remain."""
    from data_pipeline.__main__ import main as data_cli

    docs = tmp_path / "docs.jsonl"
    docs.write_text(
        "".join(json.dumps({"text": f"words of document {i} " * 40, "lang": "en"}) + "\n" for i in range(400))
    )
    config = tmp_path / "build.yaml"
    with small_filesystem(tmp_path / "disk", 256 << 10) as disk:
        out = disk / "out"
        out.mkdir()
        (out / "previous.txt").write_text("the previous dataset")
        config.write_text(json.dumps({"output_dir": str(out), "sources": [{"paths": [str(docs)]}], "seq_len": 64,
                                      "total_tokens": 200_000, "tokenizer": {"vocab_size": 2000}}))  # fmt: skip
        assert data_cli(["build", str(config)]) == 3
        stderr = capsys.readouterr().err
        errors = [line[line.index("error:") :] for line in stderr.replace("\r", "\n").splitlines() if "error:" in line]
        assert len(errors) == 1 and "Traceback" not in stderr, stderr  # progress bars aside, one line
        assert errors[0].startswith(f"error: the disk is full: No space left on device while building {out} (")
        assert "bytes free on its filesystem" in errors[0]
        assert (out / "previous.txt").is_file() and not (disk / "out.building").exists()


def test_a_full_cache_keeps_the_data_index_in_memory(small_dataset, tmp_path):
    """`data.cache_dir` on a real full disk (tmpfs): the index is kept in memory, said once, nothing
    half-written is left, and the rows are the same."""
    import numpy as np

    from data_pipeline.mixed import MixConfig, MixedDataset

    mix = MixConfig(ratios={"germanic": 1, "code": 1}, total_tokens=20_000)
    with small_filesystem(tmp_path / "cache", 256 << 10) as disk:
        fill(disk, leave_bytes=8 * 4096)
        mixed = MixedDataset(small_dataset, mix, cache_dir=disk)
        assert any(w.startswith(f"could not cache the data index in {disk}/index") for w in mixed.warnings)
        assert not [p for p in disk.rglob("*") if ".tmp-" in p.name], "no half-written index is left"
    plain = MixedDataset(small_dataset, mix)
    rows = np.arange(len(plain))
    assert bool((mixed.get(rows).tokens == plain.get(rows).tokens).all())
