"""``mlip-client --site-config site.yaml [--check]``: a hospital joins the federation.

``--check`` validates the site YAML and loads (and decodes) every study with the project's readers,
printing counts and skipped files by reason, without connecting anywhere. Without it the launcher
runs the same validation, then starts ``flower-supernode`` with TLS, node authentication and the
site YAML as node config, and stays its parent (signals forwarded, exit codes explained). Every
ClientApp the SuperNode starts first checks the run's FAB against ``approved_fab_hashes``
(``mlip_fed.deploy.fab_guard``); with none approved the launcher does not start.

Exit status: 0 done; 1 the SuperNode failed (message says why); 2 a bad site config, no approved FAB or no
usable data.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from mlip_fed.cli.help_format import HelpFormatter, describe
from mlip_fed.config import ConfigError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mlip-client", description=describe(__doc__), formatter_class=HelpFormatter)
    parser.add_argument("--site-config", required=True, type=Path, metavar="SITE.yaml", help="the site's YAML")
    parser.add_argument(
        "--check", action="store_true", help="validate the config and the data (counts, skips), then exit"
    )
    parser.add_argument("--no-decode", action="store_true", help="with --check: only check that files exist")
    parser.add_argument("--print-command", action="store_true", help="print the flower-supernode command line and exit")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from mlip_fed.deploy.site_config import check_site_data, load_site_config
    from mlip_fed.deploy.supernode import explain_exit, run_supernode, site_supernode_env, supernode_command

    args = build_parser().parse_args(argv)
    try:
        site = load_site_config(args.site_config)
        cmd = supernode_command(site, args.site_config)
    except (ConfigError, FileNotFoundError) as err:
        print(f"mlip-client: {err}", file=sys.stderr)
        return 2
    if args.print_command:
        print(" ".join(cmd))
        return 0
    if args.check:
        try:
            found = check_site_data(site, decode=not args.no_decode)
        except (ConfigError, ValueError, OSError) as err:
            print(f"mlip-client: {site.site_id}: data check failed: {err}", file=sys.stderr)
            return 2
        print(f"site {site.site_id}: config OK ({Path(args.site_config).resolve()})")
        print(f"  superlink {site.superlink}, device {site.device}, privacy {site.privacy.mechanism}")
        print(f"  data: {site.data.source} {site.data.manifest or site.data.root}")
        print(f"  approved FABs: {', '.join(site.approved_fab_hashes) or 'none (joining is refused until one is set)'}")
        for line in found.summary().splitlines():
            print(f"  {line}")
        if found.train == 0:
            print(f"mlip-client: {site.site_id}: no usable training study; the site cannot join", file=sys.stderr)
            return 2
        return 0
    if not site.approved_fab_hashes:
        print(
            f"mlip-client: {site.site_id}: approved_fab_hashes is empty in {Path(args.site_config).resolve()}: this "
            "site would refuse every app the server sends. Add the FAB's SHA-256 the operator prints with "
            "`mlip-certs fab-hash` (check it against the .fab file they send: sha256sum)",
            file=sys.stderr,
        )
        return 2
    site.state_dir.mkdir(parents=True, exist_ok=True)
    env = site_supernode_env(site)
    approved = ", ".join(h[:12] for h in site.approved_fab_hashes)
    print(
        f"mlip-client: {site.site_id}: starting flower-supernode -> {site.superlink} (TLS, node auth, "
        f"FABs pinned: {approved})",
        flush=True,
    )
    reason = explain_exit(run_supernode(cmd, env), site)
    if reason is None:
        return 0
    print(f"mlip-client: {site.site_id}: {reason}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
