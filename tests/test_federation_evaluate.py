"""federation/evaluate.py: the server's per-round probe split and its metrics on a tiny SynthCXR held-out set."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from mlip_fed.data.records import StudyRecord
from mlip_fed.federation.evaluate import ServerEvaluator, patient_halves


def _records(patients: list[str]) -> list[StudyRecord]:
    return [StudyRecord(Path(f"/x/{p}_{i}.png"), "r", p, f"{p}_{i}") for i, p in enumerate(patients)]


def test_patient_halves_keep_each_patient_on_one_side_and_are_seeded() -> None:
    records = _records([f"p{i % 7}" for i in range(30)])  # several studies per patient
    first, second = patient_halves(records, seed=0)
    assert sorted(first + second) == list(range(30))
    assert not {records[i].patient_id for i in first} & {records[i].patient_id for i in second}
    assert patient_halves(records, seed=0) == (first, second)
    assert any(patient_halves(records, seed=s) != (first, second) for s in range(1, 5))


def test_one_patient_cannot_be_split() -> None:
    with pytest.raises(ValueError, match="1 patient"):
        patient_halves(_records(["p0"] * 5), seed=0)


def test_too_few_heldout_studies_are_refused() -> None:
    from mlip_fed.config import ExperimentConfig

    with pytest.raises(ValueError, match="at least 4 held-out studies, got 3"):
        ServerEvaluator(ExperimentConfig(), model=None, records=_records(["a", "b", "c"]))


@pytest.fixture(scope="module")
def evaluator(tmp_path_factory: pytest.TempPathFactory) -> tuple[ServerEvaluator, list[str], object]:
    from mlip_fed import pipeline
    from mlip_fed.config_compose import compose_experiment

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("synth")
    cfg = compose_experiment(["experiment=smoke", f"data.root={root}", "data.synthetic.studies_per_site=30"])
    model = pipeline.build_model(cfg)
    lines: list[str] = []
    return ServerEvaluator.from_config(cfg, model, log=lines.append), lines, model


def test_metrics_of_a_round(evaluator) -> None:
    ev, lines, model = evaluator
    assert lines[0].startswith(f"[server] evaluation on {len(ev.records)} held-out studies")
    metrics = ev(model.state_dict(), {})
    assert metrics["n_heldout"] == len(ev.records)
    assert metrics["r_at_5"] == pytest.approx(0.5 * (metrics["r_at_5_i2t"] + metrics["r_at_5_t2i"]))
    assert all(0.0 <= metrics[k] <= 1.0 for k in ("r_at_5_i2t", "r_at_5_t2i"))
    assert math.isnan(metrics["auroc"]) or 0.0 <= metrics["auroc"] <= 1.0


def test_a_probe_without_enough_positives_is_skipped_and_said(evaluator) -> None:
    ev, lines, model = evaluator
    ev.min_class_count = 10**6
    try:
        metrics = ev(model.state_dict(), {})
    finally:
        ev.min_class_count = 3
    assert math.isnan(metrics["auroc"]) and "auroc_classes" not in metrics
    assert lines[-1] == "[server] linear probe skipped: no class has 1000000 positives and negatives"


def test_a_source_without_a_test_split_is_refused(tmp_path: Path) -> None:
    from mlip_fed.config_compose import compose_experiment

    manifest = tmp_path / "m.csv"
    image = tmp_path / "i.png"
    image.write_bytes(b"")
    manifest.write_text(f"image_path,report_text,patient_id,study_id,split\n{image},r,p,s,train\n", encoding="utf-8")
    cfg = compose_experiment(["experiment=smoke", "data.source=manifest", f"data.manifest={manifest}"])
    with pytest.raises(ValueError, match="has no test split for server evaluation"):
        ServerEvaluator.from_config(cfg, model=None, log=lambda _: None)
