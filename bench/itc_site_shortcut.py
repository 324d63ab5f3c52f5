"""Global ITC per round, centralized vs federated vs one site alone, and how much of it is a site shortcut.

SynthCXR hospitals differ in acquisition (contrast, burned-in marker, field of view) and in report style
(docs/synthcxr.md, "Sites"). A centralized batch mixes hospitals, so image-report contrast can fall below
log(batch) by matching an image's hospital to a report's style alone; a FedAvg site only ever sees batches of
one hospital. This bench trains the three arms in-process (``run_in_process``) and scores each final global model
with plain InfoNCE (``objectives.global_itc.temperature``, no soft targets, eval transforms, training-split studies)
on single-hospital batches and on mixed-hospital batches: a gain only on mixed batches is the shortcut.
Findings and figures: docs/federation.md, "The global contrast does not start under FedAvg from scratch".

    .venv/bin/python bench/itc_site_shortcut.py --studies-per-site 300 --rounds 4 --central-epochs 2 --site-epochs 6
"""

from __future__ import annotations

import argparse
import json
import math
import random
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
#: The block of docs/federation.md this bench writes.
BLOCK = "itc_site_shortcut"
#: Studies per hospital scored, in batches of ``BATCH`` (the training batch of ``synth_cpu``).
SCORED_PER_SITE = 96
BATCH = 32
MIXED_BATCHES = 9


def train_arm(
    work: Path, name: str, sites: int, studies: int, rounds: int, epochs: int, central: bool
) -> tuple[list[dict[str, float]], Path]:
    """One in-process run; returns each round's per-site ``loss_global_itc`` and the final server checkpoint."""
    from mlip_fed.federation.simulation import run_in_process

    out = work / name
    overrides = [
        f"data.root={work / f'data_{sites}x{studies}'}",
        f"data.synthetic.num_sites={sites}",
        f"data.synthetic.studies_per_site={studies}",
        "train.num_threads=1",
        f"federation.num_rounds={rounds}",
        f"federation.local_epochs={epochs}",
        "federation.server_evaluation=false",
        "federation.min_train_nodes=1",
        "federation.min_available_nodes=1",
    ]
    run_in_process("synth_cpu", overrides, out, central=central)
    results = json.loads((out / "results.json").read_text())
    per_round = [
        {s["site_id"]: float(s["loss_global_itc"]) for s in record["sites"]}
        for record in results["rounds"]
        if record.get("sites")
    ]
    return per_round, out / "checkpoints" / "server_last.pt"


def shortcut_check(checkpoint: Path) -> dict[str, float]:
    """Plain InfoNCE of the initial and the final global model on single-hospital and on mixed-hospital batches."""
    import torch
    import torch.nn.functional as F

    from mlip_fed import pipeline
    from mlip_fed.config import ExperimentConfig

    saved = torch.load(checkpoint, map_location="cpu", weights_only=False)
    cfg = ExperimentConfig.model_validate(saved["config"])
    model = pipeline.build_model(cfg)
    collator = pipeline.build_collator(model, cfg)
    temperature = cfg.model.objectives.global_itc.temperature
    hospitals = []
    for k in range(cfg.data.synthetic.num_sites):
        data = pipeline.eval_dataset(pipeline.load_records(cfg.data, k).train, cfg)
        hospitals.append([data[i] for i in range(min(SCORED_PER_SITE, len(data)))])

    @torch.no_grad()
    def itc(items: list[Any]) -> float:
        batch = collator(items)
        image = model.encode_image(batch["image"]).embedding
        text = model.encode_text(batch["input_ids"], batch["attention_mask"]).embedding
        logits = image @ text.t() / temperature
        target = torch.arange(len(items))
        return float(0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)))

    def score() -> tuple[float, float]:
        model.eval()
        single = [itc(h[j : j + BATCH]) for h in hospitals for j in range(0, len(h) - BATCH + 1, BATCH)]
        if len(hospitals) < 2:
            return sum(single) / len(single), math.nan
        pool, rng, mixed = [x for h in hospitals for x in h], random.Random(0), []
        for _ in range(MIXED_BATCHES):
            rng.shuffle(pool)
            mixed.append(itc(pool[:BATCH]))
        return sum(single) / len(single), sum(mixed) / len(mixed)

    init_single, init_mixed = score()
    model.load_state_dict(saved["weights"])
    single, mixed = score()
    return {"init_single": init_single, "init_mixed": init_mixed, "single": single, "mixed": mixed}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--studies-per-site", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--central-epochs", type=int, default=2, help="local epochs of the pooled 'site' per round")
    parser.add_argument("--site-epochs", type=int, default=6, help="local epochs of a hospital per round")
    parser.add_argument("--work", type=Path, default=None, help="keep runs and generated data here")
    parser.add_argument("--doc", type=Path, default=REPO / "docs" / "federation.md", help="page to write the table to")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    work = args.work or Path(tempfile.mkdtemp(prefix="itc_site_shortcut_"))
    n = args.studies_per_site
    arms = (  # name, hospitals, epochs per round, central
        ("central (3 hospitals pooled)", 3, args.central_epochs, True),
        ("FedAvg, 3 hospitals", 3, args.site_epochs, False),
        ("one hospital alone", 1, args.site_epochs, False),
    )
    lines = [
        f"Command: `python bench/itc_site_shortcut.py --studies-per-site {n} --rounds {args.rounds} "
        f"--central-epochs {args.central_epochs} --site-epochs {args.site_epochs}` (experiment `synth_cpu`, "
        f"SynthCXR `cpu` tier, {n} studies per hospital, batch {BATCH}, 1 torch thread, in-process). "
        f"Chance = log({BATCH}) = {math.log(BATCH):.3f}; ITC round r = each site's mean training `loss_global_itc` "
        "in round r (results.json); the last two columns score the initial and the final global model.",
        "",
    ]
    rounds_header = " | ".join(f"ITC round {r}" for r in range(1, args.rounds + 1))
    lines.append(
        f"| arm | steps / round / site | {rounds_header} | single-hospital ITC (init → final) | "
        "mixed ITC (init → final) |"
    )
    lines.append("|---|---|" + "---|" * args.rounds + "---|---|")
    for line in lines:
        print(line)
    for index, (name, sites, epochs, central) in enumerate(arms):
        per_round, checkpoint = train_arm(work, f"arm_{index}", sites, n, args.rounds, epochs, central)
        steps = json.loads((checkpoint.parent.parent / "results.json").read_text())["rounds"][-1]["sites"][0]
        cells = " | ".join("/".join(f"{v:.3f}" for v in r.values()) for r in per_round)
        check = shortcut_check(checkpoint)
        mixed = "-" if math.isnan(check["mixed"]) else f"{check['init_mixed']:.3f} → {check['mixed']:.3f}"
        lines.append(
            f"| {name} | {int(steps['train_steps'])} | {cells} | "
            f"{check['init_single']:.3f} → {check['single']:.3f} | {mixed} |"
        )
        print(lines[-1], flush=True)
    from bench.docs_block import replace_block

    replace_block(args.doc, BLOCK, "\n".join(lines))
    print(f"\nwritten to {args.doc}; runs and data: {work}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
