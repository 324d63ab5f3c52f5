"""evaluate_all end to end on a fake encoder, the config schema, and the JSON / markdown writers."""

from __future__ import annotations

import json
import math

import pytest
import torch
from pydantic import ValidationError
from test_eval_features import FakeEncoder, FakeTokenizer, ToyCXR

from mlip_fed.eval.config import EvalConfig
from mlip_fed.eval.report import evaluate_all, load_result, to_markdown, write_json, write_markdown

SEG_ON = {"segmentation": {"enabled": True, "class_names": ["Cardiomegaly"], "epochs": 2, "hidden": 8}}


def _cfg(**overrides) -> EvalConfig:
    base = {"batch_size": 16, "linear_probe": {"fractions": [0.1, 1.0]}, **SEG_ON}
    return EvalConfig.model_validate({**base, **overrides})


def test_evaluate_all_runs_every_evaluator_and_round_trips(tmp_path) -> None:
    torch.set_num_threads(1)
    model = FakeEncoder().train()
    result = evaluate_all(model, FakeTokenizer(), ToyCXR(64, seed=0), ToyCXR(32, seed=1), _cfg())
    assert model.training  # handed back in the mode it came in
    assert (result.n_train, result.n_test) == (64, 32)

    lp = result.linear_probe
    assert lp is not None and lp.classes == ["No Finding", "Cardiomegaly"]  # the only labelled classes
    assert lp.fractions[-1].per_class["Cardiomegaly"] > 0.8  # a bright square is visible to a random conv
    zs = result.zero_shot
    assert zs is not None and len(zs.classes) == 14
    assert math.isnan(zs.per_class["Edema"]) and not math.isnan(zs.per_class["Cardiomegaly"])
    rt = result.retrieval
    assert rt is not None and rt.n == 32 and 0.0 <= rt.image_to_text.recall[10] <= 1.0
    assert set(rt.image_to_text.precision) == {5, 10, 50}
    sg = result.segmentation
    assert sg is not None and 0.0 <= sg.mean_dice <= 1.0

    path = write_json(result, tmp_path / "out" / "eval.json")
    raw = json.loads(path.read_text())  # standard JSON: undefined metrics are null, not NaN
    assert raw["zero_shot"]["per_class"]["Edema"] is None
    assert load_result(path).model_dump_json() == result.model_dump_json()
    assert not list((tmp_path / "out").glob("*.tmp"))

    md = to_markdown(result, title="toy")
    for heading in ("## Linear probe", "## Zero-shot", "## Retrieval", "## Segmentation"):
        assert heading in md
    assert "| Edema | n/a |" in md
    assert write_markdown(result, tmp_path / "eval.md", title="toy").read_text() == md

    flat = result.flat_metrics()
    assert flat["linear_probe/macro_auroc@1"] == lp.fractions[-1].macro_auroc
    assert "retrieval/i2t_R@1" in flat and "segmentation/mean_dice" in flat


def test_cheap_server_evaluation_needs_no_masks() -> None:
    """Linear probe + retrieval only (what the server runs each round): masks are never read."""
    cfg = EvalConfig.model_validate({"zero_shot": {"enabled": False}, "linear_probe": {"fractions": [1.0]}})
    res = evaluate_all(
        FakeEncoder(), FakeTokenizer(), ToyCXR(32, with_mask=False), ToyCXR(16, seed=2, with_mask=False), cfg
    )
    assert res.zero_shot is None and res.segmentation is None
    assert res.linear_probe is not None and res.retrieval is not None
    again = evaluate_all(
        FakeEncoder(), FakeTokenizer(), ToyCXR(32, with_mask=False), ToyCXR(16, seed=2, with_mask=False), cfg
    )
    assert again.model_dump_json() == res.model_dump_json()


def test_config_errors_name_the_field() -> None:
    with pytest.raises(ValidationError, match="class_names"):
        EvalConfig.model_validate({"segmentation": {"enabled": True}})
    with pytest.raises(ValidationError, match="fractions"):
        EvalConfig.model_validate({"linear_probe": {"fractions": [0.0]}})
    with pytest.raises(ValidationError, match="extra"):
        EvalConfig.model_validate({"linear_prob": {}})
    with pytest.raises(ValueError, match="tokenizer"):
        evaluate_all(FakeEncoder(), None, ToyCXR(8), ToyCXR(8), EvalConfig())


def test_load_result_rejects_garbage(tmp_path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('{"n_train": "many"}')
    with pytest.raises(ValueError, match="bad.json"):
        load_result(bad)
