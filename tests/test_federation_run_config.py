"""federation/run_config.py: Flower's run config -> a validated experiment; relative paths never follow the cwd."""

from __future__ import annotations

from pathlib import Path

import pytest

from mlip_fed.config import ConfigError
from mlip_fed.federation import run_config as rc
from mlip_fed.federation.run_config import HOME_ENV_VAR, experiment_from_run_config, resolve_path

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _no_home(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(HOME_ENV_VAR, raising=False)


def test_experiment_overrides_rounds_and_output_dir_compose(tmp_path: Path) -> None:
    run = experiment_from_run_config(
        {
            "experiment": "smoke",
            "overrides": "train.batch_size=4 federation.num_rounds=5",
            "num-server-rounds": 0,
            "output-dir": str(tmp_path / "out"),
        }
    )
    assert run.cfg.name == "smoke" and run.cfg.train.batch_size == 4
    assert run.num_rounds == 5  # 0 = the config's own count
    assert run.output_dir == tmp_path / "out" and run.overrides[0] == "experiment=smoke"
    assert experiment_from_run_config({"experiment": "smoke", "num-server-rounds": 3}).num_rounds == 3


def test_relative_paths_resolve_against_the_checkout_not_the_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # the SuperLink's working directory, say
    run = experiment_from_run_config({"experiment": "smoke", "output-dir": "runs/x", "overrides": "data.root=d"})
    assert run.output_dir == REPO / "runs" / "x" and run.cfg.data.root == REPO / "d"
    kept = experiment_from_run_config({"experiment": "smoke", "output-dir": "runs/x"}, resolve_paths=False)
    assert kept.output_dir == Path("runs/x")  # a deployed site: the server's folders mean nothing there


def test_home_variable_anchors_relative_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(HOME_ENV_VAR, str(tmp_path))
    assert rc.project_root() == tmp_path.resolve()
    assert resolve_path("data/x") == tmp_path.resolve() / "data" / "x"
    assert resolve_path(tmp_path / "abs") == tmp_path / "abs"


def test_an_installed_package_without_home_refuses_relative_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rc, "project_root", lambda: None)
    with pytest.raises(ConfigError, match=rf"data.root = 'synth' is relative.*set {HOME_ENV_VAR}"):
        resolve_path("synth", field="data.root")
    assert resolve_path("/abs/synth") == Path("/abs/synth")


@pytest.mark.parametrize(
    ("run_config", "named"),
    [
        ({"experiment": "smoke", "rounds": 3}, r"unknown key\(s\) \['rounds'\]"),
        ({"num-server-rounds": -1}, r"num-server-rounds = -1: expected an integer >= 0"),
        ({"num-server-rounds": True}, r"num-server-rounds = True"),
        ({"num-server-rounds": "3"}, r"num-server-rounds = '3'"),
    ],
)
def test_bad_run_config_values_are_named(run_config: dict, named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        experiment_from_run_config(run_config)


def test_a_bad_override_names_the_field() -> None:
    with pytest.raises(ConfigError, match="train.batch_size"):
        experiment_from_run_config({"experiment": "smoke", "overrides": "train.batch_size=-1"})
