"""DP step time vs non-DP step time for MLIP at batch 32 on the CPU default model, with a time breakdown.

    .venv/bin/python bench/dp_overhead.py [--batch 32] [--steps 3] [--threads 1]

Writes the table between the dp_overhead markers in docs/privacy.md. Other processes share the CPU:
read the ratio, not the absolute times.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from mlip_fed.config import PrivacyPolicy
from mlip_fed.data.collate import MLIPCollator
from mlip_fed.model import MLIPModel, ModelConfig
from mlip_fed.pipeline import model_from_config
from mlip_fed.privacy.buckets import bucket_ids
from mlip_fed.privacy.site_privacy import SitePrivacy
from mlip_fed.train.trainer import standard_gradient

REPORTS = [
    "Small left pleural effusion. No pneumothorax.",
    "Heart size is enlarged, consistent with cardiomegaly.",
    "No acute cardiopulmonary process.",
    "Right lower lobe consolidation concerning for pneumonia. Endotracheal tube in place.",
]
DOC = Path(__file__).resolve().parents[1] / "docs" / "privacy.md"


def make_batch(model: MLIPModel, n: int, num_buckets: int) -> dict:
    g = torch.Generator().manual_seed(0)
    items = []
    for i in range(n):
        labels = torch.full((14,), math.nan)
        labels[(3 * i) % 14] = 1.0
        items.append(
            {
                "image": torch.randn(1, 64, 64, generator=g),
                "image_view2": torch.randn(1, 64, 64, generator=g),
                "report": REPORTS[i % 4],
                "labels": labels,
                "patient_id": f"p{i}",
                "study_id": f"s{i}",
            }
        )
    batch = MLIPCollator(model.tokenizer, model.kb, max_length=64, swap_prob=0.5, seed=0)(items)
    batch["group_ids"] = bucket_ids(batch["patient_id"], num_buckets)
    return batch


def timed(fn, steps: int) -> list[float]:
    fn()  # warm-up
    out = []
    for _ in range(steps):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--buckets", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = model_from_config(ModelConfig(seed=0)).train()
    batch = make_batch(model, args.batch, args.buckets)

    def plain() -> None:
        model.zero_grad(set_to_none=True)
        standard_gradient(model, batch, 1.0)

    plain_times = timed(plain, args.steps)
    # The engine a site gets from its façade (sigma 1, C 1); the ledger is a throwaway: nothing here is charged.
    policy = PrivacyPolicy(
        mechanism="bucketed", epsilon_budget=8.0, noise_multiplier=1.0, clipping_norm=1.0, num_buckets=args.buckets
    )
    ledger_dir = tempfile.TemporaryDirectory(prefix="dp_overhead_ledger_")
    site = SitePrivacy(policy, Path(ledger_dir.name) / "ledger.sqlite", args.batch, "dp_overhead", site="bench")
    engine = site.gradient_fn(model)
    profile: dict[str, list[float]] = {"forward+backward (hooks)": [], "bucket sums + clipping": [], "noise": []}

    def dp() -> None:
        model.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        image = batch["image"]
        groups = batch["group_ids"]
        out = model(batch)
        (out.total * image.shape[0]).backward()
        t1 = time.perf_counter()
        uniq, inverse = torch.unique(groups, return_inverse=True)
        per_bucket = engine._bucket_gradients(inverse, image.shape[0], int(uniq.numel()))
        norms = torch.zeros(int(uniq.numel()), dtype=torch.float64)
        for gb in per_bucket:
            if gb is not None:
                norms += gb.flatten(1).double().pow(2).sum(1)
        t2 = time.perf_counter()
        for p in engine._params:
            p.grad = torch.normal(0.0, 1.0, size=p.shape, generator=engine.generator)
        t3 = time.perf_counter()
        profile["forward+backward (hooks)"].append(t1 - t0)
        profile["bucket sums + clipping"].append(t2 - t1)
        profile["noise"].append(t3 - t2)

    dp_full = timed(lambda: (model.zero_grad(set_to_none=True), engine(model, batch, 1.0)), args.steps)
    for v in profile.values():
        v.clear()
    timed(dp, args.steps)
    engine.close()
    site.close()
    ledger_dir.cleanup()
    p_med, d_med = statistics.median(plain_times), statistics.median(dp_full)
    cmd = "python bench/dp_overhead.py " + " ".join(sys.argv[1:])
    rows = [
        f"Command: `{cmd.strip()}` (torch threads={args.threads}, batch={args.batch}, {args.buckets} buckets, "
        f"median of {args.steps} steps after 1 warm-up; 1-min load average {os.getloadavg()[0]:.1f} when the table was written)",
        "",
        "| step | median s | ratio |",
        "|---|---|---|",
        f"| non-DP (`standard_gradient`) | {p_med:.3f} | 1.00× |",
        f"| DP bucketed (`BucketedClippingGradient`) | {d_med:.3f} | {d_med / p_med:.2f}× |",
        "",
        "| DP step breakdown | median s |",
        "|---|---|",
        *[f"| {k} | {statistics.median(v):.3f} |" for k, v in profile.items()],
    ]
    table = "\n".join(rows)
    print(table)
    from bench.docs_block import replace_block

    replace_block(DOC, "dp_overhead", table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
