"""``make demo``: the main job on built-in data, start to finish, on a laptop-class CPU.

1. Generates a SynthCXR federation of three hospitals (own scanners, prevalence, report styles).
2. Shows what the labeler reads in one hospital's reports against the generator's truth.
3. Runs ``flwr run .`` (a private local SuperLink, three simulated hospitals) for a few rounds,
   streaming a per-round table (loss, linear-probe AUROC, R@5, time).
4. Compares the federated encoder with the seeded random-init encoder under the same probe.

Nothing is downloaded; everything is written under ``demo_out/``.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mlip-demo", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "demo_out")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--studies-per-site", type=int, default=300)
    parser.add_argument("--sites", type=int, default=3)
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
        "eval.segmentation.enabled=false",
        "eval.zero_shot.enabled=false",
        "train.progress_bar=false",
        *args.overrides,
    ]
    from mlip_fed.cli.hydra_config import compose_experiment
    from mlip_fed.config import ConfigError

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

    _banner("4/4  Global encoder vs random-init encoder (frozen encoder, linear probe on all train studies)")
    results = result.results or {}
    checkpoint = result.output_dir / "checkpoints" / "server_last.pt"
    from mlip_fed.cli.evaluate import comparison_table, run_evaluation, write_results

    evaluation = run_evaluation(cfg, checkpoint, compare_random=True)
    renamed = {"random_init": evaluation["random_init"], "federated": evaluation["pretrained"]}
    write_results(renamed, out / "eval", cfg.name)
    table = comparison_table(renamed)
    print("\n".join("  " + line for line in table.splitlines() if "median_rank" not in line))
    print(f"  (full tables: {out / 'eval' / 'eval.md'})")
    failures = results.get("failures") or []
    print(f"\n  site failures: {len(failures)}")
    print(f"  results: {result.output_dir / 'results.json'}")
    for plot in sorted(result.output_dir.glob("*.png")):
        print(f"  plot:    {plot}")
    print(f"\nmlip-demo finished in {time.perf_counter() - start:.0f} s")
    return 0


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
