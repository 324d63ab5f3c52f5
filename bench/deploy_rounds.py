"""Per-round time of a deployment against simulation, and what a fresh ClientApp process costs.

In deployment every message starts a fresh ``flwr-clientapp`` process (Flower 1.42 SuperNode,
``--isolation subprocess``: the SuperExec launches one per message, which handles it and exits), so
each round pays the imports and the site's start-up again. This measures:

- per-round time (mean over rounds 1..R of ``results.json`` ``seconds.round``, and its Flower overhead:
  send-and-receive wall time not spent in the slowest site's handler) for (a) simulation, (b) deployment
  without TLS, (c) deployment with TLS + node authentication, (d) the same with
  ``federation.secure_aggregation=true`` (``--secagg``);
- a fresh ClientApp process: ``python -X importtime -c "import client.app"`` (lazy sklearn, and with
  sklearn imported eagerly as before), then import, site start-up and the first round's handler, timed
  in one new process.

    .venv/bin/python bench/deploy_rounds.py --rounds 2 --studies-per-site 16 --secagg   # writes docs/deployment.md
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SITES = ("hospital_a", "hospital_b", "hospital_c")


def overrides_for(studies_per_site: int, data_root: Path) -> list[str]:
    return [
        f"data.root={data_root}",
        "data.synthetic.num_sites=3",
        f"data.synthetic.studies_per_site={studies_per_site}",
        "train.num_threads=1",
        "train.max_steps=2",
        "federation.min_available_nodes=3",
        "federation.min_train_nodes=3",
        "federation.round_timeout_s=600",
    ]


def round_times(results: dict[str, Any]) -> tuple[float, float]:
    rounds = [r for r in results["rounds"] if r["round"] > 0]
    if len(rounds) != results["num_rounds"] or not all(r.get("aggregated") for r in rounds):
        raise RuntimeError(f"run did not aggregate every round: {results.get('status')} {results.get('failures')}")
    return (
        statistics.mean(r["seconds"]["round"] for r in rounds),
        statistics.mean(r["seconds"]["flower_overhead"] for r in rounds),
    )


def run_simulation(work: Path, overrides: list[str], rounds: int) -> dict[str, Any]:
    from mlip_fed.federation.simulation import run_flwr_simulation

    result = run_flwr_simulation(
        REPO, output_dir=work / "out", num_supernodes=3, experiment="smoke", overrides=overrides, num_rounds=rounds
    )
    if result.results is None:
        raise RuntimeError(f"simulation wrote no results; see {result.log_path}")
    return result.results


def run_deployment(work: Path, overrides: list[str], rounds: int, tls: bool) -> dict[str, Any]:
    from mlip_fed.config_compose import compose_experiment
    from mlip_fed.deploy.local import LocalDeployment
    from mlip_fed.federation.simulation import write_run_config
    from mlip_fed.pipeline import synthetic_manifests

    manifests = synthetic_manifests(compose_experiment(["experiment=smoke", *overrides]).data)
    dep = LocalDeployment(work / "deploy", tls=tls)
    try:
        dep.start_superlink(site_ids=SITES)
        if not tls:
            dep.certs.mkdir(parents=True, exist_ok=True)  # the YAML names a CA and key even when unused
            (dep.certs / "ca.crt").touch()
            (dep.certs / "sites").mkdir(exist_ok=True)
            for site_id in SITES:
                key = dep.certs / "sites" / f"{site_id}.key"
                key.touch()
                key.chmod(0o600)
        for site_id, manifest in zip(SITES, manifests, strict=True):
            dep.start_site(site_id, dep.site_yaml(site_id, manifest))
        out = work / "out"
        run = dep.flwr_run(REPO, write_run_config(work / "run.toml", "smoke", overrides, out, rounds))
        run.wait(timeout=1800)
        results_file = out / "results.json"
        if not results_file.is_file():
            raise RuntimeError(f"no results.json; flwr run:\n{dep.log_tail('flwr_run')}")
        return json.loads(results_file.read_text())
    finally:
        dep.stop()


def import_seconds(eager_sklearn: bool) -> float:
    """Cumulative ``-X importtime`` of ``client.app`` (plus sklearn first, as the eager import chain had it)."""
    code = ("import sklearn.linear_model, sklearn.metrics; " if eager_sklearn else "") + "import client.app"
    wanted = {"client.app", "sklearn.linear_model", "sklearn.metrics"}
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    total = 0
    for line in proc.stderr.splitlines():  # top level: one space before the name
        _, cumulative, name = line.split("|")
        if name.startswith(" ") and not name.startswith("  ") and name.strip() in wanted:
            total += int(cumulative)
    return total / 1e6


def probe(site_yaml: Path, run_toml: Path) -> None:
    """In a fresh process: import, site start-up and the first round's handler, as one ClientApp does."""
    t0 = time.perf_counter()
    import client.app  # noqa: F401  (the ClientApp module's own import chain)

    t_import = time.perf_counter() - t0
    import tomllib

    from mlip_fed.deploy.site_config import load_site_config, site_experiment
    from mlip_fed.federation.payload import RoundRequest
    from mlip_fed.federation.run_config import experiment_from_run_config
    from mlip_fed.federation.site import SiteRuntime, initial_global_state

    run = experiment_from_run_config(tomllib.loads(run_toml.read_text()))
    weights, bank, _ = initial_global_state(run.cfg)  # the server's side: not counted
    request = RoundRequest(
        1,
        weights,
        {k: bank[k] for k in ("prototypes_image", "prototypes_text", "initialized")},
        {"server-round": 1, "run-id": "bench", "num-rounds": 1, "local-epochs": 1, "strategy": "fedavg"},
    )
    t1 = time.perf_counter()
    site = load_site_config(site_yaml)
    runtime = SiteRuntime(site_experiment(site, run.cfg), None, site.state_dir, log=lambda line: None)
    runtime.site_id = site.site_id
    t_startup = time.perf_counter() - t1
    t2 = time.perf_counter()
    runtime.train_round(request)
    t_round = time.perf_counter() - t2
    print(json.dumps({"import": t_import, "startup": t_startup, "first_round": t_round}))


