"""Server-side aggregation: weight averaging, server optimisers (FedAvg / FedProx / FedAdam), bank merge.

The bank maths itself is ``PrototypeBank.merge`` (the model's); this module only feeds it site statistics.

Plain tensors in, plain tensors out, so the maths is tested without Flower and without a model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import torch
from torch import Tensor

from mlip_fed.model.objectives.prototype_bank import PrototypeBank

StateDict = dict[str, Tensor]


def weighted_average(states: Sequence[Mapping[str, Tensor]], weights: Sequence[float]) -> StateDict:
    """Example-weighted mean of site state dicts.

    Floating tensors are averaged in float64 and cast back, so the result does not depend on the
    order replies arrived in beyond rounding. Integer buffers (e.g. step counters) cannot be averaged
    meaningfully: they take the value of the site with the largest weight, ties broken by order.
    """
    if not states:
        raise ValueError("weighted_average: no site states to aggregate")
    if len(states) != len(weights):
        raise ValueError(f"weighted_average: {len(states)} states but {len(weights)} weights")
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"weighted_average: weights must be non-negative with a positive sum, got {list(weights)}")
    keys = list(states[0].keys())
    for index, state in enumerate(states[1:], start=1):
        if set(state.keys()) != set(keys):
            missing = sorted(set(keys) - set(state.keys()))[:5]
            extra = sorted(set(state.keys()) - set(keys))[:5]
            raise ValueError(f"weighted_average: state {index} has different keys (missing {missing}, extra {extra})")
    total = float(sum(weights))
    heaviest = max(range(len(weights)), key=lambda i: (weights[i], -i))
    out: StateDict = {}
    for key in keys:
        ref = states[0][key]
        for index, state in enumerate(states):
            if state[key].shape != ref.shape:
                raise ValueError(
                    f"weighted_average: {key!r} has shape {tuple(state[key].shape)} in state {index}, "
                    f"expected {tuple(ref.shape)}"
                )
        if not torch.is_floating_point(ref):
            out[key] = states[heaviest][key].clone()
            continue
        acc = torch.zeros(ref.shape, dtype=torch.float64)
        for state, weight in zip(states, weights, strict=True):
            acc += state[key].detach().to(torch.float64) * (weight / total)
        out[key] = acc.to(ref.dtype)
    return out


class ServerOptimizer(Protocol):
    """Turns the averaged site weights into the next global weights; its state is checkpointed."""

    name: str

    def step(self, current: Mapping[str, Tensor], averaged: Mapping[str, Tensor]) -> StateDict: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...


class FedAvgOptimizer:
    """FedAvg (and FedProx, whose difference is the sites' proximal term): the average is the new model."""

    name = "fedavg"

    def step(self, current: Mapping[str, Tensor], averaged: Mapping[str, Tensor]) -> StateDict:
        return {k: v.clone() for k, v in averaged.items()}

    def state_dict(self) -> dict[str, Any]:
        return {"name": self.name}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("name") not in ("fedavg", "fedprox"):
            raise ValueError(f"server optimiser state is for {state.get('name')!r}, not {self.name!r}")


class FedAdamOptimizer:
    """FedAdam (Reddi et al., 2021, Alg. 2): Adam on the pseudo-gradient ``averaged - current``.

    Same update as Flower's ``FedAdam`` (no bias correction, ``tau`` inside the square root's
    denominator), reimplemented here because the moments must live in our checkpoint.
    Integer buffers bypass the optimiser and take the averaged value.
    """

    name = "fedadam"

    def __init__(self, lr: float, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3) -> None:
        if lr <= 0 or not 0 <= beta1 < 1 or not 0 <= beta2 < 1 or tau <= 0:
            raise ValueError(f"FedAdam: invalid lr={lr}, beta1={beta1}, beta2={beta2}, tau={tau}")
        self.lr, self.beta1, self.beta2, self.tau = lr, beta1, beta2, tau
        self.m: StateDict = {}
        self.v: StateDict = {}

    def step(self, current: Mapping[str, Tensor], averaged: Mapping[str, Tensor]) -> StateDict:
        out: StateDict = {}
        for key, avg in averaged.items():
            if not torch.is_floating_point(avg):
                out[key] = avg.clone()
                continue
            cur = current[key].to(torch.float64)
            delta = avg.to(torch.float64) - cur
            m = self.m.get(key, torch.zeros_like(delta))
            v = self.v.get(key, torch.zeros_like(delta))
            m = self.beta1 * m + (1 - self.beta1) * delta
            v = self.beta2 * v + (1 - self.beta2) * delta * delta
            self.m[key], self.v[key] = m, v
            out[key] = (cur + self.lr * m / (v.sqrt() + self.tau)).to(avg.dtype)
        return out

    def state_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "hparams": {"lr": self.lr, "beta1": self.beta1, "beta2": self.beta2, "tau": self.tau},
            "m": {k: v.clone() for k, v in self.m.items()},
            "v": {k: v.clone() for k, v in self.v.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("name") != self.name:
            raise ValueError(f"server optimiser state is for {state.get('name')!r}, not {self.name!r}")
        self.m = {k: v.clone() for k, v in state["m"].items()}
        self.v = {k: v.clone() for k, v in state["v"].items()}


def build_server_optimizer(strategy: str, server_lr: float) -> ServerOptimizer:
    if strategy in ("fedavg", "fedprox"):
        return FedAvgOptimizer()
    if strategy == "fedadam":
        return FedAdamOptimizer(lr=server_lr)
    raise ValueError(f"federation.strategy={strategy!r}: expected 'fedavg', 'fedprox' or 'fedadam'")


#: What the server sends of the global bank (sites' own sums/counts start at zero each round).
BANK_GLOBAL_KEYS = ("prototypes_image", "prototypes_text", "initialized")
#: What a site releases of its bank: per-category sums of unit-norm embeddings and member counts.
BANK_STAT_KEYS = ("sum_image", "sum_text", "count")


def merge_site_banks(
    global_state: Mapping[str, Tensor], site_stats: Sequence[Mapping[str, Tensor]], min_count: float
) -> tuple[dict[str, Tensor], Tensor]:
    """Pool the sites' (sums, counts) into the global bank with ``PrototypeBank.merge``.

    Count-weighted means over all members pooled (not a mean of site means), renormalised to the
    unit sphere; a category whose pooled count is below ``min_count`` keeps its previous value.
    Returns the new global bank state (statistics zeroed) and the [K] mask of updated categories.
    """
    dim = int(global_state["prototypes_image"].shape[1])
    bank = PrototypeBank(dim=dim, min_count=min_count)
    bank.load_state_dict(dict(global_state))
    others = []
    for index, stats in enumerate(site_stats):
        missing = [k for k in BANK_STAT_KEYS if k not in stats]
        if missing:
            raise ValueError(f"merge_site_banks: site {index} statistics lack {missing}")
        site = PrototypeBank(dim=dim, min_count=min_count)
        site.load_state_dict({**site.state_dict(), **{k: stats[k] for k in BANK_STAT_KEYS}})
        if not all(torch.isfinite(getattr(site, k)).all() for k in BANK_STAT_KEYS):
            raise ValueError(f"merge_site_banks: site {index} sent non-finite bank statistics")
        others.append(site)
    updated = bank.merge(others)
    bank.reset_statistics()
    return bank.state_dict(), updated


def state_nbytes(state: Mapping[str, Tensor]) -> int:
    """Payload size of a state dict as it travels (element bytes, no framing)."""
    return int(sum(t.numel() * t.element_size() for t in state.values()))
