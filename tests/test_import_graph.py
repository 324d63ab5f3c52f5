"""Imports point down the layers and never form a cycle (docs/architecture.md, "Layers", invariant 1).

The graph is built from source with ``ast``, not by importing anything: one node per module of ``mlip_fed``,
``mlip_wire``, ``server`` and ``client``, one edge per import statement that names another of those modules,
wherever the statement sits (module level, inside a function, under ``if TYPE_CHECKING``). ``from a.b import c``
counts as importing ``a.b`` and, when ``a.b.c`` is a module, ``a.b.c``. Importing ``a.b.c`` is not counted as
importing the package ``a.b`` (its ``__init__``): the packages' ``__init__`` files here hold docstrings or load
their names lazily. Imports hidden in strings (``importlib.import_module``, ``python -m``) are not seen.

``LAYERS`` is the table of docs/architecture.md, bottom first; a module belongs to the layer of its longest
matching prefix. A module may import its own layer and the layers below it, never one above; the Flower apps
never import each other. A module that no prefix matches fails the test, so a new package gets a row here and in
the doc.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("mlip_fed", "mlip_wire", "server", "client")

#: Bottom first: (layer, module prefixes). Mirrored in docs/architecture.md, "Layers and their one rule".
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("foundation", ("mlip_fed", "mlip_fed.io", "mlip_fed.hf_cache", "mlip_fed.process_tree")),
    ("knowledge", ("mlip_fed.knowledge",)),
    ("data", ("mlip_fed.data",)),
    (
        "schema",
        (
            "mlip_fed.config",
            "mlip_fed.config_compose",
            "mlip_fed.checkpoint_config",
            "mlip_fed.model.config",
            "mlip_fed.eval.config",
        ),
    ),
    ("model", ("mlip_fed.model",)),
    ("train", ("mlip_fed.train",)),
    ("eval", ("mlip_fed.eval",)),
    ("pipeline", ("mlip_fed.pipeline",)),
    ("privacy", ("mlip_fed.privacy",)),
    ("runs", ("mlip_fed.train.run", "mlip_fed.eval.run")),
    ("federation", ("mlip_fed.federation",)),
    ("entry points", ("mlip_fed.deploy", "mlip_fed.cli")),
    ("wire", ("mlip_wire",)),
    ("apps", ("server", "client")),
)
#: Top-level packages that share a layer but must not import each other.
APART: tuple[tuple[str, str], ...] = (("server", "client"), ("client", "server"))


def module_files(root: Path, packages: Iterable[str]) -> dict[str, Path]:
    """Dotted module name -> source file, for every ``.py`` under the given packages."""
    found: dict[str, Path] = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def imported_names(module: str, path: Path) -> set[str]:
    """Every dotted name an import statement of ``path`` may load, relative imports resolved."""
    names: set[str] = set()
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                source = ".".join([*base, *([node.module] if node.module else [])])
            else:
                source = node.module or ""
            names.add(source)
            names.update(f"{source}.{alias.name}" for alias in node.names)
    return names


def import_graph(files: Mapping[str, Path]) -> dict[str, set[str]]:
    """Module -> the other modules of ``files`` it imports."""
    return {m: {n for n in imported_names(m, p) if n in files and n != m} for m, p in files.items()}


def layer_of(module: str, layers: tuple[tuple[str, tuple[str, ...]], ...] = LAYERS) -> int | None:
    """Index of the layer whose longest prefix matches ``module``; None when none does."""
    best: tuple[int, int] | None = None  # (prefix length, layer index)
    for index, (_, prefixes) in enumerate(layers):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and (best is None or len(prefix) > best[0]):
                best = (len(prefix), index)
    return None if best is None else best[1]


def cycles(graph: Mapping[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module, or a module importing itself (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
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
            if len(component) > 1 or v in graph.get(v, ()):
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def upward_imports(
    graph: Mapping[str, set[str]],
    layers: tuple[tuple[str, tuple[str, ...]], ...] = LAYERS,
    apart: tuple[tuple[str, str], ...] = APART,
) -> list[str]:
    """``a (layer) imports b (higher layer)`` for every edge that points up, or between packages kept apart."""
    bad = []
    for source, targets in sorted(graph.items()):
        for target in sorted(targets):
            s, t = layer_of(source, layers), layer_of(target, layers)
            if s is None or t is None:
                continue  # reported by unlayered()
            if t > s:
                bad.append(f"{source} ({layers[s][0]}) imports {target} ({layers[t][0]})")
            elif (source.split(".")[0], target.split(".")[0]) in apart:
                bad.append(f"{source} imports {target}: the two apps share only mlip_wire and mlip_fed")
    return bad


def unlayered(graph: Mapping[str, set[str]], layers: tuple[tuple[str, tuple[str, ...]], ...] = LAYERS) -> list[str]:
    return sorted(m for m in graph if layer_of(m, layers) is None)


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph(module_files(REPO, PACKAGES))


def test_every_module_has_a_layer(graph: dict[str, set[str]]) -> None:
    assert unlayered(graph) == []


def test_no_import_cycles(graph: dict[str, set[str]]) -> None:
    assert cycles(graph) == []


def test_imports_point_down_the_layers(graph: dict[str, set[str]]) -> None:
    assert upward_imports(graph) == []


def test_the_graph_sees_the_project(graph: dict[str, set[str]]) -> None:
    """The scanner finds real edges, function-level ones included (so an empty result above means something)."""
    assert "mlip_fed.pipeline" in graph["mlip_fed.train.run"]
    assert "mlip_fed.data.tokenizer" in graph["mlip_fed.pipeline"]  # imported inside build_tokenizer
    assert "mlip_wire.codec" in graph["client.app"] and "mlip_wire.codec" in graph["server.app"]


# ---------------------------------------------------------------------------------------------- the checker itself
def _write(root: Path, files: dict[str, str]) -> dict[str, set[str]]:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return import_graph(module_files(root, ["pkg"]))


def test_checker_finds_a_cycle_through_a_function_level_import(tmp_path: Path) -> None:
    graph = _write(
        tmp_path,
        {
            "pkg/__init__.py": "",
            "pkg/a.py": "from pkg.b import thing\n",
            "pkg/b.py": "def thing():\n    from . import c\n",
            "pkg/c.py": "def late():\n    import pkg.a\n",
        },
    )
    assert graph["pkg.b"] == {"pkg", "pkg.c"}  # "from . import c" names the package and the module
    assert cycles(graph) == [["pkg.a", "pkg.b", "pkg.c"]]
    del graph["pkg.c"]
    assert cycles(graph) == []


def test_checker_finds_an_upward_import_and_an_unlayered_module(tmp_path: Path) -> None:
    graph = _write(
        tmp_path,
        {
            "pkg/__init__.py": "",
            "pkg/low.py": "def f():\n    from pkg.high import g\n",
            "pkg/high.py": "from pkg import low\n",
            "pkg/stray.py": "",
        },
    )
    layers = (("bottom", ("pkg", "pkg.low")), ("top", ("pkg.high",)))
    assert upward_imports(graph, layers) == ["pkg.low (bottom) imports pkg.high (top)"]
    assert unlayered(graph, (("bottom", ("pkg.low",)), ("top", ("pkg.high",)))) == ["pkg", "pkg.stray"]
    assert layer_of("pkg.low.deep", layers) == 0 and layer_of("pkg.highway", layers) == 0  # prefix means a dot


def test_checker_keeps_the_apps_apart() -> None:
    graph = {"client.app": {"server.codec"}, "server.app": {"mlip_fed.io"}, "server.codec": set(), "mlip_fed.io": set()}
    assert upward_imports(graph) == ["client.app imports server.codec: the two apps share only mlip_wire and mlip_fed"]
