"""The package's one layout rule: every import points down.

`LAYERS` is the order, low to high, written only here. A module may import from its own layer or a lower one, never
from a higher one, and the import graph has no cycle. Every module of the package must be in a layer. The model
core imports only config and itself; the objectives never the trainer; FP8 numerics (`fp8.formats`) are a leaf;
checkpoint I/O sits above the model; one CLI module on top. Read with `ast`: lazy imports inside functions count.
"""

from __future__ import annotations

import ast
import fnmatch
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "dsv3_ref"

# low to high; names relative to dsv3_ref ("__init__" is the package root, "train.*" matches train/__init__ too)
LAYERS: list[list[str]] = [
    ["config", "data", "fp8", "fp8.formats", "nn"],
    ["fp8.gemm"],
    ["nn.layers", "nn.rope"],
    ["nn.attention", "nn.moe"],
    ["nn.model"],
    ["objectives.*", "fp8.linear", "io.*", "systems.*"],
    ["train.*", "inference.*"],
    ["teaching.*"],
    ["cli", "__main__", "__init__"],
]
# subpackages whose __init__ may not import anything (importing fp8.formats must not load fp8.linear)
NO_REEXPORTS = ["fp8", "nn"]


def _modules() -> dict[str, Path]:
    """Module name relative to dsv3_ref ("nn.model", "train" for train/__init__.py, "__init__" for the root) -> file."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
        if parts[-1] == "__init__" and len(parts) > 1:
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _package_of(name: str) -> list[str]:
    """The package a module's relative imports start from, as parts below dsv3_ref."""
    path = MODULES[name]
    return [] if name == "__init__" else list(path.relative_to(PACKAGE).parent.parts)


def _resolve(base: list[str], dotted: str) -> str:
    """The most specific package module that `base.dotted` names (an imported function resolves to its module)."""
    parts = base + [p for p in dotted.split(".") if p]
    while parts and ".".join(parts) not in MODULES:
        parts.pop()
    return ".".join(parts) if parts else "__init__"


def imports_of(name: str) -> set[str]:
    """The package modules that module `name` imports (top level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(MODULES[name].read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "dsv3_ref" or alias.name.startswith("dsv3_ref."):
                    found.add(_resolve([], alias.name.removeprefix("dsv3_ref")))
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                if not (node.module == "dsv3_ref" or (node.module or "").startswith("dsv3_ref.")):
                    continue
                base, module = [], node.module.removeprefix("dsv3_ref")
            else:
                pkg = _package_of(name)
                base, module = pkg[: len(pkg) - (node.level - 1)], node.module or ""
            for alias in node.names:  # `from . import x` / `from .pkg import module` import modules
                found.add(_resolve(base, f"{module}.{alias.name}"))
    found.discard(name)
    return found


def layer_of(name: str) -> int:
    hits = [i for i, layer in enumerate(LAYERS) for pattern in layer
            if fnmatch.fnmatchcase(name, pattern) or (pattern.endswith(".*") and name == pattern[:-2])]
    if len(set(hits)) != 1:
        raise AssertionError(f"dsv3_ref.{name} must be in exactly one layer of LAYERS, found in {sorted(set(hits))}")
    return hits[0]


def upward_imports() -> list[str]:
    return [f"dsv3_ref.{a} (layer {layer_of(a)}) imports dsv3_ref.{b} (layer {layer_of(b)}, higher)"
            for a in MODULES for b in sorted(imports_of(a)) if layer_of(b) > layer_of(a)]


def import_cycles() -> list[list[str]]:
    """Every cycle found by a depth-first search of the import graph (each reported once, from its first module)."""
    graph = {a: sorted(imports_of(a)) for a in MODULES}
    cycles, state = [], {}  # state: 1 = on the current path, 2 = done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for start in graph:
        if start not in state:
            visit(start, [start])
    return cycles


def test_every_module_is_in_exactly_one_layer():
    for name in MODULES:
        layer_of(name)


def test_every_import_points_down():
    bad = upward_imports()
    assert not bad, "upward import(s):\n  " + "\n  ".join(bad)


def test_no_import_cycle():
    cycles = import_cycles()
    assert not cycles, "import cycle(s):\n  " + "\n  ".join(" -> ".join(f"dsv3_ref.{m}" for m in c) for c in cycles)


@pytest.mark.parametrize("name", NO_REEXPORTS)
def test_nn_and_fp8_do_not_reexport(name):
    assert not imports_of(name), f"dsv3_ref/{name}/__init__.py imports {sorted(imports_of(name))}: no re-exports"


def test_the_rule_sees_lazy_and_relative_imports():
    """The reader of imports itself: relative, absolute, `from . import module` and imports inside functions."""
    assert imports_of("train.trainer") >= {"config", "nn.model", "io.checkpoint", "io.atomic", "fp8.linear",
                                           "objectives.lm", "train.config"}
    assert imports_of("nn.model") == {"config", "nn.attention", "nn.layers", "nn.moe", "nn.rope"}
    assert imports_of("teaching.exercises") >= {"fp8.formats", "objectives.balance"}  # `from ..fp8 import formats`


@pytest.mark.parametrize("module, absent", [
    ("dsv3_ref.io.checkpoint", ["dsv3_ref.fp8.linear", "dsv3_ref.fp8.gemm", "dsv3_ref.train.trainer"]),
    ("dsv3_ref.objectives.mtp", ["dsv3_ref.train.trainer"]),
    ("dsv3_ref.objectives.balance", ["dsv3_ref.train.trainer"]),
    ("dsv3_ref.fp8.formats", ["dsv3_ref.fp8.linear"]),
])
def test_importing_a_module_does_not_load_higher_layers(module, absent):
    """In a fresh interpreter (the package root's facade is loaded too, as by any import of dsv3_ref)."""
    code = f"import sys, {module}; print(sorted(m for m in {absent!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", f"import {module} loaded {out.strip()}"
