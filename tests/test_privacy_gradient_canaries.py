"""White-box Dirac gradient canaries: distinct reproducible directions, an included canary reaches the engine's
clipped sum with norm C (an excluded one does not), and the one-run bound separates noise off from real noise."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from torch import nn

from mlip_fed.cli.privacy import main as privacy_main
from mlip_fed.privacy.accountant import AccountedStep, compute_epsilon
from mlip_fed.privacy.canary import audit_scores
from mlip_fed.privacy.canary_run import canary_inclusion, default_guesses
from mlip_fed.privacy.engine import BucketedClippingGradient, UnitGradient, empty_batch
from mlip_fed.privacy.gradient_canaries import CanaryGradients, dirac_canaries, weight_decay_factor

TINY = [
    "experiment=smoke",
    "objectives=clip_only",
    "privacy=bucketed",
    "privacy.epsilon_budget=1",
    "data.image_size=32",
    "data.synthetic.num_sites=1",
    "data.synthetic.studies_per_site=8",
    "train.num_threads=1",
    "train.progress_bar=false",
]


def _mse(model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    loss = ((model(batch["image"]) - batch["target"]) ** 2).sum(dim=1).mean()
    return loss, {"mse": loss}


def _engine(model: nn.Module, sigma: float, extra: CanaryGradients | None, clip: float = 1.0, buckets: int = 4):
    return BucketedClippingGradient(
        model,
        noise_multiplier=sigma,
        clipping_norm=clip,
        num_buckets=buckets,
        mode="decomposable",
        loss_fn=_mse,
        extra_unit_gradients=extra,
        seed=1,
    )


def test_directions_are_distinct_and_reproducible() -> None:
    sizes = [7, 1, 30, 12]
    a = dirac_canaries(sizes, 40, seed=5)
    assert a == dirac_canaries(sizes, 40, seed=5)
    assert a != dirac_canaries(sizes, 40, seed=6)
    assert len({(c.param, c.index) for c in a}) == 40  # never the same coordinate twice
    assert all(0 <= c.index < sizes[c.param] and c.sign in (-1.0, 1.0) for c in a)
    assert len({c.param for c in a}) == 4  # spread over every parameter, not one
    assert len({(c.param, c.index) for c in dirac_canaries(sizes, 50, seed=0)}) == 50  # every coordinate once
    with pytest.raises(ValueError, match="distinct coordinates"):
        dirac_canaries(sizes, 51, seed=0)


def test_included_canary_reaches_the_clipped_sum_with_norm_c_and_excluded_does_not() -> None:
    torch.manual_seed(0)
    model = nn.Linear(6, 3)
    canaries = dirac_canaries([p.numel() for p in model.parameters()], 10, seed=2)
    included = np.array([True, False] * 5)
    extra = CanaryGradients(canaries, included, clipping_norm=0.5, sample_rate=1.0, seed=0)
    engine = _engine(model, sigma=0.0, extra=extra, clip=0.5, buckets=4)
    try:
        engine(model, empty_batch(), 1.0)  # a step that sampled no real record: only the canaries
    finally:
        engine.close()
    grads = [p.grad.reshape(-1) for p in engine.params]
    for c, inc in zip(canaries, included, strict=True):
        expected = c.sign * 0.5 / 4 if inc else 0.0  # clipped sum / M, noise off
        assert float(grads[c.param][c.index]) == pytest.approx(expected, rel=1e-5)
    total = torch.cat(grads)
    assert float(total.norm()) * 4 == pytest.approx(0.5 * np.sqrt(5), rel=1e-5)  # 5 included units of norm C each
    assert engine.last_stats is not None and engine.last_stats.extra_units == 5
    assert extra.sampled.tolist() == [1, 0] * 5


def test_an_oversized_unit_is_clipped_to_c() -> None:
    model = nn.Linear(2, 2)
    engine = _engine(model, sigma=0.0, extra=None, clip=1.0)
    try:
        summed = [torch.zeros_like(p) for p in engine.params]
        engine.add_extra_units(summed, [UnitGradient(0, torch.tensor([0, 3]), torch.tensor([30.0, 40.0]))])
        assert float(torch.cat([s.reshape(-1) for s in summed]).norm()) == pytest.approx(1.0, abs=1e-5)
        with pytest.raises(ValueError, match="parameter size 4"):
            engine.add_extra_units(summed, [UnitGradient(0, torch.tensor([4]), torch.tensor([1.0]))])
    finally:
        engine.close()


def test_poisson_draws_do_not_depend_on_the_coins() -> None:
    canaries = dirac_canaries([100], 20, seed=0)
    a = CanaryGradients(canaries, np.ones(20, bool), clipping_norm=1.0, sample_rate=0.3, seed=4)
    b = CanaryGradients(canaries, canary_inclusion(20, seed=1), clipping_norm=1.0, sample_rate=0.3, seed=4)
    for step in range(5):
        assert np.array_equal(a.draw(step), b.draw(step))
        assert {(u.param, int(u.index)) for u in b(step)} <= {(u.param, int(u.index)) for u in a(step)}
    assert 0 < a.sampled.sum() < 100  # q = 0.3 over 5 steps: some, not all


def _audit(sigma: float, m: int = 200, steps: int = 6, q: float = 0.8) -> tuple[float, int, int]:
    """Train a tiny linear model on random data with DP + canaries and the real AdamW; (eps_lb, correct, r)."""
    torch.manual_seed(0)
    model = nn.Linear(32, 32)
    params = [p for p in model.parameters() if p.requires_grad]
    included = canary_inclusion(m, seed=0)
    extra = CanaryGradients(
        dirac_canaries([p.numel() for p in params], m, seed=0), included, clipping_norm=1.0, sample_rate=q, seed=0
    )
    engine = _engine(model, sigma=sigma, extra=extra, buckets=8)
    optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.05)
    x, y = torch.randn(8, 32), torch.randn(8, 32)
    try:
        for step in range(steps):
            rows = torch.rand(8, generator=torch.Generator().manual_seed(step)) < q
            optimizer.zero_grad(set_to_none=True)
            engine(model, {"image": x[rows], "target": y[rows]}, 1.0)
            optimizer.step()
    finally:
        engine.close()
    scores = extra.scores(extra.first_moments(optimizer, params))
    result = audit_scores(scores, included, k_plus=m // 4, k_minus=m // 4, delta=1e-5)
    return result.epsilon_lower_bound, result.correct, result.guesses


def test_noise_off_is_caught_and_large_noise_is_not() -> None:
    sigma = 6.0
    claimed = compute_epsilon([AccountedStep(sigma / 1.0, 0.8, 6)], 1e-5).epsilon  # decomposable: factor 1
    eps_off, correct, guesses = _audit(sigma=0.0)
    assert correct == guesses  # every guess right: the canaries dominate their coordinates
    assert eps_off > 2 * claimed
    eps_dp, _, _ = _audit(sigma=sigma)
    assert eps_dp <= claimed


def test_weight_decay_factor() -> None:
    assert weight_decay_factor([0.1, 0.1], 0.5) == pytest.approx(0.95**2)
    assert weight_decay_factor([], 0.5) == 1.0


def test_gradient_canaries_catch_noise_off_on_synthcxr(tmp_path, capsys) -> None:
    """The default kind end to end on the real (tiny) MLIP model: noise off is caught, every guess is right."""
    out = tmp_path / "grad"
    code = privacy_main(
        ["canary-run", "--out", str(out), "--canaries", "200", "--steps", "3", "--noise-off", "--i-know-noise-is-off"]
        + ["--format", "json", f"data.root={tmp_path / 'data'}", *TINY]
    )
    report = json.loads(capsys.readouterr().out)
    assert report["kind"] == "gradient" and (report["k_plus"], report["k_minus"]) == default_guesses(200)
    assert report["correct"] == report["guesses"] == 100
    assert report["epsilon_lower_bound"] > 2 * report["claimed_epsilon"]
    assert code == 1 and not report["passed"]
    with open(out / "canaries.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    included = canary_inclusion(200, seed=0)
    assert [r["included"] == "1" for r in rows] == included.tolist()
    # q = 1: every included canary is in all 3 steps, no excluded one ever is
    assert all(int(r["sampled_steps"]) == (3 if inc else 0) for r, inc in zip(rows, included, strict=True))
    assert len({(r["parameter"], r["index"]) for r in rows}) == 200
