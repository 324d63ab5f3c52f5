"""``mlip-privacy``: a privacy officer's view of a site's ledger, and the one-run empirical audit.

    mlip-privacy audit --ledger site.db [--format text|json|html] [--out FILE]
    mlip-privacy canary-audit --scores scores.csv --k-plus 50 [--k-minus 50] [--delta 1e-5] [--claimed-epsilon 8]

``scores.csv`` has one row per canary with columns ``score`` (higher = more likely trained on) and
``included`` (1/0, the secret coin flip).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

from mlip_fed.io import atomic_write_text


def _audit(args: argparse.Namespace) -> int:
    from mlip_fed.privacy.audit import FORMATTERS, build_report
    from mlip_fed.privacy.ledger import PrivacyLedger

    if not Path(args.ledger).is_file():
        raise FileNotFoundError(f"ledger {args.ledger} does not exist")
    with PrivacyLedger(args.ledger) as ledger:
        text = FORMATTERS[args.format](build_report(ledger))
    if args.out:
        atomic_write_text(Path(args.out), text)
    else:
        sys.stdout.write(text)
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mlip-privacy", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    audit = sub.add_parser("audit", help="audit report of a site's privacy ledger")
    audit.add_argument("--ledger", required=True, help="the site's SQLite ledger (site.db)")
    audit.add_argument("--format", choices=("text", "json", "html"), default="text")
    audit.add_argument("--out", help="write here instead of stdout")
    audit.set_defaults(func=_audit)
    canary = sub.add_parser("canary-audit", help="one-run epsilon lower bound from canary scores")
    canary.add_argument("--scores", required=True, help="CSV with columns score, included")
    canary.add_argument("--k-plus", type=int, required=True, help="guess 'in' for this many top scores")
    canary.add_argument("--k-minus", type=int, default=0, help="guess 'out' for this many bottom scores")
    canary.add_argument("--delta", type=float, default=1e-5)
    canary.add_argument("--significance", type=float, default=0.05)
    canary.add_argument("--claimed-epsilon", type=float, help="exit 1 if the lower bound exceeds it")
    canary.set_defaults(func=_canary)
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
