"""Growth: time per round and peak memory against sites, image size and local dataset size.

Each point is a fresh Python process running the federation in-process (``FederationCoordinator`` and
``SiteRuntime``s called directly, as ``run_in_process`` does: same trainer, aggregation and checkpoints as
``flwr run``, without Ray/SuperLink start-up, whose cost ``bench/flower_overhead.py`` measures). So the
memory figure is exact and simple: the process's peak RSS (``ru_maxrss``, ``pipeline.peak_rss_gib``), and
there is no child process. Server evaluation is switched off (it grows with the pooled test split, not
with what is swept); time per round = every site's ``train_round`` (sequential, 1 torch thread) plus
aggregation. The figure reported is the last round (caches warm, after start-up); the first round and
the site set-up time are in the JSON.

    .venv/bin/python bench/growth.py                          # all three sweeps, tables + plots into docs/
    .venv/bin/python bench/growth.py --sweeps sites --sites 3 10 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
FIGURES = REPO / "docs" / "figures"
#: Sweep -> (x label, how x is scaled for the slope, slope unit).
SWEEPS = {
    "sites": ("simulated sites", 1.0, "s per site"),
    "image": ("image side (pixels)", None, "s per 1k pixels"),
    "studies": ("studies per site", 1.0, "s per study"),
}


# ---------------------------------------------------------------------------- one point (child process)
def run_point(spec: dict[str, Any]) -> dict[str, Any]:
    """One federation, ``spec['rounds']`` rounds; what it cost, in the process that ran it."""
    import torch

    from mlip_fed import pipeline
    from mlip_fed.federation.coordinator import coordinator_from_run
    from mlip_fed.federation.run_config import experiment_from_run_config
    from mlip_fed.federation.site import SiteRuntime

    torch.set_num_threads(1)
    out = Path(spec["work"]) / f"run_{spec['name']}"
    shutil.rmtree(out, ignore_errors=True)
    run = experiment_from_run_config(
        {"experiment": spec["experiment"], "overrides": " ".join(spec["overrides"]), "output-dir": str(out)}
    )
    pipeline.synthetic_manifests(run.cfg.data)  # data generation is not part of any figure
    coordinator = coordinator_from_run(run, log=lambda line: None)
    coordinator.evaluator = None
    t0 = time.perf_counter()
    sites = [
        SiteRuntime(run.cfg, k, out / "sites" / f"site_{k}", log=lambda line: None)
        for k in range(run.cfg.data.synthetic.num_sites)
    ]
    setup_s = time.perf_counter() - t0
    coordinator.start()
    rounds: list[dict[str, float]] = []
    for server_round in coordinator.remaining_rounds():
        t_round = time.perf_counter()
        request = coordinator.round_request(server_round)
        updates = [site.train_round(request) for site in sites]
        coordinator.complete_round(server_round, updates, [], num_sampled=len(sites))
        train_s = sum(u.metrics["train_seconds"] for u in updates)
        steps = sum(u.metrics["train_steps"] for u in updates)
        rounds.append(
            {
                "round_s": time.perf_counter() - t_round,
                "train_s": train_s,
                "steps": steps,
                "step_s": train_s / max(steps, 1.0),
                "handler_s": sum(u.metrics["handler_seconds"] for u in updates),
            }
        )
    shutil.rmtree(out, ignore_errors=True)
    return {"setup_s": setup_s, "rounds": rounds, "peak_rss_gib": pipeline.peak_rss_gib()}


# ---------------------------------------------------------------------------- sweeps (parent)
def point_spec(args: argparse.Namespace, work: Path, sweep: str, x: int) -> dict[str, Any]:
    sites, studies, size = args.base_sites, args.base_studies, 64
    overrides = [f"train.batch_size={args.batch_size}", "train.num_threads=1", f"federation.num_rounds={args.rounds}"]
    if sweep == "sites":
        sites, studies = x, args.sites_studies
    elif sweep == "image":
        size = x
    else:
        studies = x
    if sweep != "studies":  # the dataset sweep trains a whole local epoch per round; the others a fixed budget
        overrides.append(f"train.max_steps={args.max_steps}")
    overrides += [
        f"data.root={work / f'data_{sites}x{studies}_{size}px'}",
        f"data.synthetic.num_sites={sites}",
        f"data.synthetic.studies_per_site={studies}",
        f"data.image_size={size}",
        f"federation.min_train_nodes={sites}",
        f"federation.min_available_nodes={sites}",
    ]
    return {"name": f"{sweep}_{x}", "experiment": args.experiment, "overrides": overrides, "work": str(work)}


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, __file__, "--point", json.dumps(spec)], cwd=REPO, capture_output=True, text=True
    )
    if proc.returncode != 0:
        raise RuntimeError(f"point {spec['name']} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares line y = slope * x + intercept."""
    import numpy as np

    if len(xs) < 2:
        return float("nan"), float("nan")
    slope, intercept = np.polyfit(np.asarray(xs, float), np.asarray(ys, float), 1)
    return float(slope), float(intercept)


def scaled(sweep: str, x: int) -> float:
    return x * x / 1000.0 if sweep == "image" else float(x)


