"""Regenerate the figures of docs/: every table and plot registered in docs/figures.yaml is made again
by its commands and spliced into its doc between `<!-- figure: ID -->` and `<!-- /figure: ID -->`,
under a line that names the command, the commit, each dataset's manifest hash, the seeds and the
machine. A figure whose commands fail leaves its doc as it was.

    python benchmarks/reproduce_docs.py --list                 # figures, their docs and cost
    python benchmarks/reproduce_docs.py ID [ID ...]            # some
    python benchmarks/reproduce_docs.py --all [--gpu]          # every CPU figure (`make reproduce-docs`)
    python benchmarks/reproduce_docs.py ID --docs-dir DIR --check   # splice into copies in DIR; exit 1
                                                                    # if a table differs from docs/'s
Commands run in the repository root with this Python first on PATH; sweeps skip finished runs, so an
interrupted regeneration continues where it stopped.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import os
import platform
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common.cli import print_error  # noqa: E402
from common.config import ConfigError, load_config  # noqa: E402
from common.files import atomic_write, atomic_write_text  # noqa: E402

REGISTRY = ROOT / "docs" / "figures.yaml"
PROVENANCE = "<sub>Figure `"  # the first characters of the line that names how a figure was made


@dataclass
class Figure:
    doc: str  # the doc that shows it, relative to the repository root
    commands: list[str]  # shell commands, run in order in the repository root
    tables: list[str] = field(default_factory=list)  # Markdown files the commands write, spliced in order
    images: dict[str, str] = field(default_factory=dict)  # image the commands write -> its place under docs/
    data: list[str] = field(default_factory=list)  # datasets read: their manifest hashes are recorded
    seeds: list[int] = field(default_factory=list)
    minutes: float = 1.0  # on the project's 2-core CPU machine
    gpu: bool = False


@dataclass
class Registry:
    figures: dict[str, Figure] = field(default_factory=dict)


def load_registry(path: Path = REGISTRY) -> dict[str, Figure]:
    return load_config(Registry, str(path)).figures


def commit() -> str:
    """HEAD's short hash, with `+changes` when tracked files outside docs/ differ from it."""
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    if head.returncode != 0:
        return "unknown (not a git checkout)"
    changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":!docs"],
                             cwd=ROOT, capture_output=True, text=True).stdout.strip()  # fmt: skip
    return head.stdout.strip() + ("+changes" if changed else "")


def manifest_hash(data_dir: str) -> str:
    path = ROOT / data_dir / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the figure's commands did not build this dataset")
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]


def provenance(figure_id: str, figure: Figure) -> str:
    data = "; ".join(f"data {d} (manifest sha256 {manifest_hash(d)})" for d in figure.data) or "no dataset"
    seeds = ", ".join(map(str, figure.seeds)) or "none"
    machine = f"{platform.machine()} CPU, {os.cpu_count()} cores" if not figure.gpu else "GPU (see the table)"
    return (f"{PROVENANCE}{figure_id}`: `python benchmarks/reproduce_docs.py {figure_id}` (its commands: "
            f"docs/figures.yaml); commit {commit()}; {data}; seeds {seeds}; {machine}; "
            f"{datetime.date.today().isoformat()}.</sub>")  # fmt: skip


def block_pattern(figure_id: str) -> re.Pattern:
    return re.compile(rf"(<!-- figure: {re.escape(figure_id)} -->\n)(.*?)(<!-- /figure: {re.escape(figure_id)} -->)",
                      re.DOTALL)  # fmt: skip


def table_part(block: str) -> str:
    """A block without its provenance line: what must come out the same when a figure is remade."""
    return "\n".join(line for line in block.splitlines() if not line.startswith(PROVENANCE)).strip()


def splice(doc_text: str, figure_id: str, body: str, doc: str) -> tuple[str, str]:
    """The doc with the figure's block replaced by `body`, and the block it had."""
    match = block_pattern(figure_id).search(doc_text)
    if not match:
        raise ValueError(f"{doc}: no block <!-- figure: {figure_id} --> ... <!-- /figure: {figure_id} -->")
    new = doc_text[: match.start(2)] + body.rstrip("\n") + "\n" + doc_text[match.end(2) :]
    return new, match.group(2)


def run_figure(figure_id: str, figure: Figure, docs_dir: Path | None) -> bool:
    """Make the figure and splice it in; True when its tables equal what the doc had."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    for command in figure.commands:
        print(f"[{figure_id}] $ {command}", flush=True)
        if subprocess.run(["bash", "-c", command], cwd=ROOT, env=env).returncode != 0:
            raise RuntimeError(f"figure {figure_id}: command failed: {command} (its doc is unchanged)")
    tables = []
    for table in figure.tables:
        path = ROOT / table
        if not path.is_file():
            raise FileNotFoundError(f"figure {figure_id}: its commands did not write {table}")
        tables.append(path.read_text().strip())
    body = "\n\n".join([*tables, provenance(figure_id, figure)])
    target = (docs_dir / Path(figure.doc).name) if docs_dir else ROOT / figure.doc
    if docs_dir and not target.exists():
        target.write_text((ROOT / figure.doc).read_text())
    new, old = splice(target.read_text(), figure_id, body, figure.doc)
    for made, place in figure.images.items():
        image = (docs_dir / Path(place).name) if docs_dir else ROOT / place
        data = (ROOT / made).read_bytes()
        atomic_write(image, lambda tmp, data=data: tmp.write_bytes(data))
    atomic_write_text(target, new)
    same = table_part(old) == table_part(body)
    print(f"[{figure_id}] {'unchanged' if same else 'changed'}: {target}")
    return same


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ids", nargs="*", help="figures to make (see --list)")
    parser.add_argument("--all", action="store_true", help="every figure this machine can make")
    parser.add_argument("--gpu", action="store_true", help="with --all: the GPU figures too")
    parser.add_argument("--list", action="store_true")
    parser.add_argument("--docs-dir", type=Path, help="splice into copies of the docs in this folder")
    parser.add_argument("--check", action="store_true", help="exit 1 when a remade table differs from the doc's")
    parser.add_argument("--registry", type=Path, default=REGISTRY, help="the figures' registry (YAML)")
    args = parser.parse_args(argv)
    try:
        figures = load_registry(args.registry)
        if args.list:
            for fid, f in sorted(figures.items(), key=lambda kv: kv[1].minutes):
                print(f"{fid:28s} {f.doc:24s} ~{f.minutes:g} min{' (GPU)' if f.gpu else ''}")
            return 0
        unknown = [i for i in args.ids if i not in figures]
        if unknown:
            raise ValueError(f"unknown figure(s) {unknown}; {args.registry} has {sorted(figures)}")
        chosen = args.ids or ([i for i, f in figures.items() if args.gpu or not f.gpu] if args.all else [])
        if not chosen:
            parser.error("name figures, or --all")
        if args.docs_dir:
            args.docs_dir.mkdir(parents=True, exist_ok=True)
        same = [run_figure(i, figures[i], args.docs_dir) for i in chosen]
    except (ConfigError, ValueError, FileNotFoundError, RuntimeError) as err:
        print_error(str(err))
        return 2
    return 1 if args.check and not all(same) else 0


if __name__ == "__main__":
    sys.exit(main())
