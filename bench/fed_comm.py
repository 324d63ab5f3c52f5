"""Communication and time split of real ``flwr run`` simulations, and the 20-hospital scale run.

For each federation size it runs ``flwr run`` through ``run_flwr_simulation`` (own FLWR_HOME and
ports, Ray on 127.0.0.1, 1 CPU per ClientApp) and reads results.json: bytes per round per site for
the weights and for the bank, and the round wall time split into local training, aggregation,
evaluation and Flower overhead. Peak memory is the largest sum of RSS over the SuperLink's process
tree (SuperExec, ServerApp, Ray workers), sampled every 0.5 s.

    .venv/bin/python bench/fed_comm.py            # writes the tables into docs/federation.md
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

from mlip_fed.federation.report import replace_docs_block
from mlip_fed.federation.simulation import descendants, run_flwr_simulation, superlink_pids

REPO = Path(__file__).resolve().parents[1]


def tree_rss_bytes(flwr_home: Path) -> int:
    total = 0
    for root in superlink_pids(flwr_home):
        for pid in [root, *descendants(root)]:
            try:
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
            except OSError:
                continue
    return total


def run_one(work: Path, num_sites: int, studies_per_site: int, rounds: int) -> dict[str, Any]:
    flwr_home = work / f"home_{num_sites}"
    peak = [0]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.5):
            peak[0] = max(peak[0], tree_rss_bytes(flwr_home))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
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
    finally:
        done.set()
        sampler.join()
    if not result.ok:
        raise RuntimeError(f"{num_sites}-site run failed: {result.failure_reason()}")
    assert result.results is not None
    return {"sites": num_sites, "results": result.results, "wall": result.seconds, "peak_rss": peak[0]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sites", type=int, nargs="+", default=[3, 20])
    parser.add_argument("--studies-per-site", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--doc", type=Path, default=REPO / "docs" / "federation.md")
    args = parser.parse_args(argv)
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
        "`flwr run` with 1 CPU per ClientApp on this 2-core machine shared with other jobs).",
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
    replace_docs_block(args.doc, "fed_comm", table)
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
