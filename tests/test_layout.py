"""The package layout's floors, read from the source: imports only go down, and no cycles.

Floors (design.md §3): the core library (`gmod_jax`) imports nothing from `train/`, `convert/`
or an app; `train/` and `convert/` build on the core and not on each other; each app (`demo`,
with the `demo.ablation` entry point, and `bench`) may use everything below it but not another
app. Every import counts, also those inside functions.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGES = ("gmod_jax", "train", "convert", "demo", "bench")
APPS = {"demo": ("demo",), "bench": ("bench",)}


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, pathlib.Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}


def _imports(path: pathlib.Path, modules: dict[str, pathlib.Path]) -> set[str]:
    """Project modules `path` imports: `from a.b import c` is `a.b.c` when that is a module."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                     for a in node.names]
        else:
            continue
        found.update(n for n in names if n.split(".")[0] in PACKAGES)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(path, modules) for name, path in modules.items()}


def _floor(module: str) -> str:
    for app, prefixes in APPS.items():
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return f"app:{app}"
    top = module.split(".")[0]
    return "core" if top == "gmod_jax" else top


ALLOWED = {
    "core": {"core"},
    "train": {"core", "train"},
    "convert": {"core", "convert"},
}


def _violations(graph: dict[str, set[str]]) -> list[str]:
    bad = []
    for module, targets in graph.items():
        floor = _floor(module)
        for target in targets:
            target_floor = _floor(target)
            if floor.startswith("app:"):
                ok = not target_floor.startswith("app:") or target_floor == floor
            else:
                ok = target_floor in ALLOWED[floor]
            if not ok:
                bad.append(f"{module} ({floor}) imports {target} ({target_floor})")
    return sorted(bad)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v), on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_imports_only_go_down_the_floors():
    assert _violations(_graph()) == []


def test_no_import_cycles():
    assert _cycles(_graph()) == []


def test_the_rules_catch_a_forbidden_import_and_a_cycle():
    graph = {"gmod_jax.api": {"convert.readers"}, "convert.readers": set(),
             "bench.runner": {"demo.pipeline"}, "demo.pipeline": {"train.loop"},
             "train.loop": {"convert.keymap"}, "convert.keymap": set(),
             "gmod_jax.a": {"gmod_jax.b"}, "gmod_jax.b": {"gmod_jax.a"}}
    assert _violations(graph) == [
        "bench.runner (app:bench) imports demo.pipeline (app:demo)",
        "gmod_jax.api (core) imports convert.readers (convert)",
        "train.loop (train) imports convert.keymap (convert)",
    ]
    assert _cycles(graph) == [["gmod_jax.a", "gmod_jax.b"]]


@pytest.mark.parametrize("module", ["tests.support.reference", "tests.support.eval_files"])
def test_test_only_oracles_are_not_shipped(module):
    assert module not in _modules()
