"""Federated vs centralized MLIP: the ratio of their gains over random init, beside the reference rows.

For each setting (3 or 10 SynthCXR hospitals, IID or Dirichlet alpha = 0.3 label skew) and pretraining seed,
the same generated federation is trained (a) federated: R rounds × E local epochs per site, FedAvg + bank
merge, and (b) centralized: one 'site' holding the pooled train data, R rounds × E epochs (the same trainer).
Both run in-process (no Flower: this compares learning; ``fed_comm.py`` measures the Flower side) and are
scored with the probe protocol of ``mlip_fed.eval.protocol`` on an evaluation pool of held-out patients
(``bench/quality.py``), beside random init, raw-pixel LR and the supervised ceiling (trained centrally for
as many steps as the centralized run). The headline is **gain ratio** = (federated − random) /
(central − random) per label fraction, not a ratio of raw AUROCs.

Each (setting, seed, row) writes its own JSON under ``--work-dir``; a rerun skips finished runs.

    python bench/fed_vs_central.py --sites 3 10 --seeds 0 1 2 --studies-per-site 2000 --rounds 10 --local-epochs 2
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.quality import (  # noqa: E402
    evaluate_encoder,
    load_pool,
    probe_mean,
    raw_pixel_probe,
    real_gain,
    run_once,
    seed_stats,
)
from mlip_fed.eval.protocol import ProbeProtocol  # noqa: E402

FRACTIONS = (0.01, 1.0)
BLOCK = "fed_vs_central"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, nargs="+", default=[3, 10])
    parser.add_argument("--alphas", nargs="+", default=["iid", "0.3"], help="'iid' or a Dirichlet alpha")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--total-studies", type=int, default=6000, help="studies over all sites (half held out)")
    parser.add_argument("--test-fraction", type=float, default=0.5)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--local-epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-4, help="learning rate of the MLIP runs")
    parser.add_argument("--supervised-lr", type=float, default=1e-3)
    parser.add_argument("--draws", type=int, default=3)
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--work-dir", type=Path, default=REPO / "runs" / "fed_vs_central")
    parser.add_argument("--doc", type=Path, default=REPO / "docs" / "federation.md")
    parser.add_argument("--no-report", action="store_true")
    return parser.parse_args(argv)


def setting_overrides(args: argparse.Namespace, sites: int, alpha: str, seed: int) -> list[str]:
    root = args.work_dir / f"data_{sites}_{alpha}"
    return [
        f"data.root={root}",
        f"data.synthetic.num_sites={sites}",
        f"data.synthetic.studies_per_site={args.total_studies // sites}",
        f"data.synthetic.test_fraction={args.test_fraction}",
        f"data.synthetic.dirichlet_alpha={'null' if alpha == 'iid' else alpha}",
        f"seed={seed}",
        f"train.batch_size={args.batch_size}",
        f"train.lr={args.lr}",
        "train.num_threads=1",
        "train.max_steps=null",
        "train.progress_bar=false",
        f"federation.num_rounds={args.rounds}",
        f"federation.local_epochs={args.local_epochs}",
        f"federation.min_available_nodes={sites}",
        f"federation.min_train_nodes={sites}",
        f"federation.evaluate_every={args.rounds}",
        "eval.segmentation.enabled=false",
    ]


def run_setting(args: argparse.Namespace, sites: int, alpha: str, seed: int) -> dict[str, dict[str, Any]]:
    from mlip_fed import pipeline
    from mlip_fed.config_compose import compose_experiment
    from mlip_fed.federation.simulation import run_in_process

    common = setting_overrides(args, sites, alpha, seed)
    cfg = compose_experiment(["experiment=synth_cpu", *common])
    pool = load_pool(cfg)
    protocol = ProbeProtocol(fractions=FRACTIONS, draws=args.draws, bootstrap=args.bootstrap)
    base = args.work_dir / "runs" / f"{sites}_{alpha}_seed{seed}"
    out: dict[str, dict[str, Any]] = {}

    def trained(mode: str) -> dict[str, Any]:
        output = base / mode
        summary = run_in_process("synth_cpu", common, output, central=mode == "central")
        model = pipeline.build_model(cfg)
        pipeline.load_model_weights(model, output / "checkpoints" / "server_last.pt")
        result = evaluate_encoder(model, cfg, pool, protocol, segmentation=False)
        history = json.loads((output / "results.json").read_text())["rounds"]
        itc = [  # each round's global contrast, mean over sites: log(batch) means it never left chance
            statistics.fmean(site["loss_global_itc"] for site in r["sites"] if "loss_global_itc" in site)
            for r in history
            if any("loss_global_itc" in site for site in r.get("sites", []))
        ]
        return {**result, "wall_seconds": summary.get("wall_seconds"), "rounds": args.rounds, "global_itc": itc}

    def random_init() -> dict[str, Any]:
        return evaluate_encoder(pipeline.build_model(cfg), cfg, pool, protocol, segmentation=False)

    def supervised() -> dict[str, Any]:
        n_steps = args.rounds * args.local_epochs * pipeline.steps_per_epoch(len(pool.pretrain), cfg)
        sup = compose_experiment(
            [
                "experiment=synth_cpu",
                *common,
                "objectives=supervised",
                f"train.lr={args.supervised_lr}",
                f"train.max_steps={n_steps}",
                "train.epochs=100000",
            ]
        )
        model, info = pipeline.train_for_steps(sup, pool.pretrain)
        return {**evaluate_encoder(model, sup, pool, protocol, segmentation=False), **info}

    makers = {
        "raw_pixel": lambda: raw_pixel_probe(pool, protocol),
        "random_init": random_init,
        "supervised": supervised,
        "central": lambda: trained("central"),
        "federated": lambda: trained("federated"),
    }
    for row, make in makers.items():
        out[row] = run_once(base / f"{row}.json", make)
        print(f"[fed_vs_central] {sites} sites {alpha} seed {seed} {row}: probe@100% {probe_mean(out[row], 1.0):.3f}")
    return out


def gain_ratio(result: dict[str, dict[str, Any]], fraction: float) -> float:
    central = real_gain(result["central"], result["random_init"], fraction)  # NaN: no central gain beyond noise
    federated = probe_mean(result["federated"], fraction) - probe_mean(result["random_init"], fraction)
    return federated / central if math.isfinite(central) else math.nan


def render(args: argparse.Namespace, results: dict[tuple[int, str], list[dict[str, dict[str, Any]]]]) -> str:
    command = "python bench/fed_vs_central.py " + shlex.join(
        [
            "--sites",
            *map(str, args.sites),
            "--alphas",
            *args.alphas,
            "--seeds",
            *map(str, args.seeds),
            "--total-studies",
            str(args.total_studies),
            "--rounds",
            str(args.rounds),
            "--local-epochs",
            str(args.local_epochs),
        ]
    )
    lines = [
        f"Command: `{command}` — `experiment=synth_cpu` (SynthCXR `cpu` tier, resnet_tiny, all five objectives), "
        f"{args.total_studies} studies over all sites, {args.test_fraction:g} of each site's patients held out as the "
        f"evaluation pool; {args.rounds} rounds × {args.local_epochs} local epochs vs the same epochs centralized; "
        "LP = linear-probe macro AUROC (mean over probe draws, then mean ± std over seeds); gain ratio = "
        "(federated − random) / (central − random), undefined where the central gain is not above half its "
        "probe's bootstrap 95 % CI.",
        "",
        "| sites | split | seeds | raw-pixel LP 100 % | random LP 1 % / 100 % | supervised LP 1 % / 100 % | "
        "central LP 1 % / 100 % | federated LP 1 % / 100 % | gain ratio 1 % | gain ratio 100 % |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for (sites, alpha), runs in results.items():

        def cell(row: str, fraction: float, runs: list[dict[str, dict[str, Any]]] = runs) -> str:
            mean, std, _n = seed_stats([probe_mean(r[row], fraction) for r in runs])
            return f"{mean:.3f}" + (f" ± {std:.3f}" if math.isfinite(std) else "")

        ratios = {f: seed_stats([gain_ratio(r, f) for r in runs]) for f in FRACTIONS}
        lines.append(
            f"| {sites} | {'IID' if alpha == 'iid' else f'Dirichlet {alpha}'} | {len(runs)} | {cell('raw_pixel', 1.0)} | "
            + " | ".join(
                f"{cell(row, 0.01)} / {cell(row, 1.0)}" for row in ("random_init", "supervised", "central", "federated")
            )
            + " | "
            + " | ".join(_ratio_cell(*ratios[f][:2]) for f in FRACTIONS)
            + " |"
        )
    return "\n".join(lines)


def _ratio_cell(mean: float, std: float) -> str:
    if not math.isfinite(mean):
        return "— (no central gain beyond noise)"
    return f"**{mean:.2f}**" + (f" ± {std:.2f}" if math.isfinite(std) else "")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(1)
    results: dict[tuple[int, str], list[dict[str, dict[str, Any]]]] = {}
    for seed in args.seeds:
        for sites in args.sites:
            for alpha in args.alphas:
                results.setdefault((sites, alpha), []).append(run_setting(args, sites, alpha, seed))
    if args.no_report:
        return 0
    table = render(args, results)
    print(table)
    from bench.docs_block import replace_block

    replace_block(args.doc, BLOCK, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
