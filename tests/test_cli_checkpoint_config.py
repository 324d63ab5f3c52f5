"""How ``mlip-eval`` layers the user's overrides on the config saved beside a checkpoint (no training here)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from mlip_fed.checkpoint_config import SAVED_CONFIG_NAME, layer_overrides, resolve_eval_config, saved_config
from mlip_fed.config import ConfigError
from mlip_fed.config_compose import compose_experiment
from mlip_fed.pipeline import state_dict_mismatch


@pytest.fixture(scope="module")
def saved() -> dict:
    """A training config that differs from the defaults in its model, objectives and data root."""
    overrides = ["experiment=smoke", "model.text.num_layers=2", "objectives.itm.enabled=false", "data.root=/d/train"]
    return compose_experiment(overrides).model_dump(mode="json")


def test_without_overrides_the_saved_config_is_used_as_is(saved: dict) -> None:
    cfg = layer_overrides(saved, [], "config.json")
    assert cfg.model_dump(mode="json") == saved


def test_field_overrides_apply_on_top_and_the_model_stays(saved: dict, caplog) -> None:
    with caplog.at_level(logging.WARNING):
        cfg = layer_overrides(
            saved, ["experiment=smoke", "eval.zero_shot.enabled=false", "output_dir=/o", "train.num_threads=1"], "c"
        )
    assert cfg.model.text.num_layers == 2 and not cfg.model.objectives.itm.enabled
    assert str(cfg.data.root) == "/d/train"  # experiment=smoke re-selects nothing the run had overridden
    assert not cfg.eval.zero_shot.enabled and str(cfg.output_dir) == "/o" and cfg.train.num_threads == 1
    assert "ignored" not in caplog.text  # the checkpoint's own experiment: nothing to warn about


def test_group_selections_replace_their_section(saved: dict, caplog) -> None:
    cfg = layer_overrides(saved, ["data=manifest", "data.manifest=/m.csv", "objectives=clip_only"], "c")
    assert cfg.data.source == "manifest" and str(cfg.data.manifest) == "/m.csv"
    assert cfg.data.image_size == cfg.model.image.image_size  # follows the trained encoder, not data=manifest
    assert cfg.model.objectives.enabled_names() == ["global_itc"] and cfg.model.text.num_layers == 2
    with caplog.at_level(logging.WARNING):
        layer_overrides(saved, ["experiment=synth_cpu"], "c")
    assert "experiment=synth_cpu ignored" in caplog.text


def test_a_bad_override_names_the_saved_config(saved: dict) -> None:
    with pytest.raises(ConfigError, match=r"(?s)config.json \+ \[train.lr=-1\].*train.lr = -1"):
        layer_overrides(saved, ["train.lr=-1"], "config.json")


def test_config_is_found_beside_or_inside_the_checkpoint(tmp_path: Path, saved: dict) -> None:
    trainer = tmp_path / "run" / "checkpoint.pt"
    trainer.parent.mkdir()
    torch.save({"model": {}}, trainer)
    assert saved_config(trainer) is None
    (trainer.parent / SAVED_CONFIG_NAME).write_text(json.dumps(saved))
    assert saved_config(trainer) == (saved, str(trainer.parent / SAVED_CONFIG_NAME))
    cfg, source = resolve_eval_config(trainer, [])
    assert cfg.model.text.num_layers == 2 and source.endswith(SAVED_CONFIG_NAME)

    federation = tmp_path / "fed" / "server_last.pt"
    federation.parent.mkdir()
    torch.save({"weights": {}, "config": saved}, federation)
    found = saved_config(federation)
    assert found is not None and found[0] == saved and "embedded" in found[1]


def test_mismatch_summary_is_one_line_naming_the_first_tensors() -> None:
    model = {"a": torch.zeros(2, 3), "b": torch.zeros(4), "c": torch.zeros(1)}
    checkpoint = {"a": torch.zeros(2, 5), "b": torch.zeros(4), "d": torch.zeros(1)}
    text = state_dict_mismatch(model, checkpoint)
    assert "\n" not in text
    assert "1 tensors differ in shape (checkpoint vs model): a (2, 5) vs (2, 3)" in text
    assert "missing from the checkpoint: c" in text and "the model lacks: d" in text
    assert state_dict_mismatch(model, dict(model)) == ""
