"""``mlip-privacy``: a privacy officer's view of a site's ledger, and the one-run empirical audit.

    mlip-privacy audit --ledger <state_dir>/privacy_ledger.sqlite [--format text|json|html] [--out FILE]
    mlip-privacy acknowledge-reset --state-dir <state_dir> --operator NAME --reason TEXT
    mlip-privacy canary-audit --scores scores.csv --k-plus 50 [--k-minus 50] [--delta 1e-5] [--claimed-epsilon 8]
    mlip-privacy canary-run --out DIR [--canary-kind gradient|input|release] [--canaries 1000 --steps 30 --sample-rate 1]
                            [--noise-applied-fraction 0.5 --i-know-this-is-broken]
                            [hydra overrides, e.g. experiment=smoke privacy=bucketed privacy.epsilon_budget=1]

``scores.csv`` has one row per canary with columns ``score`` (higher = more likely trained on) and
``included`` (1/0, the secret coin flip); ``canary-run`` writes one (``DIR/canaries.csv``) after it has
inserted the canaries, trained with the configured DP and scored them. ``canary-run`` judges gradient canaries
against the epsilon of one canary unit (sensitivity C, at sigma), input canaries against the patient claim, and
release canaries (units sent through one prototype-bank release, no training) against the epsilon one release charges.
``--noise-applied-fraction F`` (F < 1, with ``--i-know-this-is-broken``) adds only F * sigma while the accountant is
charged sigma: a deliberately broken run the audit should catch (``--noise-off`` = F 0). Exit status of both canary
audits: 0 when the lower bound is consistent with the epsilon it is compared against, 1 when it exceeds it, 2 on bad
input. ``audit`` exits 1 when the ledger's hash chain is BROKEN (events edited or deleted).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path
from typing import Any

from mlip_fed.cli.help_format import HelpFormatter, describe, subparser_options
from mlip_fed.io import atomic_write_text
from mlip_fed.privacy.ledger import LEDGER_FILENAME

#: Gradient canaries are cheap (one coordinate each) and m = 1000 lets a perfect guesser reach eps ~ 5; every
#: input canary is a training image, so fewer.
#: Release canaries need no training (3 L coordinates of one release each): many.
DEFAULT_CANARIES = {"gradient": 1000, "input": 64, "release": 100_000}


def _audit(args: argparse.Namespace) -> int:
    from mlip_fed.privacy.audit import FORMATTERS, build_report
    from mlip_fed.privacy.ledger import PrivacyLedger

    if not Path(args.ledger).is_file():
        raise FileNotFoundError(f"ledger {args.ledger} does not exist")
    with PrivacyLedger(args.ledger) as ledger:
        report = build_report(ledger)
    text = FORMATTERS[args.format](report)
    if args.out:
        atomic_write_text(Path(args.out), text)
    else:
        sys.stdout.write(text)
    return 1 if report["chain"]["status"] == "BROKEN" else 0


def _acknowledge_reset(args: argparse.Namespace) -> int:
    from mlip_fed.privacy.ledger import RESETS_FILENAME, acknowledge_reset

    record = acknowledge_reset(Path(args.state_dir), args.operator or "", args.reason or "")
    print(
        f"recorded: ledger reset of {record['state_dir']} acknowledged by {record['operator']} "
        f"({record['reason']}); found: {'; '.join(record['found'])}. A new ledger starts at epsilon 0; the reset is "
        f"in {Path(args.state_dir) / RESETS_FILENAME} and in the new ledger, and every audit reports it."
    )
    return 0


def _canary(args: argparse.Namespace) -> int:
    from mlip_fed.privacy.canary import audit_scores

    scores, included = [], []
    with open(args.scores, newline="") as fh:
        for i, row in enumerate(csv.DictReader(fh), start=2):
            try:
                scores.append(float(row["score"]))
                included.append(bool(int(row["included"])))
            except (KeyError, ValueError) as err:
                raise ValueError(
                    f"{args.scores}:{i}: need numeric 'score' and 0/1 'included' columns ({err})"
                ) from None
    result = audit_scores(
        scores,
        included,
        k_plus=args.k_plus,
        k_minus=args.k_minus,
        delta=args.delta,
        significance=args.significance,
    )
    out = {
        "canaries": result.m,
        "guesses": result.guesses,
        "correct": result.correct,
        "epsilon_lower_bound": result.epsilon_lower_bound,
        "confidence": 1 - result.significance,
        "delta": result.delta,
    }
    if args.claimed_epsilon is not None:
        out["claimed_epsilon"] = args.claimed_epsilon
        out["consistent_with_claim"] = result.epsilon_lower_bound <= args.claimed_epsilon
    print(json.dumps(out, indent=2))
    return 0 if out.get("consistent_with_claim", True) else 1


def _canary_run(args: argparse.Namespace) -> int:
    from mlip_fed.config_compose import compose_experiment
    from mlip_fed.io import atomic_write_json
    from mlip_fed.privacy.canary_run import check_noise_applied, resolve_noise_applied_fraction, run_canary_audit

    fraction = resolve_noise_applied_fraction(args.noise_off, args.noise_applied_fraction)
    check_noise_applied(fraction, args.i_know_this_is_broken)  # before anything is composed or generated
    cfg = compose_experiment(args.overrides)
    out = Path(args.out)
    m = args.canaries if args.canaries is not None else DEFAULT_CANARIES[args.canary_kind]
    report: Any
    if args.canary_kind == "release":
        from mlip_fed.privacy.release_canaries import run_release_canary_audit

        report = run_release_canary_audit(
            cfg,
            out,
            m=m,
            k_plus=args.k_plus,
            k_minus=args.k_minus,
            significance=args.significance,
            noise_applied_fraction=fraction,
            i_know_this_is_broken=args.i_know_this_is_broken,
        )
    else:
        report = run_canary_audit(
            cfg,
            out,
            m=m,
            steps=args.steps,
            kind=args.canary_kind,
            sample_rate=args.sample_rate,
            site=None if args.site < 0 else args.site,
            k_plus=args.k_plus,
            k_minus=args.k_minus,
            significance=args.significance,
            noise_applied_fraction=fraction,
            i_know_this_is_broken=args.i_know_this_is_broken,
            progress=args.progress,
        )
    atomic_write_json(out / "report.json", {**report.to_dict(), "overrides": args.overrides})
    atomic_write_text(out / "report.txt", report.text())
    sys.stdout.write(json.dumps(report.to_dict(), indent=2) + "\n" if args.format == "json" else report.text())
    return 0 if report.passed else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mlip-privacy", description=describe(__doc__), formatter_class=HelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    audit = sub.add_parser("audit", help="audit report of a site's privacy ledger", **subparser_options())
    audit.add_argument("--ledger", required=True, help=f"the site's SQLite ledger (<state_dir>/{LEDGER_FILENAME})")
    audit.add_argument(
        "--format", choices=("text", "json", "html"), default="text", help="report format (html: one standalone page)"
    )
    audit.add_argument("--out", help="write here instead of stdout")
    audit.set_defaults(func=_audit)
    reset = sub.add_parser(
        "acknowledge-reset",
        help="record that a site's lost ledger restarts at epsilon 0 (the site refuses to train until then)",
        **subparser_options(),
    )
    reset.add_argument("--state-dir", required=True, help="the site's state_dir (holds the ledger)")
    reset.add_argument("--operator", help="who accepts the reset (required; recorded)")
    reset.add_argument("--reason", help="why the ledger is lost (required; recorded)")
    reset.set_defaults(func=_acknowledge_reset)
    canary = sub.add_parser(
        "canary-audit", help="one-run epsilon lower bound from canary scores", **subparser_options()
    )
    canary.add_argument("--scores", required=True, help="CSV with columns score, included")
    canary.add_argument("--k-plus", type=int, required=True, help="guess 'in' for this many top scores")
    canary.add_argument("--k-minus", type=int, default=0, help="guess 'out' for this many bottom scores")
    canary.add_argument("--delta", type=float, default=1e-5, help="delta of the (epsilon, delta) lower bound")
    canary.add_argument("--significance", type=float, default=0.05, help="1 - confidence of the lower bound")
    canary.add_argument(
        "--claimed-epsilon",
        type=float,
        help="exit 1 if the lower bound exceeds it (for gradient canaries: the canary-unit epsilon of the run)",
    )
    canary.set_defaults(func=_canary)
    run = sub.add_parser(
        "canary-run",
        help="insert canaries, train with the configured DP, score them, report an epsilon lower bound",
        description="End-to-end one-run audit (Steinke, Nasr, Jagielski 2023) on a SynthCXR (or manifest) site. "
        "Positional arguments are hydra overrides; the privacy group must be a DP mechanism.",
        **subparser_options(),
    )
    run.add_argument("overrides", nargs="*", help="hydra overrides, e.g. experiment=smoke privacy=bucketed")
    run.add_argument("--out", required=True, help="directory for canaries.csv, report.json/txt and canary images")
    run.add_argument(
        "--canary-kind",
        choices=("gradient", "input", "release"),
        default="gradient",
        help="gradient: white-box Dirac gradient canaries added before the engine's noise (audits mechanism + "
        "accountant); input: canary patients (random image + words) scored black-box; release: canary units sent "
        "through one prototype-bank release (privacy.prototype_*; no training, --steps/--sample-rate/--site unused)",
    )
    run.add_argument(
        "--canaries",
        type=int,
        help="m: canaries, each included w.p. 1/2 (default 1000 gradient, 64 input, 100000 release)",
    )
    run.add_argument("--steps", type=int, default=30, help="DP-SGD steps (noise steps, as charged)")
    run.add_argument("--sample-rate", type=float, default=1.0, help="Poisson sampling rate q of privacy units")
    run.add_argument("--site", type=int, default=0, help="SynthCXR site whose records join the canaries (-1: all)")
    run.add_argument(
        "--k-plus",
        type=int,
        help="guess 'in' for this many top scores (default m/4 gradient, m/8 input, m/100 release)",
    )
    run.add_argument(
        "--k-minus",
        type=int,
        help="guess 'out' for this many bottom scores (default m/4 gradient, m/8 input, m/100 release)",
    )
    run.add_argument("--significance", type=float, default=0.05, help="1 - confidence of the lower bound")
    run.add_argument("--format", choices=("text", "json"), default="text", help="what is printed to stdout")
    run.add_argument("--progress", action="store_true", help="show a progress bar")
    run.add_argument(
        "--noise-applied-fraction",
        type=float,
        help="BROKEN ON PURPOSE below 1: the engine adds this fraction of sigma while the accountant is still charged "
        "sigma (0.5: 2x under-noised, 0.25: 4x, 0: noise off; default 1; needs --i-know-this-is-broken)",
    )
    run.add_argument(
        "--noise-off",
        action="store_true",
        help="BROKEN ON PURPOSE: same as --noise-applied-fraction 0 (needs --i-know-this-is-broken)",
    )
    run.add_argument(
        "--i-know-this-is-broken",
        "--i-know-noise-is-off",
        dest="i_know_this_is_broken",
        action="store_true",
        help="confirm --noise-applied-fraction < 1 or --noise-off (--i-know-noise-is-off: the old name)",
    )
    run.set_defaults(func=_canary_run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as err:
        print(f"mlip-privacy {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
