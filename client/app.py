"""Flower ClientApp: decodes the server's request, calls the site runtime, encodes the reply; no ML here.

Simulation: ``node_config["partition-id"]`` picks SynthCXR hospital ``site_<k>``. Deployment
(``mlip-client --site-config``): ``node_config["site-config"]`` is the site YAML; the site's own data,
device and privacy policy come from it, the model and schedule from the server's run config. ``train`` messages
run a round (``SiteRuntime.train_round``); ``evaluate`` messages score the global model on the site's own split
(``SiteRuntime.evaluate_round``), if the site's policy releases evaluation metrics. A site that fails replies with an
error naming its site id (the server logs it and leaves the site out of the round or the evaluation) instead of
letting Flower report an anonymous exception.
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Callable
from pathlib import Path

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode

from client.secagg import is_secure_request, secagg_mod, secure_train
from mlip_fed.federation.payload import format_site_error
from mlip_fed.federation.run_config import experiment_from_run_config
from mlip_fed.federation.site import SiteRuntime
from mlip_wire.codec import decode_request, encode_evaluation, encode_update, transport_dtype_of

logger = logging.getLogger("mlip_fed.client")

app = ClientApp()

#: One runtime per (run, site) per worker process: data and model are built once, not every round.
#: Everything that must survive the process is on the site's disk (``SiteRuntime.state_dir``).
_RUNTIMES: dict[tuple[int, int | str], SiteRuntime] = {}


def _site_log(line: str) -> None:
    """A site's own lines (``[site_k] round r: ...``): printed, so they reach ``mlip-client``'s console and log and,
    in simulation, the run's stream (Ray forwards actor stdout). INFO records of ``logging`` would be dropped: the
    ClientApp process configures no handler for them."""
    print(line, flush=True)


def site_index_from_node_config(node_config: dict[str, object], num_sites: int) -> int:
    """The simulated hospital this SuperNode plays; a clear error for a deployment node without one."""
    if "partition-id" not in node_config:
        raise ValueError(
            f"node_config has neither 'partition-id' (simulation) nor 'site-config' (deployment); keys: "
            f"{sorted(node_config)}. Start a hospital with mlip-client --site-config site.yaml"
        )
    index = int(node_config["partition-id"])  # type: ignore[call-overload]
    partitions = int(node_config.get("num-partitions", num_sites))  # type: ignore[call-overload]
    if partitions != num_sites or not 0 <= index < num_sites:
        raise ValueError(
            f"simulation has {partitions} SuperNodes (partition-id {index}) but data.synthetic.num_sites="
            f"{num_sites}: set --federation-config num-supernodes={num_sites}"
        )
    return index


def _deployed_runtime(context: Context, site_config: str) -> SiteRuntime:
    """A hospital: its YAML says who it is, what it trains on and under which policy; the server says the model."""
    from mlip_fed.deploy.site_config import load_site_config, site_experiment

    site = load_site_config(site_config)
    key = (int(context.run_id), site.site_id)
    if key not in _RUNTIMES:
        run = experiment_from_run_config(context.run_config, resolve_paths=False)
        cfg = site_experiment(site, run.cfg)
        runtime = SiteRuntime(cfg, None, site.state_dir, log=_site_log)
        runtime.site_id = site.site_id  # SiteRuntime names pooled data "central"; a deployed site has its own id
        _RUNTIMES[key] = runtime
    return _RUNTIMES[key]


def _runtime(context: Context) -> SiteRuntime:
    site_config = context.node_config.get("site-config")
    if site_config:
        return _deployed_runtime(context, str(site_config))
    run = experiment_from_run_config(context.run_config)
    index = site_index_from_node_config(dict(context.node_config), run.cfg.data.synthetic.num_sites)
    key = (int(context.run_id), index)
    if key not in _RUNTIMES:
        state_dir = Path(run.output_dir) / "sites" / f"site_{index}"
        _RUNTIMES[key] = SiteRuntime(run.cfg, index, state_dir, log=_site_log)
    return _RUNTIMES[key]


@app.train(mods=[secagg_mod])  # SecAgg+ messages only; plain rounds pass straight through
def train(msg: Message, context: Context) -> Message:
    def work(runtime: SiteRuntime) -> RecordDict:
        if is_secure_request(msg.content):  # legacy FitIns from the SecAgg+ workflow: reply FitRes for the mod to mask
            return secure_train(runtime, msg.content)
        update = runtime.train_round(decode_request(msg.content))
        return encode_update(update, transport_dtype_of(msg.content))

    return _answer(msg, context, work, "round")


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """The global model scored on this site's own test split, if the site's policy releases evaluation metrics."""
    return _answer(
        msg,
        context,
        lambda runtime: encode_evaluation(runtime.evaluate_round(decode_request(msg.content))),
        "evaluation",
    )


def _answer(msg: Message, context: Context, work: Callable[[SiteRuntime], RecordDict], what: str) -> Message:
    """Run ``work`` on this site's runtime; a failure becomes an error reply naming the site (public code under DP)."""
    site_id = f"site_{context.node_config.get('partition-id', '?')}"
    if "site-config" in context.node_config:
        site_id = Path(str(context.node_config["site-config"])).stem
    runtime: SiteRuntime | None = None
    try:
        runtime = _runtime(context)
        site_id = runtime.site_id
        return Message(work(runtime), reply_to=msg)
    except Exception as err:  # reply with the site id; the server leaves this site out and lists it
        logger.error("%s failed in %s %s:\n%s", site_id, what, msg.metadata.group_id, traceback.format_exc())
        # Under DP only a public reason code leaves the site; the message above stays in the site's log.
        private = runtime.dp if runtime is not None else _dp_policy(context)
        reason = format_site_error(site_id, err, private=private)
        return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=msg)


def _dp_policy(context: Context) -> bool:
    """Whether this site's own config puts it under DP, for an error raised before its runtime existed.

    A config that does not even load is a configuration error (no data was read yet): its message is sent as is.
    """
    try:
        site_config = context.node_config.get("site-config")
        if site_config:
            from mlip_fed.deploy.site_config import load_site_config

            return load_site_config(str(site_config)).privacy.mechanism != "none"
        return experiment_from_run_config(context.run_config).cfg.privacy.mechanism != "none"
    except Exception:
        return False
