"""The package's layering, checked on the source: no import cycles, and no layer imports a higher one.

Layers, lowest first (docs/architecture.md draws the same map):
    maths     slope.config, slope.masks, slope.autograd, slope.devices: pure functions and the config
    backends  slope.backends.*: the sparse products, behind one door (slope.backends)
    layer     slope.linear, slope.convert: SlopeLinear and model conversion, the public core API
    io        slope.io.*: checkpoints, exports, loading
    train     slope.train.*: the pretraining driver and its integrations
    cli       slope.cli.*, slope.__main__: the command line
The package root (`slope`, lazy re-exports) stands outside.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
LAYERS = ["maths", "backends", "layer", "io", "train", "cli"]
MATHS = {"slope.config", "slope.masks", "slope.autograd", "slope.devices"}
LAYER = {"slope.linear", "slope.convert", "slope.memory", "slope.srste"}


def layer_of(module: str) -> str | None:
    if module in MATHS:
        return "maths"
    if module in LAYER:
        return "layer"
    for prefix in ("backends", "io", "train", "cli"):
        if module == f"slope.{prefix}" or module.startswith(f"slope.{prefix}."):
            return prefix
    if module == "slope.__main__":
        return "cli"
    return None


def modules() -> dict[str, Path]:
    found = {}
    for path in (SRC / "slope").rglob("*.py"):
        name = ".".join(path.relative_to(SRC).with_suffix("").parts).removesuffix(".__init__")
        found[name] = path
    return found


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """Every slope module `name` imports anywhere in its file (function-level imports included)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            candidates = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for candidate in candidates:
            while candidate and candidate not in known:
                candidate = candidate.rpartition(".")[0]
            if candidate and candidate != name:
                targets.add(candidate)
                break
    return targets


GRAPH = {name: imports_of(name, path, set(modules())) for name, path in modules().items()}


def test_every_module_has_a_layer():
    unplaced = [m for m in GRAPH if layer_of(m) is None and m != "slope"]
    assert not unplaced, f"modules outside the layer map (add them to docs/architecture.md and here): {unplaced}"


@pytest.mark.parametrize("module", sorted(m for m in GRAPH if layer_of(m)))
def test_no_module_imports_a_higher_layer(module):
    rank = LAYERS.index(layer_of(module))
    upward = sorted(
        target for target in GRAPH[module]
        # the package root re-exports io: below the cli, importing it would hide an upward import
        if (target == "slope" and layer_of(module) != "cli")
        or (target != "slope" and LAYERS.index(layer_of(target) or "cli") > rank)
    )
    assert not upward, f"{module} ({layer_of(module)}) imports a higher layer or the package root: {upward}"


def test_no_import_cycles():
    state: dict[str, int] = {}
    cycles = []

    def visit(node, stack):
        state[node] = 1
        for nxt in sorted(GRAPH.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join([*stack[stack.index(nxt):], nxt]))
            elif nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = 2

    for node in sorted(GRAPH):
        if node not in state:
            visit(node, [node])
    assert not cycles


def _modules_after(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys; print('\\n'.join(sys.modules))"],
                         capture_output=True, text=True, check=True).stdout
    return set(out.split())


def test_cli_help_imports_no_torch():
    loaded = _modules_after("from slope.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass")
    assert "torch" not in loaded and "numpy" not in loaded and "transformers" not in loaded


def test_import_slope_loads_no_cuda_only_code():
    loaded = _modules_after(
        "import slope, slope.backends\nfrom slope.cli.commands import info\nslope.SlopeLinear, slope.load, slope.sparsify"
    )
    assert "slope.backends.cusparselt_plans" not in loaded
    assert not any(m.startswith("triton") for m in loaded)


# Small modules with one job each, readable top to bottom: a module that outgrows these limits holds
# more than one concept and is split along them (docs/architecture.md).
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 60


def test_no_module_or_function_outgrows_its_limit():
    too_long = []
    for name, path in sorted(modules().items()):
        source = path.read_text()
        if len(source.splitlines()) > MAX_MODULE_LINES:
            too_long.append(f"{name}: {len(source.splitlines())} lines")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    too_long.append(f"{name}.{node.name}: {lines} lines")
    assert not too_long, (f"over {MAX_MODULE_LINES} lines a module or {MAX_FUNCTION_LINES} a function: "
                          + "; ".join(too_long))
