"""A site runs only the Flower apps it approved: the ``flwr-clientapp`` its SuperNode starts is this module.

The ClientApp a SuperNode executes comes from the run's FAB, which whoever starts the run sends. Flower 1.42's
own check (``flower-supernode --trusted-entities``) only accepts FABs carrying a verification record signed by
a trusted key; in open-source Flower such records come from Flower's hub (the SuperLink must mark the FAB
``valid_license``), so it cannot pin an app offline. Here the site pins the FAB file itself: its SHA-256, the hash
Flower computes over the ``.fab`` bytes (``flwr build``, ``flwr run``, the SuperLink's ``fab_hash``), listed in
the site YAML's ``approved_fab_hashes``.

How it is enforced, without changing Flower:

- ``mlip-client`` writes a launcher named ``flwr-clientapp`` into ``<state_dir>/bin`` and starts the SuperNode with
  that folder first on ``PATH`` and the approved hashes in its environment (``APPROVED_ENV``). Flower's SuperExec
  starts every ClientApp process by that bare name (``flwr.supercore.constant.TASK_TYPE_TO_COMMAND``), so each
  ClientApp process runs ``main`` below.
- ``main`` runs Flower's own ``flwr-clientapp`` with two of its steps checked: the FAB bytes are hashed when
  ``install_from_fab`` is about to unpack them (the process has pulled the FAB but imported nothing of it), and the
  project folder it then loads must be the one named by that same hash. An unapproved FAB raises
  ``FabNotApproved`` there: nothing of it is unpacked or imported, Flower answers the server's message with an
  error reply that names the hash (the round goes on without this site), and the site's log gets
  ``mlip-client: <site>: refused FAB sha256=<hash> ...``.

This is the one module of ``mlip_fed`` that imports ``flwr``, and only inside ``main``: this process *is*
Flower's ClientApp process. Everything else here is plain Python, used by ``mlip-client`` and the tests.
"""

from __future__ import annotations

import hashlib
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import Any

#: The command Flower's SuperExec runs for a ClientApp task (flwr/supercore/constant.py, TASK_TYPE_TO_COMMAND).
CLIENTAPP_COMMAND = "flwr-clientapp"
#: Comma-separated approved FAB hashes; unset or empty = every FAB is refused.
APPROVED_ENV = "MLIP_FED_APPROVED_FABS"
#: The site id, for the log line.
SITE_ENV = "MLIP_FED_SITE_ID"
#: Where ``mlip-client`` writes the launcher, under the site's ``state_dir``.
LAUNCHER_DIR = "bin"
#: What the launcher runs (``-c``, not ``-m``: the module is imported once, under its own name).
LAUNCH = 'import sys; from mlip_fed.deploy.fab_guard import main; sys.argv[0] = "flwr-clientapp"; main()'


class FabNotApproved(RuntimeError):
    """The server sent a FAB this site did not approve; none of its code was run."""


def fab_sha256(fab: bytes) -> str:
    return hashlib.sha256(fab).hexdigest()


def refusal(site_id: str, digest: str, approved: Collection[str]) -> str:
    pinned = ", ".join(sorted(approved)) or "none"
    return (
        f"mlip-client: {site_id}: refused FAB sha256={digest}: not in this site's approved_fab_hashes ({pinned}); "
        "none of its code was run"
    )


def check_fab(fab: bytes, approved: Collection[str], site_id: str) -> str:
    """The FAB's SHA-256 if this site approved it; ``FabNotApproved`` (naming the hash) otherwise."""
    digest = fab_sha256(fab)
    if digest not in approved:
        raise FabNotApproved(refusal(site_id, digest, approved))
    return digest


def approved_from_env(env: Mapping[str, str]) -> frozenset[str]:
    return frozenset(h.strip().lower() for h in env.get(APPROVED_ENV, "").split(",") if h.strip())


def guard_env(base: Mapping[str, str], bin_dir: Path, approved: Collection[str], site_id: str) -> dict[str, str]:
    """``base`` with the launcher folder first on PATH and the site's approved hashes for the launcher to read."""
    env = dict(base)
    env["PATH"] = str(bin_dir) + os.pathsep + env.get("PATH", "")
    env[APPROVED_ENV] = ",".join(sorted(approved))
    env[SITE_ENV] = site_id
    return env


