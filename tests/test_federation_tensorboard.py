"""train.tensorboard=true on a federated run: each round's record mirrored into TensorBoard scalars."""

from __future__ import annotations

from pathlib import Path

from mlip_fed.federation.tensorboard import round_scalars


def test_round_scalars_flatten_a_round_record() -> None:
    record = {
        "round": 2,
        "train_loss": 3.5,
        "num_updates": 2,
        "eval": {"auroc": 0.61, "r_at_5": float("nan")},
        "sites": [{"site_id": "site_0", "num_examples": 40, "train_loss": 3.4, "epsilon": 1.2}],
        "epsilon": {"site_0": 1.2},
        "bytes": {"total": 1000, "up_weights_per_site": [10, 20]},
        "seconds": {"round": 4.0, "evaluation": 0.5},
    }
    scalars = round_scalars(record)
    assert scalars["round/train_loss"] == 3.5 and scalars["eval/auroc"] == 0.61
    assert "eval/r_at_5" not in scalars  # NaN is not a point on a curve
    assert scalars["site/site_0/train_loss"] == 3.4 and scalars["epsilon/site_0"] == 1.2
    assert scalars["bytes/total"] == 1000 and "bytes/up_weights_per_site" not in scalars
    assert scalars["seconds/round"] == 4.0


def test_federated_run_writes_round_eval_and_site_scalars(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from mlip_fed.federation.simulation import run_in_process

    out = tmp_path / "run"
    run_in_process(
        "smoke",
        [f"data.root={tmp_path / 'data'}", "train.num_threads=1", "train.tensorboard=true", "federation.num_rounds=2"],
        out,
    )
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("round/train_loss")] == [1, 2]
    assert [e.step for e in events.Scalars("eval/r_at_5")] == [0, 1, 2]  # round 0: the random-init baseline
    assert {"site/site_0/train_loss", "site/site_1/train_loss", "seconds/round", "bytes/total"} <= tags
    assert list((out / "sites" / "site_0" / "tensorboard").glob("events.out.tfevents.*"))  # the site trainer's steps
