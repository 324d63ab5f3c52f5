"""Client-level DP (DP-FedAvg, McMahan et al. 2018): clip each site's update, average equally, add noise, account.

Why our own and not Flower's ``DifferentialPrivacyServerSideFixedClipping``: its accountant requires an unmodified
``FedAvg.aggregate_train`` (and no Poisson sampling), and our round loop is our own (docs/federation.md). The mechanism is
the same as Flower's server-side fixed clipping (trusted server):

- Δ_k = θ_k − θ_global over the whole floating-point encoder weight vector, clipped to ‖Δ_k‖₂ ≤ S. Bank statistics
  are not part of it: they are released under the site's own (sample-level) DP and accounted in its ledger.
- The clipped updates are summed and divided by the *fixed* expected number of sampled sites m (not by the number
  that replied, and never weighted by ``num_examples``, which would leak and change the sensitivity), so one site
  moves the mean by at most S/m.
- N(0, (z·S/m)²) is added per coordinate: the Gaussian mechanism with noise multiplier z on a sensitivity-S/m query.

Accounting (docs/privacy.md "Client-level DP"): one event per aggregated round, Poisson-subsampled Gaussian with noise multiplier
z and sample rate q = m/K (q = 1 when every site takes part: no amplification; one hospital = one client). Two figures
are reported, and neither is added to a site's sample-level ε_k (they protect different units):

- ε_c at δ_c, unit = one client (a whole site's data), against observers of the global model;
- the record-level figure against model observers: changing one record is a "replace one client's data" change
  (sensitivity 2S), i.e. the same composition at z/2.

The events live in the round records of the server history (checkpointed atomically with the round counter), so a
resumed server rebuilds the accountant from them and a round is never charged twice.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from mlip_fed.privacy.accountant import AccountedStep, EpsilonReport, compute_epsilon
from mlip_fed.privacy.randomness import secret_seed

StateDict = dict[str, Tensor]

#: Key of the per-round client-DP entry in a round record (results.json ``rounds[i]``).
CLIENT_DP_KEY = "client_dp"


@dataclass(frozen=True)
class ClientDPSettings:
    """The validated client-DP parameters (from ``FederationConfig``)."""

    noise_multiplier: float
    clipping_norm: float
    delta: float

    def __post_init__(self) -> None:
        if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier > 0):
            raise ValueError(f"federation.client_dp_noise_multiplier={self.noise_multiplier}: must be > 0")
        if not (math.isfinite(self.clipping_norm) and self.clipping_norm > 0):
            raise ValueError(f"federation.client_dp_clipping_norm={self.clipping_norm}: must be > 0")
        if not 0 < self.delta < 1:
            raise ValueError(f"federation.client_dp_delta={self.delta}: must be in (0, 1)")


def settings_from_config(fed: Any) -> ClientDPSettings | None:
    """``ClientDPSettings`` when ``fed.client_dp`` is on, else None; refuses a half-configured client DP.

    The noise multiplier and clipping norm have no defaults on purpose: both set the privacy/utility trade-off.
    FedProx and FedAdam are accepted: the proximal term only changes local training (the clip still bounds Δ_k) and
    FedAdam acts on the already-noised mean, which is post-processing.
    """
    if not fed.client_dp:
        return None
    missing = [
        f"federation.{name}"
        for name in ("client_dp_noise_multiplier", "client_dp_clipping_norm")
        if getattr(fed, name) is None
    ]
    if missing:
        raise ValueError(f"federation.client_dp=true needs {' and '.join(missing)} (no default: they set the privacy)")
    return ClientDPSettings(
        noise_multiplier=float(fed.client_dp_noise_multiplier),
        clipping_norm=float(fed.client_dp_clipping_norm),
        delta=float(fed.client_dp_delta),
    )


# ---------------------------------------------------------------------------------------------- mechanism
def _float_keys(reference: Mapping[str, Tensor]) -> list[str]:
    return [k for k, v in reference.items() if torch.is_floating_point(v)]


def update_delta(site: Mapping[str, Tensor], global_weights: Mapping[str, Tensor], index: int = 0) -> StateDict:
    """Δ_k = θ_k − θ_global in float64 over the floating-point tensors (the released weight vector)."""
    if set(site.keys()) != set(global_weights.keys()):
        missing = sorted(set(global_weights) - set(site))[:5]
        extra = sorted(set(site) - set(global_weights))[:5]
        raise ValueError(f"client DP: site update {index} has different keys (missing {missing}, extra {extra})")
    out: StateDict = {}
    for key in _float_keys(global_weights):
        ref, new = global_weights[key], site[key]
        if new.shape != ref.shape:
            raise ValueError(
                f"client DP: {key!r} has shape {tuple(new.shape)} in site update {index}, expected {tuple(ref.shape)}"
            )
        delta = new.detach().to(torch.float64) - ref.detach().to(torch.float64)
        if not torch.isfinite(delta).all():
            raise ValueError(f"client DP: site update {index} has non-finite values in {key!r}")
        out[key] = delta
    return out


def l2_norm(delta: Mapping[str, Tensor]) -> float:
    """Norm of the whole update vector (all tensors flattened together, not per layer)."""
    return math.sqrt(sum(float(t.pow(2).sum()) for t in delta.values()))


def clip_delta(delta: Mapping[str, Tensor], clipping_norm: float) -> tuple[StateDict, float, bool]:
    """Scale Δ by min(1, S/‖Δ‖₂); returns (clipped Δ, the norm before clipping, whether it was clipped)."""
    norm = l2_norm(delta)
    scale = min(1.0, clipping_norm / norm) if norm > 0 else 1.0
    return {k: v * scale for k, v in delta.items()}, norm, scale < 1.0


@dataclass
class ClientDPAggregate:
    """The noised equal-weight mean as new weights (θ_global + mean Δ + noise), and what the round reports."""

    weights: StateDict
    norms: list[float]
    clipped_fraction: float
    noise_std: float
    expected_sites: float


def dp_fedavg(
    global_weights: Mapping[str, Tensor],
    site_weights: Sequence[Mapping[str, Tensor]],
    settings: ClientDPSettings,
    *,
    expected_sites: float,
    generator: torch.Generator,
) -> ClientDPAggregate:
    """θ_global + (Σ_k clip(Δ_k, S)) / m + N(0, (z·S/m)²), with m the fixed expected number of sampled sites.

    m is fixed before anything arrives (the Poisson sample's expected size q*K, or the number of sites asked when
    every site takes part): fewer replies still divide by m (a dropped site contributes a zero update) and, under
    Poisson sampling, more sampled sites than m are divided by m too (McMahan et al. 2018's fixed-denominator
    estimator), which keeps the sensitivity at S/m whatever arrives. Integer buffers keep the global value:
    averaging them is meaningless and releasing a site's value would bypass the clip.
    """
    if not expected_sites > 0:
        raise ValueError(f"client DP: expected number of sampled sites must be > 0, got {expected_sites}")
    keys = _float_keys(global_weights)
    acc = {k: torch.zeros(global_weights[k].shape, dtype=torch.float64) for k in keys}
    norms: list[float] = []
    clipped = 0
    for index, site in enumerate(site_weights):
        delta, norm, was_clipped = clip_delta(update_delta(site, global_weights, index), settings.clipping_norm)
        norms.append(norm)
        clipped += int(was_clipped)
        for k in keys:
            acc[k] += delta[k]
    std = settings.noise_multiplier * settings.clipping_norm / expected_sites
    out: StateDict = {}
    for key, ref in global_weights.items():
        if key not in acc:
            out[key] = ref.detach().clone()
            continue
        noise = torch.randn(ref.shape, generator=generator, dtype=torch.float64) * std
        new = ref.detach().to(torch.float64) + acc[key] / expected_sites + noise
        out[key] = new.to(ref.dtype)
    fraction = clipped / len(site_weights) if site_weights else 0.0
    return ClientDPAggregate(
        weights=out, norms=norms, clipped_fraction=fraction, noise_std=std, expected_sites=expected_sites
    )


def noise_generator(seed: int | None, server_round: int) -> torch.Generator:
    """The round's noise stream, seeded from the server's OS entropy (``seed=None``, the default path).

    The server adds this noise, so only the server's own secret entropy may seed it: the experiment seed is in the
    run config every site composes (and in results.json), so a stream derived from (seed, round) can be regenerated
    and subtracted by any site or reader of the config. An int ``seed`` (the debug switch
    ``federation.client_dp_insecure_reproducible_noise``) gives that reproducible, NOT PRIVATE stream. A round
    re-aggregated after a server restart draws fresh noise: its first aggregate was never checkpointed nor sent.
    """
    if seed is None:
        return torch.Generator().manual_seed(secret_seed())
    return torch.Generator().manual_seed(seed * 1_000_003 + server_round * 7919 + 17)


# ---------------------------------------------------------------------------------------------- accountant
@dataclass(frozen=True)
class ClientDPEvent:
    """One aggregated round: a (possibly subsampled) Gaussian with noise multiplier z on the client unit."""

    server_round: int
    noise_multiplier: float
    sample_rate: float

    def __post_init__(self) -> None:
        if self.server_round < 1:
            raise ValueError(f"client DP event: server_round must be >= 1, got {self.server_round}")
        AccountedStep(self.noise_multiplier, self.sample_rate, 1)  # validates z > 0 and q in (0, 1]


class ClientDPAccountant:
    """ε_c (client unit) and the record-level figure (z/2) from the rounds aggregated so far, at δ_c.

    Uses the project's accountant (Opacus RDP at integer orders, and PRV; the larger is reported) with one step
    per round, so the numbers equal Google's dp-accounting RDP at the same orders.
    """

    def __init__(self, delta: float, events: Iterable[ClientDPEvent] = (), *, with_prv: bool = True) -> None:
        if not 0 < delta < 1:
            raise ValueError(f"client DP delta must be in (0, 1), got {delta}")
        self.delta = delta
        self.with_prv = with_prv
        self._events: dict[int, ClientDPEvent] = {}
        for event in events:
            self.record(event)

    @property
    def events(self) -> list[ClientDPEvent]:
        return [self._events[r] for r in sorted(self._events)]

    @property
    def rounds(self) -> int:
        return len(self._events)

    def record(self, event: ClientDPEvent) -> None:
        """Charge one round; a round already charged is refused (a retried round must not count twice)."""
        if event.server_round in self._events:
            raise ValueError(f"client DP: round {event.server_round} is already accounted")
        self._events[event.server_round] = event

    def steps(self, sensitivity_factor: float = 1.0) -> list[AccountedStep]:
        return [AccountedStep(e.noise_multiplier / sensitivity_factor, e.sample_rate, 1) for e in self.events]

    def client_report(self) -> EpsilonReport:
        """ε_c: one whole site's data added or removed, seen by observers of the global model."""
        return compute_epsilon(self.steps(1.0), self.delta, with_prv=self.with_prv)

    def record_report(self) -> EpsilonReport:
        """One record changed = one client's data replaced: sensitivity 2S, i.e. noise multiplier z/2."""
        return compute_epsilon(self.steps(2.0), self.delta, with_prv=self.with_prv)

    @classmethod
    def from_history(
        cls, history: Iterable[Mapping[str, Any]], delta: float, *, with_prv: bool = True
    ) -> ClientDPAccountant:
        """Rebuild from the round records of a checkpoint: each aggregated round under client DP is one event."""
        acc = cls(delta, with_prv=with_prv)
        for record in history:
            entry = record.get(CLIENT_DP_KEY)
            if entry is None:
                continue
            try:
                event = ClientDPEvent(
                    int(record["round"]), float(entry["noise_multiplier"]), float(entry["sample_rate"])
                )
            except (KeyError, TypeError, ValueError) as err:
                raise ValueError(
                    f"client DP: round record {record.get('round')!r} has a bad {CLIENT_DP_KEY!r} entry: {err}"
                ) from err
            acc.record(event)
        return acc


