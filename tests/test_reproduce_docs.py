"""The figures of docs/ come from commands: every registered figure has its block in its doc, the
smallest one is remade here and must equal what the doc shows, and a failing command leaves the doc
as it was."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("reproduce_docs", ROOT / "benchmarks" / "reproduce_docs.py")
reproduce_docs = sys.modules["reproduce_docs"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(reproduce_docs)


def test_every_registered_figure_has_its_block_and_provenance():
    for figure_id, figure in reproduce_docs.load_registry().items():
        text = (ROOT / figure.doc).read_text()
        match = reproduce_docs.block_pattern(figure_id).search(text)
        assert match, f"{figure.doc} has no block for {figure_id}"
        if match.group(2).strip():  # made at least once: it says by what, at which commit, on which data
            line = next(x for x in match.group(2).splitlines() if x.startswith(reproduce_docs.PROVENANCE))
            assert f"python benchmarks/reproduce_docs.py {figure_id}" in line and re.search(r"commit [0-9a-f]{7}", line)
            assert all(d in line for d in figure.data) and "seeds" in line
        for place in figure.images.values():
            assert (ROOT / place).is_file(), place


def test_the_smallest_figure_is_remade_equal_to_the_doc(tmp_path, capsys):
    figures = reproduce_docs.load_registry()
    smallest = min((f for f in figures.values() if not f.gpu), key=lambda f: f.minutes)
    figure_id = next(i for i, f in figures.items() if f is smallest)
    committed = (ROOT / smallest.doc).read_bytes()
    assert reproduce_docs.main([figure_id, "--docs-dir", str(tmp_path), "--check"]) == 0, capsys.readouterr().out
    assert (ROOT / smallest.doc).read_bytes() == committed, "--docs-dir must leave docs/ alone"
    remade = (tmp_path / Path(smallest.doc).name).read_text()
    block = reproduce_docs.block_pattern(figure_id).search(remade).group(2)
    assert f"`python benchmarks/reproduce_docs.py {figure_id}`" in block
    assert all(re.search(rf"data {re.escape(d)} \(manifest sha256 [0-9a-f]{{12}}\)", block) for d in smallest.data)


def test_a_failing_command_leaves_the_doc_as_it_was(tmp_path, capsys):
    doc = tmp_path / "doc.md"
    doc.write_text("before\n<!-- figure: broken -->\nold table\n<!-- /figure: broken -->\nafter\n")
    registry = tmp_path / "figures.yaml"
    registry.write_text(
        f"figures:\n  broken:\n    doc: {doc}\n    commands: ['echo made > {tmp_path}/t.md', 'false']\n"
        f"    tables: [{tmp_path}/t.md]\n  missing:\n    doc: {doc}\n    commands: ['true']\n"
    )
    assert reproduce_docs.main(["broken", "--registry", str(registry)]) == 2
    assert "figure broken: command failed: false" in capsys.readouterr().err
    assert doc.read_text().count("old table") == 1
    assert reproduce_docs.main(["missing", "--registry", str(registry)]) == 2
    assert "no block <!-- figure: missing -->" in capsys.readouterr().err
    assert reproduce_docs.main(["nothing", "--registry", str(registry)]) == 2
    assert "unknown figure(s) ['nothing']" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        reproduce_docs.main(["--registry", str(registry)])
