"""Real-language check of the labeler: IU X-Ray (Open-I) reports against their MeSH indexing.

Usage (from the repository root)::

    python bench/labeler_iu.py --reports ../shared/data/iu_xray_reports_dev.csv [--split tune] [--out docs/labeler.md]

The dev file is split once, by report id, into a 70 % *tune* part (the only part a labeler change
may be developed and debugged on; ``--errors`` lists its misses) and a fixed 30 % *holdout* part
(seeded hash of the uid, so it never depends on row order or on the labeler). ``--split holdout``
and ``--split all`` are scored only when a change is finished, to report how the rules carry to
reports they were not tuned on. ``--split`` takes several names; with ``--out`` each split's table
goes between its own pair of markers in the page.

Open-I's MeSH headings were assigned by human indexers reading the report, so they are an
independent ground truth for POSITIVE findings (absence of a heading is not a confirmed negative,
which is why only positive labels are scored). The mapping below turns headings into CheXpert
categories with the CheXpert labeler's semantics: Lung Opacity is the category the labeler emits
for opacity / infiltrate / airspace disease / scar / interstitial wording, while Atelectasis,
Consolidation, Pneumonia, Edema and Lung Lesion are their own columns (the labeler does not copy
them into Lung Opacity, so neither does the ground truth). The rationale for every choice is in
``docs/labeler.md``. The data file stays outside the repository; only metrics are written.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import math
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

from mlip_fed.knowledge.kb import CHEXPERT_CATEGORIES
from mlip_fed.knowledge.labeler import label_reports

#: The nine categories the goal is stated on (enough IU support, unambiguous MeSH).
SCORED: tuple[str, ...] = (
    "Cardiomegaly",
    "Pleural Effusion",
    "Atelectasis",
    "Lung Opacity",
    "Edema",
    "Pneumothorax",
    "Lung Lesion",
    "Fracture",
    "Support Devices",
)
#: Reported but not part of the goal (too few cases or a fuzzy MeSH counterpart).
REPORTED: tuple[str, ...] = ("Consolidation", "Pneumonia", "Enlarged Cardiomediastinum", "Pleural Other")

#: Heading (text before the first "/") → category, whatever the qualifiers.
_HEADING: dict[str, str] = {
    "cardiomegaly": "Cardiomegaly",
    "pleural effusion": "Pleural Effusion",
    "pulmonary atelectasis": "Atelectasis",
    "atelectasis": "Atelectasis",
    "volume loss": "Atelectasis",
    "opacity": "Lung Opacity",
    "airspace disease": "Lung Opacity",
    "infiltrate": "Lung Opacity",
    "lung diseases, interstitial": "Lung Opacity",
    "pulmonary edema": "Edema",
    "pulmonary congestion": "Edema",
    "heart failure": "Edema",
    "pneumothorax": "Pneumothorax",
    "hydropneumothorax": "Pneumothorax",
    "nodule": "Lung Lesion",
    "mass": "Lung Lesion",
    "cavitation": "Lung Lesion",
    "neoplasms": "Lung Lesion",
    "lung neoplasms": "Lung Lesion",
    "fractures, bone": "Fracture",
    "rib fractures": "Fracture",
    "catheters, indwelling": "Support Devices",
    "surgical instruments": "Support Devices",
    "implanted medical device": "Support Devices",
    "medical device": "Support Devices",
    "tube, inserted": "Support Devices",
    "stents": "Support Devices",
    "sutures": "Support Devices",
    "pacemaker, artificial": "Support Devices",
    "defibrillators, implantable": "Support Devices",
    "heart valve prosthesis": "Support Devices",
    "consolidation": "Consolidation",
    "pneumonia": "Pneumonia",
    "pulmonary fibrosis": "Pleural Other",
}
#: Qualifiers that move a heading off the lung (a breast mass is not a Lung Lesion).
_NON_LUNG = frozenset({"breast", "heart", "ribs", "abdomen", "thorax", "mediastinum", "shoulder", "humerus"})
_LUNG_SITES = frozenset({"lung", "retrocardiac", "costophrenic angle"})


def mesh_categories(mesh: str) -> set[str]:
    """CheXpert categories asserted by one report's ``;``-separated, ``/``-qualified MeSH headings."""
    found: set[str] = set()
    for term in mesh.split(";"):
        parts = [p.strip().lower() for p in term.split("/") if p.strip()]
        if not parts:
            continue
        head, qualifiers = parts[0], set(parts[1:])
        if head in ("nodule", "mass", "opacity") and qualifiers & _NON_LUNG and not qualifiers & _LUNG_SITES:
            continue
        if head in ("opacity", "infiltrate") and "round" in qualifiers:  # a round opacity is a nodule
            found.add("Lung Lesion")
            continue
        if head == "cicatrix":  # scar: lung scar is Lung Opacity in CheXpert, pleural scar is Pleural Other
            if "pleura" in qualifiers:
                found.add("Pleural Other")
            elif not qualifiers & _NON_LUNG:
                found.add("Lung Opacity")
        elif head == "density":  # only densities placed in the lung; a round one is a lesion
            if qualifiers & _LUNG_SITES:
                found.add("Lung Lesion" if "round" in qualifiers else "Lung Opacity")
        elif head == "markings":  # interstitial markings are opacity; bronchovascular crowding is not
            if "interstitial" in qualifiers:
                found.add("Lung Opacity")
        elif head == "thickening":
            if "pleura" in qualifiers:
                found.add("Pleural Other")
            elif "bronchi" in qualifiers:
                found.add("Lung Opacity")
        elif head == "cardiac shadow":
            if "enlarged" in qualifiers:
                found.add("Cardiomegaly")
        elif head == "mediastinum":
            if qualifiers & {"enlarged", "prominent", "widened"}:
                found.add("Enlarged Cardiomediastinum")
        elif head in _HEADING:
            found.add(_HEADING[head])
    return found


