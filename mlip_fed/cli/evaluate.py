"""``mlip-eval``: frozen-encoder evaluation of a checkpoint, and of a random-init encoder beside it.

    mlip-eval --checkpoint runs/synth_cpu/checkpoint.pt --compare-random

The model config comes from the ``config.json`` that ``mlip-pretrain`` saved beside the checkpoint (or the
config a federation checkpoint carries); overrides apply on top of it (``mlip_fed.cli.checkpoint_config``).
Linear probe (1/10/100 % labels), zero-shot with knowledge-base prompts, image<->text retrieval and
segmentation Dice (when the data has masks), written as JSON and a markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from mlip_fed.cli.help_format import HelpFormatter, describe
from mlip_fed.config import ConfigError, ExperimentConfig


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mlip-eval", description=describe(__doc__), formatter_class=HelpFormatter)
    parser.add_argument(
        "overrides",
        nargs="*",
        help="hydra overrides, applied on top of the config.json saved beside the checkpoint "
        "(e.g. data.root=/data/test eval.zero_shot.enabled=false)",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", type=Path, help="trainer or federation checkpoint (.pt)")
    source.add_argument("--random-init", action="store_true", help="evaluate the seeded, untrained encoder")
    parser.add_argument("--compare-random", action="store_true", help="also evaluate random init, side by side")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: the config's output_dir)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from mlip_fed.cli.checkpoint_config import resolve_eval_config
    from mlip_fed.pipeline import CheckpointMismatch

    try:
        cfg, model_source = resolve_eval_config(args.checkpoint, args.overrides)
    except ConfigError as err:
        print(f"mlip-eval: {err}", file=sys.stderr)
        return 2
    try:
        results = run_evaluation(cfg, args.checkpoint, compare_random=args.compare_random or args.random_init)
    except CheckpointMismatch as err:
        print(f"mlip-eval: error: {err} (model config from {model_source})", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError) as err:
        print(f"mlip-eval: error: {err}", file=sys.stderr)
        return 2
    out = args.out or Path(cfg.output_dir)
    write_results(results, out, cfg.name)
    print(json.dumps({name: r.flat_metrics() for name, r in results.items()}, indent=2))
    print(f"wrote {out / 'eval.json'} and {out / 'eval.md'}")
    return 0


def run_evaluation(cfg: ExperimentConfig, checkpoint: Path | None, *, compare_random: bool) -> dict[str, Any]:
    from mlip_fed import pipeline

    pipeline.configure_threads(cfg)
    # The models first: pretrained weights and the checkpoint are checked before any data is read.
    model = None
    if checkpoint is not None:
        model = pipeline.build_model(cfg)
        pipeline.load_model_weights(model, checkpoint)
    random_model = pipeline.build_model(cfg) if compare_random else None
    data = pipeline.load_records(cfg.data)
    if not data.test:
        raise ValueError(f"{data.name}: no test-split records to evaluate on")
    results: dict[str, Any] = {}
    if model is not None:
        results["pretrained"] = pipeline.evaluate_model(model, data, cfg)
    if random_model is not None:
        results["random_init"] = pipeline.evaluate_model(random_model, data, cfg)
    return results


def write_results(results: dict[str, Any], out: Path, title: str) -> None:
    from mlip_fed.eval.report import to_markdown, write_json
    from mlip_fed.io import atomic_write_text

    out.mkdir(parents=True, exist_ok=True)
    sections = []
    for name, result in results.items():
        write_json(result, out / f"eval_{name}.json")
        sections.append(to_markdown(result, title=f"{title} — {name}"))
    headline = comparison_table(results)
    atomic_write_text(out / "eval.md", headline + "\n\n" + "\n\n".join(sections) + "\n")
    atomic_write_text(
        out / "eval.json", json.dumps({n: r.flat_metrics() for n, r in results.items()}, indent=2, sort_keys=True)
    )


def comparison_table(results: dict[str, Any]) -> str:
    """One row per headline metric, one column per evaluated encoder."""
    names = list(results)
    metrics = sorted({key for r in results.values() for key in r.flat_metrics()})
    lines = ["| metric | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for key in metrics:
        cells = [f"{results[n].flat_metrics().get(key, float('nan')):.3f}" for n in names]
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    notes = [f"- {n}: {what} not computed: {why}" for n in names for what, why in results[n].not_computed().items()]
    return "\n".join([*lines, *([""] if notes else []), *notes])


if __name__ == "__main__":
    sys.exit(main())
