"""SecAgg+ packing: what sites mask and what the server recovers equals plain aggregation within quantization error.

"Aggregate by hand" replays Flower's own SecAgg+ arithmetic (quantize, sum, dequantize, divide by the weight sum;
the masks cancel and are left out), so these tests pin the packing to what the workflow really computes.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from flwr.common.secure_aggregation.quantization import dequantize, quantize

from mlip_fed.config import FederationConfig
from mlip_fed.federation.aggregate import merge_site_banks, weighted_average
from mlip_fed.federation.payload import SiteUpdate
from mlip_fed.federation.secure_payload import (
    CLIPPING_RANGE,
    QUANTIZATION_RANGE,
    QUANTIZATION_STEP,
    flatten_request,
    pack_update,
    packed_sizes,
    unflatten_request,
    unpack_aggregate,
)

K, D = 14, 6  # CheXpert categories of PrototypeBank
SCALE = 100.0


def _template() -> dict[str, torch.Tensor]:
    return {"enc.w": torch.zeros(5, 3), "enc.b": torch.zeros(3), "logit_scale": torch.zeros(())}


def _update(site: int, n: int, loss: float | None = 2.5) -> SiteUpdate:
    g = torch.Generator().manual_seed(site)
    weights = {k: torch.randn(v.shape, generator=g) * 0.3 for k, v in _template().items()}
    weights["logit_scale"] = torch.tensor(2.6593 + 0.01 * site)  # a 0-d tensor: the SecAgg+ bug's victim
    count = torch.randint(0, n + 1, (K,), generator=g).float()
    unit = torch.nn.functional.normalize(torch.randn(K, D, generator=g), dim=1)
    stats = {"sum_image": unit * count[:, None], "sum_text": -unit * count[:, None] * 0.5, "count": count}
    metrics = {"train_loss": loss} if loss is not None else {}
    return SiteUpdate(f"site_{site}", n, weights, stats, metrics)


def _bank() -> dict[str, torch.Tensor]:
    return {
        "prototypes_image": torch.nn.functional.normalize(torch.ones(K, D), dim=1),
        "prototypes_text": torch.nn.functional.normalize(torch.ones(K, D), dim=1),
        "initialized": torch.ones(K, dtype=torch.bool),
        **_stat_template(),
    }


def _stat_template() -> dict[str, torch.Tensor]:
    return {"sum_image": torch.zeros(K, D), "sum_text": torch.zeros(K, D), "count": torch.zeros(K)}


def _secagg_mean(packed_per_site: list[list[torch.Tensor]]) -> list[np.ndarray]:
    """Flower's SecAgg+ with weight 1 per site: quantize each site, sum, dequantize, shift, divide by m."""
    m = len(packed_per_site)
    total = None
    for packed in packed_per_site:
        q = quantize([p.numpy() for p in packed], CLIPPING_RANGE, QUANTIZATION_RANGE)
        total = q if total is None else [a + b for a, b in zip(total, q, strict=True)]
    assert total is not None
    out = dequantize(total, CLIPPING_RANGE, QUANTIZATION_RANGE)
    return [(v - (m - 1) * CLIPPING_RANGE) / m for v in out]


def test_pack_then_secagg_then_unpack_equals_plain_aggregation() -> None:
    updates = [_update(0, 40), _update(1, 90), _update(2, 17, loss=None)]  # a DP-like site without a loss
    keys = list(_template())
    packed = [pack_update(u, keys, SCALE) for u in updates]
    for site in packed:
        assert all(p.dim() == 1 for p in site)  # never 0-d
        assert all(float(p.abs().max()) <= CLIPPING_RANGE for p in site)
    agg = unpack_aggregate(_secagg_mean(packed), len(updates), SCALE, _template(), _stat_template())

    plain = weighted_average([u.weights for u in updates], [u.num_examples for u in updates])
    n_min = min(u.num_examples for u in updates)
    for key, value in plain.items():
        assert agg.weights[key].shape == value.shape and agg.weights[key].dtype == value.dtype
        assert torch.allclose(agg.weights[key], value, atol=4 * QUANTIZATION_STEP * SCALE / n_min)
    assert 2.659 < float(agg.weights["logit_scale"]) < 2.68  # not the 16.6 of the 0-d corruption
    assert agg.total_examples == pytest.approx(147, abs=1e-3)
    assert agg.train_loss == pytest.approx(2.5, abs=1e-3)  # sites without a loss do not dilute it

    for key in ("sum_image", "sum_text"):
        total = sum(u.bank_stats[key] for u in updates)
        assert torch.allclose(agg.bank_stats[key], total, atol=3 * 3 * SCALE * QUANTIZATION_STEP)
    assert torch.equal(agg.bank_stats["count"], sum(u.bank_stats["count"] for u in updates))  # integers: exact
    secure_bank, secure_mask = merge_site_banks(_bank(), [agg.bank_stats], min_count=5)
    plain_bank, plain_mask = merge_site_banks(_bank(), [u.bank_stats for u in updates], min_count=5)
    assert torch.equal(secure_mask, plain_mask)
    assert torch.allclose(secure_bank["prototypes_image"], plain_bank["prototypes_image"], atol=1e-4)