def check_history_consistent(history: Sequence[Mapping[str, Any]], enabled: bool, where: str) -> None:
    """Refuse to resume when client DP was switched on or off: ε_c would not describe the released model."""
    aggregated = [r for r in history if r.get("round", 0) > 0 and r.get("aggregated")]
    with_dp = [r["round"] for r in aggregated if CLIENT_DP_KEY in r]
    without = [r["round"] for r in aggregated if CLIENT_DP_KEY not in r]
    if enabled and without:
        raise ValueError(
            f"cannot resume {where} with federation.client_dp=true: rounds {without} were aggregated without client DP, "
            "so no client-level epsilon covers the model; start a new output dir"
        )
    if not enabled and with_dp:
        raise ValueError(
            f"cannot resume {where} with federation.client_dp=false: rounds {with_dp} used client DP; "
            "set federation.client_dp=true (same parameters) or start a new output dir"
        )


def round_entry(
    aggregate: ClientDPAggregate, settings: ClientDPSettings, sample_rate: float, accountant: ClientDPAccountant
) -> dict[str, Any]:
    """The ``client_dp`` entry of a round record (results.json), after the round was charged to ``accountant``."""
    client = accountant.client_report()
    record_level = accountant.record_report()
    return {
        "epsilon": client.epsilon,
        "delta": settings.delta,
        "noise_multiplier": settings.noise_multiplier,
        "clipping_norm": settings.clipping_norm,
        "clipped_fraction": aggregate.clipped_fraction,
        "sample_rate": sample_rate,
        "expected_sites": aggregate.expected_sites,
        "noise_std": aggregate.noise_std,
        "epsilon_rdp": client.rdp,
        "epsilon_prv": client.prv,
        "epsilon_record_vs_model_observers": record_level.epsilon,
        "rounds_accounted": accountant.rounds,
        "unit": "client (one site's data); record-level figure at noise multiplier z/2",
    }
