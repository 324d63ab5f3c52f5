"""``mlip-simulate --gpus-per-site``: the sites' GPU share reaches Flower, and a GPU run without one is refused.

Flower's default is 0 GPUs per ClientApp and Ray then hides every GPU from it (``CUDA_VISIBLE_DEVICES=""``), so
``train=gpu`` failed inside every site and ``train.device=auto`` trained on the CPU. Nothing here starts Flower.
"""

from __future__ import annotations

import io
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch

from mlip_fed.cli import simulate
from mlip_fed.federation import simulation
from mlip_fed.federation.simulation import SimulationResult, federation_config
from mlip_fed.train import trainer


def test_federation_config_carries_the_gpu_share_into_flowers_backend_config() -> None:
    """Parsed by the installed Flower exactly as ``flwr run --federation-config`` and ``flwr-simulation`` do."""
    from flwr.common.config import parse_config_args
    from flwr.simulation.app import _run_simulation_settings
    from flwr.supercore.utils import simulation_config_from_json

    for gpus, expected in ((0.5, 0.5), (1, 1.0), (0.0, 0.0)):
        text = federation_config(3, 2, gpus)
        parsed = {k.replace("-", "_"): v for k, v in parse_config_args([text]).items()}
        num_supernodes, _, backend_config, _, _ = _run_simulation_settings(simulation_config_from_json(parsed))
        assert num_supernodes == 3
        assert backend_config["client_resources"] == {"num_cpus": 2, "num_gpus": expected}
    with pytest.raises(ValueError, match=">= 0"):
        federation_config(3, 1, -1)


def test_run_flwr_simulation_passes_the_gpu_share_to_flwr_run(tmp_path: Path, monkeypatch) -> None:
    commands: list[list[str]] = []

    class _Finished:  # flwr run, and the launcher watchdog started beside it
        stdout = io.StringIO("")
        pid = 0

        def __init__(self, cmd: list[str], **_: Any) -> None:
            commands.append(cmd)

        def wait(self, timeout: float | None = None) -> int:
            return 0

        def poll(self) -> int:
            return 0

    monkeypatch.setattr(subprocess, "Popen", _Finished)
    result = simulation.run_flwr_simulation(
        tmp_path, output_dir=tmp_path / "out", num_supernodes=2, num_cpus_per_client=3, num_gpus_per_client=0.5
    )
    assert not result.ok  # nothing ran: no results.json
    cmd = commands[0]
    assert cmd[cmd.index("--federation-config") + 1] == (
        "num-supernodes=2 client-resources-num-cpus=3 client-resources-num-gpus=0.5"
    )


@pytest.fixture
def launched(monkeypatch) -> list[dict[str, Any]]:
    """Records run_flwr_simulation calls instead of starting Flower (a completed run)."""
    calls: list[dict[str, Any]] = []

    def fake_run(app_dir: Path, **kwargs: Any) -> SimulationResult:
        calls.append(kwargs)
        out = Path(kwargs["output_dir"])
        return SimulationResult(0, {"status": "completed", "aggregated_rounds": 1}, out, out / "log", 1.0)

    monkeypatch.setattr(simulation, "run_flwr_simulation", fake_run)
    return calls


@pytest.mark.parametrize("override", ["train=gpu", "train.device=cuda"])
def test_a_gpu_experiment_with_no_gpus_per_site_is_refused_at_start_up(
    tmp_path: Path, monkeypatch, capsys, launched, override: str
) -> None:
    monkeypatch.setattr(simulate, "visible_gpu_count", lambda: 1)
    assert simulate.main(["--out", str(tmp_path), override]) == 2
    err = capsys.readouterr().err
    assert "train.device='cuda'" in err and "--gpus-per-site is 0" in err and "--gpus-per-site 1" in err
    assert launched == []
    assert simulate.main(["--out", str(tmp_path), "--gpus-per-site", "0.5", override]) == 0
    assert launched[0]["num_gpus_per_client"] == 0.5


def test_gpus_the_host_does_not_have_are_refused(tmp_path: Path, monkeypatch, capsys, launched) -> None:
    monkeypatch.setattr(simulate, "visible_gpu_count", lambda: 0)
    assert simulate.main(["--out", str(tmp_path), "--gpus-per-site", "1"]) == 2
    assert "this host has 0 visible GPU(s)" in capsys.readouterr().err and launched == []


def test_auto_device_on_a_gpu_host_without_gpus_per_site_warns(tmp_path: Path, monkeypatch, capsys, launched) -> None:
    monkeypatch.setattr(simulate, "visible_gpu_count", lambda: 2)
    assert simulate.main(["--out", str(tmp_path), "train.device=auto"]) == 0
    assert "warning: this host has 2 GPU(s) but --gpus-per-site is 0" in capsys.readouterr().err
    assert launched[0]["num_gpus_per_client"] == 0.0


def test_a_site_with_its_gpus_hidden_says_so(monkeypatch, caplog) -> None:
    """Inside a ClientApp given 0 GPUs (CUDA_VISIBLE_DEVICES='' on a GPU host): auto warns, cuda names the flag."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(trainer, "hidden_gpus", lambda: 4)
    trainer._note_hidden_gpus.cache_clear()
    with caplog.at_level("WARNING", logger="mlip_fed.train"):
        assert trainer.resolve_device("auto") == torch.device("cpu")
    assert any("this host has 4 NVIDIA GPU(s)" in r.getMessage() for r in caplog.records)
    with pytest.raises(RuntimeError, match="--gpus-per-site"):
        trainer.resolve_device("cuda")
    trainer._note_hidden_gpus.cache_clear()


def test_hidden_gpus_reads_the_environment(monkeypatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    assert trainer.hidden_gpus() == 0  # GPUs are visible: nothing hidden, whatever the host has
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert trainer.hidden_gpus() == 0
