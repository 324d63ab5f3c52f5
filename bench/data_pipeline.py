"""Studies per second the training data path delivers against loader workers, at the CPU and the GPU image size.

The loader is the trainer's own (``pipeline.train_loader``: SynthCXR records, MLIPCollator with counterfactuals)
with ``data.num_workers`` = 0, 1, 2, ... (persistent, prefetching workers), in two modes: ``loader`` (MONAI
augmentation per study, both views, in the loader) and ``device`` (``data.augment_on_device``: the loader only
resizes and pads one view; the trainer augments the batch on its device). Each point iterates ``--epochs`` epochs;
the rate is taken over the last one, the steady state of a long run: the workers are up and the per-record cache of
the deterministic transform head is warm. The first epoch is reported beside it. Studies/s per CPU core divides by
the processes doing the work (the workers, or the one process without them); on a machine with fewer free cores
than workers the per-core figure falls, which says the cores were shared.

A second table times ``DeviceAugment`` on a batch of ``--augment-batch`` images at each size (both views), on the CPU
with one torch thread and, where one is visible, on the GPU: the device's share of the work in ``device`` mode.

    python bench/data_pipeline.py --workers 0 1 2 --sizes 64 224 --modes loader device --epochs 3
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def measure(size: int, workers: int, mode: str, args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from mlip_fed import pipeline
    from mlip_fed.config_compose import compose_experiment
    from mlip_fed.train.trainer import epoch_seed

    cfg = compose_experiment(
        [
            "experiment=synth_cpu",
            f"data.image_size={size}",
            "data.synthetic.num_sites=1",
            f"data.synthetic.studies_per_site={args.studies}",
            "data.synthetic.test_fraction=0.05",
            f"data.root={REPO / 'runs' / 'bench_data' / f'pipeline_{size}'}",
            f"data.num_workers={workers}",
            f"train.batch_size={args.batch_size}",
            f"data.augment_on_device={str(mode == 'device').lower()}",
        ]
    )
    records = pipeline.load_records(cfg.data).train
    model = pipeline.build_model(cfg)
    loader = pipeline.train_loader(pipeline.train_dataset(records, cfg), pipeline.build_collator(model, cfg), cfg)
    epochs = []
    for epoch in range(args.epochs):  # driven as LocalTrainer._set_epoch drives it
        seed = epoch_seed(cfg.train.seed, epoch)
        loader.dataset.reseed(seed)
        loader.collate_fn.set_epoch(epoch)
        loader.sampler.generator.manual_seed(seed) if workers else loader.generator.manual_seed(seed)
        start = time.perf_counter()
        studies = sum(int(batch["image"].shape[0]) for batch in loader)
        epochs.append(studies / (time.perf_counter() - start))
    del loader  # ends persistent workers before the next point
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    cores = max(1, workers)
    return {
        "size": size,
        "workers": workers,
        "mode": mode,
        "first": epochs[0],
        "steady": epochs[-1],
        "per_core": epochs[-1] / cores,
    }


def time_device_augment(size: int, device: str, args: argparse.Namespace) -> dict[str, Any]:
    """Median seconds of ``DeviceAugment`` (two views) on a batch of ``--augment-batch`` S×S images on ``device``."""
    import statistics

    import torch

    from mlip_fed.data.device_augment import DeviceAugment

    augment = DeviceAugment(second_view=True)
    images = torch.rand(args.augment_batch, 1, size, size, device=device)
    generator = torch.Generator(device=device).manual_seed(0)
    times = []
    for _ in range(1 + args.augment_repeats):  # the first call warms up (allocations, kernels)
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        augment.augment_batch({"image": images}, generator)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times[1:])
    name = torch.cuda.get_device_name() if device == "cuda" else f"cpu, {torch.get_num_threads()} torch thread(s)"
    return {"size": size, "device": name, "ms": 1e3 * seconds, "per_s": args.augment_batch / seconds}


MODE_LABEL = {"loader": "MONAI in the loader, 2 views", "device": "on the device (loader: resize + pad, 1 view)"}


def render(
    rows: Sequence[dict[str, Any]], augment_rows: Sequence[dict[str, Any]], command: str, args: argparse.Namespace
) -> str:
    load = os.getloadavg()[0]
    lines = [
        f"Command: `{command}` — `pipeline.train_loader` (+ MLIPCollator), the train split of "
        f"{args.studies} SynthCXR studies, batch {args.batch_size}, persistent workers, prefetch 2; {os.cpu_count()} logical CPUs, "
        f"1-min load average {load:.1f} when the table was written. Steady state = epoch {args.epochs} "
        "(workers up, transform-head cache warm).",
        "",
        "| image | augmentation | loader workers | studies/s, first epoch | studies/s, steady state "
        "| studies/s per CPU core |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['size']}² | {MODE_LABEL[r['mode']]} | {r['workers']} | {r['first']:.1f} | {r['steady']:.1f} "
            f"| {r['per_core']:.1f} |"
        )
    if augment_rows:
        lines += [
            "",
            f"`DeviceAugment`, both views of a batch of {args.augment_batch} (median of {args.augment_repeats} after "
            "one warm-up):",
            "",
            "| image | device | ms per batch | studies/s |",
            "|---:|---|---:|---:|",
        ]
        for r in augment_rows:
            lines.append(f"| {r['size']}² | {r['device']} | {r['ms']:.1f} | {r['per_s']:.0f} |")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 224], help="image sides (CPU 64, GPU 224)")
    parser.add_argument("--studies", type=int, default=64, help="SynthCXR studies (one site, 95 %% train)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the training process")
    parser.add_argument("--modes", nargs="+", choices=sorted(MODE_LABEL), default=["loader", "device"])
    parser.add_argument("--augment-batch", type=int, default=72, help="batch of the DeviceAugment timing (0: none)")
    parser.add_argument("--augment-repeats", type=int, default=5)
    parser.add_argument("--doc", type=Path, default=None, help="write the table into this page's block")
    args = parser.parse_args(argv)
    if args.epochs < 1 or args.studies < args.batch_size:
        parser.error("--epochs must be >= 1 and --studies >= --batch-size")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    import torch

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = [
        measure(size, workers, mode, args) for size in args.sizes for mode in args.modes for workers in args.workers
    ]
    devices = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]
    augment_rows = [time_device_augment(s, d, args) for s in args.sizes for d in devices] if args.augment_batch else []
    command = "python bench/data_pipeline.py " + shlex.join(sys.argv[1:] if argv is None else list(argv))
    table = render(rows, augment_rows, command.strip(), args)
    print(table)
    if args.doc is not None:
        from bench.docs_block import replace_block

        replace_block(args.doc, "data_pipeline", table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
