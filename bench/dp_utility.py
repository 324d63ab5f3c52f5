"""Utility of bucketed DP: how much of the non-DP gain over random init survives at target epsilon 1, 3, 8.

Every arm trains the same model from the same initialisation for the same number of steps on the pretraining
studies, at the same expected number of **records per step**, then is scored with the probe protocol of
``mlip_fed.eval.protocol`` on the held-out evaluation pool (``bench/quality.py``), beside random init and the
supervised ceiling.

- non-DP: ``mlip-pretrain``'s loop (shuffled batches of ``train.batch_size`` records, ``standard_gradient``);
- DP: the site's façade, ``SitePrivacy``, with ``privacy.epsilon_budget`` set to the target: its Poisson loader at
  q = batch_size / records (so a step holds batch_size records in expectation, whatever the privacy unit: a sampled
  patient brings all their records), its ``BucketedClippingGradient`` (C = privacy.clipping_norm,
  privacy.num_buckets buckets), sigma from ``SitePrivacy.calibrate`` so that the planned steps cost exactly the
  target epsilon at privacy.delta (never below privacy.min_noise_multiplier), the steps charged to a throwaway
  ledger; the table reports the achieved epsilon (RDP, PRV) and the measured records per step.

Each (arm, seed) writes its own JSON under ``--work-dir``; a rerun skips finished runs.

    python bench/dp_utility.py --steps 1000 --seeds 0 1 2 --epsilons 1 3 8

Writes the table between the dp_utility markers in docs/privacy.md and prints it.
"""

from __future__ import annotations

import argparse
import math
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.docs_block import replace_block  # noqa: E402
from bench.quality import Pool, evaluate_encoder, load_pool, probe_mean, real_gain, run_once, seed_stats  # noqa: E402
from mlip_fed import pipeline  # noqa: E402
from mlip_fed.config import ExperimentConfig  # noqa: E402
from mlip_fed.config_compose import compose_experiment  # noqa: E402
from mlip_fed.eval.protocol import ProbeProtocol  # noqa: E402
from mlip_fed.privacy.site_privacy import SitePrivacy  # noqa: E402
from mlip_fed.train.trainer import LocalTrainer  # noqa: E402

FRACTIONS = (0.01, 1.0)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=1000, help="optimiser steps per arm")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 3.0, 8.0])
    parser.add_argument("--studies-per-site", type=int, default=2000)
    parser.add_argument("--test-fraction", type=float, default=0.5)
    parser.add_argument("--draws", type=int, default=3)
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--work-dir", type=Path, default=REPO / "runs" / "dp_utility")
    parser.add_argument("--doc", type=Path, default=REPO / "docs" / "privacy.md")
    parser.add_argument("--no-doc", action="store_true", help="print only")
    parser.add_argument("--no-report", action="store_true", help="only train/evaluate")
    parser.add_argument("--fresh", action="store_true", help="discard finished runs in --work-dir first (cost checks)")
    return parser.parse_args(argv)


def config(args: argparse.Namespace, seed: int, *extra: str) -> ExperimentConfig:
    return compose_experiment(
        [
            "experiment=synth_cpu",
            "privacy=bucketed",
            f"seed={seed}",
            f"data.root={args.work_dir / 'data'}",
            f"data.synthetic.studies_per_site={args.studies_per_site}",
            f"data.synthetic.test_fraction={args.test_fraction}",
            "train.num_threads=1",
            "train.progress_bar=false",
            "train.log_every=1000000",
            *extra,
        ]
    )


