"""ServerApp glue with hand-made Messages and an in-process Grid (no Ray, no SuperLink)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import D, FakeGrid, fake_coordinator, site_update
from flwr.app import Error, Message, RecordDict

from mlip_fed.federation.coordinator import FederationFailed
from mlip_fed.federation.payload import SiteUpdate, format_site_error
from mlip_fed.model.objectives.prototype_bank import PrototypeBank
from mlip_wire.codec import decode_request, decode_update, encode_request, encode_update, sort_replies
from server.app import run_federation, wait_for_nodes

pytestmark = pytest.mark.usefixtures("task_identity")


def _update(site: str, value: float, n: int) -> SiteUpdate:
    metrics = {"train_loss": value, "train_seconds": 0.1, "handler_seconds": 0.2}
    return site_update(site, value, n, count0=6.0, sum_at=(0, 1), metrics=metrics)


def test_request_and_update_round_trip() -> None:
    coord_bank = PrototypeBank(dim=D).state_dict()
    from mlip_fed.federation.payload import RoundRequest

    request = RoundRequest(3, {"w": torch.arange(4.0)}, coord_bank, {"server-round": 3, "proximal-mu": 0.1})
    decoded = decode_request(encode_request(request))
    assert decoded.server_round == 3 and decoded.config["proximal-mu"] == 0.1
    assert torch.equal(decoded.weights["w"], torch.arange(4.0))
    assert set(decoded.bank) == {"prototypes_image", "prototypes_text", "initialized"}  # no zero sums sent
    update = decode_update(encode_update(_update("site_1", 2.0, 5)))
    assert update.site_id == "site_1" and update.num_examples == 5
    assert update.metrics["train_loss"] == 2.0 and float(update.bank_stats["count"][0]) == 6.0


def test_sort_replies_names_failed_and_silent_sites() -> None:
    sent = [Message(RecordDict(), dst_node_id=n, message_type="train", group_id="2") for n in (11, 12, 13, 14)]
    ok = Message(encode_update(_update("site_0", 1.0, 2)), reply_to=sent[0])
    err = Message(Error(code=0, reason=format_site_error("site_1", RuntimeError("disk gone"))), reply_to=sent[1])
    bad = Message(RecordDict(), reply_to=sent[2])
    known = {14: "site_3"}
    updates, failures = sort_replies(2, sent, [ok, err, bad], known)
    assert [u.site_id for u in updates] == ["site_0"]
    assert known[11] == "site_0"
    by_site = {f.site_id: f for f in failures}
    assert set(by_site) == {"site_1", "node-13", "site_3"}
    assert "RuntimeError: disk gone" in by_site["site_1"].reason
    assert "invalid reply" in by_site["node-13"].reason
    assert by_site["site_3"].reason == "no reply before the round timeout" and by_site["site_3"].node_id == 14


def test_run_federation_excludes_raising_site_and_lists_it(tmp_path: Path) -> None:
    def respond(node_id: int, message: Message) -> Message:
        request = decode_request(message.content)
        if node_id == 2 and request.server_round == 2:  # this site raises mid-run
            return Message(Error(code=0, reason=format_site_error("site_2", ValueError("bad batch"))), reply_to=message)
        value = float(request.weights["w"][0]) + node_id
        return Message(encode_update(_update(f"site_{node_id}", value, 1)), reply_to=message)

    grid = FakeGrid([0, 1, 2], lambda node, _round, msg: respond(node, msg))
    summary = run_federation(grid, fake_coordinator(tmp_path, num_rounds=2, min_available_nodes=3, min_train_nodes=3))
    assert summary["status"] == "completed"
    # round 1: (0+1+2)/3 = 1 ; round 2: only sites 0 and 1 -> ((1+0) + (1+1)) / 2 = 1.5
    assert summary["rounds"][1]["eval"]["auroc"] == pytest.approx(1.0)
    assert summary["rounds"][2]["eval"]["auroc"] == pytest.approx(1.5)
    assert summary["rounds"][2]["num_updates"] == 2
    assert summary["failures"] == [
        {"round": 2, "site_id": "site_2", "node_id": 2, "reason": "error reply: [site=site_2] ValueError: bad batch"}
    ]
    on_disk = json.loads((tmp_path / "run" / "results.json").read_text())
    assert on_disk["status"] == "completed" and on_disk["completed_rounds"] == 2
    assert len(grid.sent) == 6


def test_run_federation_fails_when_every_site_fails(tmp_path: Path) -> None:
    grid = FakeGrid([0, 1], lambda node, _round, msg: None)
    with pytest.raises(FederationFailed):
        run_federation(grid, fake_coordinator(tmp_path, num_rounds=1))
    assert json.loads((tmp_path / "run" / "results.json").read_text())["status"] == "failed"


def test_wait_for_nodes_times_out_with_clear_error() -> None:
    with pytest.raises(TimeoutError, match="min_available_nodes=3"):
        wait_for_nodes(FakeGrid([1], lambda n, r, m: None), 3, timeout_s=0.05, poll_s=0.01)
