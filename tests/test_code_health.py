"""The package's shape, checked: layers, import cycles, function length, one env reader.

These are the rules the README's code map promises; a change that breaks one fails here
with the module and line to look at.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "narr_assets"
MAX_FUNCTION_LINES = 80
# The fault-injecting test server is one long request handler by design (every fault in one
# place); it is a test double, not pipeline code.
LENGTH_EXEMPT = {"narr_assets/testing/server.py"}
# Modules allowed to import Dagster: its layer, the entry point that merges it, and the CLI
# that launches runs through it.
DAGSTER_LAYER = ("narr_assets.defs", "narr_assets.definitions", "narr_assets.cli")


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _imports(path: Path) -> list[tuple[str, int]]:
    """Every module imported anywhere in the file (function-level imports included)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.module, node.lineno))
            found += [(f"{node.module}.{alias.name}", node.lineno) for alias in node.names]
    return found


def _internal_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {name: set() for name in MODULES}
    for name, path in MODULES.items():
        for target, _ in _imports(path):
            if target in MODULES and target != name and not name.startswith(target + "."):
                graph[name].add(target)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

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
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles_in_the_package():
    assert _cycles(_internal_graph()) == []


def test_library_modules_never_import_the_dagster_layer():
    offenders = [
        f"{MODULES[name].relative_to(ROOT)}:{line} imports {target}"
        for name in MODULES
        if not name.startswith(DAGSTER_LAYER)
        for target, line in _imports(MODULES[name])
        if target.split(".")[0] == "dagster"
        or target.startswith("narr_assets.defs")
        or target == "narr_assets.definitions"
    ]
    assert offenders == []


def test_definitions_come_from_the_defs_package():
    wiring = [name for name in MODULES if name.startswith("narr_assets.defs.")]
    assert {w.rsplit(".", 1)[1] for w in wiring} >= {"ingest", "experiment", "comparison", "resources", "metadata"}


def _functions(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node


def test_no_function_longer_than_80_lines():
    long = [
        f"{path.relative_to(ROOT)}:{fn.lineno} {fn.name} ({fn.end_lineno - fn.lineno + 1} lines)"
        for path in MODULES.values()
        if str(path.relative_to(ROOT)) not in LENGTH_EXEMPT
        for fn in _functions(path)
        if fn.end_lineno is not None and fn.end_lineno - fn.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert long == []


ENV_READ = re.compile(r"""(environ(\.get)?\s*[\[(]|getenv\()\s*["']NARR_""")


def test_settings_is_the_one_reader_of_narr_variables():
    readers = [
        str(path.relative_to(ROOT))
        for path in MODULES.values()
        if ENV_READ.search(path.read_text()) and path.name != "settings.py"
    ]
    assert readers == []
    assert ENV_READ.search((PACKAGE / "settings.py").read_text())  # the pattern does match a read


@pytest.mark.parametrize("folder", ["narr_assets", "tests", "benchmarks", "scripts", "configs", "docs"])
def test_repository_stands_alone(folder):
    """No file points at documents outside the repository."""
    outside = re.compile(r"\.\./shared|\b(DOMAIN|DESIGN|STYLE)\.md\b")
    hits = [
        str(path.relative_to(ROOT))
        for path in (ROOT / folder).rglob("*")
        if path.is_file() and path.suffix in {".py", ".md", ".yaml", ".toml", ".txt"} and path != Path(__file__)
        if outside.search(path.read_text(errors="replace"))
    ]
    assert hits == []


def test_repository_root_documents_stand_alone():
    outside = re.compile(r"\.\./shared|\b(DOMAIN|DESIGN|STYLE)\.md\b")
    for name in ("README.md", "BENCHMARKS.md", "pyproject.toml", ".ci/run"):
        assert not outside.search((ROOT / name).read_text()), name


def test_readme_code_map_names_every_module():
    readme = (ROOT / "README.md").read_text()
    code_map = readme[readme.index("## Code map") : readme.index("## Data contract")]
    missing = []
    for path in MODULES.values():
        rel = path.relative_to(ROOT)
        if rel.name == "__init__.py" and rel.parent != PACKAGE.relative_to(ROOT):
            continue
        named = f"`{rel}`" in code_map or f"`{rel.parent}/`" in code_map or f"{rel.name}`" in code_map
        if not named and rel.name != "__init__.py":
            missing.append(str(rel))
    assert missing == []
