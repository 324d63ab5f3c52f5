"""bench/gpu_check.sh: valid bash, every GPU stage wired, and its Python stages run on the CPU at tiny sizes."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bench import gpu_check_stages

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "gpu_check.sh"
STAGES = ("versions", "gpu_step", "augment", "pretrain", "dp_step", "federation", "compile")


def test_script_parses_and_runs_every_stage_in_gpu_mode() -> None:
    assert subprocess.run(["bash", "-n", str(SCRIPT)], check=False).returncode == 0
    text = SCRIPT.read_text()
    assert re.search(r"^STAGES=" + ",".join(STAGES) + "$", text, re.M)
    for stage in STAGES[:-1]:
        assert re.search(rf"^run_stage {stage} \d+ ", text, re.M), stage
    assert re.search(r"^  run_stage compile \d+ .*--compile$", text, re.M)
    assert "--gpus-per-site 0.5" in text and "pip install" not in text


@pytest.mark.skipif(shutil.which("timeout") is None, reason="needs coreutils timeout")
def test_cpu_smoke_run_passes_every_python_stage(tmp_path) -> None:
    out = tmp_path / "check"
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        ["bash", str(SCRIPT), "--cpu-smoke", "--out", str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    summary = (out / "summary.md").read_text()
    assert run.returncode == 0, summary
    for stage in STAGES[:-1]:
        assert f"| {stage} | ok |" in summary, summary
    assert "| compile | skipped: CPU smoke" in summary
    assert "resumed from" in (out / "pretrain.log").read_text()
    assert "dp/plain" in (out / "dp_step.log").read_text()
    assert "output: valid" in (out / "augment.log").read_text()


def test_a_failing_stage_is_recorded_and_later_stages_still_run(tmp_path) -> None:
    out = tmp_path / "check"
    env = {**os.environ, "PYTHON": "/nonexistent/python", "PATH": os.environ.get("PATH", "")}
    run = subprocess.run(
        ["bash", str(SCRIPT), "--cpu-smoke", "--out", str(out), "--stages", "gpu_step,dp_step"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    summary = (out / "summary.md").read_text()
    assert run.returncode == 1
    assert "| gpu_step | **failed** (exit 127) |" in summary and "| dp_step | **failed** (exit 127) |" in summary


def test_loss_check_rejects_non_finite_and_short_runs(tmp_path, capsys) -> None:
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("\n".join(json.dumps({"step": s, "total": 1.0 / s}) for s in (1, 2, 3)) + "\n")
    assert gpu_check_stages.main(["finite-losses", str(metrics), "--min-records", "3"]) == 0
    assert gpu_check_stages.main(["finite-losses", str(metrics), "--min-records", "4"]) == 1
    metrics.write_text(metrics.read_text() + '{"step": 4, "total": NaN}\n')
    assert gpu_check_stages.main(["finite-losses", str(metrics)]) == 1
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"rounds": [{"train_loss": 2.0}, {"train_loss": 1.5}]}))
    assert gpu_check_stages.main(["federation", str(results), "--rounds", "2"]) == 0
    assert gpu_check_stages.main(["federation", str(results), "--rounds", "3"]) == 1
    results.write_text(json.dumps({"rounds": [{"train_loss": 2.0}, {"train_loss": float("inf")}]}))
    assert gpu_check_stages.main(["federation", str(results), "--rounds", "2"]) == 1
