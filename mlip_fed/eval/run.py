"""Frozen-encoder evaluation of a checkpoint (and of a random-init encoder beside it), written as JSON and markdown.

The library half of ``mlip-eval`` (which only parses arguments); ``mlip-demo`` and benches call it too.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mlip_fed import pipeline
from mlip_fed.config import ExperimentConfig
from mlip_fed.eval.report import to_markdown, write_json
from mlip_fed.io import atomic_write_text


def run_evaluation(cfg: ExperimentConfig, checkpoint: Path | None, *, compare_random: bool) -> dict[str, Any]:
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
