"""Ablation: CLIP-only → + divergence → + local → + category prototypes → full MLIP, beside the references.

Same data, same number of optimiser steps for every trained row, several pretraining seeds; the probe
protocol of ``mlip_fed.eval.protocol`` on a held-out evaluation pool (``bench/quality.py``): linear probe at
1 / 10 / 100 % of probe-train labels (mean over probe draws, then mean ± std over seeds, bootstrap CI),
gap closed against the supervised ceiling, zero-shot, retrieval and segmentation Dice on probe-test.
Rows: raw-pixel LR, random init, supervised ceiling, the five pretraining variants.

Each (row, seed) writes ``<work-dir>/runs/<row>_seed<seed>.json``; a rerun skips finished runs, so the
bench can be split across sessions or processes (``--no-report``) and collected with ``--report-only``.

    python bench/ablation.py --seeds 0 1 2 --studies-per-site 2000 --steps 2000
"""

from __future__ import annotations

import argparse
import math
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.quality import (  # noqa: E402
    Pool,
    evaluate_encoder,
    load_pool,
    probe_mean,
    raw_pixel_probe,
    run_once,
    seed_stats,
    site_identity_probe,
)
from mlip_fed.eval.protocol import ProbeProtocol, detectable_difference, gap_closed  # noqa: E402

VARIANTS: tuple[tuple[str, str], ...] = (
    ("clip_only", "CLIP-only (plain ITC)"),
    ("divergence", "+ divergence encoder"),
    ("local", "+ token-knowledge-patch alignment"),
    ("category", "+ knowledge-guided category prototypes"),
    ("full", "+ ITM and text swapping = full MLIP"),
)
REFERENCES: tuple[tuple[str, str], ...] = (
    ("site_identity", "hospital identity only (reference: one-hot site)"),
    ("raw_pixel", "raw-pixel LR (reference)"),
    ("random_init", "random-init encoder (reference)"),
    ("supervised", "supervised ceiling (reference: labels, BCE)"),
)
FRACTIONS = (0.01, 0.1, 1.0)
BLOCK = "ablation"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--studies-per-site", type=int, default=2000)
    parser.add_argument("--test-fraction", type=float, default=0.5, help="patients held out as the evaluation pool")
    parser.add_argument("--difficulty", default="cpu", help="SynthCXR tier")
    parser.add_argument("--arch", default="resnet_tiny", help="image tower (model config group)")
    parser.add_argument("--steps", type=int, default=2000, help="optimiser steps of every trained row")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-4, help="learning rate of the pretraining variants")
    parser.add_argument("--supervised-lr", type=float, default=1e-3, help="learning rate of the supervised ceiling")
    parser.add_argument("--draws", type=int, default=3, help="probe draws per label fraction")
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--no-segmentation", action="store_true")
    parser.add_argument("--variants", nargs="+", default=[v for v, _ in VARIANTS])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--work-dir", type=Path, default=REPO / "runs" / "ablation_cpu")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "results.md")
    parser.add_argument("--no-report", action="store_true", help="only train/evaluate (several processes in parallel)")
    parser.add_argument("--report-only", action="store_true", help="only collect finished runs into the report")
    return parser.parse_args(argv)


def overrides(args: argparse.Namespace, objectives: str, seed: int) -> list[str]:
    return [
        "experiment=synth_cpu",
        f"model={args.arch}",
        f"objectives={objectives}",
        f"seed={seed}",
        f"output_dir={args.work_dir / 'out'}",
        f"data.root={args.work_dir / 'data'}",
        f"data.synthetic.studies_per_site={args.studies_per_site}",
        f"data.synthetic.test_fraction={args.test_fraction}",
        f"data.synthetic.difficulty={args.difficulty}",
        f"train.batch_size={args.batch_size}",
        f"train.lr={args.supervised_lr if objectives == 'supervised' else args.lr}",
        f"train.max_steps={args.steps}",
        "train.epochs=100000",
        f"train.num_threads={args.threads}",
        "train.progress_bar=false",
        "train.log_every=1000000",
    ]


def protocol(args: argparse.Namespace) -> ProbeProtocol:
    return ProbeProtocol(fractions=FRACTIONS, draws=args.draws, bootstrap=args.bootstrap)


def run_row(args: argparse.Namespace, row: str, seed: int, pool: Pool) -> dict[str, Any]:
    from mlip_fed import pipeline
    from mlip_fed.config_compose import compose_experiment

    def make() -> dict[str, Any]:
        if row == "raw_pixel":
            return raw_pixel_probe(pool, protocol(args))
        if row == "site_identity":
            return site_identity_probe(pool, protocol(args))
        cfg = compose_experiment(overrides(args, "clip_only" if row == "random_init" else row, seed))
        segmentation = not args.no_segmentation
        if row == "random_init":
            pipeline.configure_threads(cfg)
            model, info = pipeline.build_model(cfg), {"train_seconds": 0.0, "steps": 0}
        else:
            model, info = pipeline.train_for_steps(cfg, pool.pretrain)
        return {**evaluate_encoder(model, cfg, pool, protocol(args), segmentation), **info}

    path = args.work_dir / "runs" / f"{row}_seed{seed}.json"
    if args.report_only and not path.is_file() and row != "site_identity":  # labels only: cheap, made here too
        return {}
    result = run_once(path, make)
    print(f"[ablation] {row} seed {seed}: probe@1% {probe_mean(result, 0.01):.3f} @100% {probe_mean(result, 1.0):.3f}")
    return result


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    from mlip_fed.config_compose import compose_experiment

    pool = load_pool(compose_experiment(overrides(args, "full", args.seeds[0])))
    rows = [r for r, _ in REFERENCES] + list(args.variants)
    results: dict[str, list[dict[str, Any]]] = {}
    for seed in args.seeds:
        for row in rows:
            if row in ("raw_pixel", "site_identity") and seed != args.seeds[0]:
                continue  # no pretraining seed: one run, its spread is over probe draws
            result = run_row(args, row, seed, pool)
            if result:
                results.setdefault(row, []).append(result)
    if args.no_report:
        return 0
    table = render(args, results, pool)
    print(table)
    from bench.docs_block import replace_block

    replace_block(args.out, BLOCK, table)
    print(f"wrote {args.out}")
    return 0