def fresh_process(work: Path, overrides: list[str]) -> dict[str, float]:
    from mlip_fed.config_compose import compose_experiment
    from mlip_fed.deploy.local import LocalDeployment
    from mlip_fed.federation.simulation import write_run_config
    from mlip_fed.pipeline import synthetic_manifests

    manifests = synthetic_manifests(compose_experiment(["experiment=smoke", *overrides]).data)
    dep = LocalDeployment(work / "probe", tls=True)
    dep.certs.mkdir(parents=True, exist_ok=True)
    from mlip_fed.deploy.certs import write_ca, write_site_keys

    write_ca(dep.certs)
    write_site_keys(dep.certs, SITES[0])
    site_yaml = dep.site_yaml(SITES[0], manifests[0])
    run_toml = write_run_config(work / "probe.toml", "smoke", overrides, work / "probe_out", 1)
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, __file__, "--probe", str(site_yaml), str(run_toml)],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    wall = time.perf_counter() - t0
    phases = json.loads(proc.stdout.strip().splitlines()[-1])
    return {**phases, "process_wall": wall}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--studies-per-site", type=int, default=16)
    parser.add_argument("--secagg", action="store_true", help="also run federation.secure_aggregation=true")
    parser.add_argument(
        "--variants", nargs="+", default=["simulation", "insecure", "tls"], choices=["simulation", "insecure", "tls"]
    )
    parser.add_argument("--doc", type=Path, default=REPO / "docs" / "deployment.md")
    parser.add_argument("--no-doc", action="store_true", help="print the table only")
    parser.add_argument("--probe", nargs=2, type=Path, metavar=("SITE_YAML", "RUN_TOML"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.probe:
        probe(*args.probe)
        return 0

    work = Path(tempfile.mkdtemp(prefix="deploy_rounds_"))
    rows: list[tuple[str, float, float]] = []
    try:
        overrides = overrides_for(args.studies_per_site, work / "synth")
        imports = {"lazy": import_seconds(False), "eager": import_seconds(True)}
        fresh = fresh_process(work, overrides)
        print(f"client.app import: {imports}; fresh ClientApp: {fresh}", flush=True)
        plan = [(v, v, []) for v in args.variants]
        if args.secagg:
            plan.append(("tls + SecAgg+", "tls", ["federation.secure_aggregation=true"]))
        for label, kind, extra in plan:
            sub = work / label.replace(" ", "_").replace("+", "")
            sub.mkdir()
            t0 = time.perf_counter()
            if kind == "simulation":
                results = run_simulation(sub, [*overrides, *extra], args.rounds)
            else:
                results = run_deployment(sub, [*overrides, *extra], args.rounds, tls=kind == "tls")
            per_round, overhead = round_times(results)
            rows.append((label, per_round, overhead))
            print(f"{label}: {per_round:.1f} s/round ({time.perf_counter() - t0:.0f} s total)", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    argv_text = " ".join(sys.argv[1:] if argv is None else argv)
    lines = [
        f"Command: `.venv/bin/python bench/deploy_rounds.py {argv_text}`".replace(" `", " `").rstrip()
        + f" on {platform.machine()} ({_cpus()} CPUs); experiment `smoke`, 3 sites × {args.studies_per_site} "
        f"SynthCXR studies, `train.max_steps=2`, {args.rounds} rounds, 1 thread per ClientApp.",
        "",
        "| variant | s / round | Flower overhead s / round |",
        "|---|---|---|",
        *[f"| {label} | {per_round:.1f} | {overhead:.1f} |" for label, per_round, overhead in rows],
        "",
        "| fresh ClientApp process | s |",
        "|---|---|",
        f"| `import client.app`, `-X importtime`, sklearn eager (before) | {imports['eager']:.2f} |",
        f"| `import client.app`, `-X importtime`, sklearn lazy (now) | {imports['lazy']:.2f} |",
        f"| import (timed in the probe process) | {fresh['import']:.2f} |",
        f"| site start-up (site YAML, records, model, loaders) | {fresh['startup']:.2f} |",
        f"| first round's handler (2 steps + bank statistics) | {fresh['first_round']:.2f} |",
        f"| whole probe process, wall | {fresh['process_wall']:.2f} |",
    ]
    table = "\n".join(lines)
    if not args.no_doc:
        from bench.docs_block import replace_block

        replace_block(args.doc, "deploy_rounds", table)
    print(table)
    return 0


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0))


if __name__ == "__main__":
    sys.exit(main())
