"""bench/gpu_step.py: the skip without CUDA, the peak table, and the step's code path on CPU (--tiny)."""

from __future__ import annotations

import pytest
import torch

from bench import gpu_step


def test_peak_table_picks_the_specific_name_first() -> None:
    assert gpu_step.bf16_peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert gpu_step.bf16_peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert gpu_step.bf16_peak_tflops("NVIDIA H200 NVL") == 835.0
    assert gpu_step.bf16_peak_tflops("NVIDIA H200") == 989.0
    assert gpu_step.bf16_peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert gpu_step.bf16_peak_tflops("NVIDIA L40S") == 362.0
    assert gpu_step.bf16_peak_tflops("Some Future Card") is None


def test_paper_size_config_is_what_the_configs_say() -> None:
    from mlip_fed.config_compose import compose_experiment

    args = gpu_step.parse_args(["--archs", "vit_b16"])
    cfg = compose_experiment(gpu_step.experiment_overrides("vit_b16", args))
    assert (cfg.model.image.arch, cfg.data.image_size, cfg.model.image.patch_size) == ("vit_b16", 224, 16)
    assert (cfg.model.text.hidden_size, cfg.model.text.num_heads, cfg.model.text.intermediate_size) == (768, 12, 3072)
    assert cfg.model.text.num_layers == 6 and cfg.model.text.max_length == 112
    assert cfg.train.batch_size == 72 and cfg.train.amp == "bf16"


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present: the skip path does not apply")
def test_skips_cleanly_without_cuda(capsys: pytest.CaptureFixture[str]) -> None:
    assert gpu_step.main(["--archs", "resnet50"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == "no CUDA device: skipped"
    assert "| resnet50 | no CUDA device |" in out and "not run |" in out


def test_tiny_cpu_step_runs_the_whole_code_path(capsys: pytest.CaptureFixture[str]) -> None:
    previous = torch.get_num_threads()
    try:
        # One thread: on a shared CPU a second OpenMP thread mostly waits for the first (slow, not wrong).
        code = gpu_step.main(
            ["--device", "cpu", "--tiny", "--archs", "resnet50", "--steps", "1", "--warmup", "0", "--threads", "1"]
        )
    finally:
        torch.set_num_threads(previous)
    assert code == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("| resnet50 → resnet_tiny |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2] == "2" and cells[3] == "32²"
    assert float(cells[6]) > 0  # FLOPs were counted on the real step
    assert "n/a (CPU smoke run)" in row
    assert "cpu (1 threads)" in row
