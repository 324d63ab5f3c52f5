"""Weight averaging, server optimisers and the count-weighted bank merge (no Flower, no model)."""

from __future__ import annotations

import pytest
import torch

from mlip_fed.federation.aggregate import (
    FedAdamOptimizer,
    FedAvgOptimizer,
    build_server_optimizer,
    merge_site_banks,
    state_nbytes,
    weighted_average,
)
from mlip_fed.model.objectives.prototype_bank import PrototypeBank

K = 14


def test_weighted_average_uses_example_counts() -> None:
    a = {"w": torch.tensor([1.0, 2.0]), "steps": torch.tensor(3)}
    b = {"w": torch.tensor([4.0, 8.0]), "steps": torch.tensor(7)}
    out = weighted_average([a, b], [1, 3])
    assert torch.allclose(out["w"], torch.tensor([3.25, 6.5]))
    assert out["w"].dtype == torch.float32
    assert int(out["steps"]) == 7  # integer buffer: the heaviest site's value


def test_weighted_average_rejects_mismatched_states() -> None:
    with pytest.raises(ValueError, match="different keys"):
        weighted_average([{"a": torch.zeros(1)}, {"b": torch.zeros(1)}], [1, 1])
    with pytest.raises(ValueError, match="shape"):
        weighted_average([{"a": torch.zeros(1)}, {"a": torch.zeros(2)}], [1, 1])
    with pytest.raises(ValueError, match="positive sum"):
        weighted_average([{"a": torch.zeros(1)}], [0])


def test_fedavg_optimizer_returns_the_average() -> None:
    avg = {"w": torch.tensor([1.0])}
    out = FedAvgOptimizer().step({"w": torch.tensor([5.0])}, avg)
    assert torch.equal(out["w"], avg["w"])


def test_fedadam_moves_towards_average_and_round_trips_state() -> None:
    opt = FedAdamOptimizer(lr=0.1)
    current = {"w": torch.zeros(3)}
    averaged = {"w": torch.ones(3)}
    first = opt.step(current, averaged)
    # m = 0.1, v = 0.01 -> step = 0.1 * 0.1 / (0.1 + 1e-3)
    assert torch.allclose(first["w"], torch.full((3,), 0.1 * 0.1 / (0.1 + 1e-3)))
    clone = FedAdamOptimizer(lr=0.1)
    clone.load_state_dict(opt.state_dict())
    assert torch.allclose(opt.step(first, averaged)["w"], clone.step(first, averaged)["w"])
    with pytest.raises(ValueError, match="fedavg"):
        clone.load_state_dict(FedAvgOptimizer().state_dict())


def test_build_server_optimizer_names() -> None:
    assert build_server_optimizer("fedprox", 0.1).name == "fedavg"
    assert build_server_optimizer("fedadam", 0.1).name == "fedadam"
    with pytest.raises(ValueError, match="fedyogi"):
        build_server_optimizer("fedyogi", 0.1)


def _stats(counts: list[float], direction: torch.Tensor, dim: int = 4) -> dict[str, torch.Tensor]:
    c = torch.tensor(counts + [0.0] * (K - len(counts)))
    return {
        "sum_image": c[:, None] * direction.expand(K, dim),
        "sum_text": c[:, None] * direction.expand(K, dim),
        "count": c,
    }


def test_bank_merge_is_count_weighted_and_keeps_rare_categories() -> None:
    dim = 4
    bank = PrototypeBank(dim=dim, min_count=5)
    previous = torch.nn.functional.normalize(torch.randn(K, dim), dim=1)
    bank.prototypes_image = previous.clone()
    bank.prototypes_text = previous.clone()
    e0, e1 = torch.eye(dim)[0], torch.eye(dim)[1]
    # category 0: 9 members along e0 at site A, 3 along e1 at site B -> mean (9 e0 + 3 e1) / 12
    # category 1: 2 + 2 = 4 members < min_count 5 -> keeps its previous value
    site_a = _stats([9.0, 2.0], e0)
    site_b = _stats([3.0, 2.0], e1)
    state, updated = merge_site_banks(bank.state_dict(), [site_a, site_b], min_count=5)
    expected = torch.nn.functional.normalize((9 * e0 + 3 * e1) / 12, dim=0)
    assert torch.allclose(state["prototypes_image"][0], expected, atol=1e-6)
    assert torch.allclose(state["prototypes_text"][0], expected, atol=1e-6)
    assert torch.allclose(state["prototypes_image"][1], previous[1])
    assert updated.tolist() == [True] + [False] * (K - 1)
    assert bool(state["initialized"][0]) and not bool(state["initialized"][1])
    assert float(state["count"].abs().sum()) == 0.0  # the global window is reset


def test_bank_merge_refuses_bad_site_statistics() -> None:
    bank = PrototypeBank(dim=4)
    bad = _stats([9.0], torch.eye(4)[0])
    bad["count"][0] = float("nan")
    with pytest.raises(ValueError, match="site 0"):
        merge_site_banks(bank.state_dict(), [bad], min_count=5)
    with pytest.raises(ValueError, match="lack"):
        merge_site_banks(bank.state_dict(), [{"count": torch.zeros(K)}], min_count=5)


def test_state_nbytes() -> None:
    assert state_nbytes({"a": torch.zeros(10), "b": torch.zeros(2, dtype=torch.int64)}) == 56
