"""``mlip-data synth``: write a SynthCXR federation (one manifest per simulated hospital).

The summary is read back from the written manifests, so what it prints is what a reader will load.
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

from mlip_fed.cli.help_format import describe, subparser_options
from mlip_fed.data.synthetic.findings import DIFFICULTY_NAMES
from mlip_fed.data.synthetic.write import generate_federation
from mlip_fed.knowledge.kb import CHEXPERT_CATEGORIES


def _sizes(text: str) -> int | list[int]:
    """``200`` (every site) or ``600,250,150`` (one size per site, for imbalanced federations)."""
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--studies-per-site: expected an integer or a comma list, got {text!r}"
        ) from None
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"--studies-per-site: sizes must be >= 1, got {text!r}")
    return values[0] if len(values) == 1 else values


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "synth", help="write a SynthCXR federation", description=describe(__doc__), **subparser_options()
    )
    parser.add_argument("--out", type=Path, required=True, help="output folder (site_<k>/ beneath it)")
    parser.add_argument("--sites", type=int, default=3, help="number of simulated hospitals")
    parser.add_argument("--studies-per-site", type=_sizes, default=200, help="N, or N1,N2,... per site")
    parser.add_argument("--image-size", type=int, default=64, help="side of the square images, in pixels")
    parser.add_argument("--seed", type=int, default=0, help="random seed; the same seed writes byte-identical files")
    parser.add_argument("--dirichlet-alpha", type=float, default=None, help="label skew across sites")
    parser.add_argument("--test-fraction", type=float, default=0.2, help="fraction of patients in test")
    parser.add_argument(
        "--difficulty",
        choices=DIFFICULTY_NAMES,
        default="standard",
        help="finding visibility tier (same studies, reports and labels in every tier; docs/synthcxr.md)",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    sizes = args.studies_per_site
    if isinstance(sizes, list) and len(sizes) != args.sites:
        raise ValueError(f"--studies-per-site lists {len(sizes)} sizes for --sites {args.sites}")
    start = time.perf_counter()
    manifests = generate_federation(
        args.out,
        num_sites=args.sites,
        studies_per_site=sizes,
        image_size=args.image_size,
        seed=args.seed,
        dirichlet_alpha=args.dirichlet_alpha,
        test_fraction=args.test_fraction,
        difficulty=args.difficulty,
    )
    elapsed = time.perf_counter() - start
    print(summarise(manifests))
    print(f"wrote {len(manifests)} site(s) under {args.out} in {elapsed:.1f} s")
    return 0


def summarise(manifests: list[Path]) -> str:
    """Studies, patients, split sizes and per-category prevalence (1.0 / -1.0 shares) per site."""
    header = ["category"] + [m.parent.name for m in manifests]
    table: dict[str, list[str]] = {c: [] for c in CHEXPERT_CATEGORIES}
    counts = []
    for manifest in manifests:
        with manifest.open(encoding="utf-8", newline="") as handle:
            rows = list(csv.DictReader(handle))
        n = len(rows)
        patients = {r["patient_id"] for r in rows}
        test = sum(r["split"] == "test" for r in rows)
        counts.append(f"{manifest.parent.name}: {n} studies, {len(patients)} patients, {n - test} train / {test} test")
        for category in CHEXPERT_CATEGORIES:
            pos = sum(r[category] == "1.0" for r in rows) / max(n, 1)
            unc = sum(r[category] == "-1.0" for r in rows) / max(n, 1)
            table[category].append(f"{100 * pos:5.1f}% (+{100 * unc:4.1f}% unc)")
    width = max(len(c) for c in CHEXPERT_CATEGORIES)
    cell = max(len(v) for values in table.values() for v in values) if manifests else 0
    header_line = "  ".join([header[0].ljust(width), *(h.ljust(cell) for h in header[1:])])
    lines = [*counts, "", "prevalence (label 1.0, and -1.0):", header_line]
    for category in CHEXPERT_CATEGORIES:
        lines.append("  ".join([category.ljust(width), *table[category]]))
    return "\n".join(lines)
