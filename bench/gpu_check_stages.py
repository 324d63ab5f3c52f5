"""The Python stages of ``bench/gpu_check.sh`` that no other command provides: versions, a loss check, one DP step.

Each prints ``key: value`` lines the script copies into its summary and exits non-zero when its check fails.
``--device cpu --tiny`` runs the same code at tiny sizes, which is how ``tests/test_gpu_check.py`` exercises it on a
machine without a GPU.

    python bench/gpu_check_stages.py versions
    python bench/gpu_check_stages.py finite-losses runs/gpu_check/pretrain/metrics.jsonl --min-records 2
    python bench/gpu_check_stages.py federation runs/gpu_check/federation/results.json --rounds 2
    python bench/gpu_check_stages.py dp-step --arch resnet50 [--device cpu --tiny]
    python bench/gpu_check_stages.py augment [--device cpu --tiny]
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from collections.abc import Iterator, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def versions() -> int:
    import torch

    print(f"python: {platform.python_version()}")
    print(f"torch: {torch.__version__} (CUDA build {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()})")
    for package in ("flwr", "opacus", "monai", "transformers"):
        try:
            print(f"{package}: {metadata.version(package)}")
        except metadata.PackageNotFoundError:
            print(f"{package}: not installed")
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            print(
                f"cuda device {index}: {props.name}, {props.total_memory / 2**30:.1f} GiB, "
                f"compute capability {props.major}.{props.minor}, bf16 {torch.cuda.is_bf16_supported()}"
            )
    else:
        print("cuda device: none visible")
    return 0


def _numbers(value: Any, path: str = "") -> Iterator[tuple[str, float]]:
    """Every number in a JSON value, with its key path."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _numbers(item, f"{path}.{key}" if path else str(key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _numbers(item, f"{path}[{index}]")
    elif isinstance(value, int | float) and not isinstance(value, bool):
        yield path, float(value)


def finite_losses(metrics: Path, min_records: int) -> int:
    """Every loss in a trainer's ``metrics.jsonl`` is finite, and there are at least ``min_records`` records."""
    records = [json.loads(line) for line in metrics.read_text(encoding="utf-8").splitlines() if line.strip()]
    bad = [
        (r.get("step"), k, v) for r in records for k, v in r.items() if isinstance(v, float) and not math.isfinite(v)
    ]
    print(f"records: {len(records)}; last step {records[-1]['step'] if records else '-'}")
    if records:
        print(f"last total loss: {records[-1].get('total')}")
    if bad:
        print(f"non-finite: {bad[:5]}")
    return 0 if records and len(records) >= min_records and not bad else 1


def federation(results: Path, rounds: int) -> int:
    """A simulation's ``results.json`` reached ``rounds`` rounds and every loss in it is finite."""
    data = json.loads(results.read_text(encoding="utf-8"))
    losses = [(k, v) for k, v in _numbers(data) if "loss" in k.lower()]
    bad = [(k, v) for k, v in losses if not math.isfinite(v)]
    done = data.get("rounds") if isinstance(data, dict) else None
    count = len(done) if isinstance(done, list) else None
    print(f"rounds recorded: {count}; loss values: {len(losses)}; non-finite: {len(bad)}")
    if losses:
        print(f"last loss value: {losses[-1][0]} = {losses[-1][1]:.4f}")
    return 0 if losses and not bad and (count is None or count >= rounds) else 1


