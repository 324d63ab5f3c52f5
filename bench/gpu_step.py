"""The paper-size training step on one NVIDIA GPU: images/s, step time, peak memory and bf16 MFU.

Configuration: ``configs/model/resnet50.yaml`` or ``vit_b16.yaml`` at 224², ``configs/train/gpu.yaml``
(batch 72), all five objectives, and a text tower of BERT-base width (768 hidden, 12 heads, 3072 MLP)
with the ``text.checkpoint_layers`` (6) layers MGCA keeps of Bio_ClinicalBERT. Nothing is downloaded:
the BERT-base-size tower is built from scratch unless ``--text-checkpoint DIR`` names a local one (the
FLOPs are the same). The step is ``LocalTrainer``'s own (``mlip_fed/train/trainer.py``), configured by
``configs/train/gpu.yaml``: bf16 autocast, channels-last images and convolution weights
(``train.channels_last``), SDPA attention (``train.attention``), fused AdamW, gradient clipping, the EMA update,
loss parts read back only at log points; ``--compile`` sets ``train.compile`` (the trainer's
``compile_towers``) and times after compilation. The pinned host batch is copied to the GPU every step, as the
training loader's would be.

FLOPs are counted with ``FlopCounterMode`` on one eager trainer step; MFU = FLOPs / step time / the card's
dense bf16 peak from :data:`BF16_PEAK_TFLOPS` (an unknown card gets no MFU, and says so). The step time is
the median over ``--repeats`` blocks of ``--steps`` back-to-back trainer steps, each block ended by one device
synchronisation (per-step synchronisation would stop the host from running ahead, which the trainer relies on).
Without CUDA it prints ``no CUDA device: skipped`` and a "not run" row, and exits 0.

    python bench/gpu_step.py --archs resnet50 vit_b16 --steps 10 [--compile]
    python bench/gpu_step.py --device cpu --tiny          # the same code path, tiny sizes (smoke test)
"""

from __future__ import annotations

import argparse
import math
import shlex
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

#: Dense (no sparsity) bf16 tensor-core peak, TFLOP/s, by a substring of ``torch.cuda.get_device_name()``.
#: Checked in order, so the more specific names come first. Sources: NVIDIA datasheets.
BF16_PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM
    ("H200 NVL", 835.0),
    ("H200", 989.0),  # SXM
    ("GH200", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("L40", 181.0),
    ("L4", 121.0),
    ("A10G", 70.0),
    ("A10", 125.0),
    ("RTX 4090", 165.0),
    ("RTX 3090", 71.0),
)
#: BERT-base widths for the from-scratch text tower (a local checkpoint brings its own).
BERT_BASE = ("model.text.hidden_size=768", "model.text.num_heads=12", "model.text.intermediate_size=3072")
#: ``--tiny`` swaps each paper-size tower for its CPU preset: the step, autocast, channels-last, fused AdamW and
#: the FLOP count still run exactly as on the GPU, at a cost a unit test can afford.
TINY_ARCH = {"resnet50": "resnet_tiny", "vit_b16": "vit_tiny"}
REPORTS = (
    "Small left pleural effusion. No pneumothorax.",
    "Heart size is enlarged, consistent with cardiomegaly. Mild pulmonary edema.",
    "No acute cardiopulmonary process. Lungs are clear.",
    "Right lower lobe consolidation concerning for pneumonia. Endotracheal tube in place.",
)


def bf16_peak_tflops(device_name: str) -> float | None:
    """The card's dense bf16 peak, or None for a card not in the table."""
    for key, peak in BF16_PEAK_TFLOPS:
        if key.lower() in device_name.lower():
            return peak
    return None


@dataclass
class StepResult:
    arch: str
    built_arch: str
    device_name: str
    batch: int
    image_size: int
    compiled: bool
    params_m: float
    flops: int
    step_s: float
    peak_mem_gib: float
    peak_tflops: float | None

    @property
    def images_per_s(self) -> float:
        return self.batch / self.step_s

    @property
    def mfu(self) -> float | None:
        return None if self.peak_tflops is None else self.flops / self.step_s / (self.peak_tflops * 1e12)


