"""``mlip-certs``: the federation's CA, the SuperLink's TLS certificate, and one node key pair per site.

    mlip-certs ca        --out certs/
    mlip-certs superlink --out certs/ [--dns superlink.example.org] [--ip 10.0.0.5]
    mlip-certs site      --out certs/ hospital_a hospital_b ...
    mlip-certs all       --out certs/ --sites hospital_a hospital_b hospital_c
    mlip-certs fab-hash  [APP_DIR] [--fab-out DIR]

Private keys are written 0600; an existing file is never replaced without ``--force``. ``fab-hash`` prints the
SHA-256 of the app's FAB (``flwr build``; the bytes ``flwr run`` sends): what each site pins in
``approved_fab_hashes``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from mlip_fed.cli.help_format import HelpFormatter, describe, subparser_options
from mlip_fed.deploy import certs


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mlip-certs", description=describe(__doc__), formatter_class=HelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--out", type=Path, required=True, metavar="DIR", help="certificate folder")
        p.add_argument("--force", action="store_true", help="replace existing files (locks out registered keys)")

    def sans(p: argparse.ArgumentParser) -> None:
        p.add_argument("--dns", nargs="*", default=[], metavar="NAME", help="extra DNS SANs (localhost is always in)")
        p.add_argument("--ip", nargs="*", default=[], metavar="IP", help="extra IP SANs (127.0.0.1 is always in)")

    common(sub.add_parser("ca", help="create the federation's CA (ca.crt, ca.key)", **subparser_options()))
    p = sub.add_parser(
        "superlink",
        help="the SuperLink's TLS certificate signed by the CA (server.pem, server.key)",
        **subparser_options(),
    )
    common(p)
    sans(p)
    p = sub.add_parser("site", help="EC key pair per site (sites/<id>.key 0600, sites/<id>.pub)", **subparser_options())
    common(p)
    p.add_argument("site_ids", nargs="+", metavar="SITE_ID", help="one key pair per site id")
    p = sub.add_parser("all", help="CA + SuperLink certificate + site keys in one go", **subparser_options())
    common(p)
    sans(p)
    p.add_argument("--sites", nargs="+", required=True, metavar="SITE_ID", help="one key pair per site id")
    p = sub.add_parser(
        "fab-hash",
        help="SHA-256 of the app's FAB as flwr run sends it (what sites pin in approved_fab_hashes)",
        **subparser_options(),
    )
    p.add_argument("app", nargs="?", type=Path, default=Path("."), help="the Flower app folder (its pyproject.toml)")
    p.add_argument("--fab-out", type=Path, metavar="DIR", help="also keep the .fab there, for the sites to read")
    return parser


def _fab_hash(args: argparse.Namespace) -> None:
    import tempfile

    from mlip_fed.deploy.fab_guard import build_fab, fab_sha256

    with tempfile.TemporaryDirectory(prefix="mlip-fab-") as tmp:
        fab = build_fab(args.app, args.fab_out if args.fab_out is not None else Path(tmp))
        print(f"{fab_sha256(fab.read_bytes())}  {fab.name if args.fab_out is None else fab}")


def _superlink(args: argparse.Namespace) -> None:
    dns = list(dict.fromkeys([*certs.DEFAULT_DNS, *args.dns]))
    ips = list(dict.fromkeys([*certs.DEFAULT_IPS, *args.ip]))
    cert, key = certs.write_server_cert(args.out, dns, ips, force=args.force)
    print(f"superlink certificate {cert} (SANs: {', '.join([*dns, *ips])}), key {key} (0600)")


def _sites(args: argparse.Namespace, site_ids: Sequence[str]) -> None:
    for site_id in site_ids:
        paths = certs.write_site_keys(args.out, site_id, force=args.force)
        print(f"site {site_id}: private key {paths.private} (0600), public key {paths.public}")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "fab-hash":
            _fab_hash(args)
            return 0
        if args.command == "all":  # all-or-nothing: no new CA next to an old site key
            out = Path(args.out)
            targets = [out / certs.CA_CERT, out / certs.CA_KEY, out / certs.SERVER_CERT, out / certs.SERVER_KEY]
            for site_id in args.sites:
                paths = certs.site_key_paths(out, site_id)
                targets += [paths.private, paths.public]
            certs.refuse_existing(targets, args.force)
        if args.command in ("ca", "all"):
            cert, key = certs.write_ca(args.out, force=args.force)
            print(f"CA certificate {cert}, key {key} (0600; keep it offline)")
        if args.command in ("superlink", "all"):
            _superlink(args)
        if args.command == "site":
            _sites(args, args.site_ids)
        if args.command == "all":
            _sites(args, args.sites)
    except (FileExistsError, FileNotFoundError, ValueError) as err:
        print(f"mlip-certs: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
