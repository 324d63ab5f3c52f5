"""DP randomness must be secret from the server: regenerating it from values the server knows must fail.

The attacker here is the honest-but-curious server of docs/privacy.md: it knows the code, the experiment config
(``cfg.seed``), the site id, the run id it chose and the round, and it sees the site's release. Before the fix every
DP draw was seeded from exactly those values, so released - regenerated noise was the noiseless clipped sum. Each test
runs the attack twice: with the default policy (must fail: error of the order of the noise) and with the debug switch
``insecure_reproducible_noise`` (must succeed: the test has teeth), which must also warn and mark the ledger.
"""

from __future__ import annotations

import hashlib
import logging
import random
from pathlib import Path

import torch
from torch import nn

from mlip_fed.config import ExperimentConfig, FederationConfig, PrivacyPolicy
from mlip_fed.federation.coordinator import FederationCoordinator
from mlip_fed.federation.payload import SiteUpdate
from mlip_fed.model.objectives.prototype_bank import PrototypeBank
from mlip_fed.model.outputs import LossOutput
from mlip_fed.privacy.audit import build_report
from mlip_fed.privacy.buckets import bucket_ids
from mlip_fed.privacy.site_privacy import SitePrivacy

CFG_SEED, SITE_ID, RUN_ID, ROUND = 0, "site_0", "smoke-0123456789ab", 1
SIGMA, CLIP, BUCKETS = 1.5, 1.0, 4


def blake(*parts: object) -> int:
    """The public seed derivation the site used (``engine._seed``): what an attacker reimplements from the code."""
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % (2**63)


def normal_stream(seed: int, shapes: list[torch.Size], std: float, secure: bool) -> list[torch.Tensor]:
    """The attacker's regeneration of a seeded noise stream (plain draws, or Opacus-style secure draws)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for shape in shapes:
        if not secure:
            out.append(torch.normal(0.0, std, size=tuple(shape), generator=g))
            continue
        torch.normal(0.0, std, size=(1,), generator=g)
        total = torch.zeros(shape)
        for _ in range(4):
            total += torch.normal(0.0, std, size=tuple(shape), generator=g)
        out.append(total / 2)
    return out


#: What the site passes to SitePrivacy as its seed: a function of public values only.
PUBLIC_ROUND_SEED = blake(CFG_SEED, SITE_ID, RUN_ID, ROUND)


class Regression(nn.Module):
    """A decomposable toy loss (mean of per-sample squared errors) that a bucketed engine can hook."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.linear = nn.Linear(5, 3)

    def forward(self, batch: dict) -> LossOutput:
        loss = ((self.linear(batch["image"]) - batch["target"]) ** 2).sum(dim=1).mean()
        return LossOutput(total=loss, parts={"mse": loss})


def _policy(insecure: bool, **extra: object) -> PrivacyPolicy:
    fields = {
        "mechanism": "bucketed",
        "epsilon_budget": 1e4,
        "delta": 1e-5,
        "noise_multiplier": SIGMA,
        "clipping_norm": CLIP,
        "num_buckets": BUCKETS,
        "prototype_noise_multiplier": 2.0,
        "prototype_count_threshold": 0.0,
        **extra,
    }
    if insecure:
        fields["insecure_reproducible_noise"] = True
    return PrivacyPolicy(**fields)


def _site_privacy(tmp_path: Path, policy: PrivacyPolicy) -> SitePrivacy:
    """Built exactly as ``SiteRuntime._train_round_dp`` builds it, with the public round seed it passes."""
    return SitePrivacy(
        policy, tmp_path / "ledger.sqlite", num_records=10**6, run_id=RUN_ID, site=SITE_ID, seed=PUBLIC_ROUND_SEED
    )


def _batch() -> dict:
    g = torch.Generator().manual_seed(3)
    patients = [f"p{i}" for i in range(12)]
    return {
        "image": torch.randn(12, 5, generator=g),
        "target": 5 * torch.randn(12, 3, generator=g),  # large errors: every bucket is clipped
        "patient_id": patients,
        "group_ids": bucket_ids(patients, BUCKETS),
    }


