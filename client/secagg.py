"""The site's half of SecAgg+: Flower's ``secaggplus_mod`` on train messages that ask for it, legacy FitIns/FitRes.

One ClientApp serves plain and secure federations. Flower's SecAgg+ exists only on the legacy API (flwr 1.42;
the Message-API port is unmerged): the server's ``SecAggPlusWorkflow`` sends four train messages per round, each with a
``secaggplus_configs`` record; ``secaggplus_mod`` answers the key-exchange and unmask stages itself and calls the
train handler once, with legacy ``FitIns`` content, masking the ``FitRes`` parameters it returns. Applied to a plain
message it fails (``KeyError: 'secaggplus_configs'``), hence ``secagg_mod`` applies it only when the record is there.

What leaves the site in the clear: the FitRes metrics of ``mlip_wire.codec.CLEAR_METRICS`` (site id, timings, the DP
site's public epsilon and schedule) and ``num_examples = 1``. Weights, bank sums and counts, the example count and the loss are masked
(``mlip_fed.federation.secure_payload``).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from flwr.app import Context, Error, Message, RecordDict
from flwr.common.constant import ErrorCode

from mlip_wire.codec import CLEAR_METRICS, LAYOUT_KEY, MAX_EXAMPLES_KEY, SITE_ID_METRIC

if TYPE_CHECKING:
    from mlip_fed.federation.site import SiteRuntime

#: Flower's ``flwr.common.secure_aggregation.secaggplus_constants.RECORD_KEY_CONFIGS`` (checked in the tests): a
#: literal here so a plain round does not import the SecAgg+ and legacy modules at all.
RECORD_KEY_CONFIGS = "secaggplus_configs"


class SecureRoundFailed(RuntimeError):
    """The train handler replied with an error inside a SecAgg+ round; carries the site's own reason."""


def is_secure_request(content: RecordDict) -> bool:
    """A SecAgg+ train message: legacy FitIns arrays plus the SecAgg+ config record."""
    return RECORD_KEY_CONFIGS in content.config_records and "fitins.parameters" in content.array_records


def secagg_mod(msg: Message, ctxt: Context, call_next: Any) -> Message:
    """``secaggplus_mod`` for SecAgg+ messages only; plain train messages pass straight to the handler."""
    if RECORD_KEY_CONFIGS not in msg.content.config_records:
        return call_next(msg, ctxt)
    from flwr.client.mod import secaggplus_mod

    def train_or_raise(inner: Message, inner_ctxt: Context) -> Message:
        reply = call_next(inner, inner_ctxt)
        if reply.has_error():  # secaggplus_mod would fail on the missing content and lose the site's reason
            raise SecureRoundFailed(reply.error.reason or f"error code {reply.error.code}")
        return reply

    try:
        return secaggplus_mod(msg, ctxt, train_or_raise)
    except SecureRoundFailed as err:  # the server counts this site as dropped; SecAgg+ unmasks the others
        return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=str(err)), reply_to=msg)


def secure_train(runtime: SiteRuntime, content: RecordDict) -> RecordDict:
    """Legacy FitIns -> ``SiteRuntime.train_round`` -> packed FitRes that ``secaggplus_mod`` masks."""
    import numpy as np
    import torch
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.compat.common import recorddict_compat as compat

    from mlip_fed.federation.payload import RoundRequest
    from mlip_fed.federation.secure_payload import pack_update, unflatten_request

    fitins = compat.recorddict_to_fitins(content, keep_input=True)
    config = dict(fitins.config)
    for key in (LAYOUT_KEY, MAX_EXAMPLES_KEY, "server-round"):
        if key not in config:
            raise ValueError(f"SecAgg+ train request: config lacks {key!r} (has {sorted(config)})")
    layout = json.loads(str(config.pop(LAYOUT_KEY)))
    scale = float(config.pop(MAX_EXAMPLES_KEY))  # type: ignore[arg-type]
    arrays = [torch.from_numpy(np.array(a, copy=True)) for a in parameters_to_ndarrays(fitins.parameters)]
    weights, bank = unflatten_request(arrays, layout["names"], layout["shapes"], int(layout["num_weights"]))
    request = RoundRequest(int(config["server-round"]), weights, bank, config)  # type: ignore[arg-type]
    update = runtime.train_round(request)
    packed = pack_update(update, list(weights), scale)
    metrics: dict[str, Any] = {SITE_ID_METRIC: update.site_id}
    metrics.update({k: float(update.metrics[k]) for k in CLEAR_METRICS if k in update.metrics})
    fitres = FitRes(
        status=Status(code=Code.OK, message=""),
        parameters=ndarrays_to_parameters([p.numpy() for p in packed]),
        num_examples=1,  # every site weighs 1 in SecAgg+'s mean; the real count is masked (secure_payload)
        metrics=metrics,
    )
    return compat.fitres_to_recorddict(fitres, keep_input=True)
