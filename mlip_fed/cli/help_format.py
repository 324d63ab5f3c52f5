"""One help style for every console script: defaults shown, no reStructuredText markup.

The module docstrings double as API documentation and use RST double-backtick literals; a
terminal shows those backticks verbatim, so ``describe`` strips them before a docstring becomes a
``--help`` description. ``HelpFormatter`` appends ``(default: ...)`` only where a default says
something: a required option, a switch (default False) or an unset value (None) would only add noise.
"""

from __future__ import annotations

import argparse
from typing import Any

RST_LITERAL = "``"


def plain(text: str) -> str:
    """``text`` without RST double-backtick literals, as a terminal should show it."""
    return text.replace(RST_LITERAL, "")


def describe(doc: str | None) -> str:
    """First line of a module docstring, as a plain-text ``--help`` description."""
    return plain((doc or "").strip().splitlines()[0]) if doc and doc.strip() else ""


def _says_nothing(default: Any) -> bool:
    """Defaults not worth printing; identity checks so that a default of 0 is still shown."""
    if default is None or default is False or default is argparse.SUPPRESS:
        return True
    return isinstance(default, list | tuple) and not default


def default_text(default: Any) -> str:
    """A default as typed on the command line: ``--views PA AP`` shows ``PA AP``, not ``['PA', 'AP']``."""
    if isinstance(default, list | tuple):
        return " ".join(str(value) for value in default)
    return str(default)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``ArgumentDefaultsHelpFormatter`` that leaves out empty defaults and those of required options."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        help_text = action.help or ""
        if action.required or _says_nothing(action.default) or "%(default)" in help_text:
            return action.help
        shown = default_text(action.default).replace("%", "%%")  # argparse %-formats help strings
        return f"{help_text} (default: {shown})"


def subparser_options() -> dict[str, Any]:
    """Keyword arguments for ``add_parser``: a subcommand does not inherit its parent's formatter."""
    return {"formatter_class": HelpFormatter}
