"""Centralized pretraining: every site's records pooled, one ``LocalTrainer``, then the frozen-encoder evaluation.

The library half of ``mlip-pretrain`` (which only parses arguments), so benches and tests run the same code.
Re-running with the same config resumes from ``<output_dir>/checkpoint.pt``; the validated config is saved beside
it as ``config.json`` (``mlip_fed.checkpoint_config``), which ``mlip-eval --checkpoint`` reads back.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mlip_fed import pipeline
from mlip_fed.checkpoint_config import SAVED_CONFIG_NAME
from mlip_fed.config import ExperimentConfig
from mlip_fed.io import atomic_write_json
from mlip_fed.train.trainer import LocalTrainer


def run_pretraining(cfg: ExperimentConfig, *, evaluate: bool = True) -> dict[str, Any]:
    """Train centrally on every site's records pooled; return a summary (and write it to output_dir)."""

    pipeline.configure_threads(cfg)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    # The model first: pretrained weights are read, converted and checked before any data is.
    model = pipeline.build_model(cfg)
    for report in model.weight_reports:
        print(f"weights: {report.summary()}")
    data = pipeline.load_records(cfg.data)
    print(f"data: {len(data.train)} train / {len(data.test)} test studies ({data.name})\n{data.skips.summary()}")
    collator = pipeline.build_collator(model, cfg)
    loader = pipeline.train_loader(pipeline.train_dataset(data.train, cfg), collator, cfg)
    total_steps = cfg.train.max_steps or cfg.train.epochs * pipeline.steps_per_epoch(len(data.train), cfg)
    trainer = LocalTrainer(model, cfg.train, total_steps=total_steps, output_dir=out)
    checkpoint = out / "checkpoint.pt"
    config_file = out / SAVED_CONFIG_NAME  # what mlip-eval --checkpoint reads back
    if cfg.train.resume and checkpoint.is_file():
        pipeline.check_resumable(config_file, cfg)
        trainer.load_checkpoint(checkpoint)
        print(f"resumed from {checkpoint} at epoch {trainer.state.epoch}, step {trainer.state.global_step}")
    atomic_write_json(config_file, cfg.model_dump(mode="json"))

    def save_every(step_info: dict[str, Any]) -> None:
        if step_info["step"] % cfg.train.checkpoint_every_steps == 0:
            trainer.save_checkpoint(checkpoint)

    summaries = []
    while trainer.state.epoch < cfg.train.epochs and not trainer.reached_max_steps():
        summary = trainer.fit(loader, epochs=1, on_step=save_every)
        trainer.save_checkpoint(checkpoint)
        summaries.append(summary)
        parts = " ".join(f"{k}={v:.3f}" for k, v in sorted(summary.mean_parts.items()))
        print(
            f"epoch {trainer.state.epoch}/{cfg.train.epochs}: {summary.steps} steps, "
            f"{summary.samples_per_second:.1f} img/s, {parts}"
        )
    trainer.save_checkpoint(checkpoint)
    result: dict[str, Any] = {
        "output_dir": str(out),
        "epochs": trainer.state.epoch,
        "steps": trainer.state.global_step,
        "train_seconds": sum(s.seconds for s in summaries),
        "images_per_second": (
            sum(s.samples for s in summaries) / max(1e-9, sum(s.seconds for s in summaries)) if summaries else None
        ),
        "skipped_images": dict(data.skips.skipped) | dict(loader.dataset.skips.skipped),
        "peak_rss_gib": pipeline.peak_rss_gib(),
        "pretrained_weights": [report.as_dict() for report in model.weight_reports],
    }
    if evaluate and data.test:
        evaluation = pipeline.evaluate_model(model, data, cfg)
        pipeline.write_evaluation(evaluation, out, title=f"{cfg.name}: frozen-encoder evaluation")
        result["eval"] = evaluation.flat_metrics()
        trainer.log_evaluation(result["eval"])
        if evaluation.not_computed():  # e.g. too few positives for the probe: reported, not fatal
            result["eval_not_computed"] = evaluation.not_computed()
    atomic_write_json(out / "pretrain_summary.json", result)
    return result
