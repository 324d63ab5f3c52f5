"""Builds ``docs/performance.md`` from the benches' recorded results: goals, runs, machine, tables, plots.

Kept apart from ``run_all.py`` so the page can be regenerated and tested without running anything. A
goal reads its measured figure from the bench's stdout, either a ``metric: name = value`` line (the
convention for new benches) or a cell of a markdown table the bench prints (for the older ones).
"""

from __future__ import annotations

import math
import os
import platform
import re
import subprocess
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

Extractor = Callable[[str], float | None]
#: True = met, False = missed, None = a figure that is reported, not judged.
Check = Callable[[float], bool | None]

_NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?")


@dataclass(frozen=True)
class Goal:
    """One line of the goals table: what the issue asks, and how to read the figure from a bench's stdout."""

    name: str
    target: str
    extract: Extractor
    check: Check
    fmt: str = "{:.3g}"


def metric(name: str) -> Extractor:
    """The value of the last ``metric: <name> = <value>`` line a bench printed."""
    pattern = re.compile(rf"^metric:\s*{re.escape(name)}\s*=\s*({_NUMBER.pattern})\s*$", re.MULTILINE)

    def extract(stdout: str) -> float | None:
        found = pattern.findall(stdout)
        return float(found[-1]) if found else None

    return extract


def column(header: str, row: str | None = None, worst: str = "max") -> Extractor:
    """The worst number in the column whose header contains ``header``, over the rows containing ``row``.

    Worst is ``max`` for an upper-bound goal (a ratio that must stay small) and ``min`` for a lower bound,
    so a goal is met only if every row meets it.
    """
    if worst not in ("max", "min"):
        raise ValueError(f"column(): worst must be 'max' or 'min', got {worst!r}")

    def extract(stdout: str) -> float | None:
        values = []
        for table in markdown_tables(stdout):
            cols = [i for i, cell in enumerate(table[0]) if header.lower() in cell.lower()]
            if not cols:
                continue
            for cells in table[1:]:
                if row is not None and not any(row.lower() in c.lower() for c in cells):
                    continue
                if cols[0] < len(cells):
                    number = _NUMBER.search(cells[cols[0]].replace(",", ""))
                    if number:
                        values.append(float(number.group()))
        if not values:
            return None
        return max(values) if worst == "max" else min(values)

    return extract


def markdown_tables(text: str) -> list[list[list[str]]]:
    """Every pipe table in ``text``: header cells first, then data rows (the ``|---|`` line dropped)."""
    tables: list[list[list[str]]] = []
    current: list[list[str]] = []
    for line in [*text.splitlines(), ""]:
        stripped = line.strip()
        if stripped.startswith("|") and stripped.endswith("|"):
            cells = [c.strip() for c in stripped.strip("|").split("|")]
            if not all(set(c) <= set("-: ") for c in cells):
                current.append(cells)
        elif current:
            tables.append(current)
            current = []
    return tables


def at_most(limit: float) -> Check:
    return lambda value: value <= limit


def at_least(limit: float) -> Check:
    return lambda value: value >= limit


def reported(_value: float) -> bool | None:
    return None


