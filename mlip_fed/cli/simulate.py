"""``mlip-simulate``: a ``flwr run`` simulation of N hospitals, run safely, with a checked exit status.

    mlip-simulate --sites 3 --rounds 5 --out runs/fed experiment=synth_cpu federation.strategy=fedprox

Plain ``flwr run .`` works too, but it exits 0 even when every site failed and leaves its local
SuperLink running on fixed ports; this wrapper gives the run its own ``FLWR_HOME`` and loopback
ports, stops the SuperLink it started by PID, and exits non-zero unless ``results.json`` says the
federation completed. Ctrl-C stops the whole federation within seconds, keeps the completed rounds and
prints the command that resumes them (``federation.resume=true``; exit 130); if this process is killed
outright, a watchdog stops what it started.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mlip_fed.cli.arg_types import at_least, existing_dir
from mlip_fed.cli.help_format import HelpFormatter, describe

REPO = Path(__file__).resolve().parents[2]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mlip-simulate", description=describe(__doc__), formatter_class=HelpFormatter)
    parser.add_argument("overrides", nargs="*", help="hydra overrides (experiment=..., federation.*=..., ...)")
    parser.add_argument("--sites", type=at_least(1), default=3, help="number of simulated hospitals (SuperNodes)")
    parser.add_argument("--rounds", type=at_least(0), default=0, help="0 = federation.num_rounds from the config")
    parser.add_argument("--out", type=Path, required=True, help="output folder (results.json, plot, checkpoints)")
    parser.add_argument(
        "--cpus-per-site",
        type=at_least(1),
        default=1,
        help="CPU cores (Ray resources and torch threads) for each site's ClientApp",
    )
    parser.add_argument(
        "--gpus-per-site",
        type=float,
        default=0.0,
        metavar="F",
        help="GPUs for each site's ClientApp (Flower client resources; 0.5 puts two sites on one GPU). With 0, "
        "Ray hides every GPU from the sites, so train.device=cuda is refused",
    )
    parser.add_argument("--timeout", type=at_least(1, float), default=3600.0, help="seconds before the run is stopped")
    parser.add_argument("--app-dir", type=existing_dir, default=REPO, help="the Flower app (this checkout)")
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="also show Flower's and Ray's DEBUG/INFO lines on the console (flwr_run.log always has everything)",
    )
    return parser


#: Exit status after Ctrl-C / SIGTERM: 128 + SIGINT, what a shell reports for a process ended by Ctrl-C.
EXIT_INTERRUPTED = 130


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    experiment = "synth_cpu"
    # One SynthCXR hospital per SuperNode unless the overrides say otherwise (they come later and win).
    overrides = [f"data.synthetic.num_sites={args.sites}"]
    for item in args.overrides:
        if item.startswith("experiment="):
            experiment = item.split("=", 1)[1]
        else:
            overrides.append(item)
    from mlip_fed.config import ConfigError
    from mlip_fed.config_compose import compose_experiment

    try:  # fail here, at start-up, rather than inside the ServerApp
        cfg = compose_experiment([f"experiment={experiment}", *overrides])
    except ConfigError as err:
        print(f"mlip-simulate: {err}", file=sys.stderr)
        return 2
    from mlip_fed.federation.simulation import (
        SimulationInterrupted,
        check_gpu_request,
        resume_hint,
        run_flwr_simulation,
    )

    error, warning = check_gpu_request(cfg.train.device, args.gpus_per_site, visible_gpu_count())
    if error is not None:
        print(f"mlip-simulate: {error}", file=sys.stderr)
        return 2
    if warning is not None:
        print(f"mlip-simulate: warning: {warning}", file=sys.stderr)

    try:
        result = run_flwr_simulation(
            args.app_dir,
            output_dir=args.out,
            num_supernodes=args.sites,
            experiment=experiment,
            overrides=overrides,
            num_rounds=args.rounds,
            num_cpus_per_client=args.cpus_per_site,
            num_gpus_per_client=args.gpus_per_site,
            timeout_s=args.timeout,
            stream=sys.stdout,
            verbose=args.verbose,
        )
    except SimulationInterrupted as stop:  # the tree is down; checkpoints and ledgers of completed rounds are on disk
        print(f"\n{resume_hint('mlip-simulate', argv, stop.result)}", file=sys.stderr)
        return EXIT_INTERRUPTED
    if not result.ok:
        print(f"mlip-simulate: the federated run failed: {result.failure_reason()} (log: {result.log_path})")
        return 1
    print(f"mlip-simulate: completed in {result.seconds:.0f} s; results in {result.output_dir / 'results.json'}")
    return 0


def visible_gpu_count() -> int:
    """CUDA devices this process sees (what Ray can hand out to the sites)."""
    import torch

    return torch.cuda.device_count()


if __name__ == "__main__":
    sys.exit(main())
