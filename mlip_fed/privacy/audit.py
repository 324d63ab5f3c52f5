"""Privacy audit report of one site's ledger: text, JSON or self-contained HTML (embedded PNG plot).

Everything is recomputed from the ledger (never from a number a training process printed), so the
officer's number is the one the ledger proves. The final epsilon is the max of RDP and PRV; the
per-round curve uses RDP (one PRV run per round would be slow and PRV is not the max in practice).
"""

from __future__ import annotations

import base64
import html
import io
import json
from typing import Any

from mlip_fed.privacy.accountant import compute_epsilon, rdp_epsilon
from mlip_fed.privacy.ledger import PrivacyLedger


def build_report(ledger: PrivacyLedger) -> dict[str, Any]:
    meta = ledger.meta()
    policy = meta.get("policy", {})
    delta = float(policy.get("delta", 1e-5))
    budget = policy.get("epsilon_budget")
    events = ledger.events()
    accounted = [e for e in events if e.accounted]
    final = compute_epsilon([e.step() for e in accounted], delta)
    per_round: list[dict[str, Any]] = []
    seen: list[Any] = []
    for e in accounted:
        seen.append(e.step())
        key = (e.run_id, e.round)
        eps = rdp_epsilon(seen, delta)[0]
        if per_round and (per_round[-1]["run_id"], per_round[-1]["round"]) == key:
            per_round[-1]["epsilon_rdp"] = eps
        else:
            per_round.append({"run_id": e.run_id, "round": e.round, "epsilon_rdp": eps})
    warnings = _warnings(meta, events, delta)
    if final.prv_error:
        warnings.append(final.prv_error)
    mechanisms = sorted({e.mechanism for e in events})
    return {
        "site": meta.get("site", "?"),
        "ledger": str(ledger.path),
        "privacy_unit": policy.get("privacy_unit", "?"),
        "mechanisms": mechanisms,
        "delta": delta,
        "epsilon": final.epsilon,
        "epsilon_rdp": final.rdp,
        "epsilon_prv": final.prv,
        "rdp_order": final.rdp_order,
        "epsilon_budget": budget,
        "remaining_budget": None if budget is None else float(budget) - final.epsilon,
        "num_records": meta.get("num_records"),
        "secure_mode": meta.get("secure_mode", False),
        "per_round": per_round,
        "events": [
            {
                "run_id": e.run_id,
                "round": e.round,
                "kind": e.kind,
                "mechanism": e.mechanism,
                "noise_multiplier": e.noise_multiplier,
                "effective_noise_multiplier": e.effective_noise_multiplier,
                "sample_rate": e.sample_rate,
                "steps": e.steps,
                "accounted": e.accounted,
                "created_at": e.created_at,
                "details": e.details,
            }
            for e in events
        ],
        "warnings": warnings,
    }


def _warnings(meta: dict[str, Any], events: list[Any], delta: float) -> list[str]:
    out = []
    n = meta.get("num_records")
    if n and delta > 1.0 / n:
        out.append(f"delta={delta:g} exceeds 1/N={1.0 / n:.3g} (N={n}): the guarantee is meaningless")
    for e in events:
        d = e.details
        if not e.accounted:
            out.append(f"unaccounted release: {e.kind} (run {e.run_id}, round {e.round}) left the site without DP")
        if d.get("loss") == "coupled" and d.get("clipping") != "bucketed":
            out.append(
                f"coupled loss without bucketing (run {e.run_id}, round {e.round}): per-record clipping of an "
                "in-batch-negative loss does not bound one record's influence; this epsilon is INVALID"
            )
        if d.get("poisson_sampling") is False:
            out.append(f"run {e.run_id} round {e.round}: no Poisson sampling; the accountant's assumptions fail")
    if not meta.get("secure_mode", False):
        out.append(
            "secure_mode=false: noise from a seeded PRNG; the guarantee ignores floating-point and PRNG side channels"
        )
    return out


def format_text(report: dict[str, Any]) -> str:
    r = report
    prv = "n/a" if r["epsilon_prv"] is None else f"{r['epsilon_prv']:.4f}"
    lines = [
        f"Privacy audit: site {r['site']} (ledger {r['ledger']})",
        f"  privacy unit      : {r['privacy_unit']}",
        f"  mechanisms        : {', '.join(r['mechanisms']) or 'none recorded'}",
        f"  epsilon (reported): {r['epsilon']:.4f} at delta={r['delta']:g}  (max of RDP {r['epsilon_rdp']:.4f}, PRV {prv})",
        f"  budget            : {r['epsilon_budget']}  remaining: "
        + ("n/a" if r["remaining_budget"] is None else f"{r['remaining_budget']:.4f}"),
        "  events:",
    ]
    for e in r["events"]:
        lines.append(
            f"    run={e['run_id']} round={e['round']} {e['kind']:<18} {e['mechanism']:<12} sigma={e['noise_multiplier']:.4g}"
            f" sigma_eff={e['effective_noise_multiplier']:.4g} q={e['sample_rate']:.4g} steps={e['steps']}"
            + ("" if e["accounted"] else "  UNACCOUNTED")
        )
    lines.append("  epsilon after each round (RDP):")
    for p in r["per_round"]:
        lines.append(f"    run={p['run_id']} round={p['round']}: {p['epsilon_rdp']:.4f}")
    lines.append("  warnings:" if r["warnings"] else "  warnings: none")
    lines += [f"    - {w}" for w in r["warnings"]]
    return "\n".join(lines) + "\n"


def format_json(report: dict[str, Any]) -> str:
    return json.dumps(report, indent=2, sort_keys=True) + "\n"


def epsilon_plot_png(report: dict[str, Any]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=100)
    eps = [p["epsilon_rdp"] for p in report["per_round"]]
    ax.plot(range(1, len(eps) + 1), eps, marker="o", label="epsilon (RDP)")
    if report["epsilon_budget"] is not None:
        ax.axhline(float(report["epsilon_budget"]), color="red", linestyle="--", label="budget")
    ax.set_xlabel("charged round (in ledger order)")
    ax.set_ylabel(f"epsilon at delta={report['delta']:g}")
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def format_html(report: dict[str, Any]) -> str:
    png = base64.b64encode(epsilon_plot_png(report)).decode()
    esc = html.escape
    rows = "".join(
        "<tr>"
        + "".join(
            f"<td>{esc(str(e[k]))}</td>"
            for k in ("run_id", "round", "kind", "mechanism", "noise_multiplier", "sample_rate", "steps", "accounted")
        )
        + "</tr>"
        for e in report["events"]
    )
    warn = "".join(f"<li>{esc(w)}</li>" for w in report["warnings"]) or "<li>none</li>"
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>Privacy audit</title></head><body>"
        f"<h1>Privacy audit: site {esc(str(report['site']))}</h1>"
        f"<p>Privacy unit: {esc(str(report['privacy_unit']))}. Reported epsilon "
        f"<b>{report['epsilon']:.4f}</b> at delta={report['delta']:g} (max of RDP and PRV). "
        f"Budget {esc(str(report['epsilon_budget']))}, remaining {esc(str(report['remaining_budget']))}.</p>"
        f"<img alt='epsilon per round' src='data:image/png;base64,{png}'/>"
        "<h2>Warnings</h2><ul>" + warn + "</ul><h2>Ledger</h2><table border='1'><tr><th>run</th><th>round</th>"
        "<th>kind</th><th>mechanism</th><th>sigma</th><th>q</th><th>steps</th><th>accounted</th></tr>"
        + rows
        + "</table></body></html>\n"
    )


FORMATTERS = {"text": format_text, "json": format_json, "html": format_html}