#: The held-out part of the dev file: this fraction of report ids, chosen by a seeded hash.
HOLDOUT_FRACTION = 0.30
HOLDOUT_SEED = "mlip-fed-labeler-holdout-v1"
SPLITS: tuple[str, ...] = ("tune", "holdout", "all")


def _uid_rank(uid: str) -> str:
    return hashlib.sha256(f"{HOLDOUT_SEED}:{uid.strip()}".encode()).hexdigest()


def holdout_ids(uids: list[str], fraction: float = HOLDOUT_FRACTION) -> frozenset[str]:
    """The ``fraction`` of report ids with the smallest seeded hash: fixed for a given file."""
    ordered = sorted({u.strip() for u in uids}, key=_uid_rank)
    return frozenset(ordered[: round(fraction * len(ordered))])


def select_split(rows: list[dict[str, str]], split: str) -> list[dict[str, str]]:
    """Rows of one split: ``tune`` (70 %), ``holdout`` (30 %) or ``all``."""
    if split == "all":
        return rows
    held = holdout_ids([r["uid"] for r in rows])
    if split == "holdout":
        return [r for r in rows if r["uid"].strip() in held]
    if split == "tune":
        return [r for r in rows if r["uid"].strip() not in held]
    raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")


@dataclass
class Counts:
    tp: int = 0
    fp: int = 0
    fn: int = 0
    support: int = 0
    fp_ids: list[str] = field(default_factory=list)
    fn_ids: list[str] = field(default_factory=list)

    def prf(self) -> tuple[float, float, float]:
        p = self.tp / (self.tp + self.fp) if self.tp + self.fp else 0.0
        r = self.tp / (self.tp + self.fn) if self.tp + self.fn else 0.0
        f = 2 * p * r / (p + r) if p + r else 0.0
        return p, r, f


def _text(row: dict[str, str]) -> str:
    cells = [(row.get(c) or "").strip() for c in ("findings", "impression")]
    return "\n\n".join(c for c in cells if c and c.lower() != "none")


def evaluate(rows: list[dict[str, str]], uncertain_positive: bool) -> tuple[dict[str, Counts], list[int]]:
    """Per-category counts; reports with no text or no MeSH indexing are left out (nothing to judge)."""
    kept = [i for i, r in enumerate(rows) if _text(r) and r["MeSH"].strip().lower() != "no indexing"]
    labeled = label_reports([_text(rows[i]) for i in kept])
    counts = {c: Counts() for c in CHEXPERT_CATEGORIES}
    for i, result in zip(kept, labeled, strict=True):
        row = rows[i]
        truth = mesh_categories(row["MeSH"])
        if row["MeSH"].strip().lower() == "normal":
            truth.add("No Finding")
        for category, value in zip(CHEXPERT_CATEGORIES, result.labels, strict=True):
            predicted = value == 1.0 or (uncertain_positive and value == -1.0 and not math.isnan(value))
            actual = category in truth
            cell = counts[category]
            cell.support += actual
            if predicted and actual:
                cell.tp += 1
            elif predicted:
                cell.fp += 1
                cell.fp_ids.append(row["uid"])
            elif actual:
                cell.fn += 1
                cell.fn_ids.append(row["uid"])
    return counts, kept