def plot(sweep: str, xs: list[int], results: list[dict[str, Any]], path: Path) -> dict[str, float]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    label, _, unit = SWEEPS[sweep]
    sx = [scaled(sweep, x) for x in xs]
    round_s = [r["rounds"][-1]["round_s"] for r in results]
    step_s = [r["rounds"][-1]["step_s"] for r in results]
    mem = [r["peak_rss_gib"] for r in results]
    slope, icpt = fit(sx, round_s)
    mem_slope, mem_icpt = fit(sx, mem)
    step_slope, _ = fit(sx, step_s)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.4))
    xlabel = "image pixels / 1000 (side²)" if sweep == "image" else label
    ax1.plot(sx, round_s, "o", label="measured")
    ax1.plot(sx, [slope * v + icpt for v in sx], "-", label=f"fit: {slope:.3g} {unit}")
    ax1.set_xlabel(xlabel)
    ax1.set_ylabel("time per round (s)")
    ax1.legend()
    ax2.plot(sx, mem, "o", color="C1", label="measured")
    ax2.plot(sx, [mem_slope * v + mem_icpt for v in sx], "-", color="C1", label=f"fit: {mem_slope:.3g} GiB/unit")
    ax2.set_xlabel(xlabel)
    ax2.set_ylabel("peak RSS of the process (GiB)")
    ax2.legend()
    fig.suptitle(f"Growth against {label}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return {"slope": slope, "mem_slope": mem_slope, "step_slope": step_slope}


def table(sweep: str, xs: list[int], results: list[dict[str, Any]], fits: dict[str, float], fig: Path) -> list[str]:
    label, _, unit = SWEEPS[sweep]
    mem_unit = unit.replace("s per", "GiB per")
    lines = [
        f"**Against {label}** ([plot]({fig.relative_to(REPO / 'docs')})). Fitted slope (least squares): "
        f"**{fits['slope']:.4g} {unit}** per round; local step {fits['step_slope']:.4g} {unit}; "
        f"memory {fits['mem_slope']:.4g} {mem_unit}.",
        "",
        f"| {label} | round s (last) | first round s | site set-up s | local step s | steps / round | peak RSS GiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for x, r in zip(xs, results, strict=True):
        last, first = r["rounds"][-1], r["rounds"][0]
        lines.append(
            f"| {x} | {last['round_s']:.2f} | {first['round_s']:.2f} | {r['setup_s']:.1f} | {last['step_s']:.3f} | "
            f"{last['steps']:.0f} | {r['peak_rss_gib']:.2f} |"
        )
    lines.append(
        f"| slope | {fits['slope']:.4g} {unit} | | | {fits['step_slope']:.4g} {unit} | | "
        f"{fits['mem_slope']:.4g} {mem_unit} |"
    )
    return lines + [""]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--point", help=argparse.SUPPRESS)
    parser.add_argument("--sweeps", nargs="+", choices=list(SWEEPS), default=list(SWEEPS))
    parser.add_argument("--sites", type=int, nargs="+", default=[3, 10, 20, 50])
    parser.add_argument("--image-sizes", type=int, nargs="+", default=[64, 128, 224])
    parser.add_argument("--studies", type=int, nargs="+", default=[25, 50, 100, 200])
    parser.add_argument("--sites-studies", type=int, default=10, help="studies per site in the sites sweep")
    parser.add_argument("--base-sites", type=int, default=2, help="sites in the image and dataset sweeps")
    parser.add_argument("--base-studies", type=int, default=20, help="studies per site in the image sweep")
    parser.add_argument("--max-steps", type=int, default=1, help="local steps per round (sites and image sweeps)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--experiment", default="synth_cpu")
    parser.add_argument("--doc", type=Path, default=REPO / "docs" / "federation.md")
    parser.add_argument("--json", type=Path, help="also write every measurement here")
    args = parser.parse_args(argv)
    if args.point:
        print(json.dumps(run_point(json.loads(args.point))))
        return 0

    from bench.docs_block import replace_block

    work = Path(tempfile.mkdtemp(prefix="growth_"))
    values = {"sites": args.sites, "image": args.image_sizes, "studies": args.studies}
    everything: dict[str, Any] = {}
    command = "python bench/growth.py " + " ".join(sys.argv[1:] if argv is None else argv)
    lines = [
        f"Command: `{command.strip()}` (experiment `{args.experiment}`, batch {args.batch_size}, {args.rounds} rounds, "
        f"1 torch thread, in-process federation, server evaluation off; machine: {platform.processor() or platform.machine()}, "
        f"2 cores, 1-min load average {os.getloadavg()[0]:.1f} when the table was written). Memory = peak RSS (`ru_maxrss`) of the one "
        "process that ran the point (no child processes).",
        "",
    ]
    try:
        for sweep in args.sweeps:
            results = []
            for x in values[sweep]:
                results.append(measure(point_spec(args, work, sweep, x)))
                last = results[-1]["rounds"][-1]
                print(
                    f"{sweep}={x}: round {last['round_s']:.2f} s, peak {results[-1]['peak_rss_gib']:.2f} GiB",
                    flush=True,
                )
            fig = FIGURES / f"growth_{sweep}.png"
            fits = plot(sweep, values[sweep], results, fig)
            lines += table(sweep, values[sweep], results, fits, fig)
            everything[sweep] = {"x": values[sweep], "results": results, "fits": fits}
            print(f"metric: growth_slope_{sweep} = {fits['slope']:.6g}", flush=True)  # read by bench/run_all.py
    finally:
        shutil.rmtree(work, ignore_errors=True)
    text = "\n".join(lines).rstrip()
    replace_block(args.doc, "growth", text)
    if args.json:
        args.json.write_text(json.dumps(everything, indent=1))
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
