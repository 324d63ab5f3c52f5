"""What each change to the full-MLIP CPU step saved: the step before them (a git revision) and after each one.

The step is ``bench/mfu.py``'s bare training step (zero_grad, forward of all five objectives, backward,
clipping, AdamW, EMA) on one pre-collated SynthCXR batch, so data loading is out of the picture. The
baseline runs from a temporary ``git worktree`` of ``--baseline-rev`` (its own code and configs); every
other row runs from this checkout, cumulatively:

1. code: the ITM fusion computes its text-only and image-only work once per text / image (not per pair)
   and only [CLS] through its last layer; the counterfactual loss encodes only the rows that have a
   counterfactual; the EMA update is one fused op. Run with the old text tower (4 layers, dropout 0.1).
2. + no dropout in the text tower (``model.text.dropout=0``).
3. + 2 text layers instead of 4: the CPU model configs as they are now.

Each variant runs in its own process; variants are interleaved over ``--rounds`` so drifting load hits
them alike; the table shows the median over rounds of each run's median step time, and the
projected wall time of 2,000 steps. Writes the ``step_cost`` block of ``docs/step_cost.md``
(``bench.docs_block``).

    python bench/step_cost.py --baseline-rev 2683b8a --archs resnet_tiny vit_tiny --steps 8 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.hardware import machine_line, measure_hardware  # noqa: E402

BLOCK = "step_cost"
OLD_TEXT = ("model.text.num_layers=4", "model.text.dropout=0.1")
#: (key, label, tree, overrides): tree "baseline" is the worktree of --baseline-rev, "here" this checkout.
VARIANTS: tuple[tuple[str, str, str, tuple[str, ...]], ...] = (
    ("baseline", "before (baseline revision: its code and configs)", "baseline", ()),
    (
        "code",
        "shared fusion work, [CLS]-only last fusion layer, counterfactuals on valid rows, fused EMA",
        "here",
        OLD_TEXT,
    ),
    ("no_dropout", "+ no text-tower dropout", "here", ("model.text.num_layers=4", "model.text.dropout=0.0")),
    ("two_layers", "+ 2-layer text tower (the CPU configs now)", "here", ()),
)

#: Run in a fresh interpreter inside the tree being measured: its own bench/mfu.py, code and configs.
MEASURE = """
import json, sys, torch
sys.path.insert(0, sys.argv[1])
from bench.mfu import build_step, count_flops, time_step
torch.set_num_threads(int(sys.argv[3]))
model, batch, step = build_step(sys.argv[2], 32, sys.argv[5:])
flops, _ = count_flops(model, batch)
print(json.dumps({"seconds": time_step(step, int(sys.argv[4])), "flops": flops}))
"""


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline-rev", default="2683b8a", help="git revision of the 'before' step")
    parser.add_argument("--archs", nargs="+", default=["resnet_tiny", "vit_tiny"])
    parser.add_argument("--steps", type=int, default=8, help="timed steps per run (median), after 2 warm-up steps")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved runs of every variant")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "step_cost.md")
    parser.add_argument("--no-doc", action="store_true", help="print the table only")
    return parser.parse_args(argv)


def measure(tree: Path, arch: str, threads: int, steps: int, overrides: Sequence[str]) -> dict[str, float]:
    """One variant in its own process (a fresh interpreter: no warm caches or thread pools carried over)."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-c", MEASURE, str(tree), arch, str(threads), str(steps), *overrides]
    done = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"step_cost: {arch} in {tree} {list(overrides)} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    hw = measure_hardware(args.threads, [512], 0.5, mem_mib=64, single_thread=False)
    runs: dict[tuple[str, str], list[dict[str, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="step_cost_") as tmp:
        baseline = Path(tmp) / "baseline"
        subprocess.run(
            ["git", "-C", str(REPO), "worktree", "add", "--detach", str(baseline), args.baseline_rev],
            check=True,
            capture_output=True,
        )
        try:
            for round_index in range(args.rounds):
                for arch in args.archs:
                    for key, _label, tree, overrides in VARIANTS:
                        root = baseline if tree == "baseline" else REPO
                        result = measure(root, arch, args.threads, args.steps, overrides)
                        runs.setdefault((arch, key), []).append(result)
                        print(f"[step_cost] round {round_index} {arch} {key}: {result['seconds']:.3f} s", flush=True)
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(baseline)], check=False)
    table = render(args, runs, machine_line(hw))
    print(table)
    if not args.no_doc:
        from bench.docs_block import replace_block

        replace_block(args.out, BLOCK, table)
        print(f"wrote {args.out}")
    return 0


def render(args: argparse.Namespace, runs: dict[tuple[str, str], list[dict[str, float]]], machine: str) -> str:
    command = "python bench/step_cost.py " + shlex.join(
        [
            "--baseline-rev",
            args.baseline_rev,
            "--archs",
            *args.archs,
            "--steps",
            str(args.steps),
            "--rounds",
            str(args.rounds),
            "--threads",
            str(args.threads),
        ]
    )
    lines = [
        f"Command: `{command}` — {machine}; {args.threads} torch threads, batch 32, all five objectives, 64²; "
        f"median over {args.rounds} interleaved runs of each run's median of {args.steps} steps.",
        "",
        "| image tower | variant | GFLOP / step | s / step | speed-up vs before | 2,000 steps |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for arch in args.archs:
        before = statistics.median(r["seconds"] for r in runs[(arch, "baseline")])
        for key, label, _tree, _overrides in VARIANTS:
            seconds = statistics.median(r["seconds"] for r in runs[(arch, key)])
            gflop = statistics.median(r["flops"] for r in runs[(arch, key)]) / 1e9
            lines.append(
                f"| {arch} | {label} | {gflop:.1f} | {seconds:.3f} | {before / seconds:.2f}× | "
                f"{2000 * seconds / 60:.1f} min |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