def micro(counts: dict[str, Counts]) -> tuple[float, float, float]:
    total = Counts(
        tp=sum(counts[c].tp for c in SCORED),
        fp=sum(counts[c].fp for c in SCORED),
        fn=sum(counts[c].fn for c in SCORED),
    )
    return total.prf()


def table(counts: dict[str, Counts], counts_u: dict[str, Counts]) -> list[str]:
    lines = [
        "| category | support | precision | recall | F1 | F1 if -1 counted positive |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for category in (*SCORED, *REPORTED, "No Finding"):
        p, r, f = counts[category].prf()
        fu = counts_u[category].prf()[2]
        name = category if category in SCORED else f"{category} (unscored)"
        lines.append(f"| {name} | {counts[category].support} | {p:.3f} | {r:.3f} | {f:.3f} | {fu:.3f} |")
    p, r, f = micro(counts)
    fu = micro(counts_u)[2]
    lines.append(
        f"| **micro (nine scored)** | {sum(counts[c].support for c in SCORED)} | {p:.3f} | {r:.3f} | "
        f"**{f:.3f}** | {fu:.3f} |"
    )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reports", required=True, type=Path, help="IU X-Ray reports CSV (uid, MeSH, findings, ...)")
    parser.add_argument(
        "--split",
        nargs="+",
        choices=SPLITS,
        default=["tune"],
        help="tune (70 %%, develop on this), holdout (fixed 30 %%, score only when a change is done) or all",
    )
    parser.add_argument("--out", type=Path, default=None, help="markdown file to write (e.g. docs/labeler.md)")
    parser.add_argument(
        "--errors", type=int, default=0, help="print up to N false positive/negative uids per category (tune only)"
    )
    args = parser.parse_args(argv)
    if not args.reports.is_file():
        raise SystemExit(f"reports file not found: {args.reports}")
    if args.errors and set(args.split) != {"tune"}:
        raise SystemExit("--errors lists misses of the tune split only: the held-out reports are not for debugging")
    with args.reports.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    missing = {"uid", "MeSH", "findings", "impression"} - set(rows[0] if rows else ())
    if missing:
        raise SystemExit(f"{args.reports}: missing column(s) {sorted(missing)}")

    command = "python bench/labeler_iu.py " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])
    )
    for split in dict.fromkeys(args.split):
        part = select_split(rows, split)
        counts, kept = evaluate(part, uncertain_positive=False)
        counts_u, _ = evaluate(part, uncertain_positive=True)
        lines = table(counts, counts_u)
        print(f"split {split}: {len(kept)} of {len(part)} reports scored")
        print("\n".join(lines))
        if args.errors:
            for category in (*SCORED, *REPORTED):
                cell = counts[category]
                print(f"{category}: FP {cell.fp_ids[: args.errors]} FN {cell.fn_ids[: args.errors]}")
        if args.out is not None:
            _write_doc(args.out, split, lines, len(kept), len(part), len(rows), command)
    return 0


def block_name(split: str) -> str:
    """The docs block of one split's table."""
    return f"labeler_iu_{split}"


_SPLIT_WORDS = {
    "tune": f"the {1 - HOLDOUT_FRACTION:.0%} tune split, the only part rules are developed on",
    "holdout": f"the fixed {HOLDOUT_FRACTION:.0%} held-out split, scored only when a change is finished",
    "all": "the whole dev file",
}


def _write_doc(path: Path, split: str, lines: list[str], kept: int, total: int, rows: int, command: str) -> None:
    """Replace this split's block so the rest of the page survives reruns."""
    from bench.docs_block import replace_block

    block = [
        f"Made by `{command}`: {_SPLIT_WORDS[split]} ({total} of {rows} reports; {kept} scored, i.e. with",
        "findings or impression text and a MeSH indexing other than `No Indexing`).",
        "",
        *lines,
    ]
    replace_block(path, block_name(split), "\n".join(block))


if __name__ == "__main__":
    sys.exit(main())