def train_arm(
    cfg: ExperimentConfig, records: list[Any], steps: int, epsilon: float | None
) -> tuple[Any, dict[str, Any]]:
    """Train one arm (``epsilon=None``: non-DP) for ``steps`` steps; (model, what it cost and spent)."""
    model = pipeline.build_model(cfg)
    collator = pipeline.build_collator(model, cfg)
    dataset = pipeline.train_dataset(records, cfg)
    train_cfg = cfg.train.model_copy(update={"max_steps": steps, "grad_accum_steps": 1})
    info: dict[str, Any] = {}
    started = time.perf_counter()
    if epsilon is None:
        loader = pipeline.train_loader(dataset, collator, cfg)
        trainer = LocalTrainer(model, train_cfg, total_steps=steps)
        while not trainer.reached_max_steps():
            trainer.fit(loader, epochs=1)
        info.update(sigma=None, q=None, steps=trainer.state.global_step, records_per_step=float(cfg.train.batch_size))
    else:
        # Through the site's façade, as deployed: sigma calibrated so the planned steps cost exactly the target
        # epsilon, sampling and noise from OS entropy, the steps charged to a (throwaway) ledger.
        # Pretraining alone releases no prototype bank: the whole target epsilon goes to the training steps.
        policy = cfg.privacy.model_copy(
            update={"epsilon_budget": epsilon, "noise_multiplier": None, "release_prototypes": False}
        )
        patients = [r.patient_id for r in records]
        q = min(1.0, cfg.train.batch_size / len(records))  # batch_size records per step in expectation
        with tempfile.TemporaryDirectory(prefix="dp_utility_ledger_") as ledger_dir:
            site = SitePrivacy(policy, Path(ledger_dir) / "ledger.sqlite", len(records), "dp_utility", site="bench")
            try:
                sigma = site.calibrate(steps, q)
                refusal = site.plan_round(0, steps, q)
                if refusal is not None:
                    raise RuntimeError(f"dp_utility: the calibrated plan was refused: {refusal}")
                loader = site.poisson_loader(dataset, collator, patients, q)
                engine = site.gradient_fn(model)
                trainer = LocalTrainer(model, train_cfg, total_steps=steps, gradient_fn=engine)
                try:
                    while not trainer.reached_max_steps():
                        trainer.fit(loader, epochs=1)
                finally:
                    engine.close()
                site.record_training(0, engine.steps, q)
                achieved = site.epsilon()
            finally:
                site.close()
        info.update(
            sigma=sigma,
            q=q,
            steps=engine.steps,
            eps_rdp=achieved.rdp,
            eps_prv=achieved.prv,
            records_per_step=trainer.state.samples_seen / max(1, trainer.state.global_step),
        )
    info["train_seconds"] = time.perf_counter() - started
    return model, info


def arm_name(epsilon: float | None) -> str:
    return "non_dp" if epsilon is None else f"dp_eps{epsilon:g}"


def run_seed(args: argparse.Namespace, seed: int, pool: Pool) -> dict[str, dict[str, Any]]:
    protocol = ProbeProtocol(fractions=FRACTIONS, draws=args.draws, bootstrap=args.bootstrap)
    out: dict[str, dict[str, Any]] = {}
    base = args.work_dir / "runs" / f"seed{seed}"

    def random_init() -> dict[str, Any]:
        cfg = config(args, seed)
        return evaluate_encoder(pipeline.build_model(cfg), cfg, pool, protocol, segmentation=False)

    def supervised() -> dict[str, Any]:
        cfg = config(
            args, seed, "objectives=supervised", "train.lr=1e-3", f"train.max_steps={args.steps}", "train.epochs=100000"
        )
        model, info = pipeline.train_for_steps(cfg, pool.pretrain)
        return {**evaluate_encoder(model, cfg, pool, protocol, segmentation=False), **info}

    def arm(epsilon: float | None) -> dict[str, Any]:
        cfg = config(args, seed)
        model, info = train_arm(cfg, pool.pretrain, args.steps, epsilon)
        return {**evaluate_encoder(model, cfg, pool, protocol, segmentation=False), **info}

    makers: dict[str, Any] = {"random_init": random_init, "supervised": supervised, "non_dp": lambda: arm(None)}
    for epsilon in args.epsilons:
        makers[arm_name(epsilon)] = lambda epsilon=epsilon: arm(epsilon)
    for name, make in makers.items():
        out[name] = run_once(base / f"{name}.json", make)
        print(f"[dp_utility] seed {seed} {name}: probe@100% {probe_mean(out[name], 1.0):.3f}", flush=True)
    return out


