"""``--help`` of every console script and subcommand: exits 0, plain text, every option explained, defaults shown.

The scripts are read from pyproject's ``[project.scripts]`` so a new entry point is covered without editing
this file; subcommands are found by walking each parser. Runs in-process (``main([..., "--help"])``).
"""

from __future__ import annotations

import argparse
import importlib
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from mlip_fed.cli.help_format import HelpFormatter, default_text

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def _scripts() -> dict[str, str]:
    return tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))["project"]["scripts"]


def _module(target: str) -> object:
    return importlib.import_module(target.split(":", 1)[0])


def _subparsers(parser: argparse.ArgumentParser) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            yield from action.choices.items()


def _commands() -> list[tuple[str, str, tuple[str, ...]]]:
    """(script, entry point, subcommand path) for every script and every (nested) subcommand."""
    found = []
    for script, target in sorted(_scripts().items()):
        parser = _module(target).build_parser()
        stack: list[tuple[tuple[str, ...], argparse.ArgumentParser]] = [((), parser)]
        while stack:
            path, current = stack.pop()
            found.append((script, target, path))
            stack += [((*path, name), sub) for name, sub in _subparsers(current)]
    return found


COMMANDS = _commands()


def _parser_for(target: str, path: tuple[str, ...]) -> argparse.ArgumentParser:
    parser = _module(target).build_parser()
    for name in path:
        parser = dict(_subparsers(parser))[name]
    return parser


def _main(target: str) -> Callable[[list[str]], int]:
    return getattr(_module(target), target.split(":", 1)[1])


def test_every_script_is_covered() -> None:
    assert {script for script, _, _ in COMMANDS} == set(_scripts())
    assert ("mlip-data", "mlip_fed.cli.data:main", ("synth",)) in COMMANDS


@pytest.mark.parametrize(("script", "target", "path"), COMMANDS, ids=[" ".join((s, *p)) for s, _, p in COMMANDS])
def test_help(script: str, target: str, path: tuple[str, ...], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        _main(target)([*path, "--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0
    assert out.startswith("usage:")
    assert "``" not in out, f"{script} {' '.join(path)}: raw RST literal in --help"

    parser = _parser_for(target, path)
    assert issubclass(parser.formatter_class, HelpFormatter)
    flat = " ".join(out.split())  # argparse wraps lines; compare whitespace-insensitively
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            assert all(choice.help for choice in action._choices_actions), f"{script}: subcommand without help"
            continue
        name = "/".join(action.option_strings) or action.dest
        assert action.help and action.help.strip(), f"{script} {' '.join(path)}: {name} has no help text"
        shows_default = HelpFormatter._get_help_string(HelpFormatter(script), action) != action.help
        if shows_default:
            shown = f"(default: {default_text(action.default)})"
            assert shown in flat, f"{script} {' '.join(path)}: {name} hides its default"


def test_known_offenders_now_explain_themselves(capsys: pytest.CaptureFixture[str]) -> None:
    from mlip_fed.cli import data, privacy, simulate
    from mlip_fed.privacy.ledger import LEDGER_FILENAME

    def help_of(main: Callable[[list[str]], int], *argv: str) -> str:
        with pytest.raises(SystemExit):
            main([*argv, "--help"])
        return " ".join(capsys.readouterr().out.split())

    assert "--cpus-per-site CPUS_PER_SITE CPU cores" in help_of(simulate.main)
    synth = help_of(data.main, "synth")
    for option in ("--sites SITES number", "--image-size IMAGE_SIZE side", "--seed SEED random seed"):
        assert option in synth
    assert "(default: 64)" in synth
    audit = help_of(privacy.main, "audit")
    assert LEDGER_FILENAME in audit and "site.db" not in audit
    assert "--format {text,json,html} report format" in audit and "(default: text)" in audit
