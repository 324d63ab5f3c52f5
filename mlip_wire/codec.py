"""Wire format of one round: ``mlip_fed.federation.payload`` types <-> Flower ``RecordDict``.

Server and ClientApp both import this (``mlip_wire``: neither app imports the other), so the two ends cannot
drift; the SecAgg+ keys below are part of the same format. Our own loop (not ``FedAvg.start()``,
see docs/federation.md "Why our own loop") is not bound by FedAvg's one-ArrayRecord rule: weights and bank travel
as two ArrayRecords, so ``bytes`` per round can be reported for each.

Transport dtype (``federation.transport_dtype``): float32 weights and bank prototypes/sums may travel as
float16 or bfloat16, halving the bytes per round; they are restored to float32 on arrival, so the trainer
and the aggregation never see a half-precision tensor. Counts and flags never change dtype: the bank merge
weights by counts, and float16 holds integers exactly only up to 2048. A ``transport`` ConfigRecord names the
wire dtype and the cast keys, so decoding is exact (a genuine int16 buffer is never mistaken for bfloat16,
which numpy cannot hold and therefore travels as its int16 bit pattern).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Protocol, TypeVar

import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from torch import Tensor

from mlip_fed.federation.aggregate import BANK_GLOBAL_KEYS, BANK_STAT_KEYS
from mlip_fed.federation.payload import RoundRequest, SiteEvaluation, SiteFailure, SiteUpdate, parse_site_error

WEIGHTS = "weights"
BANK = "bank"
CONFIG = "config"
METRICS = "metrics"
SITE = "site"
NUM_EXAMPLES = "num-examples"
TRANSPORT = "transport"
MESSAGE_TYPE = "train"
#: Flower's message type for ``@app.evaluate``: the site scores the global model on its own split.
EVALUATE_MESSAGE_TYPE = "evaluate"

# SecAgg+ rounds (``server/secagg.py``, ``client/secagg.py``) travel as Flower's legacy FitIns/FitRes; these keys are
# ours inside them.
#: FitIns config keys that carry the flattened request's layout and the public example bound.
LAYOUT_KEY = "secagg-layout"
MAX_EXAMPLES_KEY = "secagg-max-examples"
#: Site metrics that may travel in the clear beside the masked vector: timings and a DP site's public accounting.
CLEAR_METRICS = (
    "train_seconds",
    "handler_seconds",
    "train_steps",
    "epsilon",
    "epsilon_rdp",
    "epsilon_prv",
    "delta",
    "noise_multiplier",
    "sample_rate",
)
SITE_ID_METRIC = "site-id"

#: ``federation.transport_dtype`` values and the torch dtype each puts on the wire.
TRANSPORT_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
#: Bank entries that keep their dtype whatever the transport: counts and the initialised flags.
NEVER_CAST = frozenset({"count", "initialized"})


def check_transport_dtype(transport_dtype: str) -> torch.dtype:
    if transport_dtype not in TRANSPORT_DTYPES:
        raise ValueError(f"federation.transport_dtype={transport_dtype!r} is not one of {sorted(TRANSPORT_DTYPES)}")
    return TRANSPORT_DTYPES[transport_dtype]


def encode_arrays(state: Mapping[str, Tensor], transport_dtype: str = "float32") -> tuple[ArrayRecord, list[str]]:
    """An ArrayRecord of ``state`` with float32 tensors cast to the wire dtype; returns it and the cast keys."""
    wire = check_transport_dtype(transport_dtype)
    arrays: dict[str, Array] = {}
    cast: list[str] = []
    for key, tensor in state.items():
        t = tensor.detach()
        if wire != torch.float32 and t.dtype == torch.float32 and key not in NEVER_CAST:
            t = t.to(wire)
            if wire == torch.bfloat16:  # numpy has no bfloat16: send its bit pattern
                t = t.view(torch.int16)
            cast.append(key)
        arrays[key] = Array(t.cpu().numpy())
    return ArrayRecord(arrays), cast


def decode_arrays(record: ArrayRecord, cast: Sequence[str], transport_dtype: str, what: str) -> dict[str, Tensor]:
    """Tensors of ``record``; the ``cast`` keys are restored from the wire dtype to float32.

    One copy per array (numpy's buffer into a writable tensor), where ``to_torch_state_dict`` would hand out
    tensors over read-only buffers that every later in-place update must copy anyway.
    """
    wire = check_transport_dtype(transport_dtype)
    cast_set = set(cast)
    unknown = sorted(cast_set - set(record.keys()))
    if unknown:
        raise ValueError(f"{what}: transport record casts {unknown}, which the {what} does not carry")
    wire_np = "int16" if wire == torch.bfloat16 else str(wire).removeprefix("torch.")
    out: dict[str, Tensor] = {}
    for key in record.keys():
        array = record[key]
        if key not in cast_set:
            out[key] = torch.from_numpy(array.numpy().copy())
            continue
        if array.dtype != wire_np:
            raise ValueError(
                f"{what}: {key!r} arrived as {array.dtype}, expected {wire_np} ({transport_dtype} transport)"
            )
        tensor = torch.from_numpy(array.numpy().copy())
        if wire == torch.bfloat16:
            tensor = tensor.view(torch.bfloat16)
        out[key] = tensor.float()
    return out


def transport_dtype_of(content: RecordDict) -> str:
    """The wire dtype a message was encoded with (float32 for a message without a transport record)."""
    if TRANSPORT not in content:
        return "float32"
    return str(content.config_records[TRANSPORT]["dtype"])


def _transport_record(transport_dtype: str, weights_cast: list[str], bank_cast: list[str]) -> ConfigRecord:
    record: dict[str, str | list[str]] = {"dtype": transport_dtype}
    if weights_cast:  # Flower cannot type an empty list
        record["weights-cast"] = weights_cast
    if bank_cast:
        record["bank-cast"] = bank_cast
    return ConfigRecord(record)  # type: ignore[arg-type]


def _decode_transport(content: RecordDict, what: str) -> tuple[str, list[str], list[str]]:
    if TRANSPORT not in content:
        return "float32", [], []
    record = content.config_records[TRANSPORT]
    transport_dtype = str(record.get("dtype", ""))
    check_transport_dtype(transport_dtype)
    weights_cast = [str(k) for k in record.get("weights-cast", [])]  # type: ignore[union-attr]
    bank_cast = [str(k) for k in record.get("bank-cast", [])]  # type: ignore[union-attr]
    if transport_dtype == "float32" and (weights_cast or bank_cast):
        raise ValueError(f"{what}: float32 transport record lists cast keys")
    return transport_dtype, weights_cast, bank_cast


def encode_request(request: RoundRequest, transport_dtype: str = "float32") -> RecordDict:
    weights, weights_cast = encode_arrays(request.weights, transport_dtype)
    bank, bank_cast = encode_arrays({k: request.bank[k] for k in BANK_GLOBAL_KEYS}, transport_dtype)
    return RecordDict(
        {
            WEIGHTS: weights,
            BANK: bank,
            CONFIG: ConfigRecord(dict(request.config)),
            TRANSPORT: _transport_record(transport_dtype, weights_cast, bank_cast),
        }
    )


def decode_request(content: RecordDict) -> RoundRequest:
    _require(content, (WEIGHTS, BANK, CONFIG), "train request")
    config = dict(content.config_records[CONFIG])
    if "server-round" not in config:
        raise ValueError("train request: config record lacks 'server-round'")
    transport_dtype, weights_cast, bank_cast = _decode_transport(content, "train request")
    return RoundRequest(
        server_round=int(config["server-round"]),
        weights=decode_arrays(content.array_records[WEIGHTS], weights_cast, transport_dtype, "train request"),
        bank=decode_arrays(content.array_records[BANK], bank_cast, transport_dtype, "train request"),
        config=config,  # type: ignore[arg-type]
    )


def encode_update(update: SiteUpdate, transport_dtype: str = "float32") -> RecordDict:
    """The site's reply; ``transport_dtype`` is normally the request's (``transport_dtype_of(msg.content)``)."""
    metrics: dict[str, float | int] = {NUM_EXAMPLES: int(update.num_examples)}
    metrics.update({k: float(v) for k, v in update.metrics.items()})
    weights, weights_cast = encode_arrays(update.weights, transport_dtype)
    bank, bank_cast = encode_arrays({k: update.bank_stats[k] for k in BANK_STAT_KEYS}, transport_dtype)
    return RecordDict(
        {
            WEIGHTS: weights,
            BANK: bank,
            METRICS: MetricRecord(metrics),
            SITE: ConfigRecord({"site-id": update.site_id}),
            TRANSPORT: _transport_record(transport_dtype, weights_cast, bank_cast),
        }
    )


def decode_update(content: RecordDict) -> SiteUpdate:
    _require(content, (WEIGHTS, BANK, METRICS, SITE), "site reply")
    metrics = dict(content.metric_records[METRICS])
    if NUM_EXAMPLES not in metrics:
        raise ValueError(f"site reply: metrics lack {NUM_EXAMPLES!r}")
    num_examples = int(metrics.pop(NUM_EXAMPLES))  # type: ignore[arg-type]
    transport_dtype, weights_cast, bank_cast = _decode_transport(content, "site reply")
    bank = decode_arrays(content.array_records[BANK], bank_cast, transport_dtype, "site reply")
    missing = [k for k in BANK_STAT_KEYS if k not in bank]
    if missing:
        raise ValueError(f"site reply: bank statistics lack {missing}")
    return SiteUpdate(
        site_id=str(content.config_records[SITE]["site-id"]),
        num_examples=num_examples,
        weights=decode_arrays(content.array_records[WEIGHTS], weights_cast, transport_dtype, "site reply"),
        bank_stats=bank,
        metrics={k: float(v) for k, v in metrics.items()},  # type: ignore[arg-type]
    )


def encode_evaluation(evaluation: SiteEvaluation) -> RecordDict:
    """A site's evaluation reply: its metrics (with the number of test studies) and its id; no arrays."""
    metrics: dict[str, float | int] = {NUM_EXAMPLES: int(evaluation.num_examples)}
    metrics.update({k: float(v) for k, v in evaluation.metrics.items()})
    return RecordDict({METRICS: MetricRecord(metrics), SITE: ConfigRecord({"site-id": evaluation.site_id})})


def decode_evaluation(content: RecordDict) -> SiteEvaluation:
    _require(content, (METRICS, SITE), "evaluation reply")
    metrics = dict(content.metric_records[METRICS])
    if NUM_EXAMPLES not in metrics:
        raise ValueError(f"evaluation reply: metrics lack {NUM_EXAMPLES!r}")
    num_examples = int(metrics.pop(NUM_EXAMPLES))  # type: ignore[arg-type]
    return SiteEvaluation(
        site_id=str(content.config_records[SITE]["site-id"]),
        num_examples=num_examples,
        metrics={k: float(v) for k, v in metrics.items()},  # type: ignore[arg-type]
    )


class _FromSite(Protocol):
    site_id: str


Reply = TypeVar("Reply", bound=_FromSite)


def sort_replies(
    server_round: int,
    sent: Sequence[Message],
    replies: Iterable[Message],
    known_sites: dict[int, str],
    decode: Callable[[RecordDict], Reply] = decode_update,  # type: ignore[assignment]
) -> tuple[list[Reply], list[SiteFailure]]:
    """Split replies into decoded replies (``decode_update`` or ``decode_evaluation``) and failures; a sent message
    without a reply is a timeout failure.

    ``known_sites`` maps node id -> site id from earlier replies, so an error or a timeout from a node
    is still reported with its site id; it is updated in place with this round's successful replies.
    """
    updates: list[Reply] = []
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
            update = decode(reply.content)
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
