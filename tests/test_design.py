"""The structure docs/design.md promises: no import cycle in simcse_dist/ or bench/ (imports
inside functions included), `import deepspeed` only in engine.py, files small enough to read."""

from __future__ import annotations

import ast
from pathlib import Path

from helpers import REPO


def imports(package: str) -> dict[str, set[str]]:
    """module -> modules of the same package it imports, anywhere in the file."""
    root = REPO / package
    names = {p.stem for p in root.glob("*.py")}
    graph: dict[str, set[str]] = {}
    for path in root.glob("*.py"):
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level == 1:  # from .x import y / from . import x
                    found |= {node.module.split(".")[0]} if node.module else {a.name for a in node.names}
                elif node.module and node.module.split(".")[0] == package:
                    parts = node.module.split(".")
                    found |= {parts[1]} if len(parts) > 1 else {a.name for a in node.names}
                elif node.level == 0 and node.module:  # a sibling imported by bare name (sys.path edits)
                    found.add(node.module.split(".")[0])
            elif isinstance(node, ast.Import):
                found |= {a.name.split(".")[1] for a in node.names if a.name.startswith(f"{package}.")}
                found |= {a.name.split(".")[0] for a in node.names}
        graph[path.stem] = (found & names) - {path.stem}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    out, state = [], {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                out.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return out


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c", "a"]]


def test_no_import_cycles():
    for package in ("simcse_dist", "bench"):
        graph = imports(package)
        assert graph, package
        assert cycles(graph) == [], package


def test_deepspeed_is_imported_by_engine_only():
    users = set()
    for path in (REPO / "simcse_dist").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            mods = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                    [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(m.split(".")[0] == "deepspeed" for m in mods):
                users.add(path.name)
    assert users == {"engine.py"}


def test_files_stay_readable():
    sizes = {p.name: len(p.read_text().splitlines()) for p in Path(REPO / "simcse_dist").glob("*.py")}
    assert sizes["trainer.py"] <= 250
    assert max(sizes.values()) <= 450, sizes


def test_readme_layout_lists_every_module():
    readme = (REPO / "README.md").read_text()
    layout = readme[readme.index("## Layout"):]
    layout = layout[:layout.index("\n## ", 5)] if "\n## " in layout[5:] else layout
    listed = {line.split()[0] for line in layout.splitlines() if line.startswith("  ") and line.split()[0].endswith(".py")}
    modules = {p.name for p in (REPO / "simcse_dist").glob("*.py")} - {"__init__.py"}
    assert modules == listed, (modules - listed, listed - modules)
