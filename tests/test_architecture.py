"""The import contract: layers import only downward, no module takes part in a cycle, and no module
outside tests is over the size a reader holds in mind. Every import counts, the ones written inside
functions too (an import moved into a function to dodge a cycle is still a cycle).

The layers and what each may import are docs/architecture.md's diagram; change both together.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("common", "kernels", "data_pipeline", "training")
MAX_LINES = 400

# layer -> (the module prefixes it holds, the layers it may import besides its own).
# A module belongs to the layer of its longest matching prefix.
LAYERS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "common": (("common",), ()),
    "kernels": (("kernels",), ("common",)),
    "data": (("data_pipeline",), ("common",)),
    "models": (("training.models",), ("common", "kernels")),
    "checkpoint": (("training.checkpoint",), ("common", "models")),
    "construction": (("training.model_setup",), ("common", "models", "checkpoint")),
    "parallel": (("training.parallel",), ("common", "kernels", "data", "models", "construction")),
    "posttrain": (
        ("training.posttrain",),
        ("common", "data", "models", "checkpoint", "construction"),
    ),
    "loop": (
        ("training",),  # the trainer and its parts: config, components, optimizer, metrics, precision
        ("common", "kernels", "data", "models", "checkpoint", "construction", "parallel"),
    ),
    "objectives": (("training.objectives",), ("common", "data", "models", "posttrain", "loop")),
    "scaling_laws": (("training.scaling_laws",), ("common", "data", "models", "loop", "objectives")),
    "entry points": (
        ("training.pretrain", "training.export", "training.posttrain.__main__", "training.scaling_laws.__main__"),
        (
            "common",
            "data",
            "models",
            "checkpoint",
            "construction",
            "parallel",
            "posttrain",
            "loop",
            "objectives",
            "scaling_laws",
        ),
    ),  # fmt: skip
}


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer_of(module: str) -> str | None:
    best, best_len = None, -1
    for layer, (prefixes, _) in LAYERS.items():
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = layer, len(prefix)
    return best


def imports_of(path: Path, module: str, known: set[str]) -> dict[str, int]:
    """The project modules `path` imports (at any depth of the code), each with its first line.
    `from pkg import name` counts as importing `pkg.name` when that is a module."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: dict[str, int] = {}

    def add(name: str, line: int) -> None:
        if name.split(".")[0] in PACKAGES and name != module:
            found.setdefault(name, line)

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:
                full = f"{base}.{alias.name}"
                add(full if full in known else base, node.lineno)
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == "import_module":
            if node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
                add(node.args[0].value, node.lineno)
    return found


def project_modules(root: Path = ROOT) -> dict[str, Path]:
    return {module_name(p, root): p for pkg in PACKAGES for p in sorted((root / pkg).rglob("*.py"))}


def import_graph(root: Path = ROOT) -> dict[str, dict[str, int]]:
    modules = project_modules(root)
    known = set(modules)
    return {name: imports_of(path, name, known) for name, path in modules.items()}


def layer_violations(graph: dict[str, dict[str, int]], root: Path = ROOT) -> list[str]:
    problems = []
    for module, targets in sorted(graph.items()):
        layer = layer_of(module)
        if layer is None:
            problems.append(f"{module}: in no layer (add it to LAYERS and docs/architecture.md)")
            continue
        allowed = {layer, *LAYERS[layer][1]}
        for target, line in sorted(targets.items()):
            if layer_of(target) not in allowed:
                problems.append(f"{module} (layer {layer}) imports {target} (layer {layer_of(target)}) at line {line}")
    return problems


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Every strongly connected group of two or more modules (Tarjan), each as a sorted list."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, {}):
            target = _resolve(target, graph)
            if target is None:
                continue
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def _resolve(name: str, graph: dict) -> str | None:
    """The module an imported name lives in (an imported function's name is its module's)."""
    while name and name not in graph:
        name = name.rpartition(".")[0]
    return name or None


def test_layers_import_only_downward():
    problems = layer_violations(import_graph())
    assert not problems, "upward imports:\n" + "\n".join(problems)


def test_no_import_cycle():
    found = cycles(import_graph())
    assert not found, "import cycles:\n" + "\n".join(" <-> ".join(group) for group in found)


def test_no_module_over_the_size_limit():
    long = {
        str(path.relative_to(ROOT)): n
        for path in project_modules().values()
        if (n := len(path.read_text().splitlines())) > MAX_LINES
    }
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_contract_catches_a_cycle_hidden_in_a_function(tmp_path):
    """The checks themselves: a circle closed by an import inside a function, and an upward import."""
    (tmp_path / "training" / "models").mkdir(parents=True)
    (tmp_path / "training" / "__init__.py").write_text("")
    (tmp_path / "training" / "models" / "__init__.py").write_text("")
    (tmp_path / "training" / "models" / "phi.py").write_text(
        "def reset():\n    from training.model_setup import build\n"
    )
    (tmp_path / "training" / "model_setup.py").write_text("from training.models.phi import reset\n")
    for pkg in ("common", "kernels", "data_pipeline"):
        (tmp_path / pkg).mkdir()
    graph = import_graph(tmp_path)
    assert cycles(graph) == [["training.model_setup", "training.models.phi"]]
    assert layer_violations(graph, tmp_path) == [
        "training.models.phi (layer models) imports training.model_setup (layer construction) at line 2"
    ]


@pytest.mark.parametrize("module", ["kernels", "common"])
def test_low_layers_import_nothing_above(module):
    """kernels/ and common/ stand alone: nothing from data_pipeline/ or training/."""
    graph = import_graph()
    above = {
        f"{m} -> {t}"
        for m, targets in graph.items()
        if layer_of(m) == module
        for t in targets
        if t.split(".")[0] in ("data_pipeline", "training")
    }
    assert not above, f"{module} imports from above: {sorted(above)}"
