"""``mlip-pretrain`` and ``mlip-eval`` end to end on a tiny SynthCXR, plus start-up config errors."""

from __future__ import annotations

import json

import pytest

from mlip_fed.cli import evaluate as eval_cli
from mlip_fed.cli import pretrain


def _overrides(tmp_path, *extra: str) -> list[str]:
    return [
        "experiment=smoke",
        f"output_dir={tmp_path / 'run'}",
        f"data.root={tmp_path / 'data'}",
        "data.synthetic.studies_per_site=12",
        "train.batch_size=6",
        "train.progress_bar=false",
        "train.num_threads=1",
        "eval.zero_shot.enabled=false",
        *extra,
    ]


def test_pretrain_writes_checkpoint_metrics_and_eval_then_resumes(tmp_path, capsys) -> None:
    assert pretrain.main(_overrides(tmp_path)) == 0
    run = tmp_path / "run"
    summary = json.loads((run / "pretrain_summary.json").read_text())
    assert summary["epochs"] == 1 and summary["steps"] >= 2
    assert (run / "checkpoint.pt").is_file() and (run / "metrics.jsonl").read_text().strip()
    assert "linear_probe/macro_auroc@1" in summary["eval"]
    assert (run / "eval.md").read_text().startswith("# smoke")
    capsys.readouterr()

    # The same command with one more epoch continues from the checkpoint instead of starting over.
    assert pretrain.main(_overrides(tmp_path, "train.epochs=2", "--no-eval")) == 0
    assert "resumed from" in capsys.readouterr().out
    assert json.loads((run / "pretrain_summary.json").read_text())["epochs"] == 2

    # mlip-eval on that checkpoint, beside the random-init encoder.
    assert eval_cli.main(["--checkpoint", str(run / "checkpoint.pt"), "--compare-random", *_overrides(tmp_path)]) == 0
    table = json.loads((run / "eval.json").read_text())
    assert set(table) == {"pretrained", "random_init"}
    assert table["pretrained"] != table["random_init"]


def test_resume_with_a_different_model_is_refused(tmp_path, capsys) -> None:
    assert pretrain.main(_overrides(tmp_path, "--no-eval")) == 0
    capsys.readouterr()
    assert pretrain.main(_overrides(tmp_path, "model.text.num_layers=2", "--no-eval")) == 2
    assert "different `model` config" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.lr=-1", "train.lr = -1: Input should be greater than 0"),
        ("train.no_such_field=3", "train.no_such_field"),
        ("model=no_such_model", "Could not find 'model/no_such_model'"),
    ],
)
def test_bad_override_fails_at_start_naming_the_field(override: str, message: str, capsys) -> None:
    assert pretrain.main([override]) == 2
    assert message in capsys.readouterr().err


def test_itm_off_alone_is_a_valid_experiment() -> None:
    from mlip_fed.config_compose import compose_experiment

    cfg = compose_experiment(["experiment=synth_cpu", "objectives.itm.enabled=false"])
    assert cfg.model.objectives.enabled_names() == ["global_itc", "local_alignment", "category_contrast", "text_swap"]


def test_the_schema_path_of_an_objective_override_is_applied_not_dropped() -> None:
    """``model.objectives.*`` (the path error messages name) used to be overwritten by the objectives group."""
    from mlip_fed.config_compose import compose_experiment

    cfg = compose_experiment(["experiment=synth_cpu", "model.objectives.category_contrast.enabled=false"])
    assert "category_contrast" not in cfg.model.objectives.enabled_names()
    assert "global_itc" in cfg.model.objectives.enabled_names()  # the rest of the group is kept
    both = compose_experiment(["objectives=clip_only", "model.objectives.itm.enabled=true"])
    clip_only = compose_experiment(["objectives=clip_only"]).model.objectives.enabled_names()
    assert "itm" not in clip_only and set(both.model.objectives.enabled_names()) == {*clip_only, "itm"}


def test_bf16_amp_on_a_cpu_trains(tmp_path) -> None:
    """train.amp=bf16 on a CPU used to die with an uncaught RuntimeError; CPU autocast supports bf16, so it trains."""
    assert (
        pretrain.main(_overrides(tmp_path, "train.device=cpu", "train.amp=bf16", "train.max_steps=1", "--no-eval")) == 0
    )
    summary = json.loads((tmp_path / "run" / "pretrain_summary.json").read_text())
    assert summary["steps"] == 1


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="a CUDA device is visible")
def test_cuda_device_without_a_gpu_is_a_start_up_error(tmp_path, capsys) -> None:
    assert pretrain.main(_overrides(tmp_path, "train=gpu")) == 2
    assert "train.device='cuda' but no CUDA device is visible" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # refused before the model, the data or the output folder
