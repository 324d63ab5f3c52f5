"""``pipeline.train_for_steps``: exactly max_steps optimiser steps, whatever the epoch length."""

from __future__ import annotations

import pytest
import torch

from mlip_fed import pipeline
from mlip_fed.config_compose import compose_experiment


def _cfg(tmp_path, *extra: str):
    return compose_experiment(
        [
            "experiment=smoke",
            f"data.root={tmp_path / 'data'}",
            "train.num_threads=1",
            "train.progress_bar=false",
            *extra,
        ]
    )


def test_trains_exactly_max_steps_across_epochs_and_changes_weights(tmp_path) -> None:
    cfg = _cfg(tmp_path, "train.max_steps=7", "train.epochs=1000", "objectives=clip_only")
    data = pipeline.load_records(cfg.data)
    assert pipeline.steps_per_epoch(len(data.train), cfg) < 7  # the run must cross epochs
    untrained = pipeline.build_model(cfg).state_dict()
    model, info = pipeline.train_for_steps(cfg, data.train)
    assert info["steps"] == 7 and info["train_seconds"] > 0
    assert "global_itc" in info["last_epoch"]
    moved = [k for k, v in model.state_dict().items() if v.is_floating_point() and not torch.equal(v, untrained[k])]
    assert any(k.startswith("image_encoder.") for k in moved)


def test_refuses_without_max_steps(tmp_path) -> None:
    cfg = _cfg(tmp_path)
    with pytest.raises(ValueError, match="max_steps"):
        pipeline.train_for_steps(cfg, [])
