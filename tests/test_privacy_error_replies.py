"""Under DP a site's reply carries only noised releases and public values: an error reply says a public reason code
(the details stay in the site's log), the metrics carry no timing or realised counts, and a site whose ledger was
deleted refuses the next round."""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest
import torch
from conftest import dp_site_config, round_request
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

import client.app as client_app
from mlip_fed.config import ExperimentConfig
from mlip_fed.federation.payload import RoundRequest, SiteFailure, format_site_error, parse_site_error
from mlip_fed.federation.site import PRIVACY_LEDGER, RoundRefused, SiteRuntime

RUN_ID = "err-run"
#: What a DP reply may carry besides weights and the released bank: functions of the ledger's public parameters or of
#: the noised release.
PUBLIC_METRICS = {
    "train_steps",
    "epsilon",
    "epsilon_rdp",
    "epsilon_prv",
    "delta",
    "noise_multiplier",
    "sample_rate",
    "bank_categories_released",
}


def _numbers_outside_site_tag(reason: str) -> list[str]:
    return re.findall(r"\d", re.sub(r"^\[site=[^\]]*\]", "", reason))


def _request(cfg: ExperimentConfig, server_round: int) -> RoundRequest:
    return round_request(cfg, server_round, RUN_ID, num_rounds=3)


@pytest.fixture(scope="module")
def dp_round(tmp_path_factory: pytest.TempPathFactory):
    torch.set_num_threads(1)
    cfg = dp_site_config()
    lines: list[str] = []
    site = SiteRuntime(cfg, 0, tmp_path_factory.mktemp("site") / "site_0", log=lines.append)
    update = site.train_round(_request(cfg, 1))
    return site, update, lines


def test_dp_metrics_are_public_values_only(dp_round) -> None:
    site, update, _ = dp_round
    assert set(update.metrics) <= PUBLIC_METRICS, set(update.metrics) - PUBLIC_METRICS
    assert not any("seconds" in k for k in update.metrics)  # timing reflects the realised Poisson batch sizes
    assert update.metrics["train_steps"] == site.steps_per_round(1)  # the planned, charged count


# ---------------------------------------------------------------------------------------------- error replies
def test_dp_refusal_reply_carries_only_the_public_code() -> None:
    refusal = RoundRefused("site_1", 3, "refused (budget): this round would raise epsilon from 7.9 to 8.4 at N=731")
    reason = format_site_error("site_1", refusal, private=True)
    assert parse_site_error(reason) == "site_1"
    assert "refused (budget)" in reason
    assert _numbers_outside_site_tag(reason) == []
    assert SiteFailure(3, "site_1", 7, f"error reply: {reason}").refused
    # without DP nothing changes: the operator sees the whole message
    assert "8.4" in format_site_error("site_1", refusal)


@pytest.mark.parametrize(
    "err",
    [
        ValueError("a privacy unit contributes to 9 categories of the bank, above bound=8"),
        FloatingPointError("loss 12345.6 above train.loss_explode_threshold in objective global_itc"),
        RoundRefused("site_1", 2, "refused (made-up code 42): 17 patients"),
    ],
)
def test_dp_error_reply_has_no_data_dependent_numbers(monkeypatch: pytest.MonkeyPatch, err: Exception) -> None:
    logged: list[str] = []

    def fail(_request: object) -> None:
        raise err

    fake = SimpleNamespace(site_id="site_1", dp=True, train_round=fail)
    monkeypatch.setattr(client_app, "_runtime", lambda context: fake)
    monkeypatch.setattr(client_app, "decode_request", lambda content: None)
    monkeypatch.setattr(client_app.logger, "error", lambda *a: logged.append(a[0] % a[1:]))
    reply = _train(monkeypatch)
    assert reply.has_error()
    reason = reply.error.reason
    assert parse_site_error(reason) == "site_1"
    assert _numbers_outside_site_tag(reason) == [], reason
    assert "site's own log" in reason
    assert any(str(err) in line for line in logged)  # the details stay in the site's local log

    fake.dp = False  # a non-DP site keeps sending its detailed message
    assert str(err) in _train(monkeypatch).error.reason


def _train(monkeypatch: pytest.MonkeyPatch) -> Message:
    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    try:
        request = Message(
            RecordDict({"config": ConfigRecord({"server-round": 2})}), dst_node_id=5, message_type="train"
        )
        context = Context(
            run_id=1, node_id=5, node_config={"partition-id": 1}, state=RecordDict(), run_config={"overrides": ""}
        )
        return client_app.train(request, context)
    finally:
        TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


# ---------------------------------------------------------------------------------------------- deleted ledger
def test_deleted_ledger_refuses_the_next_round(dp_round) -> None:
    """Last in this module: it deletes the shared site's ledger."""
    site, _, lines = dp_round
    ledger = site.state_dir / PRIVACY_LEDGER
    for path in site.state_dir.glob(PRIVACY_LEDGER + "*"):
        path.unlink()
    with pytest.raises(RoundRefused, match=r"refused \(ledger\)") as err:
        site.train_round(_request(site.cfg, 2))
    assert str(site.state_dir) in str(err.value) and "acknowledge-reset" in str(err.value)
    assert not ledger.exists()  # nothing opened (and so silently re-created) the ledger
    reason = format_site_error(site.site_id, err.value, private=True)
    assert "refused (ledger)" in reason and _numbers_outside_site_tag(reason) == []
    assert any("is missing" in line and str(site.state_dir) in line for line in lines)  # the site's log
