"""Layering (docs/architecture.md, invariant 1): the library never imports Flower nor the Flower apps.

Module-level imports only: ``mlip_fed/deploy/fab_guard.py`` starts Flower's ``flwr-clientapp`` from inside a
function, in the ClientApp process that a site's SuperExec starts, after checking the FAB.
"""

from __future__ import annotations

import ast
from pathlib import Path

LIBRARY = Path(__file__).resolve().parents[1] / "mlip_fed"


def _module_level_imports(path: Path) -> set[str]:
    """Top-level package names imported outside any function body (class bodies and ``if`` blocks included)."""
    names: set[str] = set()
    todo: list[ast.AST] = list(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)).body)
    while todo:
        node = todo.pop()
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            continue
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
        todo.extend(ast.iter_child_nodes(node))
    return names


def _offenders(packages: set[str]) -> list[str]:
    return sorted(
        f"{path.relative_to(LIBRARY.parent)} imports {sorted(packages & found)}"
        for path in LIBRARY.rglob("*.py")
        if packages & (found := _module_level_imports(path))
    )


def test_library_never_imports_flwr_at_module_level() -> None:
    assert _offenders({"flwr"}) == []


def test_library_never_imports_the_apps() -> None:
    assert _offenders({"server", "client", "bench", "mlip_wire"}) == []
