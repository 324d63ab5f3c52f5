"""ServerApp glue with hand-made Messages and an in-process Grid (no Ray, no SuperLink)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path

import pytest
import torch
from flwr.app import Error, Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from mlip_fed.config import ExperimentConfig
from mlip_fed.federation.coordinator import FederationCoordinator, FederationFailed
from mlip_fed.federation.payload import SiteUpdate, format_site_error
from mlip_fed.model.objectives.prototype_bank import PrototypeBank
from server.app import run_federation, wait_for_nodes
from server.codec import decode_request, decode_update, encode_request, encode_update, sort_replies

K, D = 14, 4


@pytest.fixture(autouse=True)
def task_identity() -> Iterable[None]:
    """Messages read the run id from the process's task identity; Flower sets it in a real run only."""
    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


def _update(site: str, value: float, n: int) -> SiteUpdate:
    count = torch.zeros(K)
    count[0] = 6.0
    sums = torch.zeros(K, D)
    sums[0, 1] = 6.0
    return SiteUpdate(
        site,
        n,
        {"w": torch.full((2,), value)},
        {"sum_image": sums, "sum_text": sums, "count": count},
        {"train_loss": value, "train_seconds": 0.1, "handler_seconds": 0.2},
    )


class InProcessGrid(Grid):
    """Answers each message with ``respond(node_id, request_message)``; None means no reply (timeout)."""

    def __init__(self, node_ids: list[int], respond: Callable[[int, Message], Message | None]) -> None:
        self.node_ids = node_ids
        self.respond = respond
        self.sent: list[Message] = []

    @property
    def run(self):  # type: ignore[override]
        raise NotImplementedError

    def set_run(self, run_id: int) -> None:  # type: ignore[override]
        pass

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:  # type: ignore[override]
        return Message(content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id, ttl=ttl)

    def get_node_ids(self) -> list[int]:
        return list(self.node_ids)

    def push_messages(self, messages):  # type: ignore[override]
        raise NotImplementedError

    def pull_messages(self, message_ids):  # type: ignore[override]
        raise NotImplementedError

    def send_and_receive(self, messages, *, timeout=None):  # type: ignore[override]
        replies = []
        for message in messages:
            self.sent.append(message)
            reply = self.respond(message.metadata.dst_node_id, message)
            if reply is not None:
                replies.append(reply)
        return replies


def _coordinator(tmp_path: Path, **federation: object) -> FederationCoordinator:
    cfg = ExperimentConfig()
    cfg = cfg.model_copy(update={"federation": cfg.federation.model_copy(update=federation)})
    return FederationCoordinator(
        cfg,
        tmp_path / "run",
        initial_weights={"w": torch.zeros(2)},
        initial_bank=PrototypeBank(dim=D).state_dict(),
        evaluator=lambda w, b: {"auroc": float(w["w"][0]), "r_at_5": 0.0},
        log=lambda line: None,
    )


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

    grid = InProcessGrid([0, 1, 2], respond)
    summary = run_federation(grid, _coordinator(tmp_path, num_rounds=2, min_available_nodes=3, min_train_nodes=3))
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
    grid = InProcessGrid([0, 1], lambda node, msg: None)
    with pytest.raises(FederationFailed):
        run_federation(grid, _coordinator(tmp_path, num_rounds=1))
    assert json.loads((tmp_path / "run" / "results.json").read_text())["status"] == "failed"


def test_wait_for_nodes_times_out_with_clear_error() -> None:
    with pytest.raises(TimeoutError, match="min_available_nodes=3"):
        wait_for_nodes(InProcessGrid([1], lambda n, m: None), 3, timeout_s=0.05, poll_s=0.01)