def write_launcher(bin_dir: Path, python: str | None = None) -> Path:
    """``<bin_dir>/flwr-clientapp``: runs ``main`` with this environment's Python (``-P``: no cwd on sys.path)."""
    bin_dir = Path(bin_dir)
    bin_dir.mkdir(parents=True, exist_ok=True)
    path = bin_dir / CLIENTAPP_COMMAND
    body = (
        "#!/bin/sh\n"
        "# Written by mlip-client: Flower's flwr-clientapp behind this site's FAB check (mlip_fed.deploy.fab_guard).\n"
        f'exec {shlex.quote(python or sys.executable)} -P -c {shlex.quote(LAUNCH)} "$@"\n'
    )
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o700)
    with os.fdopen(fd, "w") as handle:
        handle.write(body)
    os.chmod(tmp, 0o700)
    os.replace(tmp, path)
    return path


def build_fab(app_dir: Path, out_dir: Path) -> Path:
    """``flwr build --app APP_DIR`` run in ``out_dir``: the ``.fab`` that ``flwr run APP_DIR`` sends, byte for byte.

    Flower builds a FAB deterministically from the app's ``pyproject.toml`` and its ``fab-include`` files, so
    the hash of this file is the hash the SuperLink records for the run and the sites receive.
    """
    from mlip_fed.deploy.flower_env import OFFLINE_ENV, flower_executable

    app_dir = Path(app_dir).resolve()
    if not (app_dir / "pyproject.toml").is_file():
        raise FileNotFoundError(f"{app_dir}: no pyproject.toml, not a Flower app folder")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **OFFLINE_ENV}
    cmd = [flower_executable("flwr"), "build", "--app", str(app_dir)]
    done = subprocess.run(cmd, cwd=out_dir, env=env, capture_output=True, text=True, timeout=600)
    built = re.search(r"Successfully built (\S+\.fab)", done.stdout)
    if done.returncode != 0 or built is None or not (out_dir / built.group(1)).is_file():
        raise ValueError(f"`flwr build --app {app_dir}` failed:\n{done.stdout}{done.stderr}".rstrip())
    return out_dir / built.group(1)


def guarded(
    install: Callable[..., Any], project_dir: Callable[..., Any], approved: Collection[str], site_id: str
) -> tuple[Callable[..., Any], Callable[..., Any]]:
    """Flower's ``install_from_fab`` and ``get_project_dir``, each refusing what this site did not approve."""
    installed: list[str] = []

    def install_from_fab(fab_file: Any, *args: Any, **kwargs: Any) -> Any:
        content = fab_file.read_bytes() if isinstance(fab_file, Path) else bytes(fab_file)
        try:
            digest = check_fab(content, approved, site_id)
        except FabNotApproved as err:
            print(err, file=sys.stderr, flush=True)
            raise
        print(f"mlip-client: {site_id}: FAB sha256={digest} approved", file=sys.stderr, flush=True)
        installed.append(digest)
        return install(fab_file, *args, **kwargs)

    def get_project_dir(fab_id: str, fab_version: str, fab_hash: str, *args: Any, **kwargs: Any) -> Any:
        # The folder Flower loads is named by the hash the server claims; it must be the FAB just checked.
        if not installed or fab_hash != installed[-1]:
            err = FabNotApproved(
                f"mlip-client: {site_id}: refused to load app {fab_id} {fab_version} with claimed hash {fab_hash}: "
                f"not the approved FAB this process installed ({installed[-1] if installed else 'none'})"
            )
            print(err, file=sys.stderr, flush=True)
            raise err
        return project_dir(fab_id, fab_version, fab_hash, *args, **kwargs)

    return install_from_fab, get_project_dir


def main() -> None:
    """Flower's ``flwr-clientapp`` (same arguments) with the FAB checked before any of it is unpacked or imported."""
    from flwr.supernode.cli.flwr_clientapp import flwr_clientapp
    from flwr.supernode.runtime import run_clientapp as runtime

    site_id = os.environ.get(SITE_ENV, "site")
    approved = approved_from_env(os.environ)
    for name in ("install_from_fab", "get_project_dir"):
        if not callable(getattr(runtime, name, None)):  # another Flower: fail closed rather than run unchecked
            print(f"mlip-client: {site_id}: flwr {name} not found; refusing to run any ClientApp", file=sys.stderr)
            sys.exit(1)
    if not approved:
        print(f"mlip-client: {site_id}: no approved FAB hash; every app will be refused", file=sys.stderr, flush=True)
    runtime.install_from_fab, runtime.get_project_dir = guarded(
        runtime.install_from_fab, runtime.get_project_dir, approved, site_id
    )
    flwr_clientapp()


if __name__ == "__main__":
    main()
