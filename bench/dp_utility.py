"""Utility of bucketed DP: linear-probe AUROC on SynthCXR for non-DP vs bucketed DP at target epsilon 3 and 8.

Every arm trains the same model from the same initialisation for the same number of steps on the pooled
SynthCXR train split, then the frozen image encoder is scored by the project's linear probe
(``pipeline.evaluate_model``, label fraction 1.0) on the held-out split.

- non-DP: ``mlip-pretrain``'s loop (shuffled batches of ``train.batch_size``, ``standard_gradient``);
- DP: ``PoissonLoader`` at q = batch_size / patients, ``BucketedClippingGradient`` (C = privacy.clipping_norm,
  privacy.num_buckets buckets), sigma calibrated with the RDP accountant so that the planned steps cost exactly
  the target epsilon at privacy.delta; the table reports the achieved epsilon from RDP and PRV.

    .venv/bin/python bench/dp_utility.py [--steps 40] [--seeds 0] [--epsilons 3 8] [hydra overrides ...]

Writes the table between the dp_utility markers in docs/privacy.md and prints it.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from mlip_fed import pipeline
from mlip_fed.cli.hydra_config import compose_experiment
from mlip_fed.config import ExperimentConfig
from mlip_fed.federation.report import replace_docs_block
from mlip_fed.privacy.accountant import AccountedStep, calibrate_noise_multiplier, compute_epsilon
from mlip_fed.privacy.engine import SENSITIVITY_FACTOR, BucketedClippingGradient, PoissonLoader
from mlip_fed.train.trainer import LocalTrainer

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OVERRIDES = [
    "experiment=synth_cpu",
    "privacy=bucketed",
    "data.synthetic.studies_per_site=100",
    "eval.linear_probe.fractions=[1.0]",
    "eval.zero_shot.enabled=false",
    "eval.retrieval.enabled=false",
    "eval.segmentation.enabled=false",
    "train.progress_bar=false",
]


def probe_auroc(model: Any, data: pipeline.SiteData, cfg: ExperimentConfig) -> float:
    result = pipeline.evaluate_model(model, data, cfg)
    return float(result.linear_probe.fractions[-1].macro_auroc)


def train_arm(cfg: ExperimentConfig, data: pipeline.SiteData, steps: int, epsilon: float | None) -> dict[str, Any]:
    """Train one arm (``epsilon=None``: non-DP) for ``steps`` steps and probe it."""
    model = pipeline.build_model(cfg)
    collator = pipeline.build_collator(model, cfg)
    dataset = pipeline.train_dataset(data.train, cfg)
    train_cfg = cfg.train.model_copy(update={"max_steps": steps, "grad_accum_steps": 1})
    row: dict[str, Any] = {"arm": "non-DP" if epsilon is None else f"bucketed DP, target ε={epsilon:g}"}
    started = time.perf_counter()
    if epsilon is None:
        loader = pipeline.train_loader(dataset, collator, cfg)
        trainer = LocalTrainer(model, train_cfg, total_steps=steps)
        trainer.fit(loader, epochs=-(-steps // len(loader)))
        row.update(sigma=None, q=cfg.train.batch_size / len(data.train), steps=trainer.state.global_step)
    else:
        policy = cfg.privacy
        patients = [r.patient_id for r in data.train]
        units = len(set(patients)) if policy.privacy_unit == "patient" else len(patients)
        q = min(1.0, cfg.train.batch_size / units)
        factor = SENSITIVITY_FACTOR[policy.mechanism]
        sigma = calibrate_noise_multiplier(epsilon, policy.delta, q, steps, sensitivity_factor=factor)
        loader = PoissonLoader(
            dataset, collator, patients, q, num_buckets=policy.num_buckets, unit=policy.privacy_unit, seed=cfg.seed
        )
        engine = BucketedClippingGradient(
            model,
            noise_multiplier=sigma,
            clipping_norm=policy.clipping_norm,
            num_buckets=policy.num_buckets,
            mode=policy.mechanism,  # type: ignore[arg-type]
            seed=cfg.seed,
        )
        trainer = LocalTrainer(model, train_cfg, total_steps=steps, gradient_fn=engine)
        try:
            trainer.fit(loader, epochs=-(-steps // len(loader)))
        finally:
            engine.close()
        achieved = compute_epsilon([AccountedStep(sigma / factor, q, engine.steps)], policy.delta)
        row.update(sigma=sigma, q=q, steps=engine.steps, eps_rdp=achieved.rdp, eps_prv=achieved.prv)
    row["train_s"] = time.perf_counter() - started
    row["auroc"] = probe_auroc(model, data, cfg)
    return row


def fmt(x: float | None, spec: str) -> str:
    return "—" if x is None else format(x, spec)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=40, help="optimiser steps per arm")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="one run per seed and arm")
    parser.add_argument("--epsilons", type=float, nargs="+", default=[3.0, 8.0])
    parser.add_argument("--doc", type=Path, default=REPO / "docs" / "privacy.md")
    parser.add_argument("--no-doc", action="store_true", help="print only")
    parser.add_argument("overrides", nargs="*", help="extra hydra overrides (after the defaults)")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    arms: dict[str, list[dict[str, Any]]] = {}
    for seed in args.seeds:
        cfg = compose_experiment([*DEFAULT_OVERRIDES, f"seed={seed}", *args.overrides])
        pipeline.configure_threads(cfg)
        data = pipeline.load_records(cfg.data)
        for epsilon in [None, *args.epsilons]:
            row = train_arm(cfg, data, args.steps, epsilon)
            print(f"seed {seed}: {row}", file=sys.stderr)
            arms.setdefault(row["arm"], []).append(row)
    total = time.perf_counter() - started

    lines = [
        "| arm | σ | q | steps | ε RDP | ε PRV | linear-probe macro AUROC | train s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, rows in arms.items():
        aurocs = [r["auroc"] for r in rows]
        auroc = f"{statistics.mean(aurocs):.3f}" + (f" ± {statistics.stdev(aurocs):.3f}" if len(aurocs) > 1 else "")
        first = rows[0]
        lines.append(
            f"| {name} | {fmt(first['sigma'], '.3f')} | {first['q']:.4f} | {first['steps']} | "
            f"{fmt(first.get('eps_rdp'), '.3f')} | {fmt(first.get('eps_prv'), '.3f')} | {auroc} | "
            f"{statistics.mean(r['train_s'] for r in rows):.0f} |"
        )
    cmd = "python bench/dp_utility.py " + " ".join(argv if argv is not None else sys.argv[1:])
    header = (
        f"Command: `{cmd.strip()}` — defaults `{' '.join(DEFAULT_OVERRIDES)}`; seeds {args.seeds} "
        f"(mean ± sd over seeds when more than one), δ = {cfg.privacy.delta:g}, {len(data.train)} train / "
        f"{len(data.test)} test studies; {platform.machine()} CPU, torch threads {torch.get_num_threads()}, "
        f"{total:.0f} s in all."
    )
    table = header + "\n\n" + "\n".join(lines)
    print(table)
    if not args.no_doc:
        replace_docs_block(args.doc, "dp_utility", table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