def render(args: argparse.Namespace, runs: list[dict[str, dict[str, Any]]], pool: Pool) -> str:
    command = "python bench/dp_utility.py " + shlex.join(
        [
            "--steps",
            str(args.steps),
            "--seeds",
            *map(str, args.seeds),
            "--epsilons",
            *(f"{e:g}" for e in args.epsilons),
            "--studies-per-site",
            str(args.studies_per_site),
            "--draws",
            str(args.draws),
            "--bootstrap",
            str(args.bootstrap),
        ]
    )
    names = {
        "random_init": "random init (reference)",
        "supervised": "supervised ceiling (reference)",
        "non_dp": "non-DP",
    }
    names |= {arm_name(e): f"bucketed DP, target ε = {e:g}" for e in args.epsilons}
    lines = [
        f"Command: `{command}` — `experiment=synth_cpu privacy=bucketed` (SynthCXR `cpu` tier, resnet_tiny, all five "
        f"objectives), pretraining on {len(pool.pretrain)} studies, evaluation pool {len(pool.probe_train)} probe-train / "
        f"{len(pool.probe_test)} probe-test studies of held-out patients; {args.steps} steps per arm at "
        f"{runs[0]['non_dp'].get('records_per_step', math.nan):.0f} records per step (DP: in expectation); LP = "
        "linear-probe macro AUROC (mean over probe draws, then mean ± std over seeds); kept = (arm − random) / "
        "(non-DP − random), — where the non-DP gain is not above half its probe's bootstrap 95 % CI (no effect).",
        "",
        "| arm | seeds | σ | q | records / step | ε RDP | ε PRV | LP 1 % | LP 100 % | kept 1 % | kept 100 % | train s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, label in names.items():
        rows = [r[name] for r in runs if name in r]
        if not rows:
            continue
        first = rows[0]
        probe = {f: seed_stats([probe_mean(r, f) for r in rows]) for f in FRACTIONS}
        kept = {}
        for f in FRACTIONS:
            ratios = []
            for r in runs:
                gain = real_gain(r["non_dp"], r["random_init"], f)  # NaN: no non-DP gain beyond the probe's noise
                if name in r and math.isfinite(gain) and name not in ("random_init", "supervised", "non_dp"):
                    ratios.append((probe_mean(r[name], f) - probe_mean(r["random_init"], f)) / gain)
            kept[f] = seed_stats(ratios)

        def num(key: str, spec: str, first: dict[str, Any] = first) -> str:
            value = first.get(key)
            return "—" if value is None or not math.isfinite(float(value)) else format(float(value), spec)

        cells = [
            label,
            str(len(rows)),
            num("sigma", ".3f"),
            num("q", ".4f"),
            num("records_per_step", ".1f"),
            num("eps_rdp", ".2f"),
            num("eps_prv", ".2f"),
            *(_mean_std(*probe[f][:2]) for f in FRACTIONS),
            *(_mean_std(*kept[f][:2], digits=2) for f in FRACTIONS),
            f"{statistics.fmean(float(r.get('train_seconds', 0.0)) for r in rows):.0f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _mean_std(mean: float, std: float, digits: int = 3) -> str:
    if not math.isfinite(mean):
        return "—"
    return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if math.isfinite(std) else "")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.fresh:
        import shutil

        shutil.rmtree(args.work_dir / "runs", ignore_errors=True)
    pool = load_pool(config(args, args.seeds[0]))
    runs = [run_seed(args, seed, pool) for seed in args.seeds]
    if args.no_report:
        return 0
    table = render(args, runs, pool)
    print(table)
    if not args.no_doc:
        replace_block(args.doc, "dp_utility", table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