def test_pack_refuses_what_secagg_would_clip() -> None:
    keys = list(_template())
    with pytest.raises(ValueError, match="secagg_max_examples=100"):
        pack_update(_update(0, 101), keys, SCALE)
    big = _update(0, 100)
    big.weights["enc.b"] = torch.tensor([0.0, 9.0, 0.0])
    with pytest.raises(ValueError, match=r"weights reaches \|9\| > clipping range"):
        pack_update(big, keys, SCALE)
    nan = _update(0, 10)
    nan.bank_stats["count"][0] = math.nan
    with pytest.raises(ValueError, match="bank holds non-finite"):
        pack_update(nan, keys, SCALE)
    ints = _update(0, 10)
    ints.weights["enc.b"] = torch.zeros(3, dtype=torch.long)
    with pytest.raises(ValueError, match="'enc.b' has dtype torch.int64"):
        pack_update(ints, keys, SCALE)
    with pytest.raises(ValueError, match="extra \\['logit_scale'\\]"):
        pack_update(_update(0, 10), keys[:2], SCALE)


def test_unpack_rejects_bad_shapes() -> None:
    sizes = packed_sizes(_template(), _stat_template())
    good = [np.full(s, 0.1) for s in sizes]
    assert unpack_aggregate(good, 2, SCALE, _template(), _stat_template()).num_sites == 2
    with pytest.raises(ValueError, match="weights has 18 values, the model needs 19"):
        unpack_aggregate([good[0], np.zeros(18), good[2]], 2, SCALE, _template(), _stat_template())
    with pytest.raises(ValueError, match="2 arrays, expected 3"):
        unpack_aggregate(good[:2], 2, SCALE, _template(), _stat_template())
    with pytest.raises(ValueError, match="num_sites=0"):
        unpack_aggregate(good, 0, SCALE, _template(), _stat_template())


def test_request_flattening_round_trips_and_is_never_0d() -> None:
    weights = {k: torch.randn(v.shape) for k, v in _template().items()}
    bank = {k: v for k, v in _bank().items() if k in ("prototypes_image", "prototypes_text", "initialized")}
    arrays, names, shapes = flatten_request(weights, bank)
    assert all(a.dim() >= 1 for a in arrays)
    back_w, back_b = unflatten_request(arrays, names, shapes, len(weights))
    assert all(torch.equal(back_w[k], weights[k]) for k in weights) and back_w["logit_scale"].dim() == 0
    assert all(torch.equal(back_b[k], v) for k, v in bank.items())
    with pytest.raises(ValueError, match="'enc.b' has 3 values for shape \\(4,\\)"):
        unflatten_request(arrays, names, [shapes[0], "4", *shapes[2:]], len(weights))


def test_config_refuses_combinations_that_cannot_work() -> None:
    ok = FederationConfig(secure_aggregation=True, min_train_nodes=3)
    assert ok.secagg_num_shares == 3 and ok.secagg_reconstruction_threshold == 2
    with pytest.raises(ValueError, match="client-level DP clips each site's update"):
        FederationConfig(
            secure_aggregation=True, client_dp=True, client_dp_noise_multiplier=1.0, client_dp_clipping_norm=1.0
        )
    with pytest.raises(ValueError, match="must be below secagg_num_shares=3"):
        FederationConfig(secure_aggregation=True, secagg_reconstruction_threshold=3)
    with pytest.raises(ValueError, match="exceeds min_train_nodes=2"):
        FederationConfig(secure_aggregation=True, secagg_num_shares=5, secagg_reconstruction_threshold=3)
    FederationConfig(secure_aggregation=False, secagg_reconstruction_threshold=3)  # ignored unless enabled


# ---------------------------------------------------------------------------- the legacy strategy, hand-made aggregates
def _strategy(tmp_path, **federation):  # type: ignore[no-untyped-def]
    from flwr.server.client_proxy import ClientProxy

    from mlip_fed.config import ExperimentConfig
    from mlip_fed.federation.coordinator import FederationCoordinator
    from mlip_fed.model.objectives.prototype_bank import PrototypeBank
    from server.secagg import SecureRoundStrategy

    class Proxy(ClientProxy):  # only node_id is used by the strategy
        def __init__(self, node_id: int) -> None:
            super().__init__(str(node_id))
            self.node_id = node_id

        def get_properties(self, *a, **k):  # type: ignore[no-untyped-def]
            raise NotImplementedError

        get_parameters = fit = evaluate = reconnect = get_properties

    class Manager:
        def all(self) -> dict[str, ClientProxy]:
            return {str(n): Proxy(n) for n in (11, 12, 13)}

    fed = dict(secure_aggregation=True, min_train_nodes=3, min_available_nodes=3, secagg_max_examples=int(SCALE))
    fed.update(federation)
    cfg = ExperimentConfig()
    cfg = cfg.model_copy(update={"federation": cfg.federation.model_copy(update=fed)})
    log: list[str] = []
    coordinator = FederationCoordinator(
        cfg,
        tmp_path / "run",
        initial_weights={k: torch.zeros(v.shape) for k, v in _template().items()},
        initial_bank=PrototypeBank(dim=D).state_dict(),
        evaluator=lambda weights, bank: {"auroc": 0.5},
        num_rounds=2,
        log=log.append,
    )
    coordinator.start()
    return SecureRoundStrategy(coordinator, lambda: [11, 12, 13]), Manager(), Proxy, log


