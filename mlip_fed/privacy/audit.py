"""Privacy audit report of one site's ledger: text, JSON or self-contained HTML (embedded PNG plot).

Everything is recomputed from the ledger (never from a number a training process printed), so the
officer's number is the one the ledger proves. The final epsilon is the max of RDP and PRV; the
per-round curve uses RDP (one PRV run per round would be slow and PRV is not the max in practice).

``private`` is False, and the first warning says NOT PRIVATE, when an event's noise was derivable from values the
server knows: ``privacy.insecure_reproducible_noise`` events, and events written before the noise was made secret
(no ``noise_source`` in their details). Events whose accounting was under-counted by earlier versions (decomposable
mode clipped per record but charged per patient; prototype releases that summed a patient's studies) are flagged too.
"""

from __future__ import annotations

import base64
import html
import io
import json
from typing import Any

from mlip_fed.privacy.accountant import ACCOUNTANTS, compute_epsilon, rdp_epsilon
from mlip_fed.privacy.ledger import RESETS_META, PrivacyLedger


def build_report(ledger: PrivacyLedger) -> dict[str, Any]:
    meta = ledger.meta()
    policy = meta.get("policy", {})
    delta = float(policy.get("delta", 1e-5))
    budget = policy.get("epsilon_budget")
    accountant = policy.get("accountant", "max")
    if accountant not in ACCOUNTANTS:  # a ledger written by another version: report the conservative bound
        accountant = "max"
    events = ledger.events()
    accounted = [e for e in events if e.accounted]
    final = compute_epsilon([e.step() for e in accounted], delta, with_prv=True, accountant=accountant)
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
    not_private = _not_private(meta, events)
    if not_private:
        warnings.insert(0, not_private)
    chain = ledger.verify_chain()
    for reset in reversed(meta.get(RESETS_META, [])):
        warnings.insert(
            0,
            f"LEDGER RESET acknowledged by {reset.get('operator')} at {reset.get('acknowledged_at')} "
            f"({reset.get('reason')}): the ledger was lost although the site had taken part "
            f"({'; '.join(reset.get('found', []))}); what was spent before is NOT in this ledger, so the epsilon above "
            "covers only what was recorded since",
        )
    if chain["status"] == "BROKEN":
        warnings.insert(
            0,
            "LEDGER TAMPERED: the hash chain over the events is BROKEN (" + "; ".join(chain["problems"]) + "); "
            "events were edited or deleted outside the ledger, so the epsilon above may be UNDER-COUNTED",
        )
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
        "accountant": accountant,
        "epsilon_rdp": final.rdp,
        "epsilon_prv": final.prv,
        "rdp_order": final.rdp_order,
        "epsilon_budget": budget,
        "remaining_budget": None if budget is None else float(budget) - final.epsilon,
        "num_records": meta.get("num_records"),
        "secure_mode": meta.get("secure_mode", False),
        "private": not not_private,
        "chain": chain,
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
        if d.get("poisson_sampling") is False:
            out.append(f"run {e.run_id} round {e.round}: no Poisson sampling; the accountant's assumptions fail")
        if e.mechanism == "decomposable" and d.get("unit") == "patient" and d.get("clipping") == "per_record":
            out.append(
                f"run {e.run_id} round {e.round}: decomposable mode clipped per record but was charged per patient; a "
                "patient with k records moved the sum by kC: this epsilon is UNDER-COUNTED"
            )
        if e.kind == "prototype_release" and e.accounted and "bank" not in d:
            out.append(
                f"run {e.run_id} round {e.round}: prototype release summed each patient's studies per category (a "
                "patient with k studies in one category moved its row by k): this release's epsilon is UNDER-COUNTED"
            )
    hardened = [bool(e.details.get("secure_mode")) for e in events if e.accounted and "noise_source" in e.details]
    unhardened = not all(hardened) if hardened else not meta.get("secure_mode", False)
    if unhardened:
        out.append(
            "secure_mode=false: secret noise without the floating-point mitigation or per-tensor reseeding; the "
            "guarantee ignores floating-point side channels (privacy.secure_mode=true)"
        )
    return out


