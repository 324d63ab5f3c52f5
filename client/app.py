"""Flower ClientApp: decodes the server's request, calls the site runtime, encodes the reply; no ML here.

Simulation: ``node_config["partition-id"]`` picks SynthCXR hospital ``site_<k>``. A site that fails
replies with an error naming its site id (the server logs it and leaves the site out of the round)
instead of letting Flower report an anonymous exception.
"""

from __future__ import annotations

import logging
import traceback
from pathlib import Path

from flwr.app import Context, Error, Message
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode

from mlip_fed.federation.payload import format_site_error
from mlip_fed.federation.run_config import experiment_from_run_config
from mlip_fed.federation.site import SiteRuntime
from server.codec import decode_request, encode_update

logger = logging.getLogger("mlip_fed.client")

app = ClientApp()

#: One runtime per (run, site) per worker process: data and model are built once, not every round.
#: Everything that must survive the process is on the site's disk (``SiteRuntime.state_dir``).
_RUNTIMES: dict[tuple[int, int], SiteRuntime] = {}


def site_index_from_node_config(node_config: dict[str, object], num_sites: int) -> int:
    """The simulated hospital this SuperNode plays; a clear error for a deployment node without one."""
    if "partition-id" not in node_config:
        raise ValueError(
            f"node_config has no 'partition-id' (keys: {sorted(node_config)}); deployed sites are started with "
            "mlip-client --site-config (next issue), not as simulated partitions"
        )
    index = int(node_config["partition-id"])  # type: ignore[call-overload]
    partitions = int(node_config.get("num-partitions", num_sites))  # type: ignore[call-overload]
    if partitions != num_sites or not 0 <= index < num_sites:
        raise ValueError(
            f"simulation has {partitions} SuperNodes (partition-id {index}) but data.synthetic.num_sites="
            f"{num_sites}: set --federation-config num-supernodes={num_sites}"
        )
    return index


def _runtime(context: Context) -> SiteRuntime:
    run = experiment_from_run_config(context.run_config)
    index = site_index_from_node_config(dict(context.node_config), run.cfg.data.synthetic.num_sites)
    key = (int(context.run_id), index)
    if key not in _RUNTIMES:
        state_dir = Path(run.output_dir) / "sites" / f"site_{index}"
        _RUNTIMES[key] = SiteRuntime(run.cfg, index, state_dir, log=lambda line: logger.info(line))
    return _RUNTIMES[key]


@app.train()
def train(msg: Message, context: Context) -> Message:
    site_id = f"site_{context.node_config.get('partition-id', '?')}"
    try:
        runtime = _runtime(context)
        site_id = runtime.site_id
        update = runtime.train_round(decode_request(msg.content))
        return Message(encode_update(update), reply_to=msg)
    except Exception as err:  # reply with the site id; the server leaves this site out and lists it
        logger.error("%s failed in round %s:\n%s", site_id, msg.metadata.group_id, traceback.format_exc())
        return Message(
            Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=format_site_error(site_id, err)), reply_to=msg
        )
