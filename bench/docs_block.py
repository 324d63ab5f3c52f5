"""The one way a bench writes into a docs page: the text between ``<!-- BEGIN name -->`` and ``<!-- END name -->``.

Each bench owns the blocks it names, so several benches share a page and the prose around the blocks survives
every rerun. A block holds only what the bench that writes it measured; ``tests/test_docs_blocks.py`` checks that
every block in ``docs/`` has a writer here in ``bench/``.
"""

from __future__ import annotations

import re
from pathlib import Path

from mlip_fed.io import atomic_write_text

#: A block name: what follows BEGIN / END in a marker.
NAME = re.compile(r"[A-Za-z0-9_.-]+")
#: Any marker in a page: group 1 is BEGIN or END, group 2 the block's name.
MARKER = re.compile(rf"<!-- (BEGIN|END) ({NAME.pattern}) -->")


def begin(name: str) -> str:
    return f"<!-- BEGIN {name} -->"


def end(name: str) -> str:
    return f"<!-- END {name} -->"


def block_names(text: str) -> list[str]:
    """The names of the blocks in ``text``, in order (a name once per BEGIN marker)."""
    return [m.group(2) for m in MARKER.finditer(text) if m.group(1) == "BEGIN"]


def replace_block(doc: Path, name: str, content: str, *, heading: str | None = None) -> Path:
    """Put ``content`` between the block's markers in ``doc``, leaving every other byte of the page as it was.

    A page without the block gets it appended (under ``heading`` when given); a new page is created. Markers
    that do not form exactly one BEGIN-before-END pair are refused, so a damaged page is never half-rewritten.
    """
    if not NAME.fullmatch(name):
        raise ValueError(f"block name {name!r}: use letters, digits, '_', '.' or '-'")
    doc = Path(doc)
    text = doc.read_text(encoding="utf-8") if doc.exists() else ""
    opening, closing = begin(name), end(name)
    block = f"{opening}\n{content.strip()}\n{closing}"
    counts = (text.count(opening), text.count(closing))
    if counts == (1, 1) and text.index(opening) < text.index(closing):
        text = text[: text.index(opening)] + block + text[text.index(closing) + len(closing) :]
    elif counts == (0, 0):
        parts = [text.rstrip(), heading, block]
        text = "\n\n".join(p for p in parts if p) + "\n"
    else:
        raise ValueError(
            f"{doc}: block {name!r} has {counts[0]} BEGIN and {counts[1]} END markers; fix the page by hand"
        )
    return atomic_write_text(doc, text)
