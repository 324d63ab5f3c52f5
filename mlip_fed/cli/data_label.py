"""``mlip-data label``: CheXpert-style labels for a CSV of reports.

The output matches the CheXpert labeler's ``labeled_reports.csv`` (a ``Reports`` column, then the
14 observations as 1.0 / 0.0 / -1.0 / blank) so existing tooling that reads that file reads ours.
"""

from __future__ import annotations

import argparse
import csv
import io
import math
from pathlib import Path

from mlip_fed.cli.help_format import describe, subparser_options
from mlip_fed.io import atomic_write_text
from mlip_fed.knowledge.kb import CHEXPERT_CATEGORIES

#: Cells that mean "no text" in exported report tables (IU X-Ray writes "None").
_EMPTY_CELLS = frozenset({"", "none", "nan", "null"})


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "label",
        help="label reports with the CheXpert-compatible labeler",
        description=describe(__doc__),
        **subparser_options(),
    )
    parser.add_argument("--reports", required=True, type=Path, help="CSV file with one report per row")
    parser.add_argument(
        "--text-columns",
        default="findings,impression",
        help="comma-separated columns joined (blank line between) into the text that is labelled",
    )
    parser.add_argument("--out", required=True, type=Path, help="output CSV (Reports + 14 CheXpert columns)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    columns = [c.strip() for c in args.text_columns.split(",") if c.strip()]
    texts = read_report_texts(args.reports, columns)
    # Imported here so `mlip-data --help` stays cheap.
    from mlip_fed.knowledge.labeler import label_reports

    labeled = label_reports(texts)
    write_labels(args.out, texts, [r.labels for r in labeled])
    print(f"labelled {len(texts)} reports from {args.reports} -> {args.out}")
    return 0


def read_report_texts(path: Path, columns: list[str]) -> list[str]:
    """One text per row: the non-empty ``columns`` joined by a blank line (a sentence boundary)."""
    if not columns:
        raise ValueError("--text-columns: no column named")
    if not path.is_file():
        raise FileNotFoundError(f"reports file not found: {path}")
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        header = reader.fieldnames or []
        missing = [c for c in columns if c not in header]
        if missing:
            raise ValueError(f"{path}: missing column(s) {missing}; the file has {header}")
        return [
            "\n\n".join(cell.strip() for c in columns if (cell := row[c] or "").strip().lower() not in _EMPTY_CELLS)
            for row in reader
        ]


def write_labels(path: Path, texts: list[str], labels: list[tuple[float, ...]]) -> None:
    """Write atomically (temp file, fsync, rename) so a crash never leaves half a label file."""
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer)
    writer.writerow(["Reports", *CHEXPERT_CATEGORIES])
    for text, row in zip(texts, labels, strict=True):
        writer.writerow([text, *(_cell(v) for v in row)])
    atomic_write_text(path, buffer.getvalue())


def _cell(value: float) -> str:
    return "" if math.isnan(value) else f"{value:.1f}"
