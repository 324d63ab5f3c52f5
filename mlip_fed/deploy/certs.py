"""Certificates and node keys for a federation: a CA, the SuperLink's TLS certificate, one EC key pair per site.

Same recipe as Flower's ``examples/supernode-authentication/generate_creds.py`` (Flower's "Authenticate
SuperNodes" guide): CA on EC P-256 with keyCertSign/cRLSign; SuperLink certificate with SANs
(default ``DNS:localhost, IP:127.0.0.1``) and EKU serverAuth; site keys on a NIST curve (P-384, as
the example), private key in OpenSSH format (``flower-supernode --auth-supernode-private-key`` loads
it with ``load_ssh_private_key``), public key as an OpenSSH line (``flwr supernode register``).

Private keys are created 0600 and never overwritten unless the caller says ``force``: a silently
replaced site key locks that hospital out (its registered public key no longer matches), and a
replaced CA invalidates every site's trust root.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from mlip_fed.config import SITE_ID_PATTERN

CA_CERT, CA_KEY = "ca.crt", "ca.key"
SERVER_CERT, SERVER_KEY = "server.pem", "server.key"
SITES_DIR = "sites"
DEFAULT_DNS = ("localhost",)
DEFAULT_IPS = ("127.0.0.1",)


@dataclass(frozen=True)
class SiteKeyPaths:
    private: Path
    public: Path


def site_key_paths(out_dir: Path, site_id: str) -> SiteKeyPaths:
    base = Path(out_dir) / SITES_DIR
    return SiteKeyPaths(private=base / f"{site_id}.key", public=base / f"{site_id}.pub")


# ---------------------------------------------------------------------------- writing
def refuse_existing(paths: Iterable[Path], force: bool) -> None:
    """All-or-nothing: check every target before writing any, so a refusal leaves no half-made set."""
    existing = [str(p) for p in paths if p.exists()]
    if existing and not force:
        raise FileExistsError(f"refusing to overwrite {', '.join(existing)} (pass --force to replace them)")


def write_file(path: Path, data: bytes, mode: int) -> None:
    """Atomic write created with ``mode`` from the start (a key is never briefly world-readable)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, mode)  # the umask may have narrowed it further than asked; never wider
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _pem_private(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


# ---------------------------------------------------------------------------- CA and SuperLink certificate
def make_ca(
    common_name: str = "mlip-fed federation CA", days: int = 3650
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def make_server_cert(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    dns_names: Sequence[str] = DEFAULT_DNS,
    ip_addresses: Sequence[str] = DEFAULT_IPS,
    days: int = 825,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """The SuperLink's certificate; SuperNodes check the address they dial against these SANs."""
    if not dns_names and not ip_addresses:
        raise ValueError("the SuperLink certificate needs at least one SAN (a DNS name or an IP address)")
    sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns_names]
    for ip in ip_addresses:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(ip)))
        except ValueError:
            raise ValueError(f"--ip {ip!r} is not an IP address (use --dns for host names)") from None
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, (list(dns_names) or list(ip_addresses))[0])])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),  # type: ignore[arg-type]
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    return key, cert


def write_ca(out_dir: Path, force: bool = False, days: int = 3650) -> tuple[Path, Path]:
    out_dir = Path(out_dir)
    cert_path, key_path = out_dir / CA_CERT, out_dir / CA_KEY
    refuse_existing([cert_path, key_path], force)
    key, cert = make_ca(days=days)
    write_file(key_path, _pem_private(key), 0o600)
    write_file(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return cert_path, key_path


def load_ca(out_dir: Path) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    cert_path, key_path = Path(out_dir) / CA_CERT, Path(out_dir) / CA_KEY
    for path in (cert_path, key_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no CA here; create it first with `mlip-certs ca --out {out_dir}`")
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{key_path}: expected an EC private key, got {type(key).__name__}")
    return key, x509.load_pem_x509_certificate(cert_path.read_bytes())


def write_server_cert(
    out_dir: Path,
    dns_names: Sequence[str] = DEFAULT_DNS,
    ip_addresses: Sequence[str] = DEFAULT_IPS,
    force: bool = False,
    days: int = 825,
) -> tuple[Path, Path]:
    out_dir = Path(out_dir)
    cert_path, key_path = out_dir / SERVER_CERT, out_dir / SERVER_KEY
    ca_key, ca_cert = load_ca(out_dir)
    refuse_existing([cert_path, key_path], force)
    key, cert = make_server_cert(ca_key, ca_cert, dns_names, ip_addresses, days)
    write_file(key_path, _pem_private(key), 0o600)
    write_file(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return cert_path, key_path


# ---------------------------------------------------------------------------- site keys
def make_site_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP384R1())


def write_site_keys(out_dir: Path, site_id: str, force: bool = False) -> SiteKeyPaths:
    """``sites/<site_id>.key`` (OpenSSH private, 0600) and ``sites/<site_id>.pub`` (OpenSSH public line)."""
    import re

    if not re.match(SITE_ID_PATTERN, site_id):
        raise ValueError(f"site id {site_id!r} must match {SITE_ID_PATTERN} (it becomes a file name)")
    paths = site_key_paths(Path(out_dir), site_id)
    refuse_existing([paths.private, paths.public], force)
    key = make_site_key()
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    write_file(paths.private, private, 0o600)
    write_file(paths.public, public + f" {site_id}\n".encode(), 0o644)
    return paths
