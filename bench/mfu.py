"""Model FLOPs utilisation of the MLIP training step on this CPU, per image encoder, at batch 32.

FLOPs are counted with ``torch.utils.flop_counter.FlopCounterMode`` on one real step (forward of all
enabled objectives, the EMA divergence tower included, and backward). The step timed is the training
step proper: zero_grad, forward, backward, gradient clipping, AdamW and the EMA update, on one
pre-collated batch, so data loading is out of the picture (``bench/train_step.py`` covers the
LocalTrainer around it). Achieved FLOP/s = counted FLOPs / median step time; MFU = achieved / the
best fp32 GEMM rate ``bench/hardware.py`` measures in the same process at the same thread count.

    python bench/mfu.py --archs vit_tiny resnet_tiny --batch-size 32 --steps 5 --threads 2 [--profile 15]
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.hardware import machine_line, measure_hardware  # noqa: E402


def build_step(
    arch: str, batch_size: int, overrides: list[str], channels_last: bool = False
) -> tuple[Any, dict[str, Any], Callable[[], None]]:
    """The CPU default config with ``model=arch``, one collated batch of SynthCXR, and a bare training step."""
    from mlip_fed import pipeline
    from mlip_fed.config_compose import compose_experiment

    cfg = compose_experiment(
        [
            "experiment=synth_cpu",
            f"model={arch}",
            f"train.batch_size={batch_size}",
            f"data.root={REPO / 'runs' / 'bench_data'}",
            "data.synthetic.studies_per_site=40",
            *overrides,
        ]
    )
    data = pipeline.load_records(cfg.data)
    if len(data.train) < batch_size:
        raise ValueError(f"batch {batch_size} needs more than the {len(data.train)} SynthCXR training records built")
    model = pipeline.build_model(cfg).train()
    collator = pipeline.build_collator(model, cfg)
    dataset = pipeline.train_dataset(data.train, cfg)
    batch = collator([dataset[i] for i in range(batch_size)])
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        batch = {
            k: v.contiguous(memory_format=torch.channels_last) if isinstance(v, torch.Tensor) and v.dim() == 4 else v
            for k, v in batch.items()
        }
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        model(batch).total.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.train.max_grad_norm)
        optimizer.step()
        model.update_divergence_encoder()

    return model, batch, step


def count_flops(model: Any, batch: dict[str, Any]) -> tuple[int, dict[str, int]]:
    """FLOPs of one forward+backward, in total and per aten op (matmuls, convolutions, attention)."""
    model.zero_grad(set_to_none=True)
    with FlopCounterMode(display=False) as counter:
        model(batch).total.backward()
    model.zero_grad(set_to_none=True)
    per_op = {
        str(op).split(".")[1] if "." in str(op) else str(op): int(n)
        for op, n in counter.get_flop_counts()["Global"].items()
    }
    return int(counter.get_total_flops()), per_op


def time_step(step: Callable[[], None], steps: int, warmup: int = 2) -> float:
    """Median seconds of ``steps`` individually timed steps after ``warmup`` untimed ones."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def profile_step(step: Callable[[], None], top: int) -> list[str]:
    """Markdown rows of the ``top`` aten ops by self CPU time over two steps: where the step's time goes."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
        step()
    events = [e for e in prof.key_averages() if e.key.startswith("aten::")]
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    events.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
    rows = ["| aten op | calls / step | self CPU ms / step | share of op time |", "|---|---:|---:|---:|"]
    for e in events[:top]:
        rows.append(
            f"| `{e.key}` | {e.count // 2} | {e.self_cpu_time_total / 2e3:.1f} | {100 * e.self_cpu_time_total / total:.1f} % |"
        )
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", nargs="+", default=["vit_tiny", "resnet_tiny"])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=5, help="timed steps (median) after 2 warm-up steps")
    parser.add_argument("--threads", type=int, default=2, help="torch threads, as configs/train/cpu.yaml")
    parser.add_argument("--gemm-sizes", type=int, nargs="+", default=[256, 512, 1024])
    parser.add_argument("--gemm-seconds", type=float, default=0.5)
    parser.add_argument("--profile", type=int, default=0, help="also print the top-N ops of each step (0 = off)")
    parser.add_argument("--flush-denormal", action="store_true", help="torch.set_flush_denormal(True) before timing")
    parser.add_argument("--channels-last", action="store_true", help="channels-last model and images (ResNet)")
    parser.add_argument(
        "--override", action="append", default=[], help="extra dotted config override (repeatable), e.g. the ablations"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(args.flush_denormal)
    hw = measure_hardware(args.threads, args.gemm_sizes, args.gemm_seconds, mem_mib=64, single_thread=False)
    peak = hw.peak_gflops * 1e9
    rows, profiles = [], {}
    for arch in args.archs:
        model, batch, step = build_step(arch, args.batch_size, args.override, args.channels_last)
        flops, per_op = count_flops(model, batch)
        seconds = time_step(step, args.steps)
        achieved = flops / seconds
        top_ops = sorted(per_op.items(), key=lambda kv: kv[1], reverse=True)[:3]
        rows.append((arch, flops, seconds, achieved, achieved / peak, top_ops))
        if args.profile:
            profiles[arch] = profile_step(step, args.profile)
        del model, batch, step
    command = "python bench/mfu.py " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    print(
        f"Command: `{command.strip()}` — {machine_line(hw)}; {args.threads} torch threads, batch {args.batch_size}, "
        f"all objectives of the default config, 64²{', flush-denormal' if args.flush_denormal else ''}"
        f"{', channels-last' if args.channels_last else ''}; GEMM peak {hw.peak_gflops:.1f} GFLOP/s measured in the same run."
    )
    print()
    print(
        "| image tower | GFLOP / step (fwd+bwd) | median s / step | achieved GFLOP/s | MFU vs GEMM peak | "
        "largest FLOP ops |"
    )
    print("|---|---:|---:|---:|---:|---|")
    for arch, flops, seconds, achieved, mfu, top_ops in rows:
        ops = ", ".join(f"{op} {100 * n / flops:.0f} %" for op, n in top_ops)
        print(f"| {arch} | {flops / 1e9:.2f} | {seconds:.3f} | {achieved / 1e9:.1f} | {100 * mfu:.1f} % | {ops} |")
    for arch, profile_rows in profiles.items():
        print()
        print(f"Profile of the {arch} step (top {args.profile} aten ops by self CPU time):")
        print()
        print("\n".join(profile_rows))
    print()
    for arch, _flops, _seconds, _achieved, mfu, _ops in rows:
        print(f"metric: mfu_{arch} = {mfu:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