def _not_private(meta: dict[str, Any], events: list[Any]) -> str:
    """The NOT PRIVATE warning, or "" when every accounted event's randomness was secret from the server."""
    accounted = [e for e in events if e.accounted]
    insecure = sorted(
        {(e.run_id, e.round) for e in accounted if e.details.get("noise_source") == "insecure_reproducible"}
    )
    legacy = sorted({(e.run_id, e.round) for e in accounted if "noise_source" not in e.details})
    if not insecure and not legacy and not meta.get("insecure_reproducible_noise"):
        return ""
    parts = []
    if insecure or meta.get("insecure_reproducible_noise"):
        parts.append(
            f"privacy.insecure_reproducible_noise=true in {_rounds(insecure) or 'an earlier run'} (debugging switch)"
        )
    if legacy:
        parts.append(f"{_rounds(legacy)} recorded before DP noise was drawn from secret entropy")
    return (
        "NOT PRIVATE: " + "; ".join(parts) + ": their noise and sampling were derived from the experiment seed, site "
        "id, run id and round, which the server knows; the epsilon above does not hold against the server"
    )


def _rounds(keys: list[tuple[str, int]]) -> str:
    shown = ", ".join(f"run {run} round {rnd}" for run, rnd in keys[:4])
    return shown + (f" and {len(keys) - 4} more" if len(keys) > 4 else "")


def format_text(report: dict[str, Any]) -> str:
    r = report
    prv = "n/a" if r["epsilon_prv"] is None else f"{r['epsilon_prv']:.4f}"
    lines = [
        f"Privacy audit: site {r['site']} (ledger {r['ledger']})",
        f"  privacy unit      : {r['privacy_unit']}",
        f"  mechanisms        : {', '.join(r['mechanisms']) or 'none recorded'}",
        f"  epsilon (reported): {r['epsilon']:.4f} at delta={r['delta']:g}  " + _bound_note(r, prv),
        *([] if r.get("private", True) else ["  private           : NO -- the epsilon does not hold (see warnings)"]),
        f"  chain             : {_chain_line(r.get('chain'))}",
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


def _chain_line(chain: dict[str, Any] | None) -> str:
    if not chain:
        return "n/a"
    status, legacy, chained = chain["status"], chain["legacy_events"], chain["chained_events"]
    if status == "BROKEN":
        return "BROKEN -- " + "; ".join(chain["problems"])
    if status == "LEGACY":
        return f"LEGACY -- {legacy} event(s) written before the hash chain existed; none chained yet"
    if status == "EMPTY":
        return "OK (no events)"
    head = f"head {chain['head'][:16]}"
    if legacy:
        return (
            f"OK ({chained} chained event(s), {head}; the chain starts at event id {chain['first_chained_id']}: "
            f"{legacy} event(s) written before the upgrade are anchored by its first hash, not chained one by one)"
        )
    return f"OK ({chained} chained event(s), {head})"


def _bound_note(r: dict[str, Any], prv: str) -> str:
    accountant = r.get("accountant", "max")
    if accountant == "max":
        return f"(max of RDP {r['epsilon_rdp']:.4f}, PRV {prv})"
    other = f"PRV {prv}" if accountant == "rdp" else f"RDP {r['epsilon_rdp']:.4f}"
    return f"(privacy.accountant={accountant}; {other} for information)"


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
        f"<p>Ledger hash chain: <b>{esc(_chain_line(report.get('chain')))}</b></p>"
        f"<img alt='epsilon per round' src='data:image/png;base64,{png}'/>"
        "<h2>Warnings</h2><ul>" + warn + "</ul><h2>Ledger</h2><table border='1'><tr><th>run</th><th>round</th>"
        "<th>kind</th><th>mechanism</th><th>sigma</th><th>q</th><th>steps</th><th>accounted</th></tr>"
        + rows
        + "</table></body></html>\n"
    )


FORMATTERS = {"text": format_text, "json": format_json, "html": format_html}
