"""Training-step cost of the CPU default: throughput, peak memory, and the framework tax.

The framework tax compares ``LocalTrainer`` (schedule, accumulation bookkeeping, NaN checks, gradient
clipping, EMA update, logging) with a bare PyTorch loop doing the same forward, backward, clipping,
AdamW step and EMA update on the same pre-collated batch. The two are interleaved, repeat by repeat,
so machine load affects both alike; the median step time of each is reported.

    python bench/train_step.py --archs vit_tiny resnet_tiny --batch-size 32 --steps 5 --repeats 3
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", nargs="+", default=["vit_tiny", "resnet_tiny"])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=5, help="steps per timed block")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "results.md")
    return parser.parse_args(argv)


def measure(arch: str, args: argparse.Namespace) -> dict[str, float]:
    import torch

    from mlip_fed import pipeline
    from mlip_fed.config_compose import compose_experiment
    from mlip_fed.train.trainer import LocalTrainer

    torch.set_num_threads(args.threads)
    cfg = compose_experiment(
        [
            "experiment=synth_cpu",
            f"model={arch}",
            f"train.batch_size={args.batch_size}",
            "train.progress_bar=false",
            "train.log_every=1000000",
            f"data.root={REPO / 'runs' / 'bench_data'}",
            "data.synthetic.studies_per_site=40",
        ]
    )
    data = pipeline.load_records(cfg.data)
    model = pipeline.build_model(cfg)
    collator = pipeline.build_collator(model, cfg)
    dataset = pipeline.train_dataset(data.train, cfg)
    batch = collator([dataset[i] for i in range(args.batch_size)])

    bare_opt = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=cfg.train.lr, weight_decay=cfg.train.weight_decay
    )

    def bare_step() -> None:
        bare_opt.zero_grad(set_to_none=True)
        out = model(batch)
        out.total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.max_grad_norm)
        bare_opt.step()
        model.update_divergence_encoder()

    trainer = LocalTrainer(model, cfg.train, total_steps=10_000)
    model.train()
    bare_step()  # warm-up both paths
    trainer.fit([batch], epochs=1)
    bare_times: list[float] = []
    trainer_times: list[float] = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        for _ in range(args.steps):
            bare_step()
        bare_times.append((time.perf_counter() - start) / args.steps)
        start = time.perf_counter()
        trainer.fit([batch] * args.steps, epochs=1)
        trainer_times.append((time.perf_counter() - start) / args.steps)
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    bare, framework = statistics.median(bare_times), statistics.median(trainer_times)
    return {
        "params_m": params / 1e6,
        "bare_s": bare,
        "trainer_s": framework,
        "tax": framework / bare,
        "images_per_s": args.batch_size / framework,
        "peak_rss_gib": pipeline.peak_rss_gib(),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rows = {arch: measure(arch, args) for arch in args.archs}
    lines = [
        "| image tower | params (M) | bare loop s/step | LocalTrainer s/step | framework tax | images/s | peak RSS GiB |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for arch, r in rows.items():
        lines.append(
            f"| {arch} | {r['params_m']:.2f} | {r['bare_s']:.3f} | {r['trainer_s']:.3f} | {r['tax']:.3f}× | "
            f"{r['images_per_s']:.1f} | {r['peak_rss_gib']:.2f} |"
        )
    command = (
        f"python bench/train_step.py --archs {' '.join(args.archs)} --batch-size {args.batch_size} "
        f"--steps {args.steps} --repeats {args.repeats} --threads {args.threads}"
    )
    import torch

    block = "\n".join(
        [
            f"Command: `{command}` — all five objectives, batch {args.batch_size}, 64², {args.threads} torch threads, "
            f"{platform.processor() or platform.machine()}, torch {torch.__version__}. Peak RSS is the whole bench "
            "process (cumulative over the rows above it).",
            "",
            *lines,
        ]
    )
    from bench.docs_block import replace_block

    replace_block(args.out, "train_step", block, heading="## Training step cost")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
