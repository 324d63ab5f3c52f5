"""``make demo``: the main job on built-in data, start to finish, on a laptop-class CPU.

1. Generates a SynthCXR federation of three hospitals (own scanners, prevalence, report styles).
2. Shows what the labeler reads in one hospital's reports against the generator's truth.
3. Runs ``flwr run .`` (a private local SuperLink, three simulated hospitals) for a few rounds,
   streaming a per-round table (loss, linear-probe AUROC, R@5, time); the AUROC comes from the hospitals,
   each scoring the global model on its own test split (round 0, the middle round and the last).
4. Trains the supervised ceiling (the same image tower with the 14 labels, on the pooled train studies the
   demo holds), then compares the federated encoder with the seeded random-init encoder and the ceiling under
   the same probe, with the share of the ceiling's gain the federation reached (gap closed).

Nothing is downloaded; everything is written under ``demo_out/``.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any

from mlip_fed.cli.arg_types import at_least

REPO = Path(__file__).resolve().parents[2]
#: Learning rate of the supervised ceiling (the calibration's, bench/synth_tiers.py).
SUPERVISED_LR = 1e-3


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mlip-demo", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "demo_out")
    parser.add_argument("--rounds", type=at_least(1), default=10)
    parser.add_argument("--studies-per-site", type=at_least(1), default=1000)
    parser.add_argument("--sites", type=at_least(1), default=3)
    parser.add_argument("--local-epochs", type=at_least(1), default=2, help="local epochs per round at each site")
    parser.add_argument(
        "--supervised-steps",
        type=at_least(0),
        default=800,
        help="optimiser steps of the supervised ceiling (0: leave it out)",
    )
    parser.add_argument("--verbose", action="store_true", help="also show Flower's and Ray's DEBUG/INFO lines")
    parser.add_argument("overrides", nargs="*", help="extra hydra overrides for the federation")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    start = time.perf_counter()
    out = args.out.resolve()
    data_root = out / "data"
    overrides = [
        f"data.root={data_root}",
        f"data.synthetic.num_sites={args.sites}",
        f"data.synthetic.studies_per_site={args.studies_per_site}",
        f"federation.min_train_nodes={args.sites}",
        f"federation.min_available_nodes={args.sites}",
        f"federation.local_epochs={args.local_epochs}",
        f"federation.evaluate_every={max(1, args.rounds // 2)}",  # the sites' evaluation twice, not every round
        "eval.segmentation.enabled=false",
        "eval.zero_shot.enabled=false",
        "train.progress_bar=false",
        *args.overrides,
    ]
    from mlip_fed.config import ConfigError
    from mlip_fed.config_compose import compose_experiment

    try:
        cfg = compose_experiment(["experiment=synth_cpu", *overrides])
    except ConfigError as err:
        print(f"mlip-demo: {err}", file=sys.stderr)
        return 2

    _banner("1/4  SynthCXR: three simulated hospitals")
    from mlip_fed import pipeline

    manifests = pipeline.synthetic_manifests(cfg.data)
    for manifest in manifests:
        site = pipeline.records_from_manifests([manifest], name=manifest.parent.name)
        print(f"  {site.name}: {len(site.train)} train / {len(site.test)} test studies  ({manifest})")
    print(f"  {time.perf_counter() - start:.0f} s")

    _banner("2/4  The labeler on site_0's reports (against the generator's truth)")
    _labeler_summary(manifests[0])

    _banner(f"3/4  Federated MLIP pretraining: flwr run, {args.sites} hospitals, {args.rounds} rounds")
    from mlip_fed.federation.simulation import SimulationInterrupted, resume_hint, run_flwr_simulation

    try:
        result = run_flwr_simulation(
            REPO,
            output_dir=out / "federation",
            num_supernodes=args.sites,
            experiment="synth_cpu",
            overrides=overrides,
            num_rounds=args.rounds,
            num_cpus_per_client=1,
            stream=sys.stdout,
            verbose=args.verbose,
        )
    except SimulationInterrupted as stop:  # Ctrl-C: the federation is stopped, its completed rounds are kept
        command = [sys.executable, "-m", "mlip_fed.cli.demo"]  # `make demo` passes no overrides: run this instead
        print(f"\n{resume_hint('mlip-demo', argv, stop.result, command)}", file=sys.stderr)
        return 130
    if not result.ok:
        print(f"\nmlip-demo: the federated run failed: {result.failure_reason()}", file=sys.stderr)
        print(f"  log: {result.log_path}", file=sys.stderr)
        return 1

    _banner("4/4  Federated encoder vs random init and the supervised ceiling (frozen encoder, linear probe)")
    results = result.results or {}
    checkpoint = result.output_dir / "checkpoints" / "server_last.pt"
    from mlip_fed.eval.run import comparison_table, run_evaluation, write_results

    evaluation = run_evaluation(cfg, checkpoint, compare_random=True)
    renamed = {"random_init": evaluation["random_init"], "federated": evaluation["pretrained"]}
    if args.supervised_steps > 0:
        renamed["supervised"] = _supervised_ceiling(overrides, args.supervised_steps)
    write_results(renamed, out / "eval", cfg.name)
    table = comparison_table(renamed)
    print("\n".join("  " + line for line in table.splitlines() if "median_rank" not in line))
    if "supervised" in renamed:
        print("\n" + "\n".join("  " + line for line in _gap_closed_lines(renamed)))
    print(f"  (full tables: {out / 'eval' / 'eval.md'})")
    failures = results.get("failures") or []
    print(f"\n  site failures: {len(failures)}")
    print(f"  results: {result.output_dir / 'results.json'}")
    for plot in sorted(result.output_dir.glob("*.png")):
        print(f"  plot:    {plot}")
    print(f"\nmlip-demo finished in {time.perf_counter() - start:.0f} s")
    return 0


def _supervised_ceiling(overrides: list[str], steps: int) -> Any:
    """The image tower trained with the labels (BCE) on every site's train studies, evaluated like the others.

    A reference only the demo can compute: its sites' data all live on this machine. The learning rate is the
    one the supervised ceiling was calibrated with (docs/synthcxr.md).
    """
    from mlip_fed import pipeline
    from mlip_fed.config_compose import compose_experiment

    cfg = compose_experiment(
        [
            "experiment=synth_cpu",
            *overrides,
            "objectives=supervised",
            f"train.max_steps={steps}",
            "train.epochs=100000",
            f"train.lr={SUPERVISED_LR}",
            "eval.retrieval.enabled=false",
        ]
    )
    data = pipeline.load_records(cfg.data)
    print(f"  supervised ceiling: {steps} steps on {len(data.train)} labelled train studies ...", flush=True)
    model, run = pipeline.train_for_steps(cfg, data.train)
    print(f"  trained in {run['train_seconds']:.0f} s", flush=True)
    return pipeline.evaluate_model(model, data, cfg)


def _gap_closed_lines(results: dict[str, Any]) -> list[str]:
    """Gap closed = (federated − random) / (supervised − random) for each linear-probe label fraction."""
    from mlip_fed.eval.protocol import gap_closed

    flat = {name: result.flat_metrics() for name, result in results.items()}
    lines = ["gap closed = (federated − random init) / (supervised − random init), linear probe:"]
    for key in sorted(k for k in flat["federated"] if k.startswith("linear_probe/macro_auroc@")):
        gap = gap_closed(flat["federated"][key], flat["random_init"][key], flat["supervised"].get(key, math.nan))
        shown = f"{gap:.2f}" if math.isfinite(gap) else "n/a (the ceiling is not above random init)"
        lines.append(f"  {key.split('@')[1]} of the labels: {shown}")
    return lines


def _labeler_summary(manifest: Path) -> None:
    import csv

    from mlip_fed.knowledge.kb import CHEXPERT_CATEGORIES
    from mlip_fed.knowledge.labeler import label_report

    agree = total = 0
    with manifest.open(newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    for row in rows:
        predicted = label_report(row["report_text"]).labels
        for j, category in enumerate(CHEXPERT_CATEGORIES):
            truth = float(row[category]) if row[category] else math.nan
            same = (math.isnan(truth) and math.isnan(predicted[j])) or truth == predicted[j]
            agree += same
            total += 1
    example = rows[0]["report_text"].replace("\n", " ")
    print(f"  example report: {example[:160]}{'…' if len(example) > 160 else ''}")
    print(f"  label agreement over {len(rows)} reports × 14 categories: {agree / total:.4f}")


def _banner(text: str) -> None:
    print(f"\n== {text} ==", flush=True)


if __name__ == "__main__":
    sys.exit(main())
