"""mlip-certs: a CA, a SuperLink certificate with the right SANs/EKU, site keys Flower can load; 0600; no silent overwrite."""

from __future__ import annotations

import ipaddress
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key
from cryptography.x509.oid import ExtendedKeyUsageOID

from mlip_fed.cli.certs import main as certs_main


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_all_makes_a_verifiable_chain_and_flower_loadable_keys(tmp_path: Path) -> None:
    assert certs_main(["all", "--out", str(tmp_path), "--sites", "h1", "h2", "--dns", "link.example.org"]) == 0
    ca = x509.load_pem_x509_certificate((tmp_path / "ca.crt").read_bytes())
    server = x509.load_pem_x509_certificate((tmp_path / "server.pem").read_bytes())
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert isinstance(ca.public_key(), ec.EllipticCurvePublicKey) and ca.public_key().curve.name == "secp256r1"
    server.verify_directly_issued_by(ca)  # raises if the signature or issuer does not match
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(sans.get_values_for_type(x509.DNSName)) == {"localhost", "link.example.org"}
    assert sans.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    eku = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    for site in ("h1", "h2"):
        private = load_ssh_private_key((tmp_path / "sites" / f"{site}.key").read_bytes(), None)
        public = load_ssh_public_key((tmp_path / "sites" / f"{site}.pub").read_bytes())
        assert isinstance(private, ec.EllipticCurvePrivateKey)
        assert private.public_key().public_numbers() == public.public_numbers()  # type: ignore[union-attr]
        assert _mode(tmp_path / "sites" / f"{site}.key") == 0o600
    assert _mode(tmp_path / "ca.key") == 0o600 and _mode(tmp_path / "server.key") == 0o600


def test_refuses_to_overwrite_without_force(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert certs_main(["ca", "--out", str(tmp_path)]) == 0
    assert certs_main(["site", "--out", str(tmp_path), "h1"]) == 0
    before = (tmp_path / "sites" / "h1.key").read_bytes()
    ca_before = (tmp_path / "ca.key").read_bytes()
    assert certs_main(["site", "--out", str(tmp_path), "h1"]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err
    assert (tmp_path / "sites" / "h1.key").read_bytes() == before
    # `all` is all-or-nothing: an existing site key stops it before a new CA is written
    assert certs_main(["all", "--out", str(tmp_path), "--sites", "h1"]) == 2
    assert (tmp_path / "ca.key").read_bytes() == ca_before and not (tmp_path / "server.pem").exists()
    assert certs_main(["site", "--out", str(tmp_path), "h1", "--force"]) == 0
    assert (tmp_path / "sites" / "h1.key").read_bytes() != before


def test_superlink_needs_a_ca_and_bad_inputs_are_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert certs_main(["superlink", "--out", str(tmp_path)]) == 2
    assert "mlip-certs ca" in capsys.readouterr().err
    assert certs_main(["ca", "--out", str(tmp_path)]) == 0
    assert certs_main(["superlink", "--out", str(tmp_path), "--ip", "link.example.org"]) == 2
    assert "'link.example.org' is not an IP address" in capsys.readouterr().err
    assert certs_main(["site", "--out", str(tmp_path), "../escape"]) == 2
    assert not (tmp_path.parent / "escape.key").exists()
