"""Operator launches and device-to-host synchronisations per ``LocalTrainer`` step, on the CPU.

A GPU step is host-bound when the host spends longer launching operators, or waiting for the device, than the
device spends computing. Neither needs a GPU to count: this runs the trainer's real step (``LocalTrainer.fit`` on
one pre-collated SynthCXR batch, all five objectives, the CPU model configs) under ``torch.profiler`` and counts

* **operator launches**: every ``aten::`` op the profiler records per step (nested ones included: on a GPU each
  leaf is a kernel launch, each level a dispatcher pass on the host);
* **device-to-host syncs**: the ops that, on a GPU, must wait for the device because the host needs a value or a
  data-dependent shape: ``aten::_local_scalar_dense`` (what ``.item()``, ``float()``, ``int()``, ``bool()`` of a
  tensor run), ``aten::nonzero``, ``aten::unique*``, ``aten::masked_select``; plus ``Tensor.tolist`` / ``.numpy`` /
  ``.cpu`` calls, counted by wrapping those methods (they run no profiled op on a CPU tensor). On a CPU these cost
  nothing; each is one full pipeline drain on a GPU. Reads inside the CPU optimiser's step are shown apart (the
  trainer's CUDA optimiser, fused AdamW, makes none), and ``multinomial``'s input check is not counted (on CUDA it
  is an asynchronous device-side assert).

``--tree DIR`` measures another checkout (e.g. ``git archive HEAD | tar -x -C DIR``, the code before a change) with
this same counter; rows from several trees go into one table with ``--doc``.

    python bench/step_ops.py --archs resnet_tiny vit_tiny --steps 3 --tree /tmp/before --label "before (HEAD)"
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]

#: aten ops that read a value or a data-dependent shape back to the host (a device sync on a GPU).
SYNC_OPS = ("aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select")
SYNC_PREFIXES = ("aten::unique", "aten::_unique")
#: Tensor methods that copy to the host without a profiled op on CPU tensors.
HOST_METHODS = ("tolist", "numpy", "cpu")


@contextmanager
def count_host_reads() -> Iterator[Counter[str]]:
    """Count calls of :data:`HOST_METHODS` on tensors while the block runs (the methods are restored after)."""
    import torch

    counts: Counter[str] = Counter()
    saved = {name: getattr(torch.Tensor, name) for name in HOST_METHODS}

    def wrap(name: str, method: Any) -> Any:
        def counted(self: Any, *args: Any, **kwargs: Any) -> Any:
            counts[name] += 1
            return method(self, *args, **kwargs)

        return counted

    for name, method in saved.items():
        setattr(torch.Tensor, name, wrap(name, method))
    try:
        yield counts
    finally:
        for name, method in saved.items():
            setattr(torch.Tensor, name, method)


def is_sync_op(name: str) -> bool:
    return name in SYNC_OPS or name.startswith(SYNC_PREFIXES)


def measure(arch: str, steps: int, overrides: Sequence[str]) -> dict[str, Any]:
    """Counts per trainer step for one image tower, in this process (whatever ``mlip_fed`` is importable)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from mlip_fed import pipeline
    from mlip_fed.train.trainer import LocalTrainer

    try:
        from mlip_fed.config_compose import compose_experiment
    except ImportError:  # an older checkout
        from mlip_fed.cli.hydra_config import compose_experiment  # type: ignore[no-redef]

    torch.set_num_threads(1)
    cfg = compose_experiment(
        [
            "experiment=synth_cpu",
            f"model={arch}",
            "train.batch_size=16",
            "train.progress_bar=false",
            "train.log_every=1000000",
            "data.root=runs/bench_data_step_ops",  # relative: each measured tree generates its own copy
            "data.synthetic.studies_per_site=40",
            *overrides,
        ]
    )
    data = pipeline.load_records(cfg.data)
    model = pipeline.build_model(cfg)
    collator = pipeline.build_collator(model, cfg)
    dataset = pipeline.train_dataset(data.train, cfg)
    batch = collator([dataset[i] for i in range(cfg.train.batch_size)])
    trainer = LocalTrainer(model, cfg.train, total_steps=10_000)
    trainer.fit([batch, batch], epochs=1)  # warm-up, and past the first step's log point
    with count_host_reads() as reads, profile(activities=[ProfilerActivity.CPU]) as prof:
        trainer.fit([batch] * steps, epochs=1)
    ops: Counter[str] = Counter()
    syncs: Counter[str] = Counter()
    in_optimizer = 0
    for event in prof.events():
        if not event.name.startswith("aten::"):
            continue
        ops[event.name] += 1
        if is_sync_op(event.name) and not ran_under(event, "aten::_assert_async"):
            if ran_under(event, "Optimizer.step"):
                in_optimizer += 1
            else:
                syncs[event.name] += 1
    syncs.update({f"Tensor.{name}": n for name, n in reads.items()})
    return {
        "arch": arch,
        "steps": steps,
        "aten_ops_per_step": sum(ops.values()) / steps,
        "syncs_per_step": sum(syncs.values()) / steps,
        "syncs": {name: n / steps for name, n in sorted(syncs.items())},
        "optimizer_syncs_per_step": in_optimizer / steps,
        "overrides": list(overrides),
    }


