"""Federated vs centralized MLIP on the same data with the same total local epochs.

For each setting (3 or 10 SynthCXR hospitals, IID or Dirichlet alpha=0.3 label skew), the same
generated federation is trained (a) federated: R rounds x 1 local epoch per site, FedAvg + bank merge,
and (b) centralized: one 'site' holding the pooled train data, R rounds x 1 epoch (the same trainer,
optimiser state carried across rounds). Both are scored by the server evaluator on the pooled
held-out split (linear-probe macro AUROC, retrieval R@5). Runs in-process (no Flower) so the
comparison is about learning; ``fed_comm.py`` measures the Flower side.

    .venv/bin/python bench/fed_vs_central.py            # writes the table into docs/federation.md
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from mlip_fed.federation.report import replace_docs_block
from mlip_fed.federation.simulation import run_in_process

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--total-studies", type=int, default=240)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--sites", type=int, nargs="+", default=[3, 10])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--doc", type=Path, default=REPO / "docs" / "federation.md")
    parser.add_argument("--json", type=Path, default=None, help="also write raw results here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="fed_vs_central_"))
    rows = []
    raw = []
    try:
        for num_sites in args.sites:
            for alpha in (None, 0.3):
                data_root = work / f"data_{num_sites}_{alpha}"
                common = [
                    f"data.root={data_root}",
                    f"data.synthetic.num_sites={num_sites}",
                    f"data.synthetic.studies_per_site={args.total_studies // num_sites}",
                    f"data.synthetic.dirichlet_alpha={'null' if alpha is None else alpha}",
                    f"seed={args.seed}",
                    f"train.batch_size={args.batch_size}",
                    "train.num_threads=1",
                    "train.max_steps=null",
                    f"federation.num_rounds={args.rounds}",
                    "federation.local_epochs=1",
                    f"federation.min_available_nodes={num_sites}",
                    f"federation.min_train_nodes={num_sites}",
                    f"federation.evaluate_every={args.rounds}",
                ]
                out = {}
                for mode in ("central", "federated"):
                    t0 = time.perf_counter()
                    summary = run_in_process(
                        "smoke", common, work / f"run_{num_sites}_{alpha}_{mode}", central=(mode == "central")
                    )
                    final = summary["final_eval"] or {}
                    out[mode] = {
                        "auroc": final.get("auroc"),
                        "r_at_5": final.get("r_at_5"),
                        "baseline_auroc": (summary["baseline_eval"] or {}).get("auroc"),
                        "seconds": time.perf_counter() - t0,
                    }
                    print(f"sites={num_sites} alpha={alpha} {mode}: {out[mode]}", flush=True)
                ratio = (
                    out["federated"]["auroc"] / out["central"]["auroc"]
                    if out["federated"]["auroc"] and out["central"]["auroc"]
                    else float("nan")
                )
                raw.append({"sites": num_sites, "alpha": alpha, **out, "ratio": ratio})
                rows.append(
                    f"| {num_sites} | {'IID' if alpha is None else f'Dirichlet {alpha}'} | "
                    f"{_f(out['central']['baseline_auroc'])} | {_f(out['central']['auroc'])} | "
                    f"{_f(out['federated']['auroc'])} | **{_f(ratio)}** | {_f(out['central']['r_at_5'])} | "
                    f"{_f(out['federated']['r_at_5'])} | {out['central']['seconds']:.0f} / {out['federated']['seconds']:.0f} |"
                )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    command = "python bench/fed_vs_central.py " + " ".join(sys.argv[1:] if argv is None else argv)
    table = "\n".join(
        [
            f"Command: `{command.strip()}` (experiment `smoke` model sizes, {args.total_studies} SynthCXR studies in "
            f"total, {args.rounds} rounds x 1 local epoch vs {args.rounds} centralized epochs, batch {args.batch_size}, "
            f"seed {args.seed}, 1 torch thread, in-process; AUROC = server linear probe on the pooled held-out split).",
            "",
            "| sites | split | random-init AUROC | central AUROC | federated AUROC | fed/central | central R@5 | fed R@5 | seconds (central / fed) |",
            "|---|---|---|---|---|---|---|---|---|",
            *rows,
        ]
    )
    replace_docs_block(args.doc, "fed_vs_central", table)
    if args.json:
        args.json.write_text(json.dumps(raw, indent=2))
    print(table)
    return 0


def _f(value: float | None) -> str:
    return "-" if value is None or value != value else f"{value:.3f}"


if __name__ == "__main__":
    raise SystemExit(main())
