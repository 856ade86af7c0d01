"""The package's layers (docs/architecture.md), read from the code's own imports: every module of
ssl_vit sits on one floor and imports only from floors below it, never from a neighbour on its
own floor, never from inside a function; so there is no import cycle. Importing a method does not
load Accelerate."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from conftest import ROOT

FLOORS: list[tuple[str, ...]] = [
    ("ssl_vit.__main__",),
    ("ssl_vit.cli",),
    ("ssl_vit.train",),
    ("ssl_vit.registry",),
    ("ssl_vit.eval", "ssl_vit.viz"),
    ("ssl_vit.methods",),
    ("ssl_vit.weights", "ssl_vit.data"),
    ("ssl_vit.config", "ssl_vit.backbone", "ssl_vit.ops", "ssl_vit.optim", "ssl_vit.flops"),
]
"""Top to bottom. A room (one name) may import its own modules and any room on a lower floor."""


def module_name(path: Path, base: Path) -> str:
    """The dotted name of the module at `path`, under the folder `base` holding ssl_vit/."""
    parts = path.relative_to(base).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def room_of(module: str) -> tuple[int, str]:
    """(floor index, room) of an ssl_vit module; the package's own __init__ is room-less (-1)."""
    for floor, rooms in enumerate(FLOORS):
        for room in rooms:
            if module == room or module.startswith(room + "."):
                return floor, room
    if module == "ssl_vit":
        return -1, "ssl_vit"
    raise AssertionError(f"{module}: on no floor of FLOORS; add it to docs/architecture.md too")


def imports(path: Path, base: Path) -> list[tuple[str, int, bool]]:
    """(imported ssl_vit module, line, inside a function or class) of every import in a file."""
    module = module_name(path, base)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []

    def visit(node: ast.AST, nested: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = nested or isinstance(
                child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef
            )
            names: list[str] = []
            if isinstance(child, ast.Import):
                names = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:  # relative: resolved against the importing package
                    up = package.split(".")[: len(package.split(".")) - child.level + 1]
                    base = ".".join([*up, base] if base else up)
                names = [base] + [f"{base}.{a.name}" for a in child.names]
            for name in names:
                if name == "ssl_vit" or name.startswith("ssl_vit."):
                    found.append((name, child.lineno, nested))
            visit(child, inner)

    visit(ast.parse(path.read_text()), False)
    return found


def known_module(name: str, modules: set[str]) -> str | None:
    """The module `name` refers to (`from ssl_vit.x import y` names ssl_vit.x.y, module or not)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def check_layers(package: Path) -> list[str]:
    """Every breach of the layering in the ssl_vit package folder `package`, one line each."""
    base, files = package.parent, sorted(package.rglob("*.py"))
    modules = {module_name(f, base) for f in files}
    problems, graph = [], {}
    for path in files:
        me = module_name(path, base)
        my_floor, my_room = room_of(me)
        graph[me] = set()
        seen = set()
        for name, line, nested in imports(path, base):
            target = known_module(name, modules)
            if target is None or target == me or (target, line) in seen:
                continue
            seen.add((target, line))
            graph[me].add(target)
            where = f"{path.relative_to(base)}:{line} imports {target}"
            floor, room = room_of(target)
            if nested:
                problems.append(f"{where} inside a function or class")
            if room == my_room:
                continue
            if floor < my_floor or (floor == my_floor and my_floor >= 0):
                side = "up" if floor < my_floor else "across"
                problems.append(f"{where}: an import {side} ({room} is not below {my_room})")
    return problems + [f"import cycle: {' -> '.join(c)}" for c in cycles(graph)]


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle through each module that lies on one (depth-first search)."""
    found, state = [], {}

    def walk(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                found.append(stack[stack.index(nxt) :] + [nxt])
            elif nxt not in state:
                walk(nxt, [*stack, nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            walk(node, [node])
    return found


def test_every_import_runs_down_the_floors():
    assert check_layers(ROOT / "ssl_vit") == []


def test_the_check_finds_upward_sideways_nested_imports_and_cycles(tmp_path):
    """A copy of the package with four breaches planted: each is reported."""
    pkg = tmp_path / "ssl_vit"
    subprocess.run(["cp", "-r", str(ROOT / "ssl_vit"), str(pkg)], check=True)
    plant = {
        "methods/mae.py": "from ssl_vit.train.loop import fit\n",  # up
        "viz/pos_embed.py": "from ssl_vit.eval.features import features\n",  # across
        "ops.py": "def late():\n    from ssl_vit import backbone\n",  # nested, across
        "train/state.py": "from ssl_vit.train import run\n",  # a cycle within train/
    }
    for file, line in plant.items():
        target = pkg / file
        target.write_text(target.read_text() + "\n" + line)
    problems = check_layers(pkg)
    assert any("methods/mae.py" in p and "import up (ssl_vit.train" in p for p in problems)
    assert any("viz/pos_embed.py" in p and "import across (ssl_vit.eval" in p for p in problems)
    assert any("ssl_vit/ops.py" in p and "inside a function" in p for p in problems)
    cycles = [p for p in problems if p.startswith("import cycle:")]  # mae's upward import too
    assert any("ssl_vit.train.state -> ssl_vit.train.run" in c for c in cycles)
    assert check_layers(ROOT / "ssl_vit") == []  # the package itself: none


def test_importing_a_method_loads_neither_the_loop_nor_accelerate():
    code = (
        "import sys, ssl_vit.methods.mae, ssl_vit.methods.dino, ssl_vit.methods.deit; "
        "print(sorted(m for m in sys.modules if m.startswith(('accelerate', 'ssl_vit.train'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