def dp_step(args: argparse.Namespace) -> int:
    """One bucketed-DP trainer step and one plain trainer step on the same paper-size batch: time, peak memory."""
    import torch

    from bench.gpu_step import experiment_overrides, make_batch
    from mlip_fed import pipeline
    from mlip_fed.config_compose import compose_experiment
    from mlip_fed.privacy.buckets import bucket_ids
    from mlip_fed.privacy.engine import BucketedClippingGradient
    from mlip_fed.train.trainer import LocalTrainer

    device = torch.device(args.device)
    step_args = argparse.Namespace(
        image_size=32 if args.tiny else 224,
        text_checkpoint=None,
        tiny=args.tiny,
        text_layers=6,
        batch_size=args.batch_size or (4 if args.tiny else 72),
        device=args.device,
        compile=False,
        channels_last=True,
    )
    overrides = [*experiment_overrides(args.arch, step_args), "privacy=bucketed", "privacy.epsilon_budget=8"]
    cfg = compose_experiment(overrides)
    train_cfg = cfg.train.model_copy(update={"progress_bar": False, "log_every": 10**9})
    results: dict[str, float] = {}
    for kind in ("plain", "dp"):
        torch.manual_seed(0)
        model = pipeline.build_model(cfg)
        batch = make_batch(model, cfg)
        if kind == "dp":
            batch["group_ids"] = bucket_ids(batch["patient_id"], cfg.privacy.num_buckets)
            grad: Any = BucketedClippingGradient(
                model.to(device),
                noise_multiplier=1.0,
                clipping_norm=cfg.privacy.clipping_norm,
                num_buckets=cfg.privacy.num_buckets,
            )
            trainer = LocalTrainer(model, train_cfg, total_steps=100, gradient_fn=grad, device=device)
        else:
            trainer = LocalTrainer(model, train_cfg, total_steps=100, device=device)
        trainer.fit([batch], epochs=1)  # warm-up
        _sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        times = []
        for _ in range(args.steps):
            start = time.perf_counter()
            summary = trainer.fit([batch], epochs=1)
            _sync(device)
            times.append(time.perf_counter() - start)
        results[f"{kind}_s"] = statistics.median(times)
        results[f"{kind}_peak_gib"] = (
            torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else pipeline.peak_rss_gib()
        )
        results[f"{kind}_loss"] = summary.mean_parts.get("total", math.nan)
        if kind == "dp":
            grad.close()
        del trainer, model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    ratio = results["dp_s"] / results["plain_s"]
    print(
        f"dp step ({args.arch}, batch {step_args.batch_size}, {step_args.image_size}², {cfg.privacy.num_buckets} "
        f"buckets, {device.type}): {results['dp_s']:.3f} s, peak {results['dp_peak_gib']:.2f} GiB; plain step "
        f"{results['plain_s']:.3f} s, peak {results['plain_peak_gib']:.2f} GiB; dp/plain {ratio:.2f}x (goal <= 2x)"
    )
    finite = all(math.isfinite(results[k]) for k in ("dp_loss", "plain_loss"))
    print(
        f"losses: dp {results['dp_loss']:.4f}, plain {results['plain_loss']:.4f} ({'finite' if finite else 'NOT finite'})"
    )
    return 0 if finite else 1


def augment(args: argparse.Namespace) -> int:
    """``DeviceAugment`` (``data.augment_on_device``) on a paper-size batch on the device, beside one CPU thread:
    time per batch of both views, studies/s, and a valid output (finite, normalised range, shapes kept)."""
    import torch

    from bench.data_pipeline import time_device_augment
    from mlip_fed.data.device_augment import DeviceAugment

    size, batch = (32, 8) if args.tiny else (224, args.batch_size or 72)
    timing = argparse.Namespace(augment_batch=batch, augment_repeats=args.repeats)
    torch.set_num_threads(1)  # the CPU row: what one loader core would spend on it
    for device in dict.fromkeys(["cpu", args.device]):
        r = time_device_augment(size, device, timing)
        what = f"device augment ({r['device']}, batch {batch}, {size}², 2 views)"
        print(f"{what}: {r['ms']:.2f} ms, {r['per_s']:.0f} studies/s")
    images = torch.rand(batch, 1, size, size, device=args.device)
    out = DeviceAugment(second_view=True).augment_batch({"image": images}, torch.Generator(args.device).manual_seed(0))
    views = (out["image"], out["image_view2"])
    ok = all(v.shape == images.shape and bool(torch.isfinite(v).all()) and -1 <= v.min() <= v.max() <= 1 for v in views)
    print(f"output: {'valid' if ok else 'INVALID'} (shape, finite, in [-1, 1])")
    return 0 if ok else 1


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="stage", required=True)
    sub.add_parser("versions")
    losses = sub.add_parser("finite-losses")
    losses.add_argument("metrics", type=Path)
    losses.add_argument("--min-records", type=int, default=1)
    fed = sub.add_parser("federation")
    fed.add_argument("results", type=Path)
    fed.add_argument("--rounds", type=int, default=2)
    dp = sub.add_parser("dp-step")
    dp.add_argument("--arch", choices=["resnet50", "vit_b16"], default="resnet50")
    dp.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    dp.add_argument("--batch-size", type=int, default=None, help="default 72 (4 with --tiny)")
    dp.add_argument("--steps", type=int, default=2)
    dp.add_argument("--tiny", action="store_true")
    aug = sub.add_parser("augment")
    aug.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    aug.add_argument("--batch-size", type=int, default=None, help="default 72 (8 with --tiny)")
    aug.add_argument("--repeats", type=int, default=10)
    aug.add_argument("--tiny", action="store_true")
    args = parser.parse_args(argv)
    if args.stage == "augment":
        return augment(args)
    if args.stage == "versions":
        return versions()
    if args.stage == "finite-losses":
        return finite_losses(args.metrics, args.min_records)
    if args.stage == "federation":
        return federation(args.results, args.rounds)
    return dp_step(args)


if __name__ == "__main__":
    sys.exit(main())
