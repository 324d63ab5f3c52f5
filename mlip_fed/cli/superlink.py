"""Run the federation's SuperLink: ``flower-superlink`` on 127.0.0.1 only, and the Fleet gateway for the sites.

    mlip-superlink --certs certs --host 0.0.0.0 --port 9092 --control-port 9093 \\
        --database state/superlink.db

The sites' SuperNodes connect to ``--host``:``--port`` (the gateway: Fleet API only, TLS with ``server.pem``).
The operator's ``flwr`` (``flwr supernode register``, ``flwr run``, ``flwr ls``, ``flwr stop``) connects to
``127.0.0.1:--control-port``, on this host (or through an SSH tunnel to it): the only address of the Control API.
Both stop together: SIGINT/SIGTERM stop the gateway and the SuperLink (its ServerApps included); if the SuperLink
exits, so does the gateway.

Exit status: 0 stopped by a signal; 1 the SuperLink or the gateway failed; 2 bad arguments or missing certificates.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from mlip_fed.cli.help_format import HelpFormatter, describe

NAME = "mlip-superlink"


def build_parser() -> argparse.ArgumentParser:
    from mlip_fed.deploy.superlink import CONTROL_PORT, FLEET_PORT

    parser = argparse.ArgumentParser(
        prog="mlip-superlink", description=describe(__doc__), formatter_class=HelpFormatter
    )
    parser.add_argument(
        "--certs", type=Path, required=True, metavar="DIR", help="folder with ca.crt, server.pem, server.key"
    )
    parser.add_argument("--host", default="0.0.0.0", help="address the sites reach the Fleet gateway on")
    parser.add_argument("--port", type=int, default=FLEET_PORT, help="Fleet gateway port (the sites' superlink)")
    parser.add_argument(
        "--control-port",
        type=int,
        default=CONTROL_PORT,
        help="port of flower-superlink itself on 127.0.0.1: Control and Runtime APIs, for the operator's flwr",
    )
    parser.add_argument(
        "--database", type=Path, metavar="PATH", help="the SuperLink's SQLite state (default: in memory)"
    )
    parser.add_argument(
        "--flwr-connection",
        metavar="NAME",
        help="also write $FLWR_HOME/config.toml (if absent) with a connection NAME to the Control API",
    )
    return parser


def _wait_listening(port: int, link: subprocess.Popen, stopping: list[int], timeout_s: float = 120.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and link.poll() is None and not stopping:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return True
        time.sleep(0.3)
    return False


def main(argv: Sequence[str] | None = None) -> int:
    from mlip_fed.deploy.certs import CA_CERT, SERVER_CERT, SERVER_KEY
    from mlip_fed.deploy.flower_env import OFFLINE_ENV
    from mlip_fed.deploy.superlink import connection_toml, superlink_command, write_flwr_config
    from mlip_fed.deploy.supernode import _stop_group

    args = build_parser().parse_args(argv)
    certs = Path(args.certs).resolve()
    control = f"127.0.0.1:{args.control_port}"
    try:
        if args.control_port == args.port:
            raise ValueError(f"--control-port {args.control_port} must differ from --port (the gateway's)")
        cmd = superlink_command(certs, host="127.0.0.1", port=args.control_port, database=args.database)
    except (FileNotFoundError, ValueError) as err:
        print(f"{NAME}: {err}", file=sys.stderr)
        return 2
    if args.database is not None:
        Path(args.database).resolve().parent.mkdir(parents=True, exist_ok=True)
    if args.flwr_connection:
        home = Path(os.environ.get("FLWR_HOME", Path.home() / ".flwr"))
        existing = home / "config.toml"
        if not existing.is_file():
            print(f"{NAME}: wrote {write_flwr_config(home, args.flwr_connection, control, certs / CA_CERT)}")
        elif f"[superlink.{args.flwr_connection}]" not in existing.read_text():
            section = connection_toml(args.flwr_connection, control, certs / CA_CERT)
            print(f"{NAME}: {existing} has no connection {args.flwr_connection!r}; add it yourself:\n{section}")

    stopping: list[int] = []

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        stopping.append(signum)

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    env = dict(os.environ)
    for key, value in OFFLINE_ENV.items():
        env.setdefault(key, value)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")  # flower-superexec of this env
    print(f"{NAME}: Control and Runtime APIs on https://{control} (this host only: the operator's flwr)", flush=True)
    link = subprocess.Popen(cmd, env=env, start_new_session=True)
    failed = False
    try:
        if not _wait_listening(args.control_port, link, stopping):
            failed = not stopping
            if link.poll() is not None:
                print(f"{NAME}: flower-superlink exited with status {link.returncode}", file=sys.stderr)
            elif failed:
                print(f"{NAME}: flower-superlink did not listen on {control}", file=sys.stderr)
            return 1 if failed else 0
        from mlip_fed.deploy.gateway import FleetGateway, serve

        print(f"{NAME}: Fleet API for the sites on https://{args.host}:{args.port} (gateway: Fleet routes only)")
        gateway = FleetGateway(f"https://{control}", certs / CA_CERT)
        try:
            serve(
                gateway,
                args.host,
                args.port,
                certs / SERVER_CERT,
                certs / SERVER_KEY,
                stop_when=lambda: bool(stopping) or link.poll() is not None,
            )
        except SystemExit as err:  # uvicorn could not bind
            failed = bool(err.code)
        if link.poll() is not None and not stopping:
            print(f"{NAME}: flower-superlink exited with status {link.returncode}", file=sys.stderr)
            failed = True
        return 1 if failed else 0
    finally:  # the SuperLink, then what is left of its session (SuperExec, ServerApps), by process group id
        try:
            os.killpg(link.pid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            link.wait(timeout=20)
        except subprocess.TimeoutExpired:
            link.kill()
            link.wait()
        _stop_group(link.pid, grace_s=5.0)
        for sig, handler in previous.items():
            signal.signal(sig, handler)


if __name__ == "__main__":
    sys.exit(main())
