"""What travels in one round, as plain Python/tensor types (Flower encoding lives in ``mlip_wire/codec.py``).

Everything a site releases is listed here (docs/architecture.md, invariant 4): the weights, the bank sums and
counts, and the scalar metrics in ``SiteUpdate``; on request, the evaluation metrics in ``SiteEvaluation``. Nothing
else leaves a site.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

#: Flower ``UserConfig``/``ConfigRecord`` scalars only: the round config must flatten to these.
Scalar = int | float | str | bool


@dataclass
class RoundRequest:
    """Server → site: the global model, the global bank and this round's training settings."""

    server_round: int
    weights: dict[str, Tensor]
    bank: dict[str, Tensor]  # aggregate.BANK_GLOBAL_KEYS: prototypes_image/_text [K, d], initialized [K]
    config: dict[str, Scalar] = field(default_factory=dict)


@dataclass
class SiteUpdate:
    """Site → server: trained weights, per-category embedding sums/counts, scalar metrics."""

    site_id: str
    num_examples: int
    weights: dict[str, Tensor]
    bank_stats: dict[str, Tensor]  # aggregate.BANK_STAT_KEYS: sum_image/_text [K, d], count [K]
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class SiteEvaluation:
    """Site → server, on request: metrics of the global model on the site's own test split.

    ``num_examples`` is the number of test studies scored (the aggregation weight); ``metrics`` holds the linear-probe,
    retrieval and zero-shot figures and their counts (``federation.site_evaluation``). Computed on private data:
    released only where the site's policy allows it (``PrivacyPolicy.evaluation_released``).
    """

    site_id: str
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class SiteFailure:
    """A site that did not contribute to a round, and why (error reply, timeout, invalid reply)."""

    server_round: int
    site_id: str
    node_id: int
    reason: str

    @property
    def refused(self) -> bool:
        """The site's privacy policy refused the round (``site.RoundRefused``), as opposed to a crash or timeout."""
        return "RoundRefused:" in self.reason

    def as_dict(self) -> dict[str, Any]:
        return {"round": self.server_round, "site_id": self.site_id, "node_id": self.node_id, "reason": self.reason}


#: Refusal codes a DP site may name in its error reply: each is a function of the site's policy, its ledger's public
#: parameters, its size (public, as q and the delta check already use it) or the server's own requests.
PUBLIC_REFUSAL_CODES = ("budget", "delta", "noise", "replay", "mechanism", "ledger", "evaluation")


def format_site_error(site_id: str, err: BaseException, *, private: bool = False) -> str:
    """The reason string a failing site sends; the server parses the site id back with ``parse_site_error``.

    ``private=True`` (a site under DP): only a public reason code leaves the site. An exception's message may carry
    values computed on the training data (a diverged loss, the number of categories one patient touches, ...), which
    no accountant charges; the site keeps the full message in its own log. A policy refusal keeps its public code
    (``RoundRefused: refused (budget)`` and the like, so the server still lists it as a refusal); anything else is
    ``SiteError: failed``.
    """
    if not private:
        return f"[site={site_id}] {type(err).__name__}: {err}"
    tail = "details in the site's own log"
    if type(err).__name__ == "RoundRefused":
        match = re.search(r"refused \(([a-z_]+)\)", str(err))
        code = match.group(1) if match and match.group(1) in PUBLIC_REFUSAL_CODES else "other"
        return f"[site={site_id}] RoundRefused: refused ({code}); {tail}"
    return f"[site={site_id}] SiteError: failed under DP; {tail}"


def parse_site_error(reason: str | None) -> str | None:
    """Site id from a reason made by ``format_site_error``; None when the error came from elsewhere."""
    if reason and reason.startswith("[site=") and "]" in reason:
        return reason[len("[site=") : reason.index("]")]
    return None
