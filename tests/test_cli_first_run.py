"""What a user hits first, end to end: one tiny ``mlip-pretrain`` run, then ``mlip-eval`` on its checkpoint.

One training run is shared by every test here (it costs most of the time): a non-default model (two text
layers, so the YAML defaults do *not* fit the checkpoint), TensorBoard on, and a probe threshold no class
can reach (what a small MIMIC subset or a skewed site gives).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from mlip_fed.cli import evaluate as eval_cli
from mlip_fed.cli import pretrain


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    root = tmp_path_factory.mktemp("first_run")
    overrides = [
        "experiment=smoke",
        f"output_dir={root / 'run'}",
        f"data.root={root / 'data'}",
        "data.synthetic.studies_per_site=12",
        "train.batch_size=6",
        "train.progress_bar=false",
        "train.num_threads=1",
        "train.log_every=1",
        "train.tensorboard=true",
        "model.text.num_layers=2",
        "eval.zero_shot.enabled=false",
        "eval.linear_probe.min_count=50",
    ]
    return root / "run", pretrain.main(overrides)


def test_too_few_positives_is_a_partial_evaluation_not_a_failure(run: tuple[Path, int]) -> None:
    out, code = run
    assert code == 0
    summary = json.loads((out / "pretrain_summary.json").read_text())
    assert "no class has 50 positives" in summary["eval_not_computed"]["linear_probe"]
    assert "retrieval/i2t_R@5" in summary["eval"]
    assert not any(key.startswith("linear_probe/") for key in summary["eval"])
    md = (out / "eval.md").read_text()
    assert "Not computed: no class has 50 positives" in md and "| Cardiomegaly | skipped:" in md
    assert "## Retrieval" in md


def test_tensorboard_event_files_hold_loss_parts_and_lr(run: tuple[Path, int]) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, code = run
    assert code == 0
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/lr", "train/total", "train/global_itc", "train/text_swap"} <= tags
    assert "eval/retrieval/i2t_R@5" in tags  # the final evaluation, at the last step
    steps = [e.step for e in events.Scalars("train/lr")]
    assert steps == sorted(steps) and len(steps) >= 2


def test_eval_reads_the_config_saved_beside_the_checkpoint(run: tuple[Path, int], tmp_path: Path, capsys) -> None:
    out, code = run
    assert code == 0
    capsys.readouterr()
    assert eval_cli.main(["--checkpoint", str(out / "checkpoint.pt"), "--out", str(tmp_path)]) == 0
    table = json.loads((tmp_path / "eval.json").read_text())
    assert "retrieval/i2t_R@1" in table["pretrained"]
    assert "pretrained: linear_probe not computed: no class has 50" in (tmp_path / "eval.md").read_text()


def _one_line_error(capsys: pytest.CaptureFixture[str], checkpoint: Path) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith("mlip-eval: error: checkpoint") and str(checkpoint) in err
    return err


def test_a_real_mismatch_is_one_line(run: tuple[Path, int], tmp_path: Path, capsys) -> None:
    out, code = run
    assert code == 0
    checkpoint = out / "checkpoint.pt"
    capsys.readouterr()
    # A user override that changes the model on top of the saved config: shapes differ.
    assert eval_cli.main(["--checkpoint", str(checkpoint), "--out", str(tmp_path), "model.projection.dim=16"]) == 2
    err = _one_line_error(capsys, checkpoint)
    assert "differ in shape (checkpoint vs model)" in err and f"model config from {out / 'config.json'}" in err

    # A checkpoint copied without its config.json: the overrides alone describe another model.
    alone = tmp_path / "alone" / "checkpoint.pt"
    alone.parent.mkdir()
    shutil.copy(checkpoint, alone)
    data = ["experiment=smoke", f"data.root={out.parent / 'data'}", "data.synthetic.studies_per_site=12"]
    assert eval_cli.main(["--checkpoint", str(alone), "--out", str(tmp_path), *data]) == 2
    err = _one_line_error(capsys, alone)
    assert "checkpoint tensors the model lacks" in err and "no saved config beside the checkpoint" in err
