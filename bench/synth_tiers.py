"""SynthCXR difficulty tiers: raw-pixel logistic regression against the supervised ceiling, per tier.

For each tier the same federation (same seed: same studies, reports and labels; only the pixels
differ) is generated, then

* **raw LR**: one logistic regression per category on standardised raw pixels (``bench/synth_difficulty.py``'s
  recipe: C = 0.01, at the image size), fitted on the train split;
* **supervised**: the CPU default image tower trained from scratch with ``objectives=supervised`` (linear
  14-way head, BCE on the CheXpert labels) for a fixed number of steps, then evaluated like any checkpoint:
  the frozen-encoder linear probe (100 % of the train labels, ``eval.linear_probe`` defaults). The head's
  own AUROC is reported beside it.

AUROC per category with 1.0 and -1.0 as positive (the finding is drawn; the probe's ``u_ones``). With
``--split val`` a seeded fifth of the train patients is held out and scored instead of the test split:
tune on that, report on ``--split test``. Writes the calibration table into the ``synth_tiers`` block of ``docs/synthcxr.md``
(``bench.docs_block``; only for ``--split test``).

    python bench/synth_tiers.py --tiers standard cpu --studies-per-site 300 --steps 500 --threads 1
"""

from __future__ import annotations

import argparse
import math
import os
import random
import shlex
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from mlip_fed.knowledge.kb import CHEXPERT_CATEGORIES  # noqa: E402

BLOCK = "synth_tiers"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiers", nargs="+", default=["standard", "cpu"])
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--studies-per-site", type=int, default=300)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0, help="data seed (the model and eval seeds stay fixed)")
    parser.add_argument("--steps", type=int, default=500, help="optimiser steps of the supervised ceiling")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3, help="learning rate of the supervised ceiling")
    parser.add_argument("--arch", default="vit_tiny", help="image tower (model config group)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for training and evaluation")
    parser.add_argument("--split", choices=("test", "val"), default="test", help="what is scored (tune on val)")
    parser.add_argument("--data-root", type=Path, default=None, help="keep generated data here (default: temp)")
    parser.add_argument("--skip-supervised", action="store_true", help="raw LR only")
    parser.add_argument("--doc", type=Path, default=REPO / "docs" / "synthcxr.md")
    parser.add_argument("--no-doc", action="store_true", help="print the table only")
    return parser.parse_args(argv)


def _overrides(tier: str, root: Path, args: argparse.Namespace) -> list[str]:
    return [
        "experiment=synth_cpu",
        f"model={args.arch}",
        "objectives=supervised",
        f"data.root={root}",
        f"data.image_size={args.image_size}",
        f"data.synthetic.num_sites={args.sites}",
        f"data.synthetic.studies_per_site={args.studies_per_site}",
        f"data.synthetic.seed={args.seed}",
        f"data.synthetic.difficulty={tier}",
        f"train.batch_size={args.batch_size}",
        f"train.lr={args.lr}",
        f"train.max_steps={args.steps}",
        "train.epochs=100000",
        f"train.num_threads={args.threads}",
        "train.progress_bar=false",
        "train.log_every=1000000",
        "eval.linear_probe.fractions=[1.0]",
        "eval.zero_shot.enabled=false",
        "eval.retrieval.enabled=false",
        "eval.segmentation.enabled=false",
    ]


