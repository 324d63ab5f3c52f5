"""One-run canary audit on SynthCXR: bucketed DP vs the deliberately broken noise-off configuration.

Both runs insert the same m canary patients with the same secret coins into the same SynthCXR site, train
with the same sampling rate, steps and buckets, and claim the same epsilon (sigma calibrated to
``privacy.epsilon_budget``); the only difference is that the noise-off run adds no noise. A sound mechanism
must give a lower bound <= the claim; the broken one should be caught (bound far above the claim).

    .venv/bin/python bench/canary_audit.py [--canary-kind gradient] [--canaries 1000] [--steps 10] [--sample-rate 0.5]
                                           [hydra overrides ...]

Default: white-box Dirac gradient canaries (``mlip_fed.privacy.gradient_canaries``); ``--canary-kind input``
runs the black-box input-space canaries instead (little power at CPU sizes).

Writes the table between the canary_audit markers in docs/privacy.md and prints it; the same runs are
``mlip-privacy canary-run`` with and without ``--noise-off --i-know-noise-is-off``.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.docs_block import replace_block
from mlip_fed.config_compose import compose_experiment
from mlip_fed.privacy.canary_run import CanaryRunReport, run_canary_audit

REPO = Path(__file__).resolve().parents[1]
#: A small, fast audit model: image-text contrast only (the objective the canaries are scored with), 32 px.
DEFAULT_OVERRIDES = [
    "experiment=smoke",
    "objectives=clip_only",
    "privacy=bucketed",
    "privacy.epsilon_budget=1",
    "data.image_size=32",
    "train.lr=1e-3",
    "train.warmup_fraction=0",
    "train.min_lr=1e-3",
    "train.progress_bar=false",
]


def row(name: str, r: CanaryRunReport) -> str:
    prv = "—" if r.claimed_epsilon_prv is None else f"{r.claimed_epsilon_prv:.3f}"
    return (
        f"| {name} | {r.noise_multiplier_claimed:.2f} | {r.noise_multiplier_applied:.2f} | {r.claimed_epsilon:.3f} "
        f"(RDP {r.claimed_epsilon_rdp:.3f}, PRV {prv}) | {r.canary_unit_epsilon:.3f} | {r.canaries} {r.kind} "
        f"({r.included} in) | {r.correct}/{r.guesses} | "
        f"**{r.epsilon_lower_bound:.3f}** | {'PASS' if r.passed else 'FAIL'} | {r.seconds:.0f} |"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--canary-kind", choices=("gradient", "input"), default="gradient")
    parser.add_argument("--canaries", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--sample-rate", type=float, default=0.5)
    parser.add_argument("--site", type=int, default=0)
    parser.add_argument("--significance", type=float, default=0.05)
    parser.add_argument("--doc", type=Path, default=REPO / "docs" / "privacy.md")
    parser.add_argument("--no-doc", action="store_true", help="print only")
    parser.add_argument("overrides", nargs="*", help="extra hydra overrides (after the defaults)")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    cfg = compose_experiment([*DEFAULT_OVERRIDES, *args.overrides])
    reports = {}
    with tempfile.TemporaryDirectory(prefix="canary_audit_") as work:
        for name, noise_off in (("bucketed DP", False), ("noise off (broken on purpose)", True)):
            reports[name] = run_canary_audit(
                cfg,
                Path(work) / ("off" if noise_off else "dp"),
                m=args.canaries,
                kind=args.canary_kind,
                steps=args.steps,
                sample_rate=args.sample_rate,
                site=args.site,
                significance=args.significance,
                noise_off=noise_off,
                i_know_noise_is_off=noise_off,
            )
            print(reports[name].text(), file=sys.stderr)
    first = next(iter(reports.values()))
    cmd = "python bench/canary_audit.py " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = [
        f"Command: `{cmd.strip()}` — defaults `{' '.join(DEFAULT_OVERRIDES)}`; site {args.site} "
        f"({first.site_records} SynthCXR train records) + canaries, q = {first.sample_rate:g}, {first.steps} steps, "
        f"{first.num_buckets} buckets, C = {first.clipping_norm:g}, guesses top/bottom {first.k_plus}/{first.k_minus}, "
        f"{first.confidence:.0%} confidence, δ = {first.delta:g}; {platform.machine()} CPU, torch threads "
        f"{torch.get_num_threads()}, {time.perf_counter() - started:.0f} s in all.",
        "",
        "| configuration | σ claimed | σ applied | claimed ε | ε of one canary unit | canaries | correct guesses | "
        "ε lower bound | verdict | s |",
        "|---|---|---|---|---|---|---|---|---|---|",
        *(row(name, r) for name, r in reports.items()),
    ]
    table = "\n".join(lines)
    print(table)
    if not args.no_doc:
        replace_block(args.doc, "canary_audit", table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
