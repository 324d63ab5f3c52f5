"""Flower overhead: a ``flwr run`` round against the same local training alone (same sites, steps, data, seed).

1. ``flwr run`` (``run_flwr_simulation``: own FLWR_HOME and ports, Ray on 127.0.0.1, 1 CPU per ClientApp,
   so as many Ray actors as cores) for R rounds; round 1 carries start-up (Ray actors, imports, each site's
   data and model build), so only rounds >= 2 count. From each round's ServerApp record: the round wall time
   (``send_and_receive`` + aggregation + evaluation) and the sites' own timings (training, trainer checkpoint,
   bank pass, whole handler).
2. The same federation in-process (``run_in_process``-style loop, no Flower): each site's pure training time.
3. Serialisation: ``mlip_wire/codec.py`` encode + decode of this model's request and reply, timed in-process.

Flower overhead = round − (best schedule of the sites' handler times on the actors + aggregation +
evaluation): message transport, ClientApp dispatch, Ray scheduling. Goal: <= 10 % of the round.

    .venv/bin/python bench/flower_overhead.py                    # demo model, 3 sites; table into docs/
    .venv/bin/python bench/flower_overhead.py --studies-per-site 300 --rounds 3   # the demo's data size
"""

from __future__ import annotations

import argparse
import heapq
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from statistics import mean

REPO = Path(__file__).resolve().parents[1]


def makespan(durations: list[float], workers: int) -> float:
    """Longest-processing-time-first schedule of ``durations`` on ``workers``: the best a scheduler could do."""
    loads = [0.0] * max(1, min(workers, len(durations)))
    for d in sorted(durations, reverse=True):
        heapq.heapreplace(loads, loads[0] + d)
    return max(loads)


def overrides(args: argparse.Namespace, root: Path) -> list[str]:
    found = [
        f"data.root={root}",
        f"data.synthetic.num_sites={args.sites}",
        f"data.synthetic.studies_per_site={args.studies_per_site}",
        f"federation.min_available_nodes={args.sites}",
        f"federation.min_train_nodes={args.sites}",
        "train.num_threads=1",
    ]
    if args.max_steps is not None:
        found.append(f"train.max_steps={args.max_steps}")
    return found + list(args.overrides)


def alone(args: argparse.Namespace, root: Path, out: Path) -> list[dict[str, float]]:
    """The same rounds without Flower: per round, each site's pure training and handler seconds."""
    import torch

    from mlip_fed.federation.coordinator import coordinator_from_run
    from mlip_fed.federation.run_config import experiment_from_run_config
    from mlip_fed.federation.site import SiteRuntime

    torch.set_num_threads(1)
    run = experiment_from_run_config(
        {
            "experiment": args.experiment,
            "overrides": " ".join(overrides(args, root)),
            "output-dir": str(out),
            "num-server-rounds": args.rounds,
        }
    )
    coordinator = coordinator_from_run(run, log=lambda line: None)
    coordinator.evaluator = None  # the server side is measured in the flwr run; here only the sites
    sites = [SiteRuntime(run.cfg, k, out / "sites" / f"site_{k}", log=lambda line: None) for k in range(args.sites)]
    coordinator.start()
    rounds = []
    for server_round in coordinator.remaining_rounds():
        request = coordinator.round_request(server_round)
        updates = [site.train_round(request) for site in sites]
        coordinator.complete_round(server_round, updates, [], num_sampled=len(sites))
        rounds.append(
            {
                "train": [u.metrics["train_seconds"] for u in updates],
                "handler": [u.metrics["handler_seconds"] for u in updates],
            }
        )
    return rounds