def _cell(mean: float, std: float) -> str:
    if not math.isfinite(mean):
        return "—"
    return f"{mean:.3f}" + (f" ± {std:.3f}" if math.isfinite(std) else "")


def render(args: argparse.Namespace, results: dict[str, list[dict[str, Any]]], pool: Pool) -> str:
    names = dict(REFERENCES) | dict(VARIANTS)
    command = "python bench/ablation.py " + shlex.join(
        [
            "--seeds",
            *map(str, args.seeds),
            "--studies-per-site",
            str(args.studies_per_site),
            "--steps",
            str(args.steps),
            "--arch",
            args.arch,
            "--difficulty",
            args.difficulty,
        ]
    )
    probe = {row: {f: seed_stats([probe_mean(r, f) for r in runs]) for f in FRACTIONS} for row, runs in results.items()}
    reference = {row: {f: probe[row][f][0] for f in FRACTIONS} for row in ("random_init", "supervised") if row in probe}
    header = (
        "| row | seeds | LP 1 % | LP 10 % | LP 100 % | gap closed 1 % | gap closed 100 % | zero-shot AUROC | "
        "i2t R@5 | seg Dice (positives) | train s |"
    )
    lines = [header, "|---|---:|" + "---:|" * 9]
    for row in [r for r, _ in REFERENCES] + list(args.variants):
        if row not in results:
            continue
        runs = results[row]
        gaps = []
        for f in (0.01, 1.0):
            if len(reference) == 2 and row not in ("random_init", "raw_pixel", "site_identity", "supervised"):
                gaps.append(
                    f"{gap_closed(probe[row][f][0], reference['random_init'][f], reference['supervised'][f]):.2f}"
                )
            else:
                gaps.append("—")
        metric = {
            key: seed_stats([r.get("metrics", {}).get(key, math.nan) for r in runs])
            for key in ("zero_shot/macro_auroc", "retrieval/i2t_R@5", "segmentation/mean_dice_positive")
        }
        train_s = seed_stats([float(r.get("train_seconds", math.nan)) for r in runs])
        lines.append(
            f"| {names[row]} | {probe[row][0.01][2]} | "
            + " | ".join(_cell(probe[row][f][0], probe[row][f][1]) for f in FRACTIONS)
            + f" | {gaps[0]} | {gaps[1]} | "
            + " | ".join(_cell(*metric[k][:2]) for k in metric)
            + (f" | {train_s[0]:.0f} |" if math.isfinite(train_s[0]) else " | — |")
        )
    # Rows with one seed have no seed spread: the figure comes from the rows that have at least two.
    trained = [r for r in args.variants if r in probe and probe[r][FRACTIONS[0]][2] >= 2]
    detect = []
    for f in FRACTIONS:
        stds = [probe[r][f][1] for r in trained if math.isfinite(probe[r][f][1])]
        n = min((probe[r][f][2] for r in trained), default=0)
        if stds and n >= 2:
            s = sorted(stds)[len(stds) // 2]
            detect.append(f"{100 * f:g} %: {detectable_difference(s, s, n, n):.3f}")
    cis = [
        s["ci"][1] - s["ci"][0]
        for runs in results.values()
        for r in runs
        for s in r.get("probe", [])
        if all(math.isfinite(c) for c in s["ci"])
    ]
    return "\n".join(
        [
            f"Command: `{command}` — SynthCXR `{args.difficulty}` tier, 3 sites × {args.studies_per_site} studies at 64²; "
            f"pretraining on {len(pool.pretrain)} studies; evaluation pool of held-out patients: "
            f"{len(pool.probe_train)} probe-train / {len(pool.probe_test)} probe-test studies; "
            f"{args.steps} optimiser steps at batch {args.batch_size} for every trained row (lr {args.lr:g}, supervised "
            f"{args.supervised_lr:g}); LP = linear-probe macro AUROC, mean over {args.draws} label draws per seed, then "
            "mean ± std over pretraining seeds; gap closed = (row − random) / (supervised − random).",
            "",
            *lines,
            "",
            "Smallest difference between two rows this run can detect (2 × the standard error of the difference of "
            f"two seed means, median seed std of the pretraining rows with ≥ 2 seeds, n = their fewest seeds): "
            f"{'; '.join(detect) or 'needs ≥ 2 seeds'}. "
            + (
                f"Bootstrap 95 % CI width of a single probe AUROC (probe-test resampling): median {sorted(cis)[len(cis) // 2]:.3f}."
                if cis
                else ""
            ),
        ]
    )


if __name__ == "__main__":
    sys.exit(main())
