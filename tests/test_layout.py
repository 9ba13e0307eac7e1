"""The shape docs/design.md promises, read from the source (imports inside functions included):

- the subpackages form layers: base (the top-level modules) < data < model < eval < train < cli,
  and no module imports one of a layer above its own; at most 6 modules at the top level;
- no import cycle between modules (simcse_dist/ and bench/);
- `import deepspeed` in engine.py only;
- no module imports another's private name (`from x import _y`);
- a public name is defined in one module only (one meaning per name; `main` is each console
  script's entry point);
- docs/design.md's module map names every module.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from helpers import REPO

PACKAGE = REPO / "simcse_dist"
LAYERS = ("base", "data", "model", "eval", "train", "cli")


def module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules(root: Path) -> dict[str, Path]:
    return {module_name(p, root): p for p in root.rglob("*.py")}


def imported(path: Path, package: str, names: set[str]) -> set[str]:
    """Modules of `package` that the file at `path` imports, anywhere in it."""
    here = module_name(path, REPO / package)
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets: list[str] = []
        if isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = (
                    here.split(".")[: -node.level]
                    if path.name != "__init__.py"
                    else here.split(".")[: len(here.split(".")) - node.level + 1]
                )
                mod = ".".join([*base, node.module] if node.module else base)
            else:
                mod = node.module or ""
            targets = [mod, *(f"{mod}.{a.name}" for a in node.names)]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        for t in targets:
            while t and t not in names:
                t = t.rpartition(".")[0]
            if t and t != package:
                found.add(t)
    return found - {here}


def graph(package: str) -> dict[str, set[str]]:
    mods = modules(REPO / package)
    return {name: imported(path, package, set(mods)) for name, path in mods.items()}


def layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in LAYERS) else "base"


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    out, state = [], {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(g.get(node, ())):
            if state.get(nxt) == "open":
                out.append(path[path.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for node in sorted(g):
        if node not in state:
            visit(node, [node])
    return out


def layering_violations(g: dict[str, set[str]]) -> list[str]:
    rank = {name: i for i, name in enumerate(LAYERS)}
    return sorted(
        f"{a} ({layer(a)}) imports {b} ({layer(b)})"
        for a, deps in g.items()
        for b in deps
        if rank[layer(b)] > rank[layer(a)]
    )


def test_the_checks_catch_what_they_look_for():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c", "a"]]
    g = {"simcse_dist.data.pipeline": {"simcse_dist.train.step"}, "simcse_dist.train.step": {"simcse_dist.config"}}
    assert layering_violations(g) == ["simcse_dist.data.pipeline (data) imports simcse_dist.train.step (train)"]
    assert layer("simcse_dist.config") == "base" and layer("simcse_dist.eval") == "eval"


def test_subpackages_are_layered_and_acyclic():
    g = graph("simcse_dist")
    assert {layer(m) for m in g} == set(LAYERS)
    assert layering_violations(g) == []
    assert cycles(g) == []
    assert cycles(graph("bench")) == []
    top = sorted(m for m in g if layer(m) == "base" and m != "simcse_dist")
    assert len(top) <= 6, top


def test_deepspeed_is_imported_by_engine_only():
    users = set()
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            mods = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            if any(m.split(".")[0] == "deepspeed" for m in mods):
                users.add(str(path.relative_to(PACKAGE)))
    assert users == {"engine.py"}


def private_imports(root: Path) -> list[str]:
    out = []
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.ImportFrom)
                and node.module != "__future__"
                and (node.module or "").startswith(root.name)
            ):
                out += [
                    f"{path.relative_to(root)}: {node.module}.{a.name}" for a in node.names if a.name.startswith("_")
                ]
    return out


def test_no_module_imports_another_modules_private_names(tmp_path):
    assert private_imports(PACKAGE) == []
    (tmp_path / "pkg").mkdir()  # the check itself finds one
    (tmp_path / "pkg" / "a.py").write_text("from pkg.b import _hidden\n")
    assert private_imports(tmp_path / "pkg") == ["a.py: pkg.b._hidden"]


def public_definitions(root: Path) -> dict[str, list[str]]:
    defined: dict[str, list[str]] = {}
    for path in root.rglob("*.py"):
        for node in ast.parse(path.read_text()).body:
            if (
                isinstance(node, ast.FunctionDef | ast.ClassDef)
                and not node.name.startswith("_")
                and node.name != "main"
            ):
                defined.setdefault(node.name, []).append(str(path.relative_to(root)))
    return {name: where for name, where in defined.items() if len(where) > 1}


def test_a_public_name_has_one_home():
    assert public_definitions(PACKAGE) == {}


def test_design_doc_maps_every_module():
    design = (REPO / "docs" / "design.md").read_text()
    missing = [
        m
        for m, p in modules(PACKAGE).items()
        if p.name not in ("__init__.py", "__main__.py") and f"{p.relative_to(PACKAGE).as_posix()}" not in design
    ]
    assert missing == []


@pytest.mark.parametrize("doc", ["README.md", "docs/design.md"])
def test_docs_name_only_modules_that_exist(doc):
    """Every `simcse_dist/...py` or `tests/...py` path a document names is a file of the tree."""
    import re

    text = (REPO / doc).read_text()
    named = set(re.findall(r"\b((?:simcse_dist|tests|bench)/[\w/]+\.py)\b", text))
    assert sorted(p for p in named if not (REPO / p).is_file()) == []


def test_test_files_have_unique_names():
    """pytest imports test files by basename (no packages under tests/): two of one name stop
    the whole collection."""
    names = [p.name for p in (REPO / "tests").rglob("test_*.py")]
    assert sorted(n for n in set(names) if names.count(n) > 1) == []
