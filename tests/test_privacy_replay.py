"""A DP site answers each (run, round) once: a retry of the same request gets the stored reply byte for byte, a
different request for an answered round is refused, and a crash before the reply is stored re-runs the round
without a second charge. Keying retries on (run id, round) alone let a server resend round r with other weights and
get two releases (then with identical noise: their difference is the difference of the noiseless updates).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mlip_fed.config import ExperimentConfig
from mlip_fed.config_compose import compose_experiment
from mlip_fed.federation.payload import RoundRequest, SiteUpdate
from mlip_fed.federation.site import PRIVACY_LEDGER, RoundRefused, SiteRuntime, initial_global_state
from mlip_fed.privacy.ledger import PrivacyLedger

RUN_ID = "replay-run"


def _cfg() -> ExperimentConfig:
    return compose_experiment(
        [
            "experiment=smoke",
            "privacy=bucketed",
            "data.synthetic.studies_per_site=16",
            "train.max_steps=1",
            "train.num_threads=1",
            "privacy.epsilon_budget=60",
            "privacy.noise_multiplier=1.0",
            "privacy.prototype_noise_multiplier=3.0",
        ]
    )


def _request(cfg: ExperimentConfig, weights: dict[str, torch.Tensor] | None = None) -> RoundRequest:
    init, bank, _ = initial_global_state(cfg)
    keys = ("prototypes_image", "prototypes_text", "initialized")
    return RoundRequest(
        1,
        weights if weights is not None else init,
        {k: bank[k] for k in keys},
        {"server-round": 1, "run-id": RUN_ID, "num-rounds": 2, "local-epochs": 1},
    )


def reply_bytes(update: SiteUpdate) -> bytes:
    """Everything a reply carries, as bytes (what the codec would send)."""
    out = [json.dumps([update.site_id, update.num_examples, update.metrics], sort_keys=True).encode()]
    for group in (update.weights, update.bank_stats):
        for key in sorted(group):
            t = group[key].detach().cpu().contiguous()
            out.append(f"{key}:{t.dtype}:{tuple(t.shape)}".encode())
            out.append(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return b"|".join(out)


def _events(state_dir: Path) -> list[tuple[str, int, str, int]]:
    with PrivacyLedger(state_dir / PRIVACY_LEDGER) as ledger:
        return [(e.run_id, e.round, e.kind, e.steps) for e in ledger.events()]


@pytest.fixture(scope="module")
def answered(tmp_path_factory: pytest.TempPathFactory) -> tuple[SiteRuntime, RoundRequest, SiteUpdate]:
    torch.set_num_threads(1)
    cfg = _cfg()
    site = SiteRuntime(cfg, 0, tmp_path_factory.mktemp("replay") / "site_0", log=lambda line: None)
    request = _request(cfg)
    return site, request, site.train_round(request)


def test_same_request_returns_the_stored_reply_byte_for_byte(answered) -> None:
    site, request, first = answered
    before = _events(site.state_dir)
    again = site.train_round(_request(site.cfg))  # the same round and the same global weights, resent
    assert reply_bytes(again) == reply_bytes(first)
    assert _events(site.state_dir) == before  # nothing new charged


def test_restarted_site_process_returns_the_same_stored_reply(answered) -> None:
    site, _, first = answered
    restarted = SiteRuntime(site.cfg, 0, site.state_dir, log=lambda line: None)  # a new process, same state dir
    assert reply_bytes(restarted.train_round(_request(site.cfg))) == reply_bytes(first)


def test_other_weights_for_an_answered_round_are_refused(answered) -> None:
    site, request, _ = answered
    before = _events(site.state_dir)
    weights = {k: v.clone() for k, v in request.weights.items()}
    key = next(k for k, v in weights.items() if torch.is_floating_point(v))
    weights[key] += 1e-3
    with pytest.raises(RoundRefused, match=r"refused \(replay\)"):
        site.train_round(_request(site.cfg, weights))
    assert _events(site.state_dir) == before


def test_crash_before_the_reply_is_stored_reruns_once_without_a_second_charge(answered, tmp_path: Path) -> None:
    site, _, first = answered
    other = SiteRuntime(site.cfg, 0, tmp_path / "site_0", log=lambda line: None)
    real_weights = other._weights
    crashed: list[bool] = []

    def crash_once() -> dict[str, torch.Tensor]:
        if not crashed:
            crashed.append(True)
            raise RuntimeError("simulated crash after the ledger charge, before the reply exists")
        return real_weights()

    other._weights = crash_once  # type: ignore[method-assign]
    with pytest.raises(RuntimeError, match="simulated crash"):
        other.train_round(_request(site.cfg))
    charged = _events(other.state_dir)
    assert [e[2] for e in charged] == ["train", "prototype_release"]
    reply = other.train_round(_request(site.cfg))  # nothing left the site: the round runs again, charged once
    assert _events(other.state_dir) == charged
    assert reply_bytes(other.train_round(_request(site.cfg))) == reply_bytes(reply)
    # another process with the same public inputs (config, site, run id, round, weights) released other noise
    assert any(not torch.equal(reply.weights[k], first.weights[k]) for k in first.weights)
