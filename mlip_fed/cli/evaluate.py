"""``mlip-eval``: frozen-encoder evaluation of a checkpoint, and of a random-init encoder beside it.

    mlip-eval --checkpoint runs/synth_cpu/checkpoint.pt --compare-random

The model config comes from the ``config.json`` that ``mlip-pretrain`` saved beside the checkpoint (or the
config a federation checkpoint carries); overrides apply on top of it (``mlip_fed.checkpoint_config``).
Linear probe (1/10/100 % labels), zero-shot with knowledge-base prompts, image<->text retrieval and
segmentation Dice (when the data has masks), written as JSON and a markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mlip_fed.cli.help_format import HelpFormatter, describe
from mlip_fed.config import ConfigError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mlip-eval", description=describe(__doc__), formatter_class=HelpFormatter)
    parser.add_argument(
        "overrides",
        nargs="*",
        help="hydra overrides, applied on top of the config.json saved beside the checkpoint "
        "(e.g. data.root=/data/test eval.zero_shot.enabled=false)",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", type=Path, help="trainer or federation checkpoint (.pt)")
    source.add_argument("--random-init", action="store_true", help="evaluate the seeded, untrained encoder")
    parser.add_argument("--compare-random", action="store_true", help="also evaluate random init, side by side")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: the config's output_dir)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from mlip_fed.checkpoint_config import resolve_eval_config
    from mlip_fed.eval.run import run_evaluation, write_results
    from mlip_fed.pipeline import CheckpointMismatch

    try:
        cfg, model_source = resolve_eval_config(args.checkpoint, args.overrides)
    except ConfigError as err:
        print(f"mlip-eval: {err}", file=sys.stderr)
        return 2
    try:
        results = run_evaluation(cfg, args.checkpoint, compare_random=args.compare_random or args.random_init)
    except CheckpointMismatch as err:
        print(f"mlip-eval: error: {err} (model config from {model_source})", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError) as err:
        print(f"mlip-eval: error: {err}", file=sys.stderr)
        return 2
    out = args.out or Path(cfg.output_dir)
    write_results(results, out, cfg.name)
    print(json.dumps({name: r.flat_metrics() for name, r in results.items()}, indent=2))
    print(f"wrote {out / 'eval.json'} and {out / 'eval.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
