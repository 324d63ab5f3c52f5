"""One site's warm round, split: per-item data time, collation per batch, local training, bank pass.

The before/after measurement of the §4 fixes (docs/federation.md, "Performance fixes"): run it once with
this tree and once with ``PYTHONPATH=<copy of the tree with the old files>`` (a copy picks its ``mlip_fed``
first), interleaved, and compare the JSON lines it prints.

    .venv/bin/python bench/site_round.py --image-size 64 --studies-per-site 100
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--studies-per-site", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3, help="the last round is reported (warm)")
    parser.add_argument("--data-root", type=Path, default=None, help="reuse generated SynthCXR data here")
    args = parser.parse_args(argv)

    import torch

    import mlip_fed
    from mlip_fed.config_compose import compose_experiment
    from mlip_fed.federation.payload import RoundRequest
    from mlip_fed.federation.site import SiteRuntime, initial_global_state

    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="site_round_"))
    root = args.data_root or work / "data"
    cfg = compose_experiment(
        [
            "experiment=synth_cpu",
            f"data.root={root}",
            "data.synthetic.num_sites=3",
            f"data.synthetic.studies_per_site={args.studies_per_site}",
            f"data.image_size={args.image_size}",
            "train.num_threads=1",
        ]
    )
    try:
        weights, bank, _ = initial_global_state(cfg)
        site = SiteRuntime(cfg, 0, work / "site", log=lambda line: None)
        glob = {k: bank[k] for k in ("prototypes_image", "prototypes_text", "initialized")}
        rounds = []
        for r in range(1, args.rounds + 1):
            t = time.perf_counter()
            update = site.train_round(RoundRequest(r, weights, glob, {"server-round": r, "num-rounds": args.rounds}))
            rounds.append(time.perf_counter() - t)
        data = site.train_data
        t = time.perf_counter()
        for i in range(len(data)):
            data[i]
        item_ms = (time.perf_counter() - t) / len(data) * 1e3
        items = [data[i] for i in range(min(64, len(data)))]
        t = time.perf_counter()
        for epoch in range(3):
            site.collator.set_epoch(100 + epoch)
            site.collator(items[:32])
            site.collator(items[32:64])
        collate_ms = (time.perf_counter() - t) / 6 * 1e3
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(
        json.dumps(
            {
                "tree": mlip_fed.__file__,
                "rounds": rounds,
                "train_s": update.metrics["train_seconds"],
                "bank_s": update.metrics.get("bank_seconds", float("nan")),
                "steps": update.metrics["train_steps"],
                "item_ms": item_ms,
                "collate_ms": collate_ms,
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
