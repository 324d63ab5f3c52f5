"""Flower/Ray defaults for the project's own virtual environment: plain ``flwr run .`` does the right thing.

Flower 1.42 decides in ``flower-superlink`` whether a run gets its own freshly installed environment:
``flwr.superlink.cli.flower_superlink._runtime_dependency_install_default`` is true unless
``FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1`` is in the SuperLink's environment, and the local
SuperLink that ``flwr run`` starts (``flwr.cli.local_superlink._start_local_superlink``) is launched with a
fixed command line and a copy of the ``flwr`` process's environment. With installation on, the
simulation process (``flwr.simulation.app``) runs ``uv sync`` on the FAB's ``pyproject.toml`` into
``$FLWR_HOME/runtime-envs/<run id>`` -- every run, a fresh uv resolution ignoring the lock and pip's
configuration -- and puts that environment ahead of ours on ``sys.path``. Neither the FAB (it cannot carry
``uv.lock``; uv ignores dependency overrides in a ``uv.toml``) nor ``$FLWR_HOME/config.toml`` can switch it
off: only the environment variable (or the SuperLink flag) can.

So ``make venv`` writes one ``.pth`` file into the venv's ``site-packages``: every interpreter of this venv
(``flwr`` itself, hence the SuperLink it starts) gets the same Flower/Ray defaults the Makefile exports,
as *defaults* (``os.environ.setdefault``: an explicit ``FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=0``
still wins), and the venv's ``bin`` on ``PATH`` (``flwr run`` starts ``flower-superlink`` from ``PATH``, so
``.venv/bin/flwr run .`` without activating would otherwise fail, or start another environment's
SuperLink). Nothing here imports Flower. ``python -m mlip_fed.federation.venv_defaults [--check]``.
"""

from __future__ import annotations

import argparse
import sys
import sysconfig
from pathlib import Path

PTH_NAME = "mlip_fed_flwr_defaults.pth"

#: The Flower/Ray variables the Makefile exports (docs/federation.md, "Plain `flwr run`").
DEFAULTS: dict[str, str] = {
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    #: Ray folds similar actor lines ("[site_1] round 2: ...") into one "[repeated Nx across cluster]" line.
    "RAY_DEDUP_LOGS": "0",
}


def pth_text(bin_dir: Path) -> str:
    """The ``.pth`` body: one ``import`` line (site.py executes lines that start with ``import``)."""
    pairs = tuple(DEFAULTS.items())
    line = (
        "import os; "
        f"[os.environ.setdefault(k, v) for k, v in {pairs!r}]; "
        f"_b = {str(bin_dir)!r}; "
        "_p = os.environ.get('PATH', ''); "
        "os.environ['PATH'] = _p if _b in _p.split(os.pathsep) else _b + os.pathsep + _p"
    )
    return "# written by `python -m mlip_fed.federation.venv_defaults` (make venv); see that module\n" + line + "\n"


def in_virtualenv() -> bool:
    return sys.prefix != sys.base_prefix


def pth_path() -> Path:
    return Path(sysconfig.get_paths()["purelib"]) / PTH_NAME


def expected_text() -> str:
    return pth_text(Path(sys.executable).parent)


def is_installed() -> bool:
    path = pth_path()
    return path.is_file() and path.read_text(encoding="utf-8") == expected_text()


def install() -> Path:
    """Write the ``.pth`` into this interpreter's venv; refuses a Python that is not a virtual environment."""
    if not in_virtualenv():
        raise RuntimeError(f"{sys.executable} is not a virtual environment: refusing to change {sys.prefix}")
    path = pth_path()
    path.write_text(expected_text(), encoding="utf-8")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mlip_fed.federation.venv_defaults", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--check", action="store_true", help="exit 1 unless this venv already has the defaults")
    args = parser.parse_args(argv)
    if args.check:
        ok = is_installed()
        print(f"{pth_path()}: {'up to date' if ok else 'missing or outdated (run `make venv`)'}")
        return 0 if ok else 1
    try:
        path = install()
    except RuntimeError as exc:
        print(f"venv_defaults: {exc}", file=sys.stderr)
        return 2
    print(
        f"wrote {path}: {', '.join(f'{k}={v}' for k, v in DEFAULTS.items())} (defaults), {Path(sys.executable).parent} on PATH"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
