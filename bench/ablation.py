"""Ablation: CLIP-only → + divergence → + local → + category prototypes → full MLIP (+ ITM and swapping).

Same data, same compute (epochs, batch, steps) for every variant, several seeds; a frozen-encoder
linear probe at 1 / 10 / 100 % labels, zero-shot and retrieval on the SynthCXR test split, and the
seeded random-init encoder under the same protocol. Writes the table and a plot into docs/results.md.

    python bench/ablation.py --seeds 0 1 2 --studies-per-site 400 --epochs 4
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

VARIANTS: tuple[tuple[str, str], ...] = (
    ("clip_only", "CLIP-only (plain ITC)"),
    ("divergence", "+ divergence encoder"),
    ("local", "+ token-knowledge-patch alignment"),
    ("category", "+ knowledge-guided category prototypes"),
    ("full", "+ ITM and text swapping = full MLIP"),
)
HEADLINE = (
    ("linear_probe/macro_auroc@0.01", "LP AUROC 1%"),
    ("linear_probe/macro_auroc@0.1", "LP AUROC 10%"),
    ("linear_probe/macro_auroc@1", "LP AUROC 100%"),
    ("zero_shot/macro_auroc", "zero-shot AUROC"),
    ("retrieval/i2t_R@5", "i2t R@5"),
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--studies-per-site", type=int, default=400)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--variants", nargs="+", default=[v for v, _ in VARIANTS])
    parser.add_argument("--work-dir", type=Path, default=REPO / "runs" / "ablation")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "results.md")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-report", action="store_true", help="only train/evaluate (several processes in parallel)")
    parser.add_argument("--report-only", action="store_true", help="only collect finished runs into the report")
    return parser.parse_args(argv)


def overrides(args: argparse.Namespace, variant: str, seed: int) -> list[str]:
    return [
        "experiment=synth_cpu",
        f"objectives={variant}",
        f"seed={seed}",
        f"output_dir={args.work_dir / f'{variant}_seed{seed}'}",
        f"data.root={args.work_dir / 'data'}",
        f"data.synthetic.studies_per_site={args.studies_per_site}",
        f"train.epochs={args.epochs}",
        f"train.batch_size={args.batch_size}",
        f"train.num_threads={args.threads}",
        "train.progress_bar=false",
        "train.resume=false",
        "eval.segmentation.enabled=false",
    ]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from mlip_fed import pipeline
    from mlip_fed.cli.hydra_config import compose_experiment
    from mlip_fed.cli.pretrain import run_pretraining

    rows: dict[str, list[dict[str, float]]] = {}
    seconds: dict[str, list[float]] = {}
    for seed in args.seeds:
        random_file = args.work_dir / f"random_init_seed{seed}.json"
        if not random_file.is_file() and not args.report_only:
            cfg = compose_experiment(overrides(args, "clip_only", seed))
            pipeline.configure_threads(cfg)
            data = pipeline.load_records(cfg.data)
            result = pipeline.evaluate_model(pipeline.build_model(cfg), data, cfg)
            random_file.parent.mkdir(parents=True, exist_ok=True)
            random_file.write_text(json.dumps(result.flat_metrics()))
        if random_file.is_file():
            rows.setdefault("random_init", []).append(json.loads(random_file.read_text()))
        for variant in args.variants:
            cfg = compose_experiment(overrides(args, variant, seed))
            summary_file = Path(cfg.output_dir) / "pretrain_summary.json"
            if not summary_file.is_file() and not args.report_only:
                run_pretraining(cfg, evaluate=True)
            if not summary_file.is_file():
                continue
            summary = json.loads(summary_file.read_text())
            seconds.setdefault(variant, []).append(summary["train_seconds"])
            rows.setdefault(variant, []).append(summary["eval"])
            print(f"[ablation] seed {seed} {variant}: {json.dumps(summary['eval'])}", flush=True)
    if args.no_report:
        return 0
    (args.work_dir / "ablation.json").write_text(json.dumps({"rows": rows, "seconds": seconds}, indent=2))
    plot = args.out.parent / "figures" / "ablation.png"
    write_plot(rows, plot)
    write_markdown(args, rows, seconds, plot)
    print(f"wrote {args.out} and {plot}")
    return 0


def mean_std(values: list[float]) -> tuple[float, float]:
    clean = [v for v in values if v == v]
    if not clean:
        return float("nan"), float("nan")
    return statistics.fmean(clean), statistics.stdev(clean) if len(clean) > 1 else 0.0


def write_markdown(
    args: argparse.Namespace, rows: dict[str, list[dict[str, float]]], seconds: dict[str, list[float]], plot: Path
) -> None:
    names = dict(VARIANTS) | {"random_init": "random-init encoder (no pretraining)"}
    header = "| variant | " + " | ".join(label for _, label in HEADLINE) + " | train s/run |"
    lines = [header, "|---|" + "---:|" * (len(HEADLINE) + 1)]
    for variant in [v for v in ["random_init", *args.variants] if v in rows]:
        cells = []
        for key, _ in HEADLINE:
            mean, std = mean_std([r.get(key, float("nan")) for r in rows[variant]])
            cells.append(f"{mean:.3f} ± {std:.3f}")
        secs = seconds.get(variant)
        cells.append(f"{statistics.fmean(secs):.0f}" if secs else "—")
        lines.append(f"| {names[variant]} | " + " | ".join(cells) + " |")
    command = (
        f"python bench/ablation.py --seeds {' '.join(map(str, args.seeds))} "
        f"--studies-per-site {args.studies_per_site} --epochs {args.epochs} --batch-size {args.batch_size}"
    )
    block = "\n".join(
        [
            "<!-- bench:ablation:begin -->",
            f"Command: `{command}` (mean ± std over seeds {args.seeds}; `train s/run` is the training time only; SynthCXR 3 sites × "
            f"{args.studies_per_site} studies at 64², pooled; CPU default model; same data and steps for every row).",
            "",
            *lines,
            "",
            f"![ablation]({plot.relative_to(args.out.parent)})",
            "<!-- bench:ablation:end -->",
        ]
    )
    _replace_block(args.out, "ablation", block, title="# Results on SynthCXR\n")


def _replace_block(path: Path, name: str, block: str, title: str, heading: str = "## Ablation") -> None:
    """Replace this benchmark's marked block in a doc (other benchmarks' blocks stay as they are)."""
    begin, end = f"<!-- bench:{name}:begin -->", f"<!-- bench:{name}:end -->"
    text = path.read_text() if path.exists() else title
    if begin in text and end in text:
        text = text[: text.index(begin)] + block + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip() + f"\n\n{heading}\n\n" + block + "\n"
    from mlip_fed.io import atomic_write_text

    atomic_write_text(path, text)


def write_plot(rows: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = list(rows)
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6), sharey=False)
    for ax, (key, label) in zip(axes, HEADLINE[:3], strict=True):
        stats = [mean_std([r.get(key, float("nan")) for r in rows[v]]) for v in variants]
        ax.bar(range(len(variants)), [m for m, _ in stats], yerr=[s for _, s in stats], capsize=3, color="#4c72b0")
        ax.set_xticks(range(len(variants)), variants, rotation=35, ha="right", fontsize=8)
        ax.set_title(label)
        ax.set_ylim(0.4, 1.0)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
