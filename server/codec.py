"""Wire format of one round: ``mlip_fed.federation.payload`` types <-> Flower ``RecordDict``.

Server and ClientApp both import this, so the two ends cannot drift. Our own loop (pattern C of
reference/flower-1.42.md §11) is not bound by FedAvg's one-ArrayRecord rule: weights and bank travel
as two ArrayRecords, so ``bytes`` per round can be reported for each.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from mlip_fed.federation.aggregate import BANK_GLOBAL_KEYS, BANK_STAT_KEYS
from mlip_fed.federation.payload import RoundRequest, SiteFailure, SiteUpdate, parse_site_error

WEIGHTS = "weights"
BANK = "bank"
CONFIG = "config"
METRICS = "metrics"
SITE = "site"
NUM_EXAMPLES = "num-examples"
MESSAGE_TYPE = "train"


def encode_request(request: RoundRequest) -> RecordDict:
    return RecordDict(
        {
            WEIGHTS: ArrayRecord(dict(request.weights)),
            BANK: ArrayRecord({k: request.bank[k] for k in BANK_GLOBAL_KEYS}),
            CONFIG: ConfigRecord(dict(request.config)),
        }
    )


def decode_request(content: RecordDict) -> RoundRequest:
    _require(content, (WEIGHTS, BANK, CONFIG), "train request")
    config = dict(content.config_records[CONFIG])
    if "server-round" not in config:
        raise ValueError("train request: config record lacks 'server-round'")
    return RoundRequest(
        server_round=int(config["server-round"]),
        weights=dict(content.array_records[WEIGHTS].to_torch_state_dict()),
        bank=dict(content.array_records[BANK].to_torch_state_dict()),
        config=config,  # type: ignore[arg-type]
    )


def encode_update(update: SiteUpdate) -> RecordDict:
    metrics: dict[str, float | int] = {NUM_EXAMPLES: int(update.num_examples)}
    metrics.update({k: float(v) for k, v in update.metrics.items()})
    return RecordDict(
        {
            WEIGHTS: ArrayRecord(dict(update.weights)),
            BANK: ArrayRecord({k: update.bank_stats[k] for k in BANK_STAT_KEYS}),
            METRICS: MetricRecord(metrics),
            SITE: ConfigRecord({"site-id": update.site_id}),
        }
    )


def decode_update(content: RecordDict) -> SiteUpdate:
    _require(content, (WEIGHTS, BANK, METRICS, SITE), "site reply")
    metrics = dict(content.metric_records[METRICS])
    if NUM_EXAMPLES not in metrics:
        raise ValueError(f"site reply: metrics lack {NUM_EXAMPLES!r}")
    num_examples = int(metrics.pop(NUM_EXAMPLES))  # type: ignore[arg-type]
    bank = dict(content.array_records[BANK].to_torch_state_dict())
    missing = [k for k in BANK_STAT_KEYS if k not in bank]
    if missing:
        raise ValueError(f"site reply: bank statistics lack {missing}")
    return SiteUpdate(
        site_id=str(content.config_records[SITE]["site-id"]),
        num_examples=num_examples,
        weights=dict(content.array_records[WEIGHTS].to_torch_state_dict()),
        bank_stats=bank,
        metrics={k: float(v) for k, v in metrics.items()},  # type: ignore[arg-type]
    )


def sort_replies(
    server_round: int,
    sent: Sequence[Message],
    replies: Iterable[Message],
    known_sites: dict[int, str],
) -> tuple[list[SiteUpdate], list[SiteFailure]]:
    """Split replies into updates and failures; a sent message without a reply is a timeout failure.

    ``known_sites`` maps node id -> site id from earlier replies, so an error or a timeout from a node
    is still reported with its site id; it is updated in place with this round's successful replies.
    """
    updates: list[SiteUpdate] = []
    failures: list[SiteFailure] = []
    answered: set[int] = set()
    for reply in replies:
        node_id = int(reply.metadata.src_node_id)
        answered.add(node_id)
        if reply.has_error():
            reason = reply.error.reason or f"error code {reply.error.code}"
            site_id = parse_site_error(reason) or known_sites.get(node_id, f"node-{node_id}")
            failures.append(SiteFailure(server_round, site_id, node_id, f"error reply: {reason.strip()}"))
            continue
        try:
            update = decode_update(reply.content)
        except (KeyError, ValueError, TypeError) as err:
            site_id = known_sites.get(node_id, f"node-{node_id}")
            failures.append(SiteFailure(server_round, site_id, node_id, f"invalid reply: {err}"))
            continue
        known_sites[node_id] = update.site_id
        updates.append(update)
    for message in sent:
        node_id = int(message.metadata.dst_node_id)
        if node_id not in answered:
            site_id = known_sites.get(node_id, f"node-{node_id}")
            failures.append(SiteFailure(server_round, site_id, node_id, "no reply before the round timeout"))
    updates.sort(key=lambda u: u.site_id)  # aggregation order independent of arrival order
    return updates, failures


def _require(content: RecordDict, keys: Sequence[str], what: str) -> None:
    missing = [k for k in keys if k not in content]
    if missing:
        raise ValueError(f"{what}: missing record(s) {missing} (has {sorted(content.keys())})")