def serialisation_seconds(args: argparse.Namespace, repeats: int = 3) -> dict[str, float]:
    """Encode + decode of one request and one reply of this model (what each site and the server pay)."""
    from mlip_fed.config_compose import compose_experiment
    from mlip_fed.federation.aggregate import BANK_STAT_KEYS
    from mlip_fed.federation.payload import RoundRequest, SiteUpdate
    from mlip_fed.federation.site import initial_global_state
    from mlip_wire.codec import decode_request, decode_update, encode_request, encode_update

    cfg = compose_experiment([f"experiment={args.experiment}"])
    weights, bank, model = initial_global_state(cfg)
    request = RoundRequest(1, weights, bank, {"server-round": 1})
    stats = {k: model.prototype_bank.state_dict()[k] for k in BANK_STAT_KEYS}
    update = SiteUpdate("site_0", 10, weights, stats, {"train_loss": 1.0})
    t = time.perf_counter()
    for _ in range(repeats):
        decode_request(encode_request(request))
    req_s = (time.perf_counter() - t) / repeats
    t = time.perf_counter()
    for _ in range(repeats):
        decode_update(encode_update(update))
    upd_s = (time.perf_counter() - t) / repeats
    return {"request": req_s, "reply": upd_s}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--studies-per-site", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3, help="round 1 is start-up; rounds 2.. are reported")
    parser.add_argument("--max-steps", type=int, default=None, help="local steps per round (default: one epoch)")
    parser.add_argument("--experiment", default="synth_cpu")
    parser.add_argument("--actors", type=int, default=os.cpu_count() or 1, help="Ray actors (1 CPU per ClientApp)")
    parser.add_argument("--doc", type=Path, default=REPO / "docs" / "federation.md")
    parser.add_argument("overrides", nargs="*", help="extra hydra overrides for both runs")
    args = parser.parse_args(argv)
    if args.rounds < 2:
        parser.error("--rounds must be >= 2: round 1 is start-up and is not reported")

    from bench.docs_block import replace_block
    from mlip_fed.federation.simulation import run_flwr_simulation

    work = Path(tempfile.mkdtemp(prefix="flower_overhead_"))
    root = work / "data"
    try:
        t0 = time.perf_counter()
        result = run_flwr_simulation(
            REPO,
            output_dir=work / "flwr",
            num_supernodes=args.sites,
            experiment=args.experiment,
            overrides=overrides(args, root),
            num_rounds=args.rounds,
            timeout_s=3600,
            flwr_home=work / "flwr_home",
        )
        if not result.ok:
            raise RuntimeError(f"flwr run failed: {result.failure_reason()}")
        print(f"flwr run: {time.perf_counter() - t0:.0f} s", flush=True)
        assert result.results is not None
        records = [r for r in result.results["rounds"] if r["round"] >= 2 and r.get("aggregated")]
        solo = alone(args, root, work / "alone")
        print("in-process run done", flush=True)
        codec = serialisation_seconds(args)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    rows = []
    for record in records:
        s, sites = record["seconds"], record["sites"]
        handler = [x["handler_seconds"] for x in sites]
        ideal = makespan(handler, args.actors) + s["aggregation"] + s["evaluation"]
        pure = solo[record["round"] - 1]["train"]
        rows.append(
            {
                "round": record["round"],
                "round_s": s["round"],
                "comm": s["communication"],
                "train_max": max(x["train_seconds"] for x in sites),
                "train_sum": sum(x["train_seconds"] for x in sites),
                "pure_max": max(pure),
                "pure_sum": sum(pure),
                "ckpt": mean(x.get("checkpoint_seconds", float("nan")) for x in sites),
                "bank": mean(x.get("bank_seconds", float("nan")) for x in sites),
                "handler_max": max(handler),
                "schedule": makespan(handler, args.actors),
                "agg": s["aggregation"],
                "eval": s["evaluation"],
                "overhead": s["round"] - ideal,
            }
        )
    serial = args.sites * (codec["request"] + codec["reply"])
    command = "python bench/flower_overhead.py " + " ".join(sys.argv[1:] if argv is None else argv)
    lines = [
        f"Command: `{command.strip()}` (experiment `{args.experiment}`, {args.sites} sites x {args.studies_per_site} "
        f"SynthCXR studies, {'one local epoch' if args.max_steps is None else f'{args.max_steps} local steps'} per "
        f"round, `flwr run` with 1 CPU per ClientApp on {args.actors} Ray actors; machine: "
        f"{platform.machine()}, {os.cpu_count()} cores, 1-min load average {os.getloadavg()[0]:.1f} when the table was written).",
        "",
        "| round | round s | local train max / sum s (in flwr) | same training alone max / sum s | site checkpoint s "
        "| site bank pass s | site handler max s | best schedule of handlers s | aggregation s | evaluation s "
        "| **Flower overhead s** | **overhead % of round** |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['round']} | {r['round_s']:.1f} | {r['train_max']:.1f} / {r['train_sum']:.1f} | "
            f"{r['pure_max']:.1f} / {r['pure_sum']:.1f} | {r['ckpt']:.2f} | {r['bank']:.2f} | {r['handler_max']:.1f} | "
            f"{r['schedule']:.1f} | {r['agg']:.2f} | {r['eval']:.1f} | {r['overhead']:.2f} | "
            f"**{100 * r['overhead'] / r['round_s']:.1f} %** |"
        )
    mean_pct = mean(100 * r["overhead"] / r["round_s"] for r in rows)
    lines += [
        "",
        f"Mean Flower overhead over rounds 2..{args.rounds}: **{mean_pct:.1f} % of the round** (goal <= 10 %). "
        f"Serialisation (codec encode + decode, measured in-process): {codec['request'] * 1e3:.0f} ms per request "
        f"and {codec['reply'] * 1e3:.0f} ms per reply, {serial:.2f} s per round for {args.sites} sites "
        "(part of the overhead and of the site handler).",
    ]
    text = "\n".join(lines)
    replace_block(args.doc, "flower_overhead", text)
    print(text)
    print(f"metric: flower_overhead_fraction = {mean_pct / 100:.4f}")  # read by bench/run_all.py
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
