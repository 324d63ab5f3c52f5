"""``make bench``: run every benchmark at a size this 2-core machine fits in 20 minutes, then regenerate
``docs/performance.md`` (machine, versions, exact commands, tables, plots, goals against measured figures).

Each benchmark is one :class:`Bench` entry in :data:`REGISTRY`: its script, its size arguments, its time
budget and the issue's goals it answers. Each runs as its own subprocess (a crash or a leaked thread
pool cannot touch the next); its stdout (the tables it prints) is kept verbatim, with its exit status and
wall time. A failing or missing bench does not stop the others, but makes this script exit 1 after the
report is written, so ``make bench`` fails loudly while still keeping what was measured.

Results are also kept per bench in ``runs/bench/results/<name>.json``, so ``--only`` reruns a subset and
the report still shows the last result of the others (with when it was taken).

    python bench/run_all.py                      # everything, then docs/performance.md
    python bench/run_all.py --only mfu,hardware  # a subset
    python bench/run_all.py --list               # the registry
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench import _report  # noqa: E402
from bench._report import Goal, at_least, at_most, column, metric, reported  # noqa: E402
from bench.docs_block import replace_block  # noqa: E402
from mlip_fed.process_tree import kill_tree  # noqa: E402

#: The issue's wall-clock budget for ``make bench`` on this 2-core machine.
TOTAL_BUDGET_S = 1200.0
#: A bench still running after this many times its budget is killed and recorded as failed.
HARD_LIMIT_FACTOR = 3.0
SCRATCH = REPO / "runs" / "bench"
#: Real report data kept beside the repository, never in it; relative to the repository root, where benches run.
IU_REPORTS = Path(os.environ.get("MLIP_IU_REPORTS", "../shared/data/iu_xray_reports_dev.csv"))


@dataclass(frozen=True)
class Bench:
    """One benchmark: ``python <script> <args...>`` from the repository root."""

    name: str
    script: str
    args: tuple[str, ...]
    budget_s: float
    what: str
    goals: tuple[Goal, ...] = ()
    #: Files the bench reads that a fresh clone may lack: if one is absent the bench is skipped, saying which.
    requires: tuple[Path, ...] = ()
    #: Standing analysis printed under the bench's tables (what the figures mean, what was changed).
    notes: str = ""

    def command(self, python: str = "python") -> list[str]:
        return [python, self.script, *self.args]

    def display_command(self) -> str:
        return shlex.join(self.command())


@dataclass
class BenchResult:
    name: str
    command: str
    status: str  # "ok", "failed", "skipped", "missing", "timeout"
    returncode: int | None
    wall_s: float
    budget_s: float
    stdout: str
    stderr_tail: str
    reason: str = ""
    #: 1-minute load average when the bench started: above the core count, other jobs shared the CPU.
    load_1m: float = float("nan")
    finished: str = field(default_factory=lambda: datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"))

    @property
    def failed(self) -> bool:
        return self.status in ("failed", "missing", "timeout")


def _scratch(name: str) -> str:
    """A throw-away docs target: small-size runs must not overwrite the curated figures in the other pages."""
    return str((SCRATCH / "docs" / f"{name}.md").relative_to(REPO))


#: Left out of ``make bench``, each with the reason written into docs/performance.md.
LEFT_OUT: dict[str, str] = {
    "ablation": "bench/ablation.py trains and evaluates five objective variants over several seeds (tens of "
    "minutes at its smallest meaningful size); its results live in docs/results.md, made by its own command.",
    "fed_vs_central": "bench/fed_vs_central.py compares learning (AUROC), not cost; at a size that fits this "
    "budget the AUROC gap is noise. Its table in docs/federation.md comes from its own command.",
    "itc_site_shortcut": "bench/itc_site_shortcut.py trains three arms for several rounds (about ten minutes at its "
    "smallest telling size); a finding about learning, not a cost. Its table in docs/federation.md comes from its own "
    "command.",
    "step_ops": "bench/step_ops.py compares operator launches and host syncs per step against an exported earlier "
    "revision (--tree), which make bench does not have; its table in docs/performance.md comes from its own command.",
    "data_pipeline": "bench/data_pipeline.py measures loader studies/s against worker processes: on this shared "
    "2-core machine extra workers only compete for the same cores, so the figure belongs to the GPU host; its table in "
    "docs/performance.md comes from its own command.",
}

#: Standing analysis under the MFU table. Only words: a generated block holds only what this run measured; the
#: figures seen while developing are in docs/step_cost.md ("MFU findings while developing"), with their command.
MFU_NOTES = """
**Reading the MFU figures.** The counted FLOPs are nearly the same for both towers: at the CPU image size the image
tower is small, and most of the work is the text tower run twice (report and counterfactual) plus the ITM fusion, i.e.
thousands of GEMMs with a small inner dimension. Such GEMMs reach a large share of the square-GEMM peak on one
core, but their per-call cost is small enough that OpenMP synchronisation between threads shows, most when other
jobs share the cores (see the load average under Machine): then a second OpenMP thread mostly waits for the
first, so `train.num_threads=1` per process is the fix for a shared machine and for simulations with more sites
than cores (Flower's simulation already gives each ClientApp one CPU). The profile table above (`--profile`)
says where the op time of this run went. Figures seen while developing are in `docs/step_cost.md`.
"""

GPU_NOTES = """
On a machine with one NVIDIA GPU the same command runs unchanged; add `--compile` for a second row with
`torch.compile`. The step timed is `LocalTrainer`'s own with `configs/train/gpu.yaml` (channels-last, SDPA
attention, fused AdamW, losses read back only at log points). The card's bf16 peak comes from `BF16_PEAK_TFLOPS`
in `bench/gpu_step.py` (vendor figures, not measured: H100/H200 SXM 989, H100/H200 NVL 835, H100 PCIe 756 dense
TFLOP/s); an unknown card gets its images/s and memory but no MFU. `bench/gpu_check.sh` runs this bench with the
rest of the GPU path (bf16 pretraining and resume, a DP step, a 2-site federation on one GPU, `--compile`) in at
most 9 minutes and writes `runs/gpu_check/summary.md`.
"""

REGISTRY: tuple[Bench, ...] = (
    Bench(
        "hardware",
        "bench/hardware.py",
        ("--threads", "2", "--sizes", "256", "512", "1024", "--seconds", "0.75", "--mem-mib", "256"),
        10,
        "Measured fp32 GEMM throughput (2 threads and 1) and memory bandwidth: the CPU's practical ceiling.",
        goals=(
            Goal(
                "fp32 GEMM peak, training threads", "measured", metric("gemm_peak_gflops"), reported, "{:.1f} GFLOP/s"
            ),
            Goal("fp32 GEMM peak, 1 thread", "measured", metric("gemm_peak_gflops_1t"), reported, "{:.1f} GFLOP/s"),
            Goal("memory bandwidth (triad)", "measured", metric("triad_gbs"), reported, "{:.1f} GB/s"),
        ),
    ),
    Bench(
        "mfu",
        "bench/mfu.py",
        (
            "--archs",
            "vit_tiny",
            "resnet_tiny",
            "--batch-size",
            "32",
            "--steps",
            "3",
            "--threads",
            "2",
            "--profile",
            "12",
        ),
        50,
        "Model FLOPs utilisation of the training step per image tower, batch 32, against the GEMM peak.",
        goals=(
            Goal(
                "MFU of the CPU default (vit_tiny), batch 32",
                "≥ 30 %",
                metric("mfu_vit_tiny"),
                at_least(0.30),
                "{:.1%}",
            ),
            Goal("MFU with resnet_tiny, batch 32", "≥ 30 %", metric("mfu_resnet_tiny"), at_least(0.30), "{:.1%}"),
        ),
        notes=MFU_NOTES,
    ),
    Bench(
        "gpu_step",
        "bench/gpu_step.py",
        ("--archs", "resnet50", "vit_b16", "--steps", "10"),
        5,
        "Paper-size step (224², BERT-base-width text tower, bf16, channels-last, fused AdamW) on one NVIDIA GPU.",
        goals=(
            Goal("GPU bf16 MFU, resnet50 at 224²", "measured", metric("gpu_mfu_resnet50"), reported, "{:.1%}"),
            Goal("GPU bf16 MFU, vit_b16 at 224²", "measured", metric("gpu_mfu_vit_b16"), reported, "{:.1%}"),
        ),
        notes=GPU_NOTES,
    ),
    Bench(
        "train_step",
        "bench/train_step.py",
        ("--archs", "vit_tiny", "resnet_tiny", "--steps", "3", "--repeats", "2", "--out", _scratch("train_step")),
        45,
        "LocalTrainer step against a bare PyTorch loop with the same forward/backward (framework tax), RSS.",
        goals=(Goal("framework tax (worst tower)", "≤ 1.15×", column("framework tax"), at_most(1.15), "{:.3f}×"),),
    ),
    Bench(
        "dp_overhead",
        "bench/dp_overhead.py",
        ("--steps", "3"),
        25,
        "Bucketed DP step against the non-DP step, with where the DP step's time goes (writes docs/privacy.md).",
        goals=(Goal("DP step / non-DP step", "≤ 3×", column("ratio", row="DP bucketed"), at_most(3.0), "{:.2f}×"),),
    ),
    Bench(
        "synth_difficulty",
        "bench/synth_difficulty.py",
        ("--sites", "3", "--studies-per-site", "100", "--no-doc"),
        15,
        "SynthCXR generation time and raw-pixel baseline difficulty.",
    ),
    Bench(
        "labeler_iu",
        "bench/labeler_iu.py",
        ("--reports", str(IU_REPORTS)),
        5,
        "Labeler throughput and agreement on real IU X-Ray reports (data outside the repository).",
        requires=(IU_REPORTS,),
    ),
    Bench(
        "growth",
        "bench/growth.py",
        (
            "--sites",
            "3",
            "10",
            "20",
            "50",
            "--image-sizes",
            "64",
            "128",
            "224",
            "--studies",
            "25",
            "50",
            "100",
            "--rounds",
            "1",
        ),
        245,
        "Time per round and memory against sites, image size and local dataset size, with fitted slopes.",
        goals=(
            Goal(
                "growth: time per round vs sites",
                "slope reported",
                metric("growth_slope_sites"),
                reported,
                "{:.3g} s/site",
            ),
            Goal(
                "growth: time per round vs image size",
                "slope reported",
                metric("growth_slope_image"),
                reported,
                "{:.3g} s/1k px",
            ),
            Goal(
                "growth: time per round vs studies per site",
                "slope reported",
                metric("growth_slope_studies"),
                reported,
                "{:.3g} s/study",
            ),
        ),
    ),
    Bench(
        "flower_overhead",
        "bench/flower_overhead.py",
        ("--studies-per-site", "40", "--rounds", "2"),
        95,
        "A `flwr run` round against the same local training alone, and where the rest of the round goes.",
        goals=(
            Goal("Flower overhead of a round", "≤ 10 %", metric("flower_overhead_fraction"), at_most(0.10), "{:.1%}"),
        ),
    ),
    Bench(
        "fed_comm",
        "bench/fed_comm.py",
        ("--no-flwr", "--transport", "--transport-studies", "60", "--transport-rounds", "2"),
        90,
        "Bytes per message (weights, bank, Flower framing) against raw fp32 bytes; fp16/bf16 transport and AUROC.",
        goals=(
            Goal("fp16 transport bytes / fp32", "≤ 0.55×", column("vs fp32", row="float16"), at_most(0.55), "{:.3f}×"),
        ),
    ),
    Bench(
        "dp_utility",
        "bench/dp_utility.py",
        (
            "--steps",
            "15",
            "--seeds",
            "0",
            "--epsilons",
            "8",
            "--studies-per-site",
            "150",
            "--draws",
            "1",
            "--bootstrap",
            "0",
            "--fresh",
            "--work-dir",
            "runs/bench/dp_utility",
            "--doc",
            _scratch("dp_utility"),
        ),
        180,
        "Cost check of the DP utility bench at a tiny size (its table in docs/privacy.md comes from its own command).",
    ),
    Bench(
        "canary_audit",
        "bench/canary_audit.py",
        ("--canaries", "1000", "--steps", "30", "--sample-rate", "0.5"),
        40,
        "One-run privacy audit with gradient canaries: bucketed DP against a deliberately noise-free run.",
    ),
    Bench(
        "secagg_cost",
        "bench/secagg_cost.py",
        ("--rounds", "2", "--studies-per-site", "16", "--max-examples", "64"),
        110,
        "SecAgg+ round cost against plain aggregation (simulation).",
    ),
    Bench(
        "deploy_rounds",
        "bench/deploy_rounds.py",
        ("--rounds", "1", "--studies-per-site", "16", "--variants", "insecure", "tls", "--secagg"),
        280,
        "Deployment round time (SuperLink + 3 SuperNodes on 127.0.0.1): insecure, TLS + node auth, TLS + SecAgg+.",
    ),
)


def run_bench(bench: Bench, python: str, repo: Path, env: dict[str, str] | None = None) -> BenchResult:
    """Run one bench as a subprocess and record what it printed, how it ended and how long it took."""
    display = bench.display_command()
    script = repo / bench.script
    base = {
        "name": bench.name,
        "command": display,
        "budget_s": bench.budget_s,
        "stdout": "",
        "stderr_tail": "",
        "load_1m": os.getloadavg()[0],
    }
    if not script.is_file():
        return BenchResult(**base, status="missing", returncode=None, wall_s=0.0, reason=f"{bench.script} not found")
    absent = [str(p) for p in bench.requires if not (repo / p).exists()]
    if absent:
        return BenchResult(
            **base, status="skipped", returncode=None, wall_s=0.0, reason=f"needs {', '.join(absent)} (absent here)"
        )
    run_env = {**os.environ, "PYTHONPATH": str(repo), **(env or {})}
    limit = bench.budget_s * HARD_LIMIT_FACTOR
    start = time.perf_counter()
    # Own session, so a bench that overruns is killed with everything it started (flwr, Ray, SuperLink).
    proc = subprocess.Popen(
        bench.command(python),
        cwd=repo,
        env=run_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=limit)
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        stdout, stderr = proc.communicate()
        return BenchResult(
            **{**base, "stdout": stdout, "stderr_tail": stderr[-3000:]},
            status="timeout",
            returncode=None,
            wall_s=time.perf_counter() - start,
            reason=f"killed after {limit:.0f} s ({HARD_LIMIT_FACTOR:g}× its budget)",
        )
    except BaseException:  # Ctrl-C: the bench is in its own session and would not see it
        kill_tree(proc.pid)
        raise
    wall = time.perf_counter() - start
    status = "ok" if proc.returncode == 0 else "failed"
    return BenchResult(
        **{**base, "stdout": stdout, "stderr_tail": stderr[-3000:]},
        status=status,
        returncode=proc.returncode,
        wall_s=wall,
        reason="" if status == "ok" else f"exit status {proc.returncode}",
    )


def select(registry: Sequence[Bench], only: str | None) -> list[Bench]:
    if not only:
        return list(registry)
    names = [n.strip() for n in only.split(",") if n.strip()]
    known = {b.name for b in registry}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SystemExit(f"--only: unknown bench(es) {unknown}; known: {sorted(known)}")
    return [b for b in registry if b.name in names]


def save_result(result: BenchResult, results_dir: Path) -> None:
    results_dir.mkdir(parents=True, exist_ok=True)
    tmp = results_dir / f".{result.name}.json.tmp"
    tmp.write_text(json.dumps(asdict(result), indent=1), encoding="utf-8")
    tmp.replace(results_dir / f"{result.name}.json")


def load_results(registry: Sequence[Bench], results_dir: Path) -> dict[str, BenchResult]:
    """The latest stored result of every registered bench that has one."""
    found = {}
    for bench in registry:
        path = results_dir / f"{bench.name}.json"
        if path.is_file():
            try:
                found[bench.name] = BenchResult(**json.loads(path.read_text(encoding="utf-8")))
            except (json.JSONDecodeError, TypeError) as err:
                raise SystemExit(f"{path}: not a bench result ({err}); delete it and rerun") from err
    return found


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", help="comma-separated bench names (default: all)")
    parser.add_argument("--list", action="store_true", help="print the registry and exit")
    parser.add_argument("--report-only", action="store_true", help="rewrite the page from the stored results only")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "performance.md")
    parser.add_argument("--figures", type=Path, default=REPO / "docs" / "figures")
    parser.add_argument("--results-dir", type=Path, default=SCRATCH / "results")
    parser.add_argument("--python", default=sys.executable, help="interpreter that runs each bench")
    return parser.parse_args(argv)


def main(
    argv: list[str] | None = None,
    registry: Sequence[Bench] = REGISTRY,
    left_out: dict[str, str] | None = None,
    repo: Path = REPO,
    log: Callable[[str], None] = lambda line: print(line, flush=True),
) -> int:
    args = parse_args(argv)
    left_out = LEFT_OUT if left_out is None else left_out
    if args.list:
        for bench in registry:
            present = "" if (repo / bench.script).is_file() else "   [SCRIPT MISSING]"
            log(f"{bench.name:18s} budget {bench.budget_s:5.0f} s  {bench.display_command()}{present}")
        log(f"total budget {sum(b.budget_s for b in registry):.0f} s of {TOTAL_BUDGET_S:.0f} s")
        return 0
    chosen = [] if args.report_only else select(registry, args.only)
    missing = [b.script for b in chosen if not (repo / b.script).is_file()]
    if missing:
        log(f"ERROR: registered bench script(s) missing: {', '.join(missing)} (they will be reported as failed)")
    (SCRATCH / "docs").mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    for bench in chosen:
        log(f"[{bench.name}] {bench.display_command()}")
        result = run_bench(bench, args.python, repo)
        save_result(result, args.results_dir)
        log(f"[{bench.name}] {result.status} in {result.wall_s:.1f} s (budget {bench.budget_s:.0f} s) {result.reason}")
        if result.failed and result.stderr_tail:
            log(result.stderr_tail[-1500:])
    results = load_results(registry, args.results_dir)
    ran = {b.name for b in chosen}
    command = "python bench/run_all.py" + (f" --only {args.only}" if args.only and not args.report_only else "")
    page = _report.render(
        registry=registry,
        results=results,
        ran=ran,
        left_out=left_out,
        command=command,
        total_budget_s=TOTAL_BUDGET_S,
        load=None if args.report_only else (load_before, os.getloadavg()),
        figures_dir=args.figures,
        page_path=args.out,
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    replace_block(args.out, "make_bench", page)  # the page's other sections (and their own blocks) stay
    failed = [r.name for r in results.values() if r.name in ran and r.failed]
    log(f"wrote {args.out}")
    if failed:
        log(f"FAILED: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
