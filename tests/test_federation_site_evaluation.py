"""Evaluation where the data is: a site scores the global model on its own split, its policy decides whether the
metrics leave it, the server aggregates by test studies and names the sites that did not evaluate."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import fake_coordinator, round_request, site_update

from mlip_fed.config import ExperimentConfig, PrivacyPolicy
from mlip_fed.config_compose import compose_experiment
from mlip_fed.federation.payload import RoundRequest, SiteEvaluation, SiteFailure, format_site_error
from mlip_fed.federation.site import RoundRefused, SiteRuntime
from mlip_fed.federation.site_evaluation import (
    aggregate_site_evaluations,
    probe_fractions,
    probe_train_subset,
)
from mlip_wire.codec import decode_evaluation, encode_evaluation


# ---------------------------------------------------------------------------------------------- aggregation
def test_aggregate_weights_by_test_studies_skips_undefined_and_sums_counts() -> None:
    evaluations = [
        SiteEvaluation("site_1", 300, {"auroc": 0.9, "r_at_5": 0.1, "n_test": 300.0, "n_probe_train": 900.0}),
        SiteEvaluation("site_0", 100, {"auroc": 0.5, "r_at_5": math.nan, "n_test": 100.0, "n_probe_train": 50.0}),
    ]
    failure = SiteFailure(3, "site_2", 9, "error reply: [site=site_2] RoundRefused: refused (evaluation)")
    agg = aggregate_site_evaluations(evaluations, [failure])
    assert agg["metrics"]["auroc"] == pytest.approx((0.9 * 300 + 0.5 * 100) / 400)
    assert agg["metrics"]["r_at_5"] == pytest.approx(0.1)  # site_0 could not compute it: left out, not a zero
    assert agg["metrics"]["n_test"] == 400.0 and agg["metrics"]["n_probe_train"] == 950.0
    assert agg["num_sites"] == 2 and agg["num_examples"] == 400
    assert [s["site_id"] for s in agg["sites"]] == ["site_0", "site_1"]  # per-site figures kept, in a fixed order
    assert agg["failures"] == [failure.as_dict()]


def test_a_metric_no_site_computed_is_undefined() -> None:
    agg = aggregate_site_evaluations([SiteEvaluation("a", 10, {"auroc": math.nan})])
    assert math.isnan(agg["metrics"]["auroc"])
    assert aggregate_site_evaluations([])["num_sites"] == 0


def test_probe_fractions_need_enough_labelled_studies() -> None:
    assert probe_fractions((0.01, 0.1, 1.0), 2000, 5) == (0.01, 0.1, 1.0)
    assert probe_fractions((0.01, 0.1, 1.0), 150, 5) == (0.1, 1.0)  # 1 % of 150 is 2 studies
    assert probe_fractions((0.01, 0.1, 1.0), 9, 5) == ()


def test_probe_train_subset_is_seeded_and_capped() -> None:
    items = list(range(50))
    first = probe_train_subset(items, 20, seed=3)  # type: ignore[arg-type]
    assert len(first) == 20 and first == sorted(first) and first == probe_train_subset(items, 20, seed=3)  # type: ignore[arg-type]
    assert probe_train_subset(items, 100, seed=3) == items  # type: ignore[arg-type]


def test_evaluation_reply_round_trips_through_the_wire_format() -> None:
    sent = SiteEvaluation("site_4", 123, {"auroc": 0.75, "linear_probe/macro_auroc@0.1": math.nan, "n_test": 123.0})
    back = decode_evaluation(encode_evaluation(sent))
    assert back.site_id == "site_4" and back.num_examples == 123
    assert back.metrics["auroc"] == 0.75 and math.isnan(back.metrics["linear_probe/macro_auroc@0.1"])


# ---------------------------------------------------------------------------------------------- coordinator
def test_coordinator_asks_the_sites_at_round_zero_every_k_and_last(tmp_path: Path) -> None:
    asked: list[RoundRequest] = []

    def sites(request: RoundRequest) -> tuple[list[SiteEvaluation], list[SiteFailure]]:
        asked.append(request)
        w = float(request.weights["w"].mean())
        failure = SiteFailure(request.server_round, "site_2", 7, "no reply before the round timeout")
        return [SiteEvaluation("site_0", 50, {"auroc": 0.5 + w, "r_at_5": 0.2, "n_test": 50.0})], [failure]

    log: list[str] = []
    coord = fake_coordinator(
        tmp_path, server_evaluation=False, site_evaluator=sites, log=log.append, num_rounds=3, evaluate_every=2
    )
    coord.start()
    for rnd in coord.remaining_rounds():
        coord.complete_round(rnd, [site_update("site_0", 0.1 * rnd, 10)], [], num_sampled=1)
    coord.finish()
    assert [r.server_round for r in asked] == [0, 2, 3]
    assert asked[0].config["run-id"] == coord.run_id and torch.equal(asked[1].weights["w"], torch.full((2,), 0.2))
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    rounds = {r["round"]: r for r in results["rounds"]}
    assert "site_eval" not in rounds[1] and "eval" not in rounds[2]  # no server evaluator was given
    assert rounds[2]["site_eval"]["metrics"]["auroc"] == pytest.approx(0.7)
    assert rounds[2]["site_eval"]["failures"][0]["site_id"] == "site_2"
    assert results["baseline_site_eval"]["auroc"] == pytest.approx(0.5)
    assert results["final_site_eval"]["auroc"] == pytest.approx(0.8)
    assert any("round 2 evaluated at 1 site(s) on 50 test studies: AUROC 0.7000" in line for line in log)
    assert any("not evaluated: site_2 (no reply before the round timeout)" in line for line in log)
    table_rows = [line for line in log if line.split()[:1] == ["3"]]
    assert table_rows and "0.8000" in table_rows[0]  # the round table's AUROC column is the sites' aggregate


def test_deployed_default_evaluates_at_the_sites_not_the_server() -> None:
    fed = ExperimentConfig().federation
    assert fed.site_evaluation and not fed.server_evaluation


# ---------------------------------------------------------------------------------------------- one site's data
def _site_cfg(*extra: str) -> ExperimentConfig:
    return compose_experiment(
        [
            "experiment=smoke",
            "data.synthetic.studies_per_site=120",
            "train.max_steps=2",
            "train.num_threads=1",
            "eval.zero_shot.enabled=true",
            *extra,
        ]
    )


def _request(cfg: ExperimentConfig, server_round: int) -> RoundRequest:
    return round_request(cfg, server_round, "r", 2)


def test_site_scores_the_global_model_on_its_own_split_and_then_trains_on(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    cfg = _site_cfg()
    lines: list[str] = []
    site = SiteRuntime(cfg, 0, tmp_path / "site_0", log=lines.append)
    n_test = len(site._eval_records[1])
    result = site.evaluate_round(_request(cfg, 0))
    assert result.site_id == "site_0" and result.num_examples == n_test > 0
    assert result.metrics["n_test"] == n_test and result.metrics["n_probe_train"] == len(site._eval_records[0])
    assert 0.0 <= result.metrics["auroc"] <= 1.0 and 0.0 <= result.metrics["r_at_5"] <= 1.0
    assert "zero_shot/macro_auroc" in result.metrics and "linear_probe/macro_auroc@1" in result.metrics
    assert "linear_probe/macro_auroc@0.01" not in result.metrics  # 1 % of ~100 studies is not a probe
    assert any(f"evaluated on {n_test} test studies" in line for line in lines)
    again = site.evaluate_round(_request(cfg, 0))
    assert again.metrics == pytest.approx(result.metrics, nan_ok=True)  # same model, same split, same numbers
    update = site.train_round(_request(cfg, 1))  # evaluation left the training state alone
    assert update.metrics["train_steps"] == 2.0


def test_site_without_a_test_split_is_a_named_error(tmp_path: Path) -> None:
    from mlip_fed.federation.site_evaluation import SiteEvaluator

    with pytest.raises(ValueError, match="site site_9 has no test split"):
        SiteEvaluator(_site_cfg(), None, [], [], "site_9")


def test_dp_policy_refuses_evaluation_by_default_with_a_public_code() -> None:
    assert PrivacyPolicy().evaluation_released
    dp = PrivacyPolicy(mechanism="bucketed", epsilon_budget=8.0)
    assert not dp.evaluation_released
    assert dp.model_copy(update={"release_evaluation": True}).evaluation_released
    assert not PrivacyPolicy(release_evaluation=False).evaluation_released


def test_dp_site_refuses_then_releases_when_its_policy_says_so(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    dp = ["privacy=bucketed", "privacy.epsilon_budget=60", "privacy.prototype_contribution_bound=8"]
    lines: list[str] = []
    site = SiteRuntime(_site_cfg(*dp), 0, tmp_path / "site_0", log=lines.append)
    with pytest.raises(RoundRefused, match=r"refused \(evaluation\)") as err:
        site.evaluate_round(_request(site.cfg, 0))
    reason = format_site_error(site.site_id, err.value, private=True)
    assert "RoundRefused: refused (evaluation)" in reason  # the public code survives the DP error filter

    opted_in = SiteRuntime(_site_cfg(*dp, "privacy.release_evaluation=true"), 0, tmp_path / "site_0b", log=lines.append)
    assert opted_in.evaluate_round(_request(opted_in.cfg, 0)).num_examples > 0
    assert any("outside its epsilon" in line for line in lines)  # said in the site's log every time
