"""Imports under repro/ run one way, and no module imports itself back through others.

Rooms, lowest first: config <- net <- data <- run <- tools, bench <- cli (repro/__init__.py
says what each holds). A module may import its own room and lower rooms; tools and bench
never import each other. Every import statement counts, the ones inside functions too: a
deferred import is still a dependency, and deferring one was how the old circles hid.
The checker runs on the real tree and, to prove it can fail, on small planted trees.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

RANKS = {"config": 0, "net": 1, "data": 2, "run": 3, "tools": 4, "bench": 4, "cli": 5}
"""Room -> height; a module may import rooms of lower height and its own room only."""

REPRO = Path(__file__).resolve().parents[1] / "repro"


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def room(module: str) -> str:
    """'repro.net.model' -> 'net'; 'repro.config' -> 'config'; the package itself -> 'config'."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "config"


def imports_of(path: Path, root: Path, modules: set[str]) -> list[tuple[int, str]]:
    """(line, imported module) for every import of a module of the package in `path`."""
    package = root.name
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # `from repro.data import loaders` names a module; `from repro.net.model import X` not.
            targets = [
                f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                for a in node.names
            ]
        else:
            continue
        for target in targets:
            if target == package or target.startswith(package + "."):
                while target not in modules and "." in target:
                    target = target.rsplit(".", 1)[0]
                found.append((node.lineno, target))
    return found


def check_layering(root: Path) -> list[str]:
    """Every violation under the package folder `root`, one readable line each."""
    files = {module_name(p, root): p for p in sorted(root.rglob("*.py"))}
    modules = set(files)
    graph: dict[str, set[str]] = {m: set() for m in modules}
    problems = []
    for module, path in files.items():
        if room(module) not in RANKS:
            problems.append(f"{path}: room {room(module)!r} is not one of {sorted(RANKS)}")
            continue
        for line, target in imports_of(path, root, modules):
            if target == module:
                continue
            graph[module].add(target)
            mine, theirs = room(module), room(target)
            if mine == theirs or theirs not in RANKS:
                continue
            if RANKS[theirs] >= RANKS[mine]:
                problems.append(
                    f"{path}:{line}: {module} ({mine}) imports {target} ({theirs}), "
                    f"a room that is not below it"
                )
    problems += [f"import circle: {' -> '.join(c)}" for c in circles(graph)]
    return problems


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected group of modules (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(_cycle_through(sorted(group), graph))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _cycle_through(group: list[str], graph: dict[str, set[str]]) -> list[str]:
    """A concrete path start -> ... -> start inside one strongly connected group."""
    start, members = group[0], set(group)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & members):
                if w == start:
                    return paths[v] + [start]
                if w not in paths:
                    paths[w] = paths[v] + [w]
                    nxt.append(w)
        frontier = nxt
    return group


def plant(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "repro"
    for name, text in {"__init__.py": "", **files}.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_repro_imports_run_one_way_without_circles() -> None:
    problems = check_layering(REPRO)
    assert problems == [], "\n".join(problems)


def test_every_room_is_a_package_with_a_docstring() -> None:
    for name in RANKS:
        if name in ("config", "cli"):
            assert (REPRO / f"{name}.py").is_file()
            continue
        init = REPRO / name / "__init__.py"
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc and "May import" in doc, f"{init} needs a docstring saying what it may import"


def test_a_lower_room_importing_a_higher_one_is_named(tmp_path: Path) -> None:
    root = plant(
        tmp_path,
        {
            "config.py": "",
            "net/__init__.py": "",
            "net/model.py": "def f():\n    from repro.run.train import main\n",
            "run/__init__.py": "",
            "run/train.py": "from repro.net.model import f\n",
        },
    )
    problems = check_layering(root)
    assert any(
        "net/model.py:2: repro.net.model (net) imports repro.run.train (run)" in p for p in problems
    ), problems
    assert "import circle: repro.net.model -> repro.run.train -> repro.net.model" in problems


def test_tools_and_bench_do_not_import_each_other(tmp_path: Path) -> None:
    root = plant(
        tmp_path,
        {
            "tools/__init__.py": "",
            "tools/predict.py": "",
            "bench/__init__.py": "",
            "bench/train.py": "from repro.tools import predict\n",
        },
    )
    problems = check_layering(root)
    assert len(problems) == 1 and "(bench) imports repro.tools.predict (tools)" in problems[0]


def test_a_circle_inside_one_room_is_found(tmp_path: Path) -> None:
    root = plant(
        tmp_path,
        {
            "data/__init__.py": "",
            "data/loaders.py": "import repro.data.stats\n",
            "data/stats.py": "def g():\n    from repro.data import loaders\n",
        },
    )
    assert check_layering(root) == [
        "import circle: repro.data.loaders -> repro.data.stats -> repro.data.loaders"
    ]


@pytest.mark.parametrize("text", ["import os\n", "from repro.config import Config\n"])
def test_allowed_imports_pass(tmp_path: Path, text: str) -> None:
    root = plant(tmp_path, {"config.py": "", "net/__init__.py": "", "net/model.py": text})
    assert check_layering(root) == []