def _fitres(mean: list[np.ndarray], site_id: str):  # type: ignore[no-untyped-def]
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters

    metrics = {"site-id": site_id, "train_seconds": 1.0, "handler_seconds": 2.0}
    return FitRes(Status(Code.OK, ""), ndarrays_to_parameters(mean), 1, metrics)


def test_strategy_sends_fitins_and_feeds_the_unmasked_sum_to_the_coordinator(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import json

    from flwr.app import Error
    from flwr.common import parameters_to_ndarrays

    from mlip_wire.codec import LAYOUT_KEY, MAX_EXAMPLES_KEY

    strategy, manager, proxy, log = _strategy(tmp_path)
    instructions = strategy.configure_fit(1, None, manager)
    assert [p.node_id for p, _ in instructions] == [11, 12, 13]
    fitins = instructions[0][1]
    layout = json.loads(fitins.config[LAYOUT_KEY])
    assert fitins.config[MAX_EXAMPLES_KEY] == int(SCALE) and fitins.config["server-round"] == 1
    arrays = parameters_to_ndarrays(fitins.parameters)
    assert all(a.ndim >= 1 for a in arrays) and layout["num_weights"] == 3

    updates = [_update(0, 40), _update(1, 90)]  # node 13 (site_2) dropped after the key exchange
    mean = _secagg_mean([pack_update(u, list(_template()), SCALE) for u in updates])
    failure = Exception(Error(code=0, reason="[site=site_2] RuntimeError: disk full"))
    params, _ = strategy.aggregate_fit(
        1, [(proxy(11), _fitres(mean, "site_0")), (proxy(12), _fitres(mean, "site_1"))], [failure]
    )
    assert params is None
    coordinator = strategy.coordinator
    assert coordinator.state.completed_round == 1
    plain = weighted_average([u.weights for u in updates], [40, 90])
    for key, value in plain.items():
        assert torch.allclose(coordinator.state.weights[key], value, atol=4 * QUANTIZATION_STEP * SCALE / 40)
    record = coordinator.state.history[-1]
    assert record["num_updates"] == 2 and record["total_examples"] == pytest.approx(130, abs=1e-3)
    assert [s["site_id"] for s in record["sites"]] == ["site_0", "site_1"]
    assert record["failures"] == [
        {"round": 1, "site_id": "site_2", "node_id": 13, "reason": "error reply: [site=site_2] RuntimeError: disk full"}
    ]
    assert record["bytes"]["up_weights_per_site"] == [8 * (sum(packed_sizes(_template(), _stat_template())) + 1)] * 2
    assert "eval" in record and any("site_2" in line for line in log)

    # Round 2 halts in the unmask stage (no aggregate_fit): the next configure_fit or the end records it.
    strategy.configure_fit(2, None, manager)
    strategy.close_pending("the SecAgg+ protocol halted")
    record = coordinator.state.history[-1]
    assert record["round"] == 2 and not record["aggregated"] and len(record["failures"]) == 3
    assert coordinator.state.completed_round == 2


def test_strategy_records_a_round_without_quorum(tmp_path) -> None:  # type: ignore[no-untyped-def]
    strategy, manager, _, _ = _strategy(tmp_path)

    def no_quorum() -> list[int]:
        raise TimeoutError("only 1 node(s) connected after 5 s; federation.min_available_nodes=3")

    strategy.wait_nodes = no_quorum
    assert strategy.configure_fit(1, None, manager) == []
    record = strategy.coordinator.state.history[-1]
    assert record["round"] == 1 and not record["aggregated"] and "only 1 node(s)" in record["failures"][0]["reason"]


def test_client_mod_passes_plain_messages_through() -> None:
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS as FLOWER_KEY

    from client.secagg import RECORD_KEY_CONFIGS, is_secure_request

    assert RECORD_KEY_CONFIGS == FLOWER_KEY
    from flwr.app import ArrayRecord, ConfigRecord, RecordDict

    plain = RecordDict({"weights": ArrayRecord(), "config": ConfigRecord({"server-round": 1})})
    secure = RecordDict({"fitins.parameters": ArrayRecord(), FLOWER_KEY: ConfigRecord({"stage": "setup"})})
    assert not is_secure_request(plain) and is_secure_request(secure)
