"""Cost of SecAgg+ per round against plain aggregation, in ``flwr run`` simulation at the demo size.

Runs the same federation twice through ``run_flwr_simulation`` (own FLWR_HOME and ports, Ray on 127.0.0.1, 1 CPU
per ClientApp): plain, then with ``federation.secure_aggregation=true``. From results.json: per round the fit
phase (``seconds.communication``: one ``send_and_receive`` plain, the four SecAgg+ stages secure), the whole round
(fit + aggregation + evaluation) and the upload bytes per site; peak RSS is the largest sum of RSS over the
SuperLink's process tree, sampled every 0.5 s (``bench/fed_comm.py``'s sampler).

    .venv/bin/python bench/secagg_cost.py --rounds 3 --studies-per-site 30   # writes docs/deployment.md
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
BLOCK = "secagg_cost"


def run_one(work: Path, secure: bool, sites: int, studies: int, rounds: int, max_examples: int) -> dict[str, Any]:
    name = "secagg" if secure else "plain"
    flwr_home = work / f"home_{name}"
    overrides = [
        f"data.root={work / 'data'}",  # same SynthCXR data for both runs
        f"data.synthetic.num_sites={sites}",
        f"data.synthetic.studies_per_site={studies}",
        "train.batch_size=8",
        f"federation.min_available_nodes={sites}",
        f"federation.min_train_nodes={sites}",
    ]
    if secure:
        overrides += ["federation.secure_aggregation=true", f"federation.secagg_max_examples={max_examples}"]
    with peak_tree_rss(lambda: superlink_pids(flwr_home)) as peak:
        result = run_flwr_simulation(
            REPO,
            output_dir=work / f"run_{name}",
            num_supernodes=sites,
            experiment="smoke",
            overrides=overrides,
            num_rounds=rounds,
            timeout_s=900,
            flwr_home=flwr_home,
        )
    if not result.ok:
        raise RuntimeError(f"{name} run failed: {result.failure_reason()}")
    assert result.results is not None
    return {"name": name, "results": result.results, "wall": result.seconds, "peak_rss": peak.bytes}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--studies-per-site", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-examples", type=int, default=100, help="federation.secagg_max_examples")
    parser.add_argument("--doc", type=Path, default=REPO / "docs" / "deployment.md")
    args = parser.parse_args(argv)
    if args.sites < 3:
        parser.error("--sites must be >= 3 (SecAgg+ with 3 shares and threshold 2)")
    work = Path(tempfile.mkdtemp(prefix="secagg_cost_"))
    runs = []
    try:
        for secure in (False, True):
            runs.append(run_one(work, secure, args.sites, args.studies_per_site, args.rounds, args.max_examples))
            print(f"{runs[-1]['name']}: {runs[-1]['wall']:.0f} s, peak {runs[-1]['peak_rss'] / 2**30:.2f} GiB")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    shown = " ".join(sys.argv[1:] if argv is None else argv)
    lines = [
        f"Command: `python bench/secagg_cost.py {shown}`".replace(" `", " `").rstrip()
        + f" (experiment `smoke` model, {args.sites} sites x {args.studies_per_site} SynthCXR studies, {args.rounds} "
        f"rounds, `flwr run` simulation with 1 CPU per ClientApp on a 2-core CPU machine, 1-min load average {os.getloadavg()[0]:.1f} when the table was written; no "
        "TLS in simulation).",
        "",
        "| aggregation | round | fit phase s | whole round s | up / site | down / site |",
        "|---|---|---|---|---|---|",
    ]
    for run in runs:
        for record in run["results"]["rounds"][1:]:
            b, s = record["bytes"], record["seconds"]
            up = max(w + k for w, k in zip(b["up_weights_per_site"], b["up_bank_per_site"], strict=True))
            down = b["down_weights_per_site"] + b["down_bank_per_site"]
            lines.append(
                f"| {run['name']} | {record['round']} | {s['communication']:.2f} | {s['round']:.2f} | "
                f"{up / 2**20:.2f} MiB | {down / 2**20:.2f} MiB |"
            )
    lines += ["", "| aggregation | whole `flwr run` wall s | peak RSS (SuperLink process tree) |", "|---|---|---|"]
    for run in runs:
        lines.append(f"| {run['name']} | {run['wall']:.0f} | {run['peak_rss'] / 2**30:.2f} GiB |")
    table = "\n".join(lines)
    replace_block(args.doc, BLOCK, table)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
