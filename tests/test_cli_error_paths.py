"""mlip-demo, mlip-simulate and mlip-data check: a bad argument fails at once, naming the value, with exit status 2,
before any data is generated or a federation is started."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from mlip_fed import pipeline
from mlip_fed.cli import data, demo, simulate
from mlip_fed.federation import simulation


@pytest.fixture(autouse=True)
def nothing_starts(monkeypatch: pytest.MonkeyPatch) -> None:
    """Generating data or starting a federation fails the test."""

    def started(what: str) -> Callable[..., None]:
        def fail(*_args: object, **_kwargs: object) -> None:
            raise AssertionError(f"a bad argument {what}")

        return fail

    monkeypatch.setattr(simulation, "run_flwr_simulation", started("started a federation"))
    monkeypatch.setattr(pipeline, "synthetic_manifests", started("generated data"))


def _exit_status(main: Callable[[list[str]], int], argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as stop:  # argparse refuses at parse time
        return int(stop.code or 0)


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["--sites", "0"], "argument --sites: must be >= 1, got '0'"),
        (["--rounds", "0"], "argument --rounds: must be >= 1, got '0'"),
        (["--rounds", "x"], "argument --rounds: expected an integer, got 'x'"),
        (["--studies-per-site", "-3"], "argument --studies-per-site: must be >= 1, got '-3'"),
        (["--local-epochs", "0"], "argument --local-epochs: must be >= 1, got '0'"),
        (["--supervised-steps", "-5"], "argument --supervised-steps: must be >= 0, got '-5'"),
        (["train.batch_size=-1"], "train.batch_size = -1"),
        (["experiment=nope"], "Could not find 'experiment/nope'"),
    ],
)
def test_demo_refuses_bad_arguments(argv: list[str], named: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert _exit_status(demo.main, argv) == 2
    assert named in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["--sites", "0"], "argument --sites: must be >= 1, got '0'"),
        (["--rounds", "-2"], "argument --rounds: must be >= 0, got '-2'"),
        (["--cpus-per-site", "0"], "argument --cpus-per-site: must be >= 1, got '0'"),
        (["--gpus-per-site", "-1"], "--gpus-per-site must be >= 0, got -1.0"),
        (["--timeout", "0"], "argument --timeout: must be >= 1, got '0'"),
        (["--timeout", "soon"], "argument --timeout: expected a number, got 'soon'"),
        (["--app-dir", "/nonexistent/app"], "argument --app-dir: '/nonexistent/app' is not a directory"),
        (["experiment=nope"], "Could not find 'experiment/nope'"),
        (["federation.num_rounds=-1"], "federation.num_rounds = -1"),
    ],
)
def test_simulate_refuses_bad_arguments(
    argv: list[str], named: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _exit_status(simulate.main, ["--out", str(tmp_path / "out"), *argv]) == 2
    assert named in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_simulate_needs_an_output_folder(capsys: pytest.CaptureFixture[str]) -> None:
    assert _exit_status(simulate.main, []) == 2
    assert "the following arguments are required: --out" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        ([], "nothing to check: give --manifest, --mimic-root or --chexpert-csv/--chexpert-root"),
        (["--manifest", "/nonexistent/m.csv"], "/nonexistent/m.csv"),
        (["--mimic-reports", "/r"], "--mimic-reports needs --mimic-root"),
        (["--mimic-root", "/nonexistent/mimic"], "MIMIC-CXR-JPG root /nonexistent/mimic is not a directory"),
        (["--chexpert-csv", "/x.csv"], "--chexpert-csv and --chexpert-root go together"),
        (["--chexpert-csv", "/x.csv", "--chexpert-root", "/nonexistent/cx"], "/nonexistent/cx is not a directory"),
        (["--chexpert-policy", "maybe"], "invalid choice: 'maybe'"),
    ],
)
def test_data_check_refuses_bad_arguments(argv: list[str], named: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert _exit_status(data.main, ["check", *argv]) == 2
    assert named in capsys.readouterr().err


def test_data_check_of_a_manifest_without_rows_loads_nothing_and_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest = tmp_path / "m.csv"
    manifest.write_text("image_path,report_text,patient_id,study_id\n", encoding="utf-8")
    assert data.main(["check", "--manifest", str(manifest)]) == 1
    assert "total loaded: 0" in capsys.readouterr().out
