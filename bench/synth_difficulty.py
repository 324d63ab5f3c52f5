"""How hard is SynthCXR? A raw-pixel logistic regression per CheXpert category.

If a linear model on raw pixels is near perfect the benchmark cannot tell encoders apart; if it is
at chance the findings may be invisible. Target: macro AUROC around 0.65-0.80. Writes a markdown
table (with the command that made it) to ``docs/synthcxr.md``'s generated section.

    python bench/synth_difficulty.py --sites 3 --studies-per-site 1000 --image-size 64 --seed 0
"""

from __future__ import annotations

import argparse
import csv
import math
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.preprocessing import StandardScaler

from mlip_fed.data.synthetic.write import generate_federation
from mlip_fed.knowledge.kb import CHEXPERT_CATEGORIES

BLOCK = "synth_difficulty"


def load(manifests: list[Path], resolution: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Images downsampled to ``resolution``², labels (1/-1 → positive: the finding is drawn) and split."""
    xs, ys, splits = [], [], []
    for manifest in manifests:
        with manifest.open(encoding="utf-8", newline="") as handle:
            for row in csv.DictReader(handle):
                image = Image.open(manifest.parent / row["image_path"])
                if image.size != (resolution, resolution):
                    image = image.resize((resolution, resolution), Image.Resampling.BOX)
                xs.append(np.asarray(image, dtype=np.float32).ravel() / 255.0)
                ys.append([1.0 if row[c] in ("1.0", "-1.0") else 0.0 for c in CHEXPERT_CATEGORIES])
                splits.append(row["split"])
    return np.stack(xs), np.array(ys), np.array(splits)


def evaluate(x: np.ndarray, y: np.ndarray, split: np.ndarray, seed: int) -> dict[str, float]:
    train, test = split == "train", split == "test"
    scaler = StandardScaler().fit(x[train])
    xtr, xte = scaler.transform(x[train]), scaler.transform(x[test])
    aucs = {}
    for j, category in enumerate(CHEXPERT_CATEGORIES):
        if len(set(y[train, j])) < 2 or len(set(y[test, j])) < 2:
            aucs[category] = math.nan
            continue
        model = LogisticRegression(C=0.01, max_iter=300, random_state=seed)
        model.fit(xtr, y[train, j])
        aucs[category] = float(roc_auc_score(y[test, j], model.decision_function(xte)))
    return aucs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--studies-per-site", type=int, default=1000)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resolutions", default="32,64")
    parser.add_argument("--doc", type=Path, default=Path("docs/synthcxr.md"))
    parser.add_argument("--no-doc", action="store_true", help="print the table only")
    parser.add_argument("--label", default="current generator", help="row label in the table")
    args = parser.parse_args(argv)
    command = "python bench/synth_difficulty.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        cpu = time.process_time()
        manifests = generate_federation(tmp, args.sites, args.studies_per_site, args.image_size, args.seed)
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu
        results = {}
        for resolution in (int(r) for r in args.resolutions.split(",")):
            x, y, split = load(manifests, resolution)
            results[resolution] = evaluate(x, y, split, args.seed)
            positives = y[split == "test"].sum(axis=0)

    lines = [
        f"Command: `{command}` ({args.label}).",
        "",
        f"Generation of {args.sites}×{args.studies_per_site} studies at {args.image_size}²: "
        f"{wall:.1f} s wall, {cpu:.1f} s CPU (one process).",
        "",
        "| category | test positives | " + " | ".join(f"AUROC {r}²" for r in results) + " |",
        "|---|---:|" + "---:|" * len(results),
    ]
    for j, category in enumerate(CHEXPERT_CATEGORIES):
        cells = " | ".join(
            "n/a" if math.isnan(results[r][category]) else f"{results[r][category]:.3f}" for r in results
        )
        lines.append(f"| {category} | {int(positives[j])} | {cells} |")
    macro = " | ".join(f"**{np.nanmean(list(results[r].values())):.3f}**" for r in results)
    lines.append(f"| **macro** | | {macro} |")
    table = "\n".join(lines)
    print(table)
    if not args.no_doc:
        from bench.docs_block import replace_block

        replace_block(args.doc, BLOCK, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
