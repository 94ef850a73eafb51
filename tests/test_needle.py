"""A small all-S2 model retrieves a needle from anywhere in its context; the same model with only
the local window cannot (slow: a few minutes on 2 cores)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

spec = importlib.util.spec_from_file_location("needle_s2", Path(__file__).parents[1] / "benchmarks" / "needle_s2.py")
needle = importlib.util.module_from_spec(spec)
spec.loader.exec_module(needle)


@pytest.mark.slow
def test_s2_model_finds_the_needle_at_every_depth():
    s2 = needle.train_and_evaluate(steps=600, seq_len=256, backend="sdpa", pattern="s2")
    for depth, accuracy in s2["accuracy_by_depth"].items():
        assert accuracy >= 0.9, f"needle at depth {depth}: accuracy {accuracy:.3f}"
    local = needle.train_and_evaluate(steps=600, seq_len=256, backend="sdpa", pattern="local-only")
    dense = needle.train_and_evaluate(steps=600, seq_len=256, backend="sdpa", pattern="dense")
    assert min(dense["accuracy_by_depth"].values()) >= 0.9, "the all-dense control retrieves at every depth"
    assert local["accuracy_by_depth"][0.5] < 0.3, "without the strided shards a mid-context needle is out of reach"
