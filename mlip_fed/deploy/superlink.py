"""The server side of a deployment: the SuperLink command line and the ``flwr`` connection that targets it.

Only registered sites may join: ``flower-superlink --enable-supernode-auth`` (TLS required) plus
``flwr supernode register <site>.pub <connection>`` per site (reference flower-1.42.md §9). Runtime
dependency installation stays off: the server's environment is the project's, not a per-run ``uv sync``.
"""

from __future__ import annotations

from pathlib import Path

from mlip_fed.deploy.certs import CA_CERT, SERVER_CERT, SERVER_KEY
from mlip_fed.deploy.supernode import flower_executable


def superlink_command(
    certs_dir: Path,
    host: str = "127.0.0.1",
    port: int = 9092,
    database: Path | None = None,
    executable: str | None = None,
) -> list[str]:
    """``flower-superlink`` with TLS and CLI-managed node authentication; Fleet, Control and Runtime APIs on one port."""
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