def _gradient_attack_error(sp: SitePrivacy, secure: bool) -> tuple[float, float]:
    """(|released sum - regenerated noise - true clipped sum|, expected noise norm) for one noise step."""
    model = Regression()
    engine = sp.gradient_fn(model)
    try:
        true, _ = engine.clipped_sum(_batch())
        engine(model, _batch(), 1.0)
        released = [p.grad.detach() * BUCKETS for p in engine.params]  # the engine divides by M, a public constant
    finally:
        engine.close()
    noise_seed = blake("noise", blake(PUBLIC_ROUND_SEED, RUN_ID))
    regenerated = normal_stream(noise_seed, [p.shape for p in engine.params], SIGMA * CLIP, secure)
    error = torch.cat([(r - n - t).flatten() for r, n, t in zip(released, regenerated, true, strict=True)])
    dims = sum(p.numel() for p in engine.params)
    return float(error.norm()), SIGMA * CLIP * dims**0.5


def test_default_gradient_noise_is_not_recoverable_from_public_values(tmp_path: Path) -> None:
    sp = _site_privacy(tmp_path, _policy(insecure=False))
    for secure in (False, True):  # whichever way the attacker assumes the draws are made
        error, noise_norm = _gradient_attack_error(sp, secure)
        assert error > 0.5 * noise_norm, f"regenerated noise recovered the clipped sum (error {error:.3g})"
    sp.close()


def test_insecure_switch_makes_noise_recoverable_warns_and_marks_the_ledger(tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.WARNING, logger="mlip_fed.privacy")
    sp = _site_privacy(tmp_path, _policy(insecure=True))
    error, noise_norm = _gradient_attack_error(sp, secure=True)
    assert error < 1e-4 * noise_norm  # the debug switch really replays the public stream: the attack works
    assert any(
        "insecure_reproducible_noise" in r.getMessage() and "NOT PRIVATE" in r.getMessage() for r in caplog.records
    )
    sp.record_training(ROUND, steps=1, sample_rate=0.5)
    assert sp.ledger.events()[0].details["noise_source"] == "insecure_reproducible"
    report = build_report(sp.ledger)
    assert report["private"] is False
    assert any(w.startswith("NOT PRIVATE") for w in report["warnings"])
    sp.close()


def _poisson_attack_hits(sp: SitePrivacy, steps: int = 8) -> int:
    """How many of ``steps`` Poisson draws the attacker predicts exactly from the public seed."""
    patients = [f"p{i}" for i in range(40)]
    loader = sp.poisson_loader(list(range(40)), lambda items: items, patients, 0.5)
    hits = 0
    for step in range(steps):
        g = torch.Generator().manual_seed(blake("poisson", PUBLIC_ROUND_SEED, 0, step))
        predicted = (torch.rand(40, generator=g) < 0.5).nonzero(as_tuple=True)[0].tolist()
        hits += int(predicted == loader.sample_indices(0, step))
    return hits


def test_poisson_sample_is_secret_unless_the_debug_switch_is_on(tmp_path: Path) -> None:
    secret = _site_privacy(tmp_path / "a", _policy(insecure=False))
    assert _poisson_attack_hits(secret) == 0
    secret.close()
    insecure = _site_privacy(tmp_path / "b", _policy(insecure=True))
    assert _poisson_attack_hits(insecure) == 8
    insecure.close()


def _release_attack_error(sp: SitePrivacy, secure: bool) -> tuple[float, float]:
    bank = PrototypeBank(dim=8)
    g = torch.Generator().manual_seed(7)
    bank.sum_image = torch.randn(14, 8, generator=g)
    bank.sum_text = torch.randn(14, 8, generator=g)
    bank.count = torch.full((14,), 1000.0)  # every category kept: the whole release is observable
    release = sp.release_bank(bank, ROUND)
    shapes = [bank.sum_image.shape, bank.sum_text.shape, bank.count.shape]
    noise = normal_stream(blake("release", PUBLIC_ROUND_SEED, RUN_ID), shapes, 2.0, secure)
    released = [release.sum_image, release.sum_text, release.count]
    raw = [bank.sum_image, bank.sum_text, bank.count]
    error = torch.cat([(r - n - t).flatten() for r, n, t in zip(released, noise, raw, strict=True)])
    return float(error.norm()), 2.0 * sum(torch.Size(s).numel() for s in shapes) ** 0.5


def test_prototype_release_noise_is_secret_unless_the_debug_switch_is_on(tmp_path: Path) -> None:
    for secure in (False, True):  # a fresh site each time: the attacker regenerates the stream from its start
        secret = _site_privacy(tmp_path / f"a{secure}", _policy(insecure=False))
        error, noise_norm = _release_attack_error(secret, secure)
        assert error > 0.5 * noise_norm
        secret.close()
    insecure = _site_privacy(tmp_path / "b", _policy(insecure=True))
    error, noise_norm = _release_attack_error(insecure, secure=True)
    assert error < 1e-4 * noise_norm
    insecure.close()


