"""The package's layering, read from the code itself (docs/ARCHITECTURE.md explains it).

A module may import from its own layer and the layers below it, never from a layer above; nothing imports
another package's private names; the module import graph (imports inside functions included: those are
how cycles hide) has no cycle; modules and functions stay short enough to read. Each exception is listed
here with its reason, so that a new one is a decision, not an accident.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "nemoconv"

# Bottom to top. A module belongs to the longest prefix listed.
LAYERS = [
    ("foundation", ["nemoconv.errors", "nemoconv.limits", "nemoconv.untrusted", "nemoconv.version",
                    "nemoconv.settings", "nemoconv.progress"]),
    ("storage", ["nemoconv.storage"]),
    ("data", ["nemoconv.data"]),
    ("schemes", ["nemoconv.schemes"]),
    ("checkpoint", ["nemoconv.checkpoint"]),
    ("stream", ["nemoconv.stream"]),
    ("model", ["nemoconv.model"]),
    ("serving", ["nemoconv.serving"]),
    ("verification", ["nemoconv.verification"]),
    ("quant", ["nemoconv.quant"]),
    ("commands", ["nemoconv.commands"]),
    ("cli", ["nemoconv.cli"]),
    ("facade", ["nemoconv", "nemoconv.__main__"]),
]

# (importer, imported) pairs that break a rule, each with the reason it is accepted. Keep this short.
ACCEPTED_UPWARD: dict[tuple[str, str], str] = {}
ACCEPTED_PRIVATE: dict[tuple[str, str], str] = {}

MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60
# module or module:function -> why it may be longer
ACCEPTED_LONG: dict[str, str] = {
    "nemoconv.cli.verify:verify": "a typer command: its signature is its option list (one parameter per flag, each "
                                  "with its help text); the body is a dozen lines",
}


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


MODULES = _modules()


def _layer(module: str) -> int:
    best, best_len = None, -1
    for rank, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = rank, len(prefix)
    assert best is not None, f"{module} is in no layer: add it to LAYERS in {__file__}"
    return best


def _imports(module: str) -> list[tuple[str, str]]:
    """(imported module, imported name or '') for every nemoconv import in `module`, functions included."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "nemoconv":
                continue
            for alias in node.names:
                submodule = f"{target}.{alias.name}"
                found.append((submodule, "") if submodule in MODULES else (target, alias.name))
        elif isinstance(node, ast.Import):
            found += [(a.name, "") for a in node.names if a.name.split(".")[0] == "nemoconv"]
    return found


def test_every_import_goes_down_or_sideways():
    upward = []
    for module in MODULES:
        for target, _ in _imports(module):
            if _layer(target) > _layer(module) and (module, target) not in ACCEPTED_UPWARD:
                upward.append(f"{module} -> {target}")
    assert not upward, "imports from a higher layer:\n" + "\n".join(sorted(set(upward)))


def _package_of(module: str) -> str:
    return module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]


def test_no_private_name_crosses_a_package():
    crossing = []
    for module in MODULES:
        for target, name in _imports(module):
            if name.startswith("_") and not name.startswith("__") and _package_of(module) != _package_of(target):
                if (module, f"{target}.{name}") not in ACCEPTED_PRIVATE:
                    crossing.append(f"{module} imports {target}.{name}")
    assert not crossing, "private names used across packages:\n" + "\n".join(sorted(set(crossing)))


def test_the_module_import_graph_has_no_cycle():
    graph = {m: {t for t, _ in _imports(m) if t in MODULES and t != m} for m in MODULES}
    # A package's __init__ re-exporting its own modules is not a cycle of meaning: ignore edges to parents.
    for m, targets in graph.items():
        graph[m] = {t for t in targets if not m.startswith(t + ".")}
    state, stack, cycles = {}, [], []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_modules_and_functions_are_short_enough_to_read():
    long = []
    for module, path in MODULES.items():
        text = path.read_text()
        lines = len(text.splitlines())
        if lines > MAX_MODULE_LINES and module not in ACCEPTED_LONG:
            long.append(f"{module}: {lines} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                key = f"{module}:{node.name}"
                if length > MAX_FUNCTION_LINES and key not in ACCEPTED_LONG:
                    long.append(f"{key}: {length} lines")
    assert not long, "too long to read:\n" + "\n".join(sorted(long))


def test_every_accepted_exception_is_still_needed():
    """An exception that no longer applies is deleted, so the lists say only what is true."""
    upward = {(m, t) for m in MODULES for t, _ in _imports(m) if _layer(t) > _layer(m)}
    private = {(m, f"{t}.{n}") for m in MODULES for t, n in _imports(m) if n.startswith("_")}
    assert set(ACCEPTED_UPWARD) <= upward, set(ACCEPTED_UPWARD) - upward
    assert set(ACCEPTED_PRIVATE) <= private, set(ACCEPTED_PRIVATE) - private
    for key in ACCEPTED_LONG:
        module = key.split(":")[0]
        assert module in MODULES, key
