"""A small model with S2 layers retrieves a needle from anywhere in its context (slow: ~1 min)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

spec = importlib.util.spec_from_file_location("needle_s2", Path(__file__).parents[1] / "benchmarks" / "needle_s2.py")
needle = importlib.util.module_from_spec(spec)
spec.loader.exec_module(needle)


@pytest.mark.slow
def test_s2_model_finds_the_needle_at_every_depth():
    result = needle.train_and_evaluate(steps=600, seq_len=256, backend="sdpa", pattern="s2")
    for depth, accuracy in result["accuracy_by_depth"].items():
        assert accuracy >= 0.9, f"needle at depth {depth}: accuracy {accuracy:.3f}"
