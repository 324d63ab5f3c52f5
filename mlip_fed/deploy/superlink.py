"""The server side of a deployment: the SuperLink behind its Fleet gateway, and the operator's ``flwr`` connection.

Only registered sites may join: ``flower-superlink --enable-supernode-auth`` (TLS required) plus
``flwr supernode register <site>.pub <connection>`` per site. Only the operator may register nodes or start runs:
Flower 1.42 serves the Fleet, Control and Runtime APIs from one address and authenticates no Control API account,
so the SuperLink is bound to 127.0.0.1 (``superlink_command`` refuses anything else) and the sites reach it through
``mlip_fed.deploy.gateway``, which forwards the Fleet API only. ``mlip-superlink`` runs both
(``launcher_command``). Runtime dependency installation stays off: the server's environment is the project's,
not a per-run ``uv sync``.
"""

from __future__ import annotations

from pathlib import Path

from mlip_fed.deploy.certs import CA_CERT, SERVER_CERT, SERVER_KEY
from mlip_fed.deploy.flower_env import flower_executable

#: Where the sites reach the Fleet gateway, and where the SuperLink itself listens (this host only).
FLEET_PORT = 9092
CONTROL_PORT = 9093
#: Addresses that only this host can reach.
LOOPBACK_HOSTS = ("127.0.0.1", "::1", "localhost")


def superlink_command(
    certs_dir: Path,
    host: str = "127.0.0.1",
    port: int = CONTROL_PORT,
    database: Path | None = None,
    executable: str | None = None,
) -> list[str]:
    """``flower-superlink`` with TLS and CLI-managed node authentication, bound to this host only.

    Its one address serves the Fleet, Control and Runtime APIs alike, so it must not be reachable from the
    network: the sites come in through the Fleet gateway (``launcher_command``).
    """
    if host not in LOOPBACK_HOSTS:
        raise ValueError(
            f"--host {host}: flower-superlink serves the Control API (register nodes, start runs; no account "
            "authentication in Flower 1.42) on the same address as the Fleet API, so it listens on 127.0.0.1 only; "
            "sites reach it through the Fleet gateway (mlip-superlink --host <public address>)"
        )
    certs_dir = Path(certs_dir).resolve()
    for name in (CA_CERT, SERVER_CERT, SERVER_KEY):
        if not (certs_dir / name).is_file():
            raise FileNotFoundError(f"{certs_dir / name}: missing; create it with `mlip-certs all --out {certs_dir}`")
    cmd = [
        executable or flower_executable("flower-superlink"),
        "--ssl-ca-certfile",
        str(certs_dir / CA_CERT),
        "--ssl-certfile",
        str(certs_dir / SERVER_CERT),
        "--ssl-keyfile",
        str(certs_dir / SERVER_KEY),
        "--enable-supernode-auth",
        "--disable-runtime-dependency-installation",
        "--host",
        host,
        "--port",
        str(port),
    ]
    if database is not None:
        cmd += ["--database", str(Path(database).resolve())]
    return cmd


def launcher_command(
    certs_dir: Path,
    host: str = "0.0.0.0",
    port: int = FLEET_PORT,
    control_port: int = CONTROL_PORT,
    database: Path | None = None,
    python: str = "python",
) -> list[str]:
    """``mlip-superlink``: the SuperLink on 127.0.0.1:``control_port``, the gateway on ``host:port``."""
    cmd = [python, "-m", "mlip_fed.cli.superlink", "--certs", str(certs_dir), "--host", host, "--port", str(port)]
    cmd += ["--control-port", str(control_port)]
    return cmd + (["--database", str(database)] if database is not None else [])


def connection_toml(name: str, address: str, root_certificates: Path) -> str:
    """A ``$FLWR_HOME/config.toml`` section so ``flwr run . <name>`` and ``flwr supernode ...`` reach the SuperLink."""
    ca = str(Path(root_certificates).resolve())
    if '"' in ca or '"' in address:
        raise ValueError(f"quotes in {ca!r} / {address!r} cannot be written into config.toml")
    return f'[superlink.{name}]\naddress = "{address}"\nroot-certificates = "{ca}"\n'


def write_flwr_config(flwr_home: Path, name: str, address: str, root_certificates: Path) -> Path:
    """Create ``$FLWR_HOME/config.toml`` with this connection as the default (refuses to replace an existing one)."""
    path = Path(flwr_home) / "config.toml"
    if path.exists():
        raise FileExistsError(
            f"{path} exists; add this section yourself:\n{connection_toml(name, address, root_certificates)}"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f'[superlink]\ndefault = "{name}"\n\n' + connection_toml(name, address, root_certificates))
    return path


def register_command(public_key: Path, connection: str, name: str | None = None) -> list[str]:
    cmd = [flower_executable("flwr"), "supernode", "register", str(Path(public_key).resolve()), connection]
    return cmd + (["--name", name] if name else [])
