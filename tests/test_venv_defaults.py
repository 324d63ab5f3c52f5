"""The venv's Flower/Ray defaults (.pth written by `make venv`): defaults only, PATH once, nothing else."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from mlip_fed.federation import venv_defaults


def _run_pth(pth: str, env: dict[str, str]) -> dict[str, str]:
    """Execute the .pth's import line the way site.py does, in a clean interpreter; return its environment."""
    line = next(ln for ln in pth.splitlines() if ln.startswith("import "))
    code = f"exec({line!r}); import json, os; print(json.dumps(dict(os.environ)))"
    out = subprocess.run([sys.executable, "-S", "-c", code], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def test_pth_sets_defaults_and_path(tmp_path: Path) -> None:
    bin_dir = tmp_path / "venv" / "bin"
    text = venv_defaults.pth_text(bin_dir)
    assert sum(ln.startswith("import ") for ln in text.splitlines()) == 1  # site.py executes exactly one line
    env = _run_pth(text, {"PATH": "/usr/bin"})
    for key, value in venv_defaults.DEFAULTS.items():
        assert env[key] == value
    assert env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] == "1"
    assert env["PATH"] == f"{bin_dir}{os.pathsep}/usr/bin"


def test_pth_keeps_explicit_values_and_does_not_repeat_path(tmp_path: Path) -> None:
    bin_dir = tmp_path / "venv" / "bin"
    path = f"/usr/bin{os.pathsep}{bin_dir}"
    env = _run_pth(venv_defaults.pth_text(bin_dir), {"PATH": path, "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "0"})
    assert env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] == "0"  # an explicit opt-in still wins
    assert env["PATH"] == path


def test_install_refuses_a_non_venv_python(monkeypatch) -> None:
    monkeypatch.setattr(sys, "prefix", sys.base_prefix)
    try:
        venv_defaults.install()
    except RuntimeError as exc:
        assert "not a virtual environment" in str(exc)
    else:  # pragma: no cover
        raise AssertionError("install() wrote into a non-venv Python")
