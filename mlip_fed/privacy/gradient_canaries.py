"""White-box Dirac gradient canaries for the one-run audit (Steinke, Nasr & Jagielski 2023, white-box setting).

Why white-box: input-space canaries (a random image with random words) must be memorised by the model
before a score can see them, which a few DP-SGD steps on 2 CPU cores do not do; the audit then has no power
even against a mechanism with no noise at all. A Dirac canary skips that: canary i is a privacy unit (a
bucket of its own) whose gradient is fixed, ``C * sign_i * e_{k_i}`` on one parameter coordinate k_i that no
other canary uses. ``CanaryGradients`` is passed to ``SitePrivacy.gradient_fn(model, extra_unit_gradients=...)``:
an included canary is Poisson-sampled into each step with the run's q, exactly like a real unit, and the
engine clips it and adds it to the clipped sum *before* its Gaussian noise. What is audited is therefore
the engine's noise, its normalisation and the accountant's epsilon for those steps; not the bucketing of
real data (a canary is its own bucket by construction, so its sensitivity is C, not the 2C of a patient
joining an occupied bucket that bucketed accounting charges).

Score: s_i = sign_i * m_T[k], AdamW's first moment (``exp_avg``) at the canary's coordinate after the last
step, i.e. a fixed linear combination (weights (1 - beta1) beta1^(T-t)) of the coordinate's released noisy
gradients: canary + real data + noise. Why not the parameter change (theta_T - theta_0)[k] * (-sign_i):
AdamW divides each coordinate's step by that coordinate's own RMS gradient, so an excluded canary whose
coordinate sees a small but consistent real-data gradient moves as far as an included one (measured on
SynthCXR with noise off, 4 steps: 389/500 correct guesses with the parameter change). The first moment keeps the
magnitudes: with noise off an included canary's C/M dwarfs the real-data gradient on one coordinate. AdamW
is coordinate-wise, so coordinate k's state depends only on the gradient sequence at k and canaries do not
interfere. Both the moment and the parameters are functions of the noisy gradients the mechanism releases
(post-processing), so the bound is sound with either score; the choice only buys power. The parameter change
(after removing the decoupled weight decay D = prod_t (1 - lr_t wd), the same for every coordinate) is kept
in ``canaries.csv`` for inspection. The random sign makes the real-data drift symmetric for excluded canaries.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from mlip_fed.privacy.engine import UnitGradient
from mlip_fed.privacy.randomness import public_seed


@dataclass(frozen=True)
class DiracCanary:
    """Canary i: gradient ``sign * C`` at flat position ``index`` of trainable parameter number ``param``."""

    param: int
    index: int
    sign: float


def dirac_canaries(param_sizes: Sequence[int], m: int, seed: int) -> list[DiracCanary]:
    """m canaries on m distinct coordinates drawn uniformly over all trainable coordinates, random signs."""
    total = int(sum(param_sizes))
    if m < 2:
        raise ValueError(f"the audit needs at least 2 canaries, got m={m}")
    if m > total:
        raise ValueError(f"{m} Dirac canaries need {m} distinct coordinates; the model has {total} trainable ones")
    rng = np.random.default_rng(public_seed("dirac-canaries", seed))
    flat = rng.choice(total, size=m, replace=False)
    signs = np.where(rng.random(m) < 0.5, -1.0, 1.0)
    offsets = np.cumsum([0, *param_sizes])
    params = np.searchsorted(offsets, flat, side="right") - 1
    return [DiracCanary(int(p), int(f - offsets[p]), float(s)) for p, f, s in zip(params, flat, signs, strict=True)]


class CanaryGradients:
    """``ExtraUnitGradients`` for ``BucketedClippingGradient``: the included canaries, Poisson-sampled per step.

    Every canary's Poisson draw is made at every step whether or not it is included, from a stream seeded by
    (seed, step), so the coins do not change which other canaries are sampled. ``sampled[i]`` counts the steps
    canary i contributed to (0 for excluded canaries).
    """

    def __init__(
        self,
        canaries: Sequence[DiracCanary],
        included: np.ndarray,
        *,
        clipping_norm: float,
        sample_rate: float,
        seed: int,
    ) -> None:
        if len(canaries) != len(included):
            raise ValueError(f"{len(canaries)} canaries but {len(included)} inclusion bits")
        if not 0 < sample_rate <= 1:
            raise ValueError(f"canary sample_rate must be in (0, 1], got {sample_rate}")
        self.canaries = list(canaries)
        self.included = np.asarray(included, dtype=bool)
        self.clipping_norm = clipping_norm
        self.sample_rate = sample_rate
        self.seed = seed
        self.sampled = np.zeros(len(canaries), dtype=int)

    def draw(self, step: int) -> np.ndarray:
        """Which canaries (included or not) the step's Poisson draw selects: bool [m]."""
        rng = np.random.default_rng(public_seed("canary-steps", self.seed, step))
        return rng.random(len(self.canaries)) < self.sample_rate

    def __call__(self, step: int) -> list[UnitGradient]:
        chosen = np.flatnonzero(self.draw(step) & self.included)
        self.sampled[chosen] += 1
        return [
            UnitGradient(
                c.param,
                torch.tensor([c.index], dtype=torch.long),
                torch.tensor([c.sign * self.clipping_norm], dtype=torch.float64),
            )
            for c in (self.canaries[i] for i in chosen)
        ]

    def coordinates(self, params: Sequence[nn.Parameter]) -> np.ndarray:
        """The current value of every canary coordinate: float64 [m]."""
        flat = [p.detach().reshape(-1) for p in params]
        return np.array([float(flat[c.param][c.index]) for c in self.canaries], dtype=np.float64)

    def first_moments(self, optimizer: torch.optim.Optimizer, params: Sequence[nn.Parameter]) -> np.ndarray:
        """AdamW's ``exp_avg`` at every canary coordinate: float64 [m] (an error if the optimizer has none)."""
        moments = []
        for p in params:
            state = optimizer.state.get(p, {})
            if "exp_avg" not in state:
                raise ValueError(
                    f"gradient canaries score AdamW's first moment; optimizer {type(optimizer).__name__} has no "
                    "'exp_avg' state for a trainable parameter (did training run at least one step?)"
                )
            moments.append(state["exp_avg"].detach().reshape(-1))
        return np.array([float(moments[c.param][c.index]) for c in self.canaries], dtype=np.float64)

    def signs(self) -> np.ndarray:
        return np.array([c.sign for c in self.canaries])

    def scores(self, first_moments: np.ndarray) -> np.ndarray:
        """sign * exp_avg: the smoothed released gradient at each coordinate along the canary's direction."""
        return np.asarray(first_moments, dtype=np.float64) * self.signs()

    def parameter_moves(self, initial: np.ndarray, final: np.ndarray, decay: float = 1.0) -> np.ndarray:
        """(theta_T - decay * theta_0) . (-direction): how far each coordinate moved against its canary."""
        return -(np.asarray(final) - decay * np.asarray(initial)) * self.signs()


def weight_decay_factor(lrs: Sequence[float], weight_decay: float) -> float:
    """AdamW multiplies every parameter by (1 - lr_t * wd) at each step, before the Adam update."""
    return float(np.prod([1.0 - lr * weight_decay for lr in lrs]))


__all__ = ["CanaryGradients", "DiracCanary", "dirac_canaries", "weight_decay_factor"]
