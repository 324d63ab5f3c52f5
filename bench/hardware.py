"""The machine's practical ceiling: fp32 GEMM throughput and memory bandwidth, measured with torch.

A datasheet peak says little on a shared, virtualised CPU; the best sustained square-matmul rate that
torch's own BLAS reaches here is the honest denominator for model FLOPs utilisation (``bench/mfu.py``
imports :func:`measure_hardware` and measures it in the same process, under the same load). Bandwidth
is the STREAM-style copy (2 × 4 bytes moved per element) and triad ``a = b + s·c`` (3 × 4 bytes),
on tensors far larger than the last-level cache.

    python bench/hardware.py --threads 2 --sizes 256 512 1024 2048 --seconds 1.0 --mem-mib 256
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench._report import cpu_model  # noqa: E402


@dataclass
class HardwareResult:
    """What the run measured, and the thread count it was measured at (MFU must use the same one)."""

    cpu_model: str
    logical_cpus: int
    threads: int
    torch_version: str
    numpy_version: str
    blas: str
    #: size -> best GFLOP/s at ``threads`` threads, and at 1 thread.
    gemm_gflops: dict[int, float] = field(default_factory=dict)
    gemm_gflops_1t: dict[int, float] = field(default_factory=dict)
    copy_gbs: float = 0.0
    triad_gbs: float = 0.0

    @property
    def peak_gflops(self) -> float:
        """Best sustained GEMM rate at the training thread count: the ceiling MFU is measured against."""
        return max(self.gemm_gflops.values())

    @property
    def peak_gflops_1t(self) -> float:
        return max(self.gemm_gflops_1t.values()) if self.gemm_gflops_1t else float("nan")


def blas_backend() -> str:
    """The BLAS torch was built with (``BLAS_INFO`` in its build config), plus oneDNN when enabled."""
    config = torch.__config__.show()
    match = re.search(r"BLAS_INFO=(\w+)", config)
    blas = match.group(1) if match else "unknown"
    if torch.backends.mkldnn.is_available():
        blas += " + oneDNN"
    return blas


def gemm_gflops(size: int, seconds: float) -> float:
    """Best GFLOP/s of ``size``×``size`` fp32 matmuls over several timed blocks of about ``seconds`` in total.

    The best block, not the mean: on a shared machine other jobs only ever slow a block down, so the
    fastest is the closest estimate of what the hardware sustains.
    """
    a = torch.randn(size, size)
    b = torch.randn(size, size)
    out = torch.empty(size, size)
    flops = 2.0 * size**3
    torch.mm(a, b, out=out)  # warm-up: thread pool, BLAS kernels
    start = time.perf_counter()
    torch.mm(a, b, out=out)
    one = max(time.perf_counter() - start, 1e-6)
    reps = max(1, int(seconds / 5 / one))
    best = 0.0
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(reps):
            torch.mm(a, b, out=out)
        elapsed = time.perf_counter() - start
        best = max(best, flops * reps / elapsed / 1e9)
    return best


def memory_bandwidth(mib: int, repeats: int = 5) -> tuple[float, float]:
    """Best copy and triad GB/s on fp32 tensors of ``mib`` MiB each (best of ``repeats``)."""
    n = mib * 2**20 // 4
    a = torch.empty(n)
    b = torch.rand(n)
    c = torch.rand(n)
    a.copy_(b)
    best_copy = best_triad = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        a.copy_(b)
        best_copy = max(best_copy, 2 * 4 * n / (time.perf_counter() - start) / 1e9)
        start = time.perf_counter()
        torch.add(b, c, alpha=3.0, out=a)
        best_triad = max(best_triad, 3 * 4 * n / (time.perf_counter() - start) / 1e9)
    return best_copy, best_triad


def measure_hardware(
    threads: int, sizes: list[int], seconds: float = 1.0, mem_mib: int = 256, single_thread: bool = True
) -> HardwareResult:
    """Measure GEMM at ``threads`` threads (and at 1), then bandwidth at ``threads``; restores torch's thread count."""
    import numpy

    if threads < 1:
        raise ValueError(f"--threads must be >= 1, got {threads}")
    if not sizes or min(sizes) < 16:
        raise ValueError(f"--sizes must be matrix sides >= 16, got {sizes}")
    previous = torch.get_num_threads()
    result = HardwareResult(
        cpu_model=cpu_model(),
        logical_cpus=os.cpu_count() or 0,
        threads=threads,
        torch_version=torch.__version__,
        numpy_version=numpy.__version__,
        blas=blas_backend(),
    )
    try:
        torch.set_num_threads(threads)
        result.gemm_gflops = {s: gemm_gflops(s, seconds) for s in sizes}
        result.copy_gbs, result.triad_gbs = memory_bandwidth(mem_mib)
        if single_thread:
            torch.set_num_threads(1)
            result.gemm_gflops_1t = {s: gemm_gflops(s, seconds) for s in sizes}
    finally:
        torch.set_num_threads(previous)
    return result


def machine_line(hw: HardwareResult) -> str:
    return f"{hw.cpu_model}, {hw.logical_cpus} logical CPUs, torch {hw.torch_version} ({hw.blas}), numpy {hw.numpy_version}"


def table(hw: HardwareResult) -> list[str]:
    lines = [
        f"| GEMM side | fp32 GFLOP/s at {hw.threads} thread(s) | fp32 GFLOP/s at 1 thread |",
        "|---:|---:|---:|",
    ]
    for size, rate in hw.gemm_gflops.items():
        single = hw.gemm_gflops_1t.get(size)
        lines.append(f"| {size} | {rate:.1f} | {'-' if single is None else f'{single:.1f}'} |")
    lines += [
        f"| **best** | **{hw.peak_gflops:.1f}** | **{hw.peak_gflops_1t:.1f}** |",
        "",
        "| memory bandwidth | GB/s |",
        "|---|---:|",
        f"| copy (`a.copy_(b)`) | {hw.copy_gbs:.1f} |",
        f"| triad (`a = b + 3·c`) | {hw.triad_gbs:.1f} |",
    ]
    return lines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="torch threads (use the training thread count)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512, 1024, 2048])
    parser.add_argument("--seconds", type=float, default=1.0, help="timing budget per GEMM size and thread count")
    parser.add_argument("--mem-mib", type=int, default=256, help="size of each bandwidth tensor")
    parser.add_argument("--json", type=Path, default=None, help="also write the raw result here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    hw = measure_hardware(args.threads, args.sizes, args.seconds, args.mem_mib)
    command = "python bench/hardware.py " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    print(f"Command: `{command.strip()}` — {machine_line(hw)}.")
    print()
    print("\n".join(table(hw)))
    print()
    print(f"metric: gemm_peak_gflops = {hw.peak_gflops:.3f}")
    print(f"metric: gemm_peak_gflops_1t = {hw.peak_gflops_1t:.3f}")
    print(f"metric: triad_gbs = {hw.triad_gbs:.3f}")
    if args.json is not None:
        args.json.write_text(json.dumps(asdict(hw), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
