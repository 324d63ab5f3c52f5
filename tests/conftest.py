"""The fakes several test modules share: a Flower Grid without a SuperLink, a site's update, dataset items, a DP
site's experiment and round request, and a loopback deployment.

Test modules import the builders (``from conftest import FakeGrid, site_update``): pytest puts this folder on
``sys.path`` before it imports them. Fixtures here (``task_identity``) are used by name.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from flwr.app import Error, Message
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

#: Bank categories and embedding width of the fake updates (the real K is the knowledge base's 14 categories).
K, D = 14, 4

#: Reports for dataset items: findings the knowledge base knows, a normal study, and a report with two findings.
REPORTS = (
    "Small left pleural effusion. No pneumothorax.",
    "Heart size is enlarged, consistent with cardiomegaly.",
    "No acute cardiopulmonary process.",
    "Right lower lobe consolidation concerning for pneumonia. Endotracheal tube in place.",
)


# ---------------------------------------------------------------------------- Flower messages
@pytest.fixture
def task_identity() -> Iterable[None]:
    """Messages read the run id from the process's task identity; Flower sets it in a real run only."""
    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


class FakeGrid(Grid):
    """A Grid answered in-process: ``online(round)`` lists the connected node ids; ``respond(node, round, message)``
    returns the reply, ``"dead"`` (the SuperLink then answers NODE_UNAVAILABLE, as for a node whose heartbeats
    stopped) or None (no reply: a hung node)."""

    def __init__(
        self,
        online: Callable[[int], list[int]] | Sequence[int],
        respond: Callable[[int, int, Message], Message | str | None],
    ) -> None:
        nodes = None if callable(online) else list(online)
        self.online: Callable[[int], list[int]] = online if nodes is None else (lambda _round: list(nodes))  # type: ignore[assignment]
        self.respond = respond
        self.next_round = 1
        self.sent: list[Message] = []
        self.sent_rounds: list[tuple[int, list[int]]] = []

    @property
    def run(self):  # type: ignore[override]
        raise NotImplementedError

    def set_run(self, run_id: int) -> None:  # type: ignore[override]
        pass

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:  # type: ignore[override]
        return Message(content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id, ttl=ttl)

    def get_node_ids(self) -> list[int]:
        return self.online(self.next_round)

    def push_messages(self, messages):  # type: ignore[override]
        raise NotImplementedError

    def pull_messages(self, message_ids):  # type: ignore[override]
        raise NotImplementedError

    def send_and_receive(self, messages, *, timeout=None):  # type: ignore[override]
        messages = list(messages)
        if not messages:
            return []
        group = str(messages[0].metadata.group_id)
        server_round = int(group) if group.isdigit() else self.next_round
        self.sent += messages
        self.sent_rounds.append((server_round, [int(m.metadata.dst_node_id) for m in messages]))
        replies = []
        for i, message in enumerate(messages):
            message.metadata.__dict__["_message_id"] = f"m{server_round}-{i}"  # as Grid.push_messages does
            reply = self.respond(int(message.metadata.dst_node_id), server_round, message)
            if reply == "dead":
                replies.append(superlink_error(message))
            elif isinstance(reply, Message):
                replies.append(reply)
        self.next_round = server_round + 1
        return replies


#: The reason a SuperLink gives for a node that stopped heartbeating (flwr linkstate utils).
UNAVAILABLE = "Error: Node Unavailable - The destination node failed to report a heartbeat"


def superlink_error(request: Message) -> Message:
    """The SuperLink's reply for an unavailable node: addressed from SUPERLINK_NODE_ID, not from the node."""
    reply = Message(Error(code=ErrorCode.NODE_UNAVAILABLE, reason=UNAVAILABLE), reply_to=request)
    reply.metadata.__dict__["_src_node_id"] = SUPERLINK_NODE_ID
    return reply


def site_update(
    site: str,
    value: float,
    num_examples: int = 1,
    *,
    count0: float = 0.0,
    sum_at: tuple[int, int] | None = None,
    metrics: dict[str, float] | None = None,
) -> Any:
    """A site's ``SiteUpdate``: weights ``{"w": [value, value]}``; bank category 0 counted ``count0`` times (the
    others 0), with ``count0`` at ``sums[sum_at]`` of both sums when given (else the sums are zero)."""
    from mlip_fed.federation.payload import SiteUpdate

    count = torch.zeros(K)
    count[0] = count0
    sums = torch.zeros(K, D)
    if sum_at is not None:
        sums[sum_at] = count0
    return SiteUpdate(
        site_id=site,
        num_examples=num_examples,
        weights={"w": torch.full((2,), value)},
        bank_stats={"sum_image": sums, "sum_text": sums.clone(), "count": count},
        metrics=dict(metrics or {}),
    )