# ---------------------------------------------------------------------------- machine
def cpu_model() -> str:
    """Model name from lscpu, falling back to /proc/cpuinfo (containers may lack lscpu)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10, check=False).stdout
        match = re.search(r"^Model name:\s*(.+)$", out, re.MULTILINE)
        if match:
            return match.group(1).strip()
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        match = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.MULTILINE)
        if match:
            return match.group(1).strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def machine_lines(load: tuple[tuple[float, ...], tuple[float, ...]] | None) -> list[str]:
    packages = ("torch", "numpy", "flwr", "opacus", "monai", "transformers")
    gpu = "none visible (`nvidia-smi` absent)"
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True, timeout=10
        )
        if out.returncode == 0 and out.stdout.strip():
            gpu = ", ".join(out.stdout.split("\n")).strip(", ")
    except (OSError, subprocess.SubprocessError):
        pass
    if load is None:
        load_line = "- load average: per bench in the Runs table (this page was regenerated from stored results)"
    else:
        before, after = load
        load_line = (
            f"- load average (1/5/15 min) before this invocation: {' / '.join(f'{x:.2f}' for x in before)}; after: "
            f"{' / '.join(f'{x:.2f}' for x in after)}; above the core count, other jobs shared the CPU"
        )
    return [
        f"- CPU: {cpu_model()}, {os.cpu_count()} logical CPUs ({platform.machine()}, {platform.system()} "
        f"{platform.release()})",
        f"- GPU: {gpu}",
        load_line,
        f"- Python {platform.python_version()}; " + ", ".join(f"{p} {_version(p)}" for p in packages),
    ]


# ---------------------------------------------------------------------------- page
def _status_cell(result: Any) -> str:
    if result.status == "ok":
        return "ok"
    return f"**{result.status.upper()}**: {result.reason}"


def _measured(goal: Goal, bench: Any, result: Any | None) -> tuple[str, str]:
    """(measured cell, met cell) of one goal."""
    if result is None:
        return "not run yet", "?"
    if result.status in ("skipped", "missing", "timeout"):
        return f"not measured ({result.status}: {result.reason})", "?" if result.status == "skipped" else "no"
    value = goal.extract(result.stdout)
    if value is None or math.isnan(value):
        skip = next((line for line in result.stdout.splitlines() if "skipped" in line.lower()), None)
        if skip:
            return f"not run ({skip.strip()})", "n/a"
        return f"not reported by `{bench.script}`", "?"
    verdict = goal.check(value)
    met = "reported" if verdict is None else ("yes" if verdict else "**no**")
    if result.status == "failed":
        met += " (bench failed)"
    return goal.fmt.format(value), met


def render(
    *,
    registry: Sequence[Any],
    results: Mapping[str, Any],
    ran: set[str],
    left_out: Mapping[str, str],
    command: str,
    total_budget_s: float,
    load: tuple[tuple[float, ...], tuple[float, ...]] | None,
    figures_dir: Path,
    page_path: Path,
) -> str:
    """The whole page. Results not from this invocation are marked with when they were taken."""
    lines = [
        "# Performance",
        "",
        f"*Everything up to the end of the `make_bench` block is generated by `make bench` (`{command}`); edits "
        "there are overwritten, and sections after the block are kept. Each bench ran as its own process at the size "
        "in its command; benchmarks measure, they are not tests.*",
        "",
        "## Machine",
        "",
        *machine_lines(load),
        "",
        "## Goals",
        "",
        "| goal | target | measured | met? | bench |",
        "|---|---|---|---|---|",
    ]
    for bench in registry:
        for goal in bench.goals:
            measured, met = _measured(goal, bench, results.get(bench.name))
            lines.append(f"| {goal.name} | {goal.target} | {measured} | {met} | {bench.name} |")
    lines += [
        "",
        "## Runs",
        "",
        "| bench | command | status | wall s | budget s | within budget? | load avg at start | taken |",
        "|---|---|---|---:|---:|---|---:|---|",
    ]
    total = 0.0
    for bench in registry:
        result = results.get(bench.name)
        if result is None:
            lines.append(
                f"| {bench.name} | `{bench.display_command()}` | not run yet | - | {bench.budget_s:.0f} | - | - | - |"
            )
            continue
        total += result.wall_s
        within = (
            "-" if result.status in ("skipped", "missing") else ("yes" if result.wall_s <= bench.budget_s else "**no**")
        )
        taken = result.finished + ("" if bench.name in ran else " (earlier run)")
        lines.append(
            f"| {bench.name} | `{result.command}` | {_status_cell(result)} | {result.wall_s:.1f} | "
            f"{bench.budget_s:.0f} | {within} | {'-' if math.isnan(result.load_1m) else f'{result.load_1m:.2f}'} | "
            f"{taken} |"
        )
    budget_sum = sum(b.budget_s for b in registry)
    lines += [
        "",
        f"Total wall time {total:.0f} s; sum of budgets {budget_sum:.0f} s; the issue's budget for `make bench` "
        f"on this 2-core machine: {total_budget_s:.0f} s.",
        "",
    ]
    if left_out:
        lines += ["## Left out of `make bench`", ""]
        lines += [f"- **{name}**: {reason}" for name, reason in left_out.items()]
        lines.append("")
    figures = make_figures(registry, results, figures_dir)
    if figures:
        lines += ["## Plots", ""]
        rel = os.path.relpath(figures_dir, page_path.parent)
        lines += [f"![{title}]({rel}/{name})" for name, title in figures]
        lines.append("")
    for bench in registry:
        result = results.get(bench.name)
        lines += [f"## {bench.name}", "", bench.what, ""]
        if result is None:
            lines += [f"Not run yet: `{bench.display_command()}`.", ""]
            continue
        lines += [f"`{result.command}` — {_status_cell(result)}, {result.wall_s:.1f} s.", ""]
        if result.stdout.strip():
            lines += [result.stdout.strip(), ""]
        if result.failed and result.stderr_tail.strip():
            lines += ["```text", result.stderr_tail.strip()[-2000:], "```", ""]
        if getattr(bench, "notes", ""):
            lines += [bench.notes.strip(), ""]
    return "\n".join(lines).rstrip() + "\n"


# ---------------------------------------------------------------------------- plots
def make_figures(registry: Sequence[Any], results: Mapping[str, Any], figures_dir: Path) -> list[tuple[str, str]]:
    """PNG plots of what was measured; returns (file name, title) of each written. Needs matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures_dir.mkdir(parents=True, exist_ok=True)
    written = []
    timed = [(b, results[b.name]) for b in registry if b.name in results and results[b.name].wall_s > 0]
    if timed:
        fig, ax = plt.subplots(figsize=(7, 0.4 * len(timed) + 1.2))
        names = [b.name for b, _ in timed]
        ax.barh(names, [b.budget_s for b, _ in timed], color="#dddddd", label="budget")
        ax.barh(
            names,
            [r.wall_s for _, r in timed],
            color=["#c0392b" if r.failed else "#2e86c1" for _, r in timed],
            height=0.5,
            label="wall time",
        )
        ax.set_xlabel("seconds")
        ax.invert_yaxis()
        ax.legend(loc="lower right")
        ax.set_title("make bench: wall time against budget")
        fig.tight_layout()
        fig.savefig(figures_dir / "bench_wall_time.png", dpi=100)
        plt.close(fig)
        written.append(("bench_wall_time.png", "wall time against budget"))
    hw = results.get("hardware")
    if hw is not None and hw.status == "ok":
        rows = [t for t in markdown_tables(hw.stdout) if t[0] and "GEMM side" in t[0][0]]
        points = []
        for cells in rows[0][1:] if rows else []:
            numbers = [_NUMBER.search(c) for c in cells]
            if cells[0].isdigit() and all(numbers[:2]):
                single = float(numbers[2].group()) if len(numbers) > 2 and numbers[2] else math.nan
                points.append((int(cells[0]), float(numbers[1].group()), single))  # type: ignore[union-attr]
        if points:
            fig, ax = plt.subplots(figsize=(5, 3.2))
            ax.plot([p[0] for p in points], [p[1] for p in points], "o-", label=rows[0][0][1].split("at ")[-1])
            ax.plot([p[0] for p in points], [p[2] for p in points], "s--", label="1 thread")
            ax.set_xscale("log", base=2)
            ax.set_xlabel("square matrix side")
            ax.set_ylabel("fp32 GFLOP/s")
            ax.set_title("Measured GEMM throughput")
            ax.legend()
            fig.tight_layout()
            fig.savefig(figures_dir / "gemm_throughput.png", dpi=100)
            plt.close(fig)
            written.append(("gemm_throughput.png", "measured fp32 GEMM throughput"))
    mfu = results.get("mfu")
    if mfu is not None and mfu.status == "ok":
        found = re.findall(rf"^metric:\s*mfu_(\w+)\s*=\s*({_NUMBER.pattern})", mfu.stdout, re.MULTILINE)
        if found:
            fig, ax = plt.subplots(figsize=(5, 3.2))
            ax.bar([a for a, _ in found], [100 * float(v) for _, v in found], color="#2e86c1")
            ax.axhline(30, color="#c0392b", linestyle="--", label="goal 30 %")
            ax.set_ylabel("MFU (% of measured GEMM peak)")
            ax.set_title("Training step, batch 32")
            ax.legend()
            fig.tight_layout()
            fig.savefig(figures_dir / "mfu.png", dpi=100)
            plt.close(fig)
            written.append(("mfu.png", "model FLOPs utilisation per image tower"))
    return written
