"""Site-side pieces that need no data: the FedProx gradient, simulation helpers."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import torch
from flwr.common.config import parse_config_args
from torch import nn

from mlip_fed.federation.simulation import SimulationResult, write_run_config
from mlip_fed.federation.site import proximal_gradient
from mlip_fed.federation.superlink_tree import superlink_pids
from mlip_fed.train.trainer import standard_gradient


class _Linear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor([1.0, -2.0]))

    def forward(self, batch: dict) -> SimpleNamespace:
        loss = (self.w * batch["x"]).sum()
        return SimpleNamespace(total=loss, parts={"lin": loss})


def test_proximal_gradient_adds_mu_times_distance_to_global() -> None:
    model = _Linear()
    batch = {"x": torch.tensor([3.0, 4.0])}
    global_weights = {"w": torch.tensor([0.0, 0.0])}
    parts = proximal_gradient(global_weights, mu=0.5, max_grad_norm=None)(model, batch, 1.0)
    # d/dw [w.x + mu/2 ||w - 0||^2] = x + mu * w
    assert torch.allclose(model.w.grad, torch.tensor([3.0 + 0.5, 4.0 - 1.0]))
    assert parts["proximal"] == 0.25 * 5.0
    model.w.grad = None
    standard_gradient(model, batch, 1.0)
    assert torch.allclose(model.w.grad, torch.tensor([3.0, 4.0]))


def test_proximal_gradient_clips() -> None:
    model = _Linear()
    parts = proximal_gradient({"w": model.w.detach().clone()}, mu=0.1, max_grad_norm=1.0)(
        model, {"x": torch.tensor([30.0, 40.0])}, 1.0
    )
    assert parts["grad_norm"] == 50.0
    assert abs(float(model.w.grad.norm()) - 1.0) < 1e-5


def test_run_config_file_parses_as_flower_reads_it(tmp_path: Path) -> None:
    path = write_run_config(tmp_path / "rc.toml", "smoke", ["a=1", "b.c='x y'"], Path("/abs/out"), 2)
    parsed = parse_config_args([str(path)])
    assert parsed == {
        "experiment": "smoke",
        "overrides": "a=1 'b.c='\"'\"'x y'\"'\"''",
        "output-dir": "/abs/out",
        "num-server-rounds": 2,
    }
    from mlip_fed.config_compose import split_overrides

    assert split_overrides(str(parsed["overrides"])) == ["a=1", "b.c='x y'"]


def test_simulation_result_ok_needs_completed_status(tmp_path: Path) -> None:
    assert superlink_pids(tmp_path) == []
    log = tmp_path / "log"
    assert not SimulationResult(0, None, tmp_path, log, 1.0).ok  # flwr exited 0 but nothing was written
    assert not SimulationResult(0, {"status": "failed", "aggregated_rounds": 0}, tmp_path, log, 1.0).ok
    assert not SimulationResult(0, {"status": "running", "aggregated_rounds": 1}, tmp_path, log, 1.0).ok
    assert SimulationResult(1, {"status": "completed", "aggregated_rounds": 1}, tmp_path, log, 1.0).ok
