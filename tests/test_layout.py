"""The package's modules form layers: none imports, at any depth, a module that imports it back.

Imports made inside functions count: they defer the cost of an import, not the dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "jaxae"

# Lowest first. A module may import only modules listed before it (the package itself,
# ``jaxae/__init__.py``, re-exports the public API and sits above all of them).
LAYERS = [
    "_version",
    "errors",
    "data",
    "models",
    "objectives",
    "torch_reference",
    "config",
    "train",
    "parallel",
    "stream",
    "checkpoint",
    "rundir",
    "plots",
    "probe",
    "generation",
    "epochs",
    "convert",
    "loop",
    "sweep",
    "bench",
    "cli",
    "__main__",
]


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts) or "__init__"


def imports_of(path: Path) -> set[str]:
    """The jaxae modules ``path`` imports anywhere in its body (``"__init__"`` for the package)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "jaxae":
                    found.add("__init__")
                elif alias.name.startswith("jaxae."):
                    found.add(alias.name.split(".")[1])
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "jaxae":
                for alias in node.names:
                    sub = PACKAGE / f"{alias.name}.py"
                    found.add(alias.name if sub.exists() or (PACKAGE / alias.name).is_dir() else "__init__")
            elif node.module.startswith("jaxae."):
                found.add(node.module.split(".")[1])
    return found


def import_graph() -> dict[str, set[str]]:
    graph = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = _module_name(path).split(".")[0]
        graph.setdefault(name, set()).update(imports_of(path) - {name})
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of module names, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycle():
    assert find_cycle(import_graph()) is None, " -> ".join(find_cycle(import_graph()))


def test_modules_import_only_layers_below_them():
    graph = import_graph()
    assert set(graph) - {"__init__"} == set(LAYERS), "a module was added or removed: place it in LAYERS"
    rank = {name: i for i, name in enumerate(LAYERS)}
    upward = [(m, dep) for m in LAYERS for dep in graph[m] if dep == "__init__" or rank[dep] > rank[m]]
    assert not upward, f"imports that point up a layer: {upward}"


def test_cycle_finder_finds_a_cycle_through_a_function_level_import(tmp_path):
    # The check above can fail: a cycle hidden in a function body is found.
    (tmp_path / "a.py").write_text("from jaxae import b\n")
    (tmp_path / "b.py").write_text("def f():\n    from jaxae.a import g\n")
    graph = {"a": imports_of(tmp_path / "a.py"), "b": imports_of(tmp_path / "b.py")}
    assert graph == {"a": {"__init__"}, "b": {"a"}}  # b is no file of the real package
    graph["a"] = {"b"}
    assert find_cycle(graph) == ["a", "b", "a"]


@pytest.mark.parametrize("name", ["fit", "FitResult", "TrainConfig", "Trainer", "encode"])
def test_public_api_unchanged_by_the_split(name):
    import jaxae

    assert hasattr(jaxae, name)


# What only the one epoch loop (jaxae/epochs.py) does: the run's outputs, signals, records, progress, figures.
_LOOP_ONLY = ("open_run_outputs", "StopOnSignal", "summarize_epoch", "tqdm", "write_run_figures", "metrics_file")


@pytest.mark.parametrize("module", ["loop", "sweep"])
def test_fit_and_fit_sweep_leave_the_epochs_to_the_one_loop(module):
    text = (PACKAGE / f"{module}.py").read_text()
    found = [name for name in _LOOP_ONLY if name in text]
    assert not found, f"jaxae/{module}.py does what jaxae/epochs.py is for: {found}"
    assert "EpochLoop(" in text
    assert all(name in (PACKAGE / "epochs.py").read_text() for name in _LOOP_ONLY)


def test_a_strategy_and_a_sweeps_placement_are_runners_of_the_loop():
    from jaxae.epochs import Runner
    from jaxae.parallel import PmapStrategy, ShardStrategy, Strategy
    from jaxae.sweep import Placement

    wanted = [n for n in vars(Runner) if not n.startswith("_")]
    assert {"compile_epoch", "compile_evaluate", "host_values", "checkpoint_states"} <= set(wanted)
    for cls in (Strategy, PmapStrategy, ShardStrategy, Placement):
        missing = [n for n in wanted if not hasattr(cls, n)]
        assert not missing, f"{cls.__name__} lacks {missing}"