def split_records(records: list[Any], split: str, seed: int) -> tuple[list[Any], list[Any]]:
    """(fit, scored) records: train/test, or train minus a seeded fifth of its patients / those patients."""
    train = [r for r in records if r.split == "train"]
    if split == "test":
        return train, [r for r in records if r.split != "train"]
    patients = sorted({r.patient_id for r in train})
    held = set(random.Random(seed).sample(patients, max(1, len(patients) // 5)))
    return [r for r in train if r.patient_id not in held], [r for r in train if r.patient_id in held]


def binary_labels(records: Sequence[Any]) -> np.ndarray:
    """[N, 14]: 1 where the label is 1.0 or -1.0 (the finding is drawn), else 0."""
    return np.array([[1.0 if v in (1.0, -1.0) else 0.0 for v in r.labels] for r in records])


def aurocs(scores: np.ndarray, y: np.ndarray) -> dict[str, float]:
    from mlip_fed.eval.linear_probe import binary_auroc

    return {c: binary_auroc(scores[:, j], y[:, j]) for j, c in enumerate(CHEXPERT_CATEGORIES)}


def raw_pixel_lr(fit: Sequence[Any], scored: Sequence[Any], seed: int) -> dict[str, float]:
    """bench/synth_difficulty.py's recipe on the given records (images at their stored size)."""
    from PIL import Image
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    def pixels(records: Sequence[Any]) -> np.ndarray:
        return np.stack([np.asarray(Image.open(r.image_path), dtype=np.float32).ravel() / 255.0 for r in records])

    x_fit, x_scored = pixels(fit), pixels(scored)
    y_fit, y_scored = binary_labels(fit), binary_labels(scored)
    scaler = StandardScaler().fit(x_fit)
    x_fit, x_scored = scaler.transform(x_fit), scaler.transform(x_scored)
    scores = np.zeros((len(scored), len(CHEXPERT_CATEGORIES)))
    for j in range(len(CHEXPERT_CATEGORIES)):
        if np.unique(y_fit[:, j]).size < 2:
            scores[:, j] = 0.0
            continue
        model = LogisticRegression(C=0.01, max_iter=300, random_state=seed)
        model.fit(x_fit, y_fit[:, j])
        scores[:, j] = model.decision_function(x_scored)
    return aurocs(scores, y_scored)


def supervised(cfg: Any, fit: list[Any], scored: list[Any]) -> dict[str, Any]:
    """Train the ceiling for ``cfg.train.max_steps`` steps; linear-probe and head AUROC on ``scored``."""
    import torch

    from mlip_fed import pipeline
    from mlip_fed.eval.features import extract_features
    from mlip_fed.eval.linear_probe import run_linear_probe

    cpu = time.process_time()
    model, run = pipeline.train_for_steps(cfg, fit)
    cpu = time.process_time() - cpu
    wall = run["train_seconds"]

    device = next(model.parameters()).device
    train_feats = extract_features(model, pipeline.eval_dataset(fit, cfg), cfg.eval.batch_size, device)
    test_feats = extract_features(model, pipeline.eval_dataset(scored, cfg), cfg.eval.batch_size, device)
    probe_cfg = cfg.eval.linear_probe
    probe = run_linear_probe(
        train_feats["pooled"],
        train_feats["labels"],
        test_feats["pooled"],
        test_feats["labels"],
        fractions=(1.0,),
        policy=probe_cfg.policy,
        seed=cfg.eval.seed,
        C=probe_cfg.C,
        c_grid=probe_cfg.c_grid,
        min_count=probe_cfg.min_count,
        max_iter=probe_cfg.max_iter,
    )
    with torch.no_grad():
        head_scores = model.supervised_head(test_feats["pooled"].to(device)).float().cpu().numpy()
    return {
        "probe": {c: probe.fractions[0].per_class.get(c, math.nan) for c in CHEXPERT_CATEGORIES},
        "head": aurocs(head_scores, binary_labels(scored)),
        "wall_s": wall,
        "cpu_s": cpu,
        "steps": run["steps"],
        "epochs": run["steps"] / max(1, pipeline.steps_per_epoch(len(fit), cfg)),
        "images_per_s": run["steps"] * cfg.train.batch_size / max(wall, 1e-9),
        "first_epoch_loss": run["first_epoch"].get("supervised", math.nan),
        "last_epoch_loss": run["last_epoch"].get("supervised", math.nan),
    }


def macro(values: dict[str, float]) -> float:
    finite = [v for v in values.values() if not math.isnan(v)]
    return float(np.mean(finite)) if finite else math.nan


def run_tier(tier: str, root: Path, args: argparse.Namespace) -> dict[str, Any]:
    from mlip_fed import pipeline
    from mlip_fed.config_compose import compose_experiment

    cfg = compose_experiment(_overrides(tier, root / tier, args))
    start, cpu = time.perf_counter(), time.process_time()
    data = pipeline.load_records(cfg.data)
    generation = (time.perf_counter() - start, time.process_time() - cpu)
    fit, scored = split_records([*data.train, *data.test], args.split, args.seed)
    result: dict[str, Any] = {"generation": generation, "n_fit": len(fit), "n_scored": len(scored)}
    result["positives"] = binary_labels(scored).sum(axis=0)
    result["raw_lr"] = raw_pixel_lr(fit, scored, args.seed)
    if not args.skip_supervised:
        result["supervised"] = supervised(cfg, fit, scored)
    return result


def _cell(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.3f}"


def render(results: dict[str, dict[str, Any]], args: argparse.Namespace, command: str) -> str:
    tiers = list(results)
    first = results[tiers[0]]
    with_sup = not args.skip_supervised
    heads = []
    for tier in tiers:
        heads.append(f"{tier}: raw LR")
        if with_sup:
            heads += [f"{tier}: supervised", f"{tier}: head"]
    load = os.getloadavg()
    lines = [
        f"Command: `{command}`.",
        "",
        f"SynthCXR {args.sites} sites × {args.studies_per_site} studies at {args.image_size}², data seed {args.seed}; "
        f"fitted on {first['n_fit']} train studies, scored on the {first['n_scored']} studies of the "
        f"**{args.split}** split. *raw LR*: logistic regression on standardised raw pixels (C = 0.01). "
        f"*supervised*: `objectives=supervised`, `model={args.arch}` from scratch, {args.steps} steps of batch "
        f"{args.batch_size}, lr {args.lr:g}, {args.threads} torch thread(s), then the frozen-encoder linear probe "
        "(100 % labels, `eval.linear_probe` defaults); *head*: the trained 14-way head's own scores.",
        "",
        "| category | positives | " + " | ".join(heads) + " |",
        "|---|---:|" + "---:|" * len(heads),
    ]
    for j, category in enumerate(CHEXPERT_CATEGORIES):
        cells = []
        for tier in tiers:
            res = results[tier]
            cells.append(_cell(res["raw_lr"][category]))
            if with_sup:
                cells += [_cell(res["supervised"]["probe"][category]), _cell(res["supervised"]["head"][category])]
        lines.append(f"| {category} | {int(first['positives'][j])} | " + " | ".join(cells) + " |")
    cells = []
    for tier in tiers:
        res = results[tier]
        cells.append(f"**{_cell(macro(res['raw_lr']))}**")
        if with_sup:
            cells += [
                f"**{_cell(macro(res['supervised']['probe']))}**",
                f"**{_cell(macro(res['supervised']['head']))}**",
            ]
    lines.append("| **macro** | | " + " | ".join(cells) + " |")
    lines.append("")
    for tier in tiers:
        res = results[tier]
        gen_wall, gen_cpu = res["generation"]
        line = f"- `{tier}`: generation {gen_wall:.0f} s wall / {gen_cpu:.0f} s CPU"
        if with_sup:
            sup = res["supervised"]
            line += (
                f"; supervised training {sup['wall_s']:.0f} s wall / {sup['cpu_s']:.0f} s CPU for {sup['steps']} steps "
                f"({sup['epochs']:.1f} epochs, {sup['images_per_s']:.0f} images/s), BCE {sup['first_epoch_loss']:.3f} "
                f"(first epoch) → {sup['last_epoch_loss']:.3f} (last)"
            )
        lines.append(line + ".")
    lines.append(
        f"- Machine: {os.cpu_count()} logical CPUs, load average {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} "
        "(1/5/15 min) at the end; above the core count, other jobs shared the CPU and wall time exceeds CPU time."
    )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    command = "python bench/synth_tiers.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = args.data_root or Path(tmp)
        for tier in args.tiers:
            results[tier] = run_tier(tier, root, args)
            res = results[tier]
            print(f"metric: {tier}_raw_lr_macro = {macro(res['raw_lr']):.4f}", flush=True)
            if "supervised" in res:
                print(f"metric: {tier}_supervised_macro = {macro(res['supervised']['probe']):.4f}", flush=True)
                print(f"metric: {tier}_supervised_head_macro = {macro(res['supervised']['head']):.4f}", flush=True)
                print(f"metric: {tier}_supervised_train_s = {res['supervised']['wall_s']:.1f}", flush=True)
    table = render(results, args, command)
    print(table)
    if not args.no_doc and args.split == "test":
        from bench.docs_block import replace_block

        replace_block(args.doc, BLOCK, table, heading="## Difficulty tiers")
    return 0


if __name__ == "__main__":
    sys.exit(main())