# ---------------------------------------------------------------------------------------------- client-level DP
def _client_dp_coordinator(tmp_path: Path, **federation: object) -> tuple[FederationCoordinator, list[str]]:
    fed = FederationConfig(
        client_dp=True, client_dp_noise_multiplier=1.0, client_dp_clipping_norm=1.0, num_rounds=2, **federation
    )
    lines: list[str] = []
    coordinator = FederationCoordinator(
        # Sites under sample-level DP: client DP refuses sites whose prototype banks nothing would cover.
        ExperimentConfig(
            federation=fed, seed=CFG_SEED, privacy=PrivacyPolicy(mechanism="bucketed", epsilon_budget=8.0)
        ),
        tmp_path / "server",
        initial_weights={"w": torch.zeros(400)},
        initial_bank=PrototypeBank(dim=4).state_dict(),
        log=lines.append,
    )
    return coordinator, lines


def _client_dp_attack_error(coordinator: FederationCoordinator) -> tuple[float, float]:
    """Aggregate two (unclipped, small) updates; subtract the noise regenerated from (cfg.seed, round)."""
    counts = torch.zeros(14)
    updates = [
        SiteUpdate(
            f"s{i}",
            1,
            {"w": torch.full((400,), 1e-3 * (i + 1))},
            {"sum_image": torch.zeros(14, 4), "sum_text": torch.zeros(14, 4), "count": counts},
            {},
        )
        for i in range(2)
    ]
    coordinator.start()
    coordinator.complete_round(1, updates, [], num_sampled=2)
    std = 1.0 * 1.0 / 2
    g = torch.Generator().manual_seed(CFG_SEED * 1_000_003 + 1 * 7919 + 17)
    regenerated = torch.randn(400, generator=g, dtype=torch.float64) * std
    true_mean = torch.full((400,), 1.5e-3, dtype=torch.float64)
    error = coordinator.state.weights["w"].double() - regenerated - true_mean
    return float(error.norm()), std * 400**0.5


def test_client_dp_noise_is_the_servers_secret(tmp_path: Path) -> None:
    coordinator, _ = _client_dp_coordinator(tmp_path / "a")
    error, noise_norm = _client_dp_attack_error(coordinator)
    assert error > 0.5 * noise_norm
    insecure, lines = _client_dp_coordinator(tmp_path / "b", client_dp_insecure_reproducible_noise=True)
    error, noise_norm = _client_dp_attack_error(insecure)
    assert error < 1e-4 * noise_norm
    assert any("client_dp_insecure_reproducible_noise" in line and "NOT PRIVATE" in line for line in lines)
    assert insecure.state.history[-1]["client_dp"]["noise_source"] == "insecure_reproducible"


def test_client_dp_site_sample_is_secret(tmp_path: Path) -> None:
    """Amplification by sampling (q = m/K) needs a sample the model's observers cannot predict from cfg.seed."""
    coordinator, _ = _client_dp_coordinator(tmp_path, fraction_train=0.5)
    nodes = list(range(100, 120))
    hits = 0
    for rnd in range(1, 9):
        predicted = sorted(random.Random(CFG_SEED * 100_003 + rnd).sample(nodes, 10))
        hits += int(predicted == coordinator.select_nodes(nodes, rnd))
    assert hits == 0


def test_audit_flags_ledgers_written_before_these_fixes(tmp_path: Path) -> None:
    """Events from earlier versions: no noise_source (public-seeded noise), decomposable clipped per record but
    charged per patient, a prototype release that summed studies. The audit must say NOT PRIVATE / UNDER-COUNTED."""
    from mlip_fed.privacy.ledger import LedgerEvent, PrivacyLedger

    with PrivacyLedger(tmp_path / "old.sqlite") as ledger:
        ledger.set_meta("policy", {"delta": 1e-5, "epsilon_budget": 8.0, "privacy_unit": "patient"})
        ledger.set_meta("secure_mode", False)
        old = {"clipping": "per_record", "unit": "patient", "poisson_sampling": True, "secure_mode": False}
        ledger.record(LedgerEvent("old-run", 1, "train", "decomposable", 1.0, 1.0, 0.1, 5, details=old))
        ledger.record(LedgerEvent("old-run", 1, "prototype_release", "gaussian", 20.0, 3.0, 1.0, 1, details={}))
        report = build_report(ledger)
    assert report["private"] is False
    assert report["warnings"][0].startswith("NOT PRIVATE") and "old-run round 1" in report["warnings"][0]
    assert sum("UNDER-COUNTED" in w for w in report["warnings"]) == 2
