"""Generated blocks in ``docs/``: one marker syntax, one writer (``bench/docs_block.py``), a bench behind every block.

The writers are found by reading the benches' source (an AST walk over ``replace_block(doc, name, ...)`` calls),
not by running them: a block in a page whose name no bench writes is a table nobody can regenerate.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from bench.docs_block import MARKER, NAME, begin, block_names, end, replace_block

REPO = Path(__file__).resolve().parents[1]
DOCS = sorted((REPO / "docs").glob("*.md"))
#: Marker syntaxes used before there was one writer: none may come back.
OLD_MARKERS = re.compile(r"<!-- bench[:/]|:(begin|start|end) -->|table split=")


def _name_patterns(tree: ast.Module, node: ast.expr, source: Path) -> list[str]:
    """Regexes for the block names ``node`` (the ``name`` argument of a ``replace_block`` call) can take."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [re.escape(node.value)]
    if isinstance(node, ast.JoinedStr):  # f"labeler_iu_{split}": any name in the formatted part
        parts = [re.escape(v.value) if isinstance(v, ast.Constant) else NAME.pattern for v in node.values]
        return ["".join(parts)]
    if isinstance(node, ast.Name):  # a module-level constant, BLOCK = "..."
        for stmt in tree.body:
            if isinstance(stmt, ast.Assign) and any(isinstance(t, ast.Name) and t.id == node.id for t in stmt.targets):
                return _name_patterns(tree, stmt.value, source)
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):  # a module function returning the name
        for stmt in tree.body:
            if isinstance(stmt, ast.FunctionDef) and stmt.name == node.func.id:
                returns = [r.value for r in ast.walk(stmt) if isinstance(r, ast.Return) and r.value is not None]
                return [p for value in returns for p in _name_patterns(tree, value, source)]
    raise AssertionError(
        f"{source.name}:{node.lineno}: replace_block's name must be a literal, a constant or an f-string"
    )


def written_blocks() -> dict[str, str]:
    """Regex of each block name a bench writes -> the bench's file name."""
    found: dict[str, str] = {}
    for source in sorted((REPO / "bench").glob("*.py")):
        tree = ast.parse(source.read_text(encoding="utf-8"))
        for call in ast.walk(tree):
            if isinstance(call, ast.Call) and getattr(call.func, "id", None) == "replace_block" and len(call.args) >= 2:
                for pattern in _name_patterns(tree, call.args[1], source):
                    found[pattern] = source.name
    return found


def test_the_benches_write_blocks() -> None:
    writers = written_blocks()
    assert {"fed_comm", "dp_overhead", "synth_tiers", "train_step", "secagg_cost"} <= set(writers)
    assert any(re.fullmatch(p, "labeler_iu_holdout") for p in writers)


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_block_in_the_docs_has_a_bench_that_writes_it(doc: Path) -> None:
    text = doc.read_text(encoding="utf-8")
    assert not OLD_MARKERS.search(text), f"{doc.name}: an old marker syntax; use {begin('name')} ... {end('name')}"
    writers = written_blocks()
    for name in block_names(text):
        assert text.count(begin(name)) == 1 and text.count(end(name)) == 1, f"{doc.name}: block {name} twice"
        assert text.index(begin(name)) < text.index(end(name)), f"{doc.name}: block {name} ends before it begins"
        assert any(re.fullmatch(p, name) for p in writers), f"{doc.name}: no bench writes block {name!r}"
    ends = [m.group(2) for m in MARKER.finditer(text) if m.group(1) == "END"]
    assert sorted(ends) == sorted(block_names(text)), f"{doc.name}: an END marker without its BEGIN"


def test_only_the_one_writer_makes_markers() -> None:
    """No other module in bench/ or the library spells a block marker (the page header of run_all aside)."""
    for root in ("bench", "mlip_fed"):
        for source in (REPO / root).rglob("*.py"):
            if source.name in ("docs_block.py",):
                continue
            text = source.read_text(encoding="utf-8")
            assert not re.search(r"<!-- (BEGIN|END) ", text), f"{source}: writes block markers itself"
            assert not OLD_MARKERS.search(text), f"{source}: an old marker syntax"


def test_replace_block_changes_only_its_block(tmp_path: Path) -> None:
    doc = tmp_path / "page.md"
    head = "# Page\n\nProse before, kept byte for byte.  \n\n"
    middle = "\n\nProse between.\n\n"
    tail = "\n\nProse after.\n"
    other = f"{begin('other')}\n| other |\n{end('other')}"
    doc.write_text(f"{head}{begin('mine')}\nold table\n{end('mine')}{middle}{other}{tail}", encoding="utf-8")
    replace_block(doc, "mine", "| new |\n|---|\n| 1 |\n")
    assert doc.read_text(encoding="utf-8") == (
        f"{head}{begin('mine')}\n| new |\n|---|\n| 1 |\n{end('mine')}{middle}{other}{tail}"
    )
    replace_block(doc, "mine", "| newer |")  # idempotent in shape: a second write replaces the first
    text = doc.read_text(encoding="utf-8")
    assert "| new |" not in text and text.count(begin("mine")) == 1 and other in text


def test_replace_block_appends_a_missing_block_under_its_heading(tmp_path: Path) -> None:
    doc = tmp_path / "page.md"
    doc.write_text("# Page\n\nintro\n", encoding="utf-8")
    replace_block(doc, "t", "| a |", heading="## Tables")
    assert doc.read_text(encoding="utf-8") == f"# Page\n\nintro\n\n## Tables\n\n{begin('t')}\n| a |\n{end('t')}\n"
    fresh = tmp_path / "sub" / "new.md"
    replace_block(fresh, "t", "| a |")
    assert block_names(fresh.read_text(encoding="utf-8")) == ["t"]


@pytest.mark.parametrize(
    "text",
    [f"{begin('t')}\nno end\n", f"{end('t')}\n{begin('t')}\n", f"{begin('t')}\n{end('t')}\n{begin('t')}\n{end('t')}\n"],
    ids=["no-end", "end-first", "twice"],
)
def test_damaged_markers_are_refused_and_the_page_untouched(tmp_path: Path, text: str) -> None:
    doc = tmp_path / "page.md"
    doc.write_text(text, encoding="utf-8")
    with pytest.raises(ValueError, match="block 't'"):
        replace_block(doc, "t", "| a |")
    assert doc.read_text(encoding="utf-8") == text


def test_a_name_outside_the_marker_syntax_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="block name"):
        replace_block(tmp_path / "page.md", "two words", "x")
