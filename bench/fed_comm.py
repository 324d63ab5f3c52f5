"""Communication and time split of real ``flwr run`` simulations, and the 20-hospital scale run.

For each federation size it runs ``flwr run`` through ``run_flwr_simulation`` (own FLWR_HOME and
ports, Ray on 127.0.0.1, 1 CPU per ClientApp) and reads results.json: bytes per round per site for
the weights and for the bank, and the round wall time split into local training, aggregation,
evaluation and Flower overhead. Peak memory is the largest sum of RSS over the SuperLink's process
tree (SuperExec, ServerApp, Ray workers), sampled every 0.5 s.

    .venv/bin/python bench/fed_comm.py            # writes the tables into docs/federation.md

``--transport`` adds the wire-format table (``federation.transport_dtype`` float32 / float16 / bfloat16):
the serialised size of one request and one reply split into weights, bank and Flower's framing (the
protobuf ``RecordDict``: keys, dtypes, shapes, ``.npy`` headers, config and metrics records) against the
raw float32 parameter bytes, and the linear-probe AUROC after a few rounds of an in-process federation
whose every request and reply goes through ``mlip_wire/codec.py`` in that dtype (same seed for all three).
``--no-flwr`` skips the ``flwr run`` sweep.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.docs_block import replace_block
from bench.rss import peak_tree_rss
from mlip_fed.federation.simulation import run_flwr_simulation
from mlip_fed.federation.superlink_tree import superlink_pids

REPO = Path(__file__).resolve().parents[1]


def run_one(work: Path, num_sites: int, studies_per_site: int, rounds: int) -> dict[str, Any]:
    flwr_home = work / f"home_{num_sites}"
    with peak_tree_rss(lambda: superlink_pids(flwr_home)) as peak:
        result = run_flwr_simulation(
            REPO,
            output_dir=work / f"run_{num_sites}",
            num_supernodes=num_sites,
            experiment="smoke",
            overrides=[
                f"data.root={work / f'data_{num_sites}'}",
                f"data.synthetic.num_sites={num_sites}",
                f"data.synthetic.studies_per_site={studies_per_site}",
                "train.batch_size=8",
                f"federation.min_available_nodes={num_sites}",
                f"federation.min_train_nodes={num_sites}",
            ],
            num_rounds=rounds,
            timeout_s=1200,
            flwr_home=flwr_home,
        )
    if not result.ok:
        raise RuntimeError(f"{num_sites}-site run failed: {result.failure_reason()}")
    assert result.results is not None
    return {"sites": num_sites, "results": result.results, "wall": result.seconds, "peak_rss": peak.bytes}


# ---------------------------------------------------------------------------- transport dtype
DTYPES = ("float32", "float16", "bfloat16")


def message_sizes(experiment: str, transport_dtype: str) -> dict[str, int]:
    """Serialised bytes of one request and one reply of this model, split into weights / bank / framing."""
    from flwr.common.serde import recorddict_to_proto

    from mlip_fed.config_compose import compose_experiment
    from mlip_fed.federation.aggregate import BANK_STAT_KEYS, state_nbytes
    from mlip_fed.federation.payload import RoundRequest, SiteUpdate
    from mlip_fed.federation.site import initial_global_state
    from mlip_wire.codec import BANK, WEIGHTS, encode_request, encode_update

    cfg = compose_experiment([f"experiment={experiment}"])
    weights, bank, model = initial_global_state(cfg)
    stats = {k: model.prototype_bank.state_dict()[k] for k in BANK_STAT_KEYS}
    request = encode_request(RoundRequest(1, weights, bank, {"server-round": 1, "run-id": "x"}), transport_dtype)
    reply = encode_update(SiteUpdate("site_0", 10, weights, stats, {"train_loss": 1.0}), transport_dtype)
    out: dict[str, int] = {"raw_fp32_weights": state_nbytes(weights)}
    for name, content in (("down", request), ("up", reply)):
        total = recorddict_to_proto(content).ByteSize()
        w = sum(len(a.data) - _npy_header(a.data) for a in content.array_records[WEIGHTS].values())
        b = sum(len(a.data) - _npy_header(a.data) for a in content.array_records[BANK].values())
        out.update({f"{name}_total": total, f"{name}_weights": w, f"{name}_bank": b, f"{name}_framing": total - w - b})
    return out


def _npy_header(data: bytes) -> int:
    """Length of a ``.npy`` header: framing, not payload (version 1: 10 + HEADER_LEN bytes)."""
    return (
        10 + int.from_bytes(data[8:10], "little") if data[6:7] == b"\x01" else 12 + int.from_bytes(data[8:12], "little")
    )


def transport_auroc(work: Path, transport_dtype: str, args: argparse.Namespace) -> dict[str, Any]:
    """An in-process federation whose requests and replies cross ``mlip_wire/codec.py`` in ``transport_dtype``."""
    import torch

    from mlip_fed.federation.coordinator import coordinator_from_run
    from mlip_fed.federation.run_config import experiment_from_run_config
    from mlip_fed.federation.site import SiteRuntime
    from mlip_wire.codec import decode_request, decode_update, encode_request, encode_update

    torch.set_num_threads(1)
    out = work / f"transport_{transport_dtype}"
    run = experiment_from_run_config(
        {
            "experiment": args.transport_experiment,
            "overrides": " ".join(
                [
                    f"data.root={work / 'transport_data'}",
                    f"data.synthetic.num_sites={args.transport_sites}",
                    f"data.synthetic.studies_per_site={args.transport_studies}",
                    "train.batch_size=16",
                    "train.num_threads=1",
                    "federation.evaluate_every=0",
                    "federation.server_evaluation=true",  # the sites are called directly here: the server scores
                    f"federation.transport_dtype={transport_dtype}",
                ]
            ),
            "output-dir": str(out),
            "num-server-rounds": args.transport_rounds,
        }
    )
    coordinator = coordinator_from_run(run, log=lambda line: None)
    sites = [
        SiteRuntime(run.cfg, k, out / "sites" / f"site_{k}", log=lambda line: None) for k in range(args.transport_sites)
    ]
    dtype = run.cfg.federation.transport_dtype
    coordinator.start()
    for server_round in coordinator.remaining_rounds():
        request = decode_request(encode_request(coordinator.round_request(server_round), dtype))
        updates = [decode_update(encode_update(site.train_round(request), dtype)) for site in sites]
        coordinator.complete_round(server_round, updates, [], num_sampled=len(sites))
    summary = coordinator.finish()
    return summary.get("final_eval") or {}


def transport_table(args: argparse.Namespace, argv_text: str) -> str:
    work = Path(tempfile.mkdtemp(prefix="fed_transport_"))
    try:
        sizes = {d: message_sizes(args.transport_experiment, d) for d in args.transport_dtypes}
        evals = {}
        for d in args.transport_dtypes:
            evals[d] = transport_auroc(work, d, args)
            print(f"transport {d}: AUROC {_f(evals[d].get('auroc'))}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    base = sizes.get("float32")
    lines = [
        f"Command: `python bench/fed_comm.py {argv_text}` (experiment `{args.transport_experiment}` model; sizes = "
        "`recorddict_to_proto(...).ByteSize()` of one request / one reply; AUROC = server linear probe after "
        f"{args.transport_rounds} in-process rounds of {args.transport_sites} sites x {args.transport_studies} SynthCXR "
        "studies, batch 16, seed 0, every message through `mlip_wire/codec.py`; 1-min load average "
        f"{os.getloadavg()[0]:.1f} when the table was written).",
        "",
        "| transport | raw fp32 weights | down: weights / bank / framing | down total | up: weights / bank / framing "
        "| up total | vs fp32 | final AUROC | final R@5 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for d in args.transport_dtypes:
        s, e = sizes[d], evals[d]
        ratio = (s["down_total"] + s["up_total"]) / (base["down_total"] + base["up_total"]) if base else float("nan")
        lines.append(
            f"| {d} | {_mb(s['raw_fp32_weights'])} | {_mb(s['down_weights'])} / {_kb(s['down_bank'])} / "
            f"{_kb(s['down_framing'])} | {_mb(s['down_total'])} | {_mb(s['up_weights'])} / {_kb(s['up_bank'])} / "
            f"{_kb(s['up_framing'])} | {_mb(s['up_total'])} | {ratio:.3f} | {_f(e.get('auroc'))} | {_f(e.get('r_at_5'))} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sites", type=int, nargs="+", default=[3, 20])
    parser.add_argument("--studies-per-site", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--doc", type=Path, default=REPO / "docs" / "federation.md")
    parser.add_argument("--no-flwr", action="store_true", help="skip the flwr run sweep")
    parser.add_argument("--transport", action="store_true", help="add the transport-dtype table")
    parser.add_argument("--transport-dtypes", nargs="+", choices=DTYPES, default=list(DTYPES))
    parser.add_argument("--transport-experiment", default="synth_cpu")
    parser.add_argument("--transport-sites", type=int, default=3)
    parser.add_argument("--transport-studies", type=int, default=60)
    parser.add_argument("--transport-rounds", type=int, default=3)
    args = parser.parse_args(argv)
    argv_text = " ".join(sys.argv[1:] if argv is None else argv)
    if args.transport:
        table = transport_table(args, argv_text)
        replace_block(args.doc, "fed_transport", table)
        print(table)
    if args.no_flwr:
        return 0
    work = Path(tempfile.mkdtemp(prefix="fed_comm_"))
    runs = []
    try:
        for num_sites in args.sites:
            runs.append(run_one(work, num_sites, args.studies_per_site, args.rounds))
            print(
                f"{num_sites} sites: {runs[-1]['wall']:.0f} s, peak {runs[-1]['peak_rss'] / 2**30:.2f} GiB", flush=True
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    lines = [
        f"Command: `python bench/fed_comm.py {' '.join(sys.argv[1:] if argv is None else argv)}`".replace(" `", " `")
        + f" (experiment `smoke` model sizes, {args.studies_per_site} SynthCXR studies per site, {args.rounds} rounds, "
        "`flwr run` with 1 CPU per ClientApp on this 2-core machine; 1-min load "
        f"average {os.getloadavg()[0]:.1f} when the table was written).",
        "",
        "| sites | round | down weights / site | down bank / site | up weights / site | up bank / site | round total | "
        "communication s | local train max s | local train sum s | aggregation s | evaluation s | Flower overhead s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        for record in run["results"]["rounds"][1:]:
            b, s = record["bytes"], record["seconds"]
            up_w = max(b["up_weights_per_site"]) if b["up_weights_per_site"] else 0
            up_b = max(b["up_bank_per_site"]) if b["up_bank_per_site"] else 0
            lines.append(
                f"| {run['sites']} | {record['round']} | {_mb(b['down_weights_per_site'])} | {_kb(b['down_bank_per_site'])} | "
                f"{_mb(up_w)} | {_kb(up_b)} | {_mb(b['total'])} | {s['communication']:.1f} | {s['local_train_max']:.1f} | "
                f"{s['local_train_sum']:.1f} | {s['aggregation']:.2f} | {s['evaluation']:.1f} | {s['flower_overhead']:.1f} |"
            )
    lines += [
        "",
        "| sites | whole `flwr run` wall s | peak RSS of the SuperLink process tree | final AUROC | final R@5 |",
        "|---|---|---|---|---|",
    ]
    for run in runs:
        final = run["results"].get("final_eval") or {}
        lines.append(
            f"| {run['sites']} | {run['wall']:.0f} | {run['peak_rss'] / 2**30:.2f} GiB | {_f(final.get('auroc'))} | {_f(final.get('r_at_5'))} |"
        )
    table = "\n".join(lines)
    replace_block(args.doc, "fed_comm", table)
    print(table)
    return 0


def _mb(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


def _kb(n: int) -> str:
    return f"{n / 2**10:.1f} KiB"


def _f(value: float | None) -> str:
    return "-" if value is None or value != value else f"{value:.3f}"


if __name__ == "__main__":
    raise SystemExit(main())