def fake_coordinator(
    tmp_path: Path,
    *,
    server_evaluation: bool = True,
    site_evaluator: Any = None,
    log: Callable[[str], None] | None = None,
    **federation: object,
) -> Any:
    """A coordinator over the one-tensor model ``{"w": [0, 0]}``; its "AUROC" is ``w[0]``, so a test reads the
    aggregate of a round from the round's evaluation. ``site_evaluator``: the sites' evaluation (see
    ``federation.site_evaluation.SiteEvaluatorFn``); ``server_evaluation=False`` leaves the server's own out."""
    from mlip_fed.config import ExperimentConfig
    from mlip_fed.federation.coordinator import FederationCoordinator
    from mlip_fed.model.objectives.prototype_bank import PrototypeBank

    cfg = ExperimentConfig()
    cfg = cfg.model_copy(update={"federation": cfg.federation.model_copy(update=federation)})
    return FederationCoordinator(
        cfg,
        tmp_path / "run",
        initial_weights={"w": torch.zeros(2)},
        initial_bank=PrototypeBank(dim=D).state_dict(),
        evaluator=(lambda w, b: {"auroc": float(w["w"][0]), "r_at_5": 0.0}) if server_evaluation else None,
        site_evaluator=site_evaluator,
        log=log or (lambda line: None),
    )


# ---------------------------------------------------------------------------- data
def dataset_items(
    n: int,
    *,
    reports: Sequence[str] = REPORTS,
    size: int = 64,
    second_view: bool = True,
    positives: bool = True,
    seed: int = 1,
) -> list[dict[str, Any]]:
    """``n`` items as ``ImageReportDataset`` returns them: seeded random views of ``size``², report ``i`` cycling
    through ``reports``, labels NaN (unmentioned) but for one positive category per item when ``positives``."""
    g = torch.Generator().manual_seed(seed)
    items = []
    for i in range(n):
        labels = torch.full((14,), math.nan)
        if positives:
            labels[(3 * i) % 14] = 1.0
        item: dict[str, Any] = {"image": torch.randn(1, size, size, generator=g)}
        if second_view:
            item["image_view2"] = torch.randn(1, size, size, generator=g)
        item.update(report=reports[i % len(reports)], labels=labels, patient_id=f"p{i}", study_id=f"s{i}")
        items.append(item)
    return items


# ---------------------------------------------------------------------------- a DP site
def dp_site_config(*overrides: str) -> Any:
    """The smoke experiment with tiny data under bucketed DP and a loose bank release, for in-process site rounds."""
    from mlip_fed.config_compose import compose_experiment

    return compose_experiment(
        [
            "experiment=smoke",
            "privacy=bucketed",
            "data.synthetic.studies_per_site=16",
            "train.max_steps=2",
            "train.num_threads=1",
            "privacy.epsilon_budget=60",
            "privacy.prototype_noise_multiplier=3.0",
            "privacy.prototype_contribution_bound=8",
            *overrides,
        ]
    )


def round_request(cfg: Any, server_round: int, run_id: str, num_rounds: int, **config: object) -> Any:
    """The server's request of one round: the initial global weights and bank of ``cfg``, one local epoch."""
    from mlip_fed.federation.payload import RoundRequest
    from mlip_fed.federation.site import initial_global_state

    weights, bank, _ = initial_global_state(cfg)
    keys = ("prototypes_image", "prototypes_text", "initialized")
    return RoundRequest(
        server_round,
        weights,
        {k: bank[k] for k in keys},
        {"server-round": server_round, "run-id": run_id, "num-rounds": num_rounds, "local-epochs": 1, **config},
    )


# ---------------------------------------------------------------------------- a loopback deployment
#: The hospitals of the loopback deployments, and what every one of their runs shares.
DEPLOY_SITES = ("hospital_a", "hospital_b", "hospital_c")
DEPLOY_OVERRIDES = (
    "data.synthetic.num_sites=3",
    "train.num_threads=1",
    "train.max_steps=2",
    "federation.min_available_nodes=3",
    "federation.min_train_nodes=3",
    "federation.round_timeout_s=240",
)


@contextmanager
def loopback_deployment(root: Path, overrides: Sequence[str], app_dir: Path | None = None) -> Iterator[Any]:
    """SynthCXR data for ``DEPLOY_SITES`` (``overrides`` name its root) and a TLS SuperLink with node authentication
    that registered them, on 127.0.0.1; yields ``(deployment, manifests)``. At exit every process started is stopped
    by PID, and none may be left running."""
    from mlip_fed.config_compose import compose_experiment
    from mlip_fed.deploy.local import LocalDeployment
    from mlip_fed.pipeline import synthetic_manifests

    manifests = synthetic_manifests(compose_experiment(["experiment=smoke", *overrides]).data)
    dep = LocalDeployment(root / "deploy", tls=True, **({"app_dir": app_dir} if app_dir is not None else {}))
    try:
        dep.start_superlink(site_ids=DEPLOY_SITES)
        yield dep, manifests
    finally:
        dep.stop()
    assert [name for name, proc in dep.procs.items() if proc.poll() is None] == []
