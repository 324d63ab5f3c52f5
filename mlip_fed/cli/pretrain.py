"""``mlip-pretrain``: centralized MLIP pretraining driven by hydra overrides.

    mlip-pretrain experiment=synth_cpu objectives.itm.enabled=false train.epochs=3

Re-running the same command resumes from ``<output_dir>/checkpoint.pt``. When training ends the
frozen encoder is evaluated on the test split (``eval.json`` / ``eval.md`` beside the checkpoint).
"""

from __future__ import annotations

import argparse
import json
import sys

from mlip_fed.cli.help_format import HelpFormatter
from mlip_fed.config import ConfigError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mlip-pretrain",
        description="Centralized MLIP pretraining. Positional arguments are hydra overrides (key=value).",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("overrides", nargs="*", help="hydra overrides, e.g. experiment=synth_cpu train.epochs=2")
    parser.add_argument("--print-config", action="store_true", help="print the validated config and exit")
    parser.add_argument("--no-eval", action="store_true", help="skip the evaluation after training")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from mlip_fed.config_compose import compose_experiment

    try:
        cfg = compose_experiment(args.overrides)
    except ConfigError as err:
        print(f"mlip-pretrain: {err}", file=sys.stderr)
        return 2
    if args.print_config:
        print(json.dumps(cfg.model_dump(mode="json"), indent=2))
        return 0
    from mlip_fed.train.run import run_pretraining
    from mlip_fed.train.trainer import TrainingDiverged, resolve_device

    try:  # train.device=cuda on a machine without a visible GPU: one line at start-up, not a traceback later
        resolve_device(cfg.train.device)
    except RuntimeError as err:
        print(f"mlip-pretrain: {err}", file=sys.stderr)
        return 2
    try:
        result = run_pretraining(cfg, evaluate=not args.no_eval)
    except TrainingDiverged as err:
        print(f"mlip-pretrain: training stopped: {err}", file=sys.stderr)
        return 3
    except (ValueError, FileNotFoundError) as err:
        print(f"mlip-pretrain: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