def ran_under(event: Any, prefix: str | tuple[str, ...]) -> bool:
    """Whether a profiled op ran inside an event whose name starts with ``prefix`` (or one of them).

    Two are set apart: ``Optimizer.step`` (CPU AdamW reads each parameter's step count with ``.item()``; the trainer's
    CUDA optimiser is fused AdamW, which reads none) and ``aten::_assert_async`` (``multinomial``'s input check: a
    host read on a CPU, an asynchronous device-side assert on CUDA, so not counted)."""
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith(prefix):
            return True
        parent = parent.cpu_parent
    return False


def run_tree(tree: Path, arch: str, steps: int, overrides: Sequence[str]) -> dict[str, Any]:
    """``measure`` in a fresh process importing ``mlip_fed`` from ``tree`` (its code and configs)."""
    code = (
        "import json, sys; sys.path.insert(0, sys.argv[1]); sys.path.insert(1, sys.argv[2]); "
        "from bench_step_ops_counter import measure; "
        "print('RESULT ' + json.dumps(measure(sys.argv[3], int(sys.argv[4]), json.loads(sys.argv[5]))))"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MLIP_FED_CONFIG_DIR": str(tree / "configs")}
    shim = REPO / "runs" / "bench" / "step_ops_shim"
    shim.mkdir(parents=True, exist_ok=True)
    (shim / "bench_step_ops_counter.py").write_text(Path(__file__).read_text(encoding="utf-8"), encoding="utf-8")
    out = subprocess.run(
        [sys.executable, "-c", code, str(tree), str(shim), arch, str(steps), json.dumps(list(overrides))],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    raise RuntimeError(f"step_ops in {tree} failed:\n{out.stderr[-3000:]}")


def render(rows: Sequence[tuple[str, dict[str, Any]]], command: str) -> str:
    lines = [
        f"Command: `{command}` — LocalTrainer step, all five objectives, batch 16, 64², 1 torch thread, CPU; "
        "counts per step over the profiled steps (after 2 warm-up steps).",
        "",
        "| code | image tower | overrides | aten ops / step | device→host syncs / step | syncs by kind | "
        "in CPU AdamW.step (none in fused CUDA AdamW) |",
        "|---|---|---|---:|---:|---|---:|",
    ]
    for label, r in rows:
        kinds = ", ".join(f"{k.removeprefix('aten::')} {v:g}" for k, v in r["syncs"].items()) or "none"
        overrides = " ".join(f"`{o}`" for o in r["overrides"]) or "-"
        lines.append(
            f"| {label} | {r['arch']} | {overrides} | {r['aten_ops_per_step']:.0f} | {r['syncs_per_step']:g} | {kinds} "
            f"| {r['optimizer_syncs_per_step']:g} |"
        )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", nargs="+", default=["resnet_tiny", "vit_tiny"])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--tree", type=Path, default=None, help="measure the code in this checkout (a subprocess)")
    parser.add_argument("--label", default=None, help="the row label of --tree (default: its path)")
    parser.add_argument("--override", action="append", default=[], help="extra hydra override (repeatable)")
    parser.add_argument("--sdpa-row", action="store_true", help="also measure this checkout with train.attention=sdpa")
    parser.add_argument("--doc", type=Path, default=None, help="write the table into this page's step_ops block")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    rows: list[tuple[str, dict[str, Any]]] = []
    for arch in args.archs:
        if args.tree is not None:
            rows.append((args.label or str(args.tree), run_tree(args.tree.resolve(), arch, args.steps, args.override)))
        rows.append(("this checkout", run_tree(REPO, arch, args.steps, args.override)))
        if args.sdpa_row:
            rows.append(("this checkout", run_tree(REPO, arch, args.steps, [*args.override, "train.attention=sdpa"])))
    given = list(argv if argv is not None else sys.argv[1:])
    shown = ["DIR" if args.tree is not None and a == str(args.tree) else a for a in given]  # a scratch path
    table = render(rows, "python bench/step_ops.py " + shlex.join(shown))
    print(table)
    if args.doc is not None:
        sys.path.insert(0, str(REPO))
        from bench.docs_block import replace_block

        replace_block(args.doc, "step_ops", table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
