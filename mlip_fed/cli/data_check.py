"""``mlip-data check``: load a site's data exactly as training would and say what was lost, and why.

A site runs this before joining a federation: it reads the manifest (or MIMIC-CXR-JPG / CheXpert
tree), decodes every image once, and prints per source what loaded and what was skipped per
reason with examples. Exit code 0 when at least one study loaded, 1 when nothing did, 2 on a
configuration error (bad columns, missing folder) raised by the reader.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

from mlip_fed.cli.help_format import describe, subparser_options
from mlip_fed.data.chexpert import POLICIES, read_chexpert
from mlip_fed.data.dataset import validate_records
from mlip_fed.data.manifest import read_manifest
from mlip_fed.data.mimic import read_mimic
from mlip_fed.data.records import SkipReport, StudyRecord

Loader = Callable[[], tuple[list[StudyRecord], SkipReport]]


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "check",
        help="load and decode every study as training would; report what was skipped and why",
        description=describe(__doc__),
        **subparser_options(),
    )
    parser.add_argument(
        "--manifest", action="append", default=[], metavar="FILE.csv", help="site manifest (repeatable)"
    )
    parser.add_argument("--mimic-root", metavar="DIR", help="MIMIC-CXR-JPG root (holds files/ and the CSVs)")
    parser.add_argument("--mimic-reports", metavar="DIR", help="MIMIC-CXR reports root, if not under --mimic-root")
    parser.add_argument("--chexpert-csv", metavar="FILE", help="CheXpert train.csv / valid.csv")
    parser.add_argument("--chexpert-root", metavar="DIR", help="folder that the CSV's Path column is relative to")
    parser.add_argument("--chexpert-policy", choices=POLICIES, default="keep", help="uncertain-label policy")
    parser.add_argument("--splits", nargs="+", metavar="SPLIT", help="only these splits (train val test)")
    parser.add_argument("--views", nargs="+", default=["PA", "AP"], help="MIMIC views to keep")
    parser.add_argument("--all-views", action="store_true", help="keep every view (MIMIC and CheXpert)")
    parser.add_argument("--no-decode", action="store_true", help="skip decoding images (only check files exist)")
    parser.set_defaults(func=run)


def _loaders(args: argparse.Namespace) -> list[tuple[str, Loader]]:
    loaders: list[tuple[str, Loader]] = []
    for manifest in args.manifest:
        loaders.append((f"manifest {manifest}", lambda m=manifest: read_manifest(m, splits=args.splits)))
    if args.mimic_root:
        views = None if args.all_views else args.views
        loaders.append(
            (
                f"MIMIC-CXR-JPG {args.mimic_root}",
                lambda: read_mimic(args.mimic_root, reports_root=args.mimic_reports, views=views, splits=args.splits),
            )
        )
    elif args.mimic_reports:
        raise ValueError("--mimic-reports needs --mimic-root")
    if bool(args.chexpert_csv) != bool(args.chexpert_root):
        raise ValueError("--chexpert-csv and --chexpert-root go together")
    if args.chexpert_csv:
        loaders.append(
            (
                f"CheXpert {args.chexpert_csv}",
                lambda: read_chexpert(
                    args.chexpert_csv,
                    args.chexpert_root,
                    policy=args.chexpert_policy,
                    frontal_only=not args.all_views,
                ),
            )
        )
    if not loaders:
        raise ValueError("nothing to check: give --manifest, --mimic-root or --chexpert-csv/--chexpert-root")
    return loaders


def run(args: argparse.Namespace) -> int:
    total_loaded = 0
    for name, load in _loaders(args):
        records, report = load()
        if not args.no_decode:
            records, decoded = validate_records(records, progress=True)
            report.merge(decoded)
            report.loaded = len(records)
        total_loaded += len(records)
        patients = len({r.patient_id for r in records})
        splits = ", ".join(f"{s}={sum(r.split == s for r in records)}" for s in sorted({r.split for r in records}))
        print(f"== {name}")
        print(f"   {len(records)} images, {patients} patients" + (f" ({splits})" if splits else ""))
        for line in report.summary().splitlines():
            print(f"   {line}")
    print(f"total loaded: {total_loaded}")
    return 0 if total_loaded > 0 else 1