def experiment_overrides(arch: str, args: argparse.Namespace) -> list[str]:
    """Hydra overrides of the paper-size run (or its tiny stand-in for the CPU smoke test)."""
    overrides = [f"model={arch}", "train=gpu", f"data.image_size={args.image_size}"]
    if args.text_checkpoint is not None:
        overrides.append(f"model.text.checkpoint_dir={args.text_checkpoint}")
    elif args.tiny:
        overrides.append(f"model.image.arch={TINY_ARCH[arch]}")
        overrides += ["model.text.hidden_size=64", "model.text.num_heads=2", "model.text.intermediate_size=128"]
        overrides += ["model.text.num_layers=1", "model.projection.hidden=64"]
    else:
        overrides += [*BERT_BASE, f"model.text.num_layers={args.text_layers}"]
    if args.batch_size is not None:
        overrides.append(f"train.batch_size={args.batch_size}")
    overrides += [f"train.device={args.device}", f"train.compile={str(args.compile).lower()}"]
    if not args.channels_last:
        overrides.append("train.channels_last=false")
    return overrides


def make_batch(model: Any, cfg: Any) -> dict[str, Any]:
    """A collated host batch of random images and real-looking reports (the step's cost does not depend on content),
    in pinned memory when a GPU is present, as the training loader's ``pin_memory`` gives it."""
    from mlip_fed import pipeline

    collator = pipeline.build_collator(model, cfg)
    g = torch.Generator().manual_seed(cfg.seed)
    size = cfg.data.image_size
    items = []
    for i in range(cfg.train.batch_size):
        labels = torch.full((14,), math.nan)
        labels[(3 * i) % 14] = 1.0
        items.append(
            {
                "image": torch.randn(1, size, size, generator=g),
                "image_view2": torch.randn(1, size, size, generator=g),
                "report": REPORTS[i % len(REPORTS)],
                "labels": labels,
                "patient_id": f"p{i}",
                "study_id": f"s{i}",
            }
        )
    batch = collator(items)
    if torch.cuda.is_available():
        batch = {k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    return batch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_arch(arch: str, args: argparse.Namespace, device: torch.device) -> StepResult:
    from mlip_fed import pipeline
    from mlip_fed.config_compose import compose_experiment
    from mlip_fed.train.trainer import LocalTrainer, compile_towers

    cfg = compose_experiment(experiment_overrides(arch, args))
    model = pipeline.build_model(cfg)
    batch = make_batch(model, cfg)
    # Compilation comes after the FLOP count (counted on the eager step), so the trainer is built without it and
    # compiled with its own ``compile_towers``: the same modules ``train.compile=true`` compiles.
    train_cfg = cfg.train.model_copy(update={"compile": False, "progress_bar": False, "log_every": 10**9})
    trainer = LocalTrainer(model, train_cfg, total_steps=10**6, device=device)
    params = [p for p in model.parameters() if p.requires_grad]
    with FlopCounterMode(display=False) as counter:
        trainer.fit([batch], epochs=1)
    if cfg.train.compile:
        compile_towers(model)
    if args.warmup:
        trainer.fit([batch] * args.warmup, epochs=1)
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        trainer.fit([batch] * args.steps, epochs=1)
        _sync(device)
        times.append((time.perf_counter() - start) / args.steps)
    if device.type == "cuda":
        peak_mem = torch.cuda.max_memory_allocated(device) / 2**30
        name = torch.cuda.get_device_name(device)
    else:
        peak_mem = pipeline.peak_rss_gib()
        name = f"cpu ({torch.get_num_threads()} threads)"
    return StepResult(
        arch=arch,
        built_arch=cfg.model.image.arch,
        device_name=name,
        batch=cfg.train.batch_size,
        image_size=cfg.data.image_size,
        compiled=cfg.train.compile,
        params_m=sum(p.numel() for p in params) / 1e6,
        flops=int(counter.get_total_flops()),
        step_s=statistics.median(times),
        peak_mem_gib=peak_mem,
        peak_tflops=bf16_peak_tflops(name) if device.type == "cuda" else None,
    )


HEADER = (
    "| image tower | device | batch | image | compile | params (M) | GFLOP / step | s / step | images/s | "
    "peak memory GiB | bf16 MFU |\n|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|"
)


def row(r: StepResult) -> str:
    mfu = "n/a (unknown card)" if r.mfu is None else f"{100 * r.mfu:.1f} %"
    if r.device_name.startswith("cpu"):
        mfu = "n/a (CPU smoke run)"
    return (
        f"| {r.arch if r.arch == r.built_arch else f'{r.arch} → {r.built_arch}'} | {r.device_name} | {r.batch} | {r.image_size}² | {'yes' if r.compiled else 'no'} | "
        f"{r.params_m:.1f} | {r.flops / 1e9:.1f} | {r.step_s:.3f} | {r.images_per_s:.1f} | {r.peak_mem_gib:.2f} | {mfu} |"
    )


def _text_tower(args: argparse.Namespace) -> str:
    if args.text_checkpoint is not None:
        return f"from {args.text_checkpoint}"
    if args.tiny:
        return "tiny (1 layer, 64 wide) and tiny image towers (--tiny smoke run, not a figure)"
    return f"BERT-base width, {args.text_layers} layers, from scratch"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", nargs="+", default=["resnet50", "vit_b16"], choices=["resnet50", "vit_b16"])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--batch-size", type=int, default=None, help="default: configs/train/gpu.yaml (72)")
    parser.add_argument("--image-size", type=int, default=None, help="default 224 (32 with --tiny)")
    parser.add_argument("--text-layers", type=int, default=6, help="layers of the from-scratch BERT-base tower")
    parser.add_argument("--text-checkpoint", type=Path, default=None, help="local BERT directory (never downloaded)")
    parser.add_argument("--steps", type=int, default=10, help="trainer steps per timed block")
    parser.add_argument("--repeats", type=int, default=3, help="timed blocks (the median block is reported)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="torch.compile the towers and the fusion head")
    parser.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own)")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes: a smoke test of the code path, not a figure")
    args = parser.parse_args(argv)
    if args.image_size is None:
        args.image_size = 32 if args.tiny else 224
    if args.tiny and args.batch_size is None:
        args.batch_size = 2
    if min(args.steps, args.repeats, args.text_layers) < 1 or args.warmup < 0:
        parser.error("--steps, --repeats and --text-layers must be >= 1, --warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = "python bench/gpu_step.py " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: skipped")
        print()
        print(HEADER)
        for arch in args.archs:
            print(f"| {arch} | no CUDA device | - | - | - | - | - | - | - | - | not run |")
        return 0
    device = torch.device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    results = [run_arch(arch, args, device) for arch in args.archs]
    print(
        f"Command: `{command.strip()}` — torch {torch.__version__}; LocalTrainer's step with configs/train/gpu.yaml "
        f"(bf16 autocast, {'channels-last' if args.channels_last else 'contiguous'}, SDPA attention, fused AdamW on "
        f"CUDA), all five objectives, text tower {_text_tower(args)}; median over {args.repeats} blocks of "
        f"{args.steps} steps after {args.warmup} warm-up."
    )
    print()
    print(HEADER)
    for r in results:
        print(row(r))
        if r.mfu is None and device.type == "cuda":
            print(f"(no bf16 peak known for {r.device_name!r}: MFU omitted; add it to BF16_PEAK_TFLOPS)")
    for r in results if device.type == "cuda" else ():
        if r.mfu is not None:
            print(f"metric: gpu_mfu_{r.arch} = {r.mfu:.4f}")
        print(f"metric: gpu_images_per_s_{r.arch} = {r.images_per_s:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
