"""Rollout decisions: the policy's validation, traffic steps, the shadow verdict and the A/B
guardrails, each failure with a reason that names the figure it failed on."""

from __future__ import annotations

import json
import math

import pytest
from pydantic import ValidationError

from llmops.gate import Decision
from llmops.rollout.contracts import RolloutPlan, VersionRef
from llmops.rollout.policy import (
    Guardrails,
    RolloutPolicy,
    ShadowComparison,
    ShadowCriteria,
    VariantWindow,
    all_phases_passed,
    check_guardrails,
    compare_shadow,
    decide_shadow,
    first_stop,
    rollout_outcome,
    step_label,
    step_request_budget,
    step_weights,
    win_rate,
)

POLICY = RolloutPolicy()  # shadow: 8 pairs, win rate 0.4, errors 2%, latency 2x; rails: 4 requests, 2%, 60 s, drop 1


def failed(decision: Decision) -> dict[str, str]:
    return {c.name: c.detail for c in decision.checks if not c.passed}


# -- policy -------------------------------------------------------------------------------------


def test_the_default_policy_steps_ten_fifty_all():
    assert POLICY.traffic_steps == [0.1, 0.5, 1.0]
    assert POLICY.shadow == ShadowCriteria()
    assert POLICY.guardrails == Guardrails()


@pytest.mark.parametrize("steps", [[1.0], [0.5, 1.0], [0.01, 0.05, 0.25, 0.5, 1.0]])
def test_increasing_steps_ending_at_all_traffic_are_accepted(steps):
    assert RolloutPolicy(traffic_steps=steps).traffic_steps == steps


@pytest.mark.parametrize(
    ("steps", "phrase"),
    [
        ([0.5, 0.1, 1.0], "must increase"),
        ([0.1, 0.5, 0.5, 1.0], "must increase"),
        ([0.1, 0.5], "last traffic step must send all traffic"),
        ([0.0, 0.5, 1.0], "in (0, 1]"),
        ([-0.1, 1.0], "in (0, 1]"),
        ([0.5, 1.5], "in (0, 1]"),
    ],
)
def test_steps_must_increase_within_zero_to_one_and_end_at_all_traffic(steps, phrase):
    with pytest.raises(ValidationError) as raised:
        RolloutPolicy(traffic_steps=steps)
    assert phrase in str(raised.value)


def test_an_empty_or_too_long_step_list_is_rejected():
    with pytest.raises(ValidationError):
        RolloutPolicy(traffic_steps=[])
    with pytest.raises(ValidationError):
        RolloutPolicy(traffic_steps=[i / 11 for i in range(1, 12)])


@pytest.mark.parametrize(
    "data",
    [
        {"traffic_step": [0.5, 1.0]},
        {"shadow": {"min_pair": 3}},
        {"guardrails": {"max_p95_latency_ms": 100}},
    ],
)
def test_unknown_policy_fields_are_rejected(data):
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        RolloutPolicy.model_validate(data)


@pytest.mark.parametrize(
    "data",
    [
        {"shadow": {"min_pairs": 0}},
        {"shadow": {"min_win_rate": 1.5}},
        {"shadow": {"max_latency_ratio": 0}},
        {"guardrails": {"min_invocations": 0}},
        {"guardrails": {"max_error_rate": -0.1}},
        {"guardrails": {"max_judge_drop": -1}},
        {"step_requests": -1},
        {"lookback_hours": 0},
    ],
)
def test_out_of_range_criteria_are_rejected(data):
    with pytest.raises(ValidationError):
        RolloutPolicy.model_validate(data)


def test_a_policy_is_frozen():
    with pytest.raises(ValidationError):
        POLICY.step_requests = 3


# -- steps --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("share", "label"), [(0.01, "1pct"), (0.1, "10pct"), (0.25, "25pct"), (0.5, "50pct"), (1.0, "100pct")]
)
def test_step_label_is_the_share_in_percent(share, label):
    assert step_label(share) == label


@pytest.mark.parametrize("share", [0.1, 0.3, 0.5, 0.7, 1.0])
def test_step_weights_give_the_share_to_the_challenger_and_the_rest_to_the_champion(share):
    weights = step_weights(share, "champion", "challenger")
    assert weights == {"champion": pytest.approx(1 - share), "challenger": pytest.approx(share)}
    assert sum(weights.values()) == pytest.approx(1.0)


def test_step_weights_are_rounded_clean():
    assert step_weights(0.7, "a", "b") == {"a": 0.3, "b": 0.7}
    assert step_weights(1.0, "a", "b") == {"a": 0.0, "b": 1.0}


def test_no_step_requests_means_live_traffic_only():
    assert step_request_budget(0.1, RolloutPolicy(step_requests=0, bake_seconds=600)) == (0, 0)


def test_live_traffic_only_needs_time_to_see_traffic():
    with pytest.raises(ValidationError, match="bake_seconds > 0"):
        RolloutPolicy(step_requests=0)


def test_a_low_sampling_rate_asks_for_more_requests_per_step():
    policy = RolloutPolicy()
    assert step_request_budget(0.5, policy, 20)[0] > step_request_budget(0.5, policy, 100)[0]


def test_a_step_with_too_few_judged_answers_rolls_back():
    decision = check_guardrails(
        "10pct", VariantWindow(12, 0, 100.0, 200.0), 9.0, 6.0, RolloutPolicy(), judged_answers=1
    )
    assert not decision.promote
    assert any("judge scored 1" in reason for reason in decision.reasons)


def binomial_below(k: int, n: int, p: float) -> float:
    """P(X < k) for X ~ Binomial(n, p)."""
    return sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k))


@pytest.mark.parametrize("share", [0.01, 0.05, 0.1, 0.5, 1.0])
@pytest.mark.parametrize("min_invocations", [1, 4, 20])
def test_the_step_budget_gives_the_challenger_enough_requests_at_small_shares(share, min_invocations):
    policy = RolloutPolicy(step_requests=12, guardrails=Guardrails(min_invocations=min_invocations))
    low, high = step_request_budget(share, policy)
    assert low >= policy.step_requests
    assert low <= high
    assert low * share >= min_invocations - 1e-9  # at the least, min_invocations are expected
    # at the most, the challenger (drawn with probability share) misses min_invocations under 1% of the time
    assert binomial_below(min_invocations, high, share) < 0.01


def test_the_step_budget_is_the_step_requests_when_they_suffice():
    assert step_request_budget(1.0, RolloutPolicy(step_requests=12)) == (12, 24)
    assert step_request_budget(0.5, RolloutPolicy(step_requests=100)) == (100, 100)
    assert step_request_budget(0.1, RolloutPolicy(step_requests=12)) == (40, 240)


# -- shadow -------------------------------------------------------------------------------------


def test_win_rate_counts_ties_as_half_and_leaves_out_missing_scores():
    pairs = [(8.0, 6.0), (5.0, 5.0), (3.0, 7.0), (None, 4.0), (9.0, None), (None, None), (7.0, 7.0)]
    rate, used = win_rate(pairs)
    assert used == 4
    assert rate == pytest.approx((1 + 0.5 + 0 + 0.5) / 4)


def test_win_rate_without_scored_pairs_is_none():
    assert win_rate([]) == (None, 0)
    assert win_rate([(None, 5.0), (5.0, None)]) == (None, 0)


def test_win_rate_extremes():
    assert win_rate([(2.0, 1.0)] * 3) == (1.0, 3)
    assert win_rate([(1.0, 2.0)] * 3) == (0.0, 3)


def test_compare_shadow_summarises_the_scores_and_windows():
    shadow, champion = VariantWindow(10, 0, p95_ms=120.0), VariantWindow(10, 0, p95_ms=100.0)
    comparison = compare_shadow([(8.0, 6.0), (6.0, 6.0), (None, 4.0)], shadow, champion)
    assert comparison.pairs == 2
    assert comparison.win_rate == pytest.approx(0.75)
    assert comparison.challenger_judge_mean == pytest.approx(7.0)
    assert comparison.champion_judge_mean == pytest.approx(6.0)  # complete pairs only, like the win rate
    assert (comparison.shadow, comparison.champion) == (shadow, champion)


def test_compare_shadow_without_scores_has_no_means():
    comparison = compare_shadow([], VariantWindow(0, 0), VariantWindow(0, 0))
    assert (comparison.pairs, comparison.win_rate) == (0, None)
    assert comparison.challenger_judge_mean is None and comparison.champion_judge_mean is None


def shadow_comparison(
    pairs: int = 10,
    wins: float = 6,
    shadow: VariantWindow | None = None,
    champion: VariantWindow | None = None,
) -> ShadowComparison:
    """``pairs`` paired scores of which ``wins`` go to the shadow (a half is a tie)."""
    whole = int(wins)
    scores = [(8.0, 6.0)] * whole + [(6.0, 6.0)] * round((wins - whole) * 2)
    scores += [(5.0, 7.0)] * (pairs - len(scores))
    return compare_shadow(
        scores,
        shadow or VariantWindow(invocations=50, errors=0, p95_ms=150.0),
        champion or VariantWindow(invocations=50, errors=0, p95_ms=100.0),
    )


def test_a_good_shadow_goes_on_to_ab():
    decision = decide_shadow(shadow_comparison(), POLICY)
    assert decision.promote is True
    assert decision.verdict == "pass"
    assert [c.name for c in decision.checks] == [
        "shadow_pairs",
        "shadow_win_rate",
        "shadow_error_rate",
        "shadow_latency",
    ]
    assert all(c.passed for c in decision.checks)
    reasons = " | ".join(decision.reasons)
    assert "10 paired answers (need 8)" in reasons
    assert "judge win rate 0.60 >= 0.40" in reasons
    assert "shadow error rate 0.0% of 50 (at most 2.0%)" in reasons
    assert "p95 latency 150 ms vs champion 100 ms: 1.50x (within 2x)" in reasons


def test_the_shadow_passes_at_exactly_the_thresholds():
    """8 pairs, win rate 0.375, error rate 2%, latency ratio 2.0: each exactly at its limit."""
    comparison = shadow_comparison(
        pairs=8,
        wins=3,  # a win rate of 3/8 = 0.375, the policy's minimum below
        shadow=VariantWindow(100, 2, p95_ms=200.0),
        champion=VariantWindow(100, 0, p95_ms=100.0),
    )
    policy = RolloutPolicy(shadow=ShadowCriteria(min_pairs=8, min_win_rate=0.375))
    assert decide_shadow(comparison, policy).promote is True


def test_too_few_pairs_is_no_verdict_and_fails():
    decision = decide_shadow(shadow_comparison(pairs=5, wins=5), POLICY)
    assert decision.promote is False
    reasons = failed(decision)
    assert reasons["shadow_pairs"] == "5 paired answers (need 8)"
    assert reasons["shadow_win_rate"] == "no judge verdict: too few paired answers"
    assert set(reasons) == {"shadow_pairs", "shadow_win_rate"}


def test_a_low_win_rate_fails_naming_the_rate_and_the_means():
    decision = decide_shadow(shadow_comparison(pairs=10, wins=2.5), POLICY)
    assert decision.promote is False
    reasons = failed(decision)
    assert set(reasons) == {"shadow_win_rate"}
    assert reasons["shadow_win_rate"] == "judge win rate 0.25 < 0.40 (challenger 5.70 vs champion 6.70)"


def test_a_high_error_rate_fails_naming_the_rate():
    decision = decide_shadow(shadow_comparison(shadow=VariantWindow(40, 2, p95_ms=100.0)), POLICY)
    assert decision.promote is False
    assert failed(decision) == {"shadow_error_rate": "shadow error rate 5.0% of 40 (at most 2.0%)"}


def test_a_shadow_that_answered_nothing_fails():
    decision = decide_shadow(shadow_comparison(shadow=VariantWindow(0, 0, p95_ms=None)), POLICY)
    assert decision.promote is False
    reasons = failed(decision)
    assert reasons["shadow_error_rate"] == "the shadow answered no requests"
    assert reasons["shadow_latency"] == "no latency to compare: a variant answered no requests"


def test_a_shadow_too_slow_next_to_the_champion_fails_naming_the_ratio():
    decision = decide_shadow(shadow_comparison(shadow=VariantWindow(50, 0, p95_ms=250.0)), POLICY)
    assert decision.promote is False
    assert failed(decision) == {"shadow_latency": "p95 latency 250 ms vs champion 100 ms: 2.50x (beyond 2x)"}


@pytest.mark.parametrize(
    ("shadow_p95", "champion_p95"),
    [(None, 100.0), (100.0, None), (100.0, 0.0)],
)
def test_a_missing_latency_fails(shadow_p95, champion_p95):
    comparison = shadow_comparison(
        shadow=VariantWindow(50, 0, p95_ms=shadow_p95), champion=VariantWindow(50, 0, p95_ms=champion_p95)
    )
    decision = decide_shadow(comparison, POLICY)
    assert decision.promote is False
    assert failed(decision) == {"shadow_latency": "no latency to compare: a variant answered no requests"}


def test_variant_window_error_rate():
    assert VariantWindow(0, 0).error_rate == 0.0
    assert VariantWindow(8, 2).error_rate == 0.25


# -- guardrails ---------------------------------------------------------------------------------


def guardrails(
    invocations: int = 20,
    errors: int = 0,
    p99_ms: float | None = 900.0,
    challenger_judge: float | None = 6.5,
    champion_judge: float | None = 7.0,
    label: str = "10pct",
    policy: RolloutPolicy = POLICY,
) -> Decision:
    window = VariantWindow(invocations, errors, p95_ms=None, p99_ms=p99_ms)
    return check_guardrails(label, window, challenger_judge, champion_judge, policy)


def test_a_healthy_step_continues():
    decision = guardrails()
    assert decision.promote is True
    assert [c.name for c in decision.checks] == [
        "10pct_traffic",
        "10pct_error_rate",
        "10pct_p99_latency",
        "10pct_judge",
    ]
    reasons = " | ".join(decision.reasons)
    assert "step 10pct: the challenger served 20 requests (need 4)" in reasons
    assert "step 10pct: p99 latency 900 ms (within 60000 ms)" in reasons
    assert "step 10pct: online judge 6.50 vs champion 7.00 (within the allowed drop of 1)" in reasons


def test_a_challenger_better_than_the_champion_passes_the_judge_rail():
    assert guardrails(challenger_judge=9.0, champion_judge=5.0).promote is True


def test_too_little_traffic_is_no_verdict_and_rolls_back():
    decision = guardrails(invocations=3)
    assert decision.promote is False
    reasons = failed(decision)
    assert reasons["10pct_traffic"] == "step 10pct: the challenger served 3 requests (need 4)"
    assert decision.reasons[0] == reasons["10pct_traffic"]


def test_no_traffic_at_all_rolls_back():
    assert guardrails(invocations=0, p99_ms=None).promote is False


def test_a_high_error_rate_rolls_back_naming_the_rate():
    decision = guardrails(invocations=20, errors=1)
    assert decision.promote is False
    assert failed(decision) == {"10pct_error_rate": "step 10pct: error rate 5.0% (at most 2.0%)"}


def test_a_p99_latency_above_the_ceiling_rolls_back():
    decision = guardrails(p99_ms=61_000.0)
    assert decision.promote is False
    assert failed(decision) == {"10pct_p99_latency": "step 10pct: p99 latency 61000 ms (above 60000 ms)"}


def test_a_p99_latency_at_the_ceiling_passes():
    assert guardrails(p99_ms=60_000.0).promote is True


def test_a_missing_p99_latency_rolls_back():
    decision = guardrails(p99_ms=None)
    assert failed(decision) == {"10pct_p99_latency": "step 10pct: no latency measured"}


def test_a_judge_drop_beyond_the_margin_rolls_back():
    decision = guardrails(challenger_judge=5.5, champion_judge=7.0, label="50pct")
    assert decision.promote is False
    assert failed(decision) == {
        "50pct_judge": "step 50pct: online judge 5.50 vs champion 7.00 (beyond the allowed drop of 1)"
    }


def test_a_judge_drop_of_exactly_the_margin_passes():
    assert guardrails(challenger_judge=6.0, champion_judge=7.0).promote is True


@pytest.mark.parametrize(("challenger", "champion"), [(None, 7.0), (7.0, None), (None, None)])
def test_a_missing_judge_score_rolls_back(challenger, champion):
    decision = guardrails(challenger_judge=challenger, champion_judge=champion)
    assert decision.promote is False
    assert failed(decision) == {"10pct_judge": "step 10pct: no online judge score"}


def test_guardrails_follow_the_policy():
    too_little = RolloutPolicy(guardrails=Guardrails(min_invocations=50))
    reasons = failed(guardrails(policy=too_little))
    assert set(reasons) == {"10pct_traffic"}, "too little traffic is no verdict: nothing else is claimed"
    assert "(need 50)" in reasons["10pct_traffic"]
    strict = RolloutPolicy(guardrails=Guardrails(max_p99_latency_ms=500, max_judge_drop=0))
    reasons = failed(guardrails(policy=strict))
    assert "(above 500 ms)" in reasons["10pct_p99_latency"]


# -- serialisation ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "decision",
    [
        decide_shadow(shadow_comparison(), POLICY),
        decide_shadow(shadow_comparison(pairs=3, wins=0), POLICY),
        guardrails(),
        guardrails(invocations=1, p99_ms=None, challenger_judge=None),
    ],
)
def test_a_decision_survives_to_dict_and_from_dict_through_json(decision):
    data = json.loads(json.dumps(decision.to_dict()))
    assert data["verdict"] == decision.verdict
    assert data["reasons"] == decision.reasons
    assert Decision.from_dict(data) == decision


def test_a_shadow_comparison_survives_to_dict_and_from_dict_through_json():
    comparison = shadow_comparison(
        shadow=VariantWindow(50, 1, p95_ms=150.0, p99_ms=300.0), champion=VariantWindow(60, 0, p95_ms=None)
    )
    data = json.loads(json.dumps(comparison.to_dict()))
    assert data["shadow"] == {"invocations": 50, "errors": 1, "p95_ms": 150.0, "p99_ms": 300.0}
    restored = ShadowComparison.from_dict(data)
    assert restored == comparison
    assert isinstance(restored.shadow, VariantWindow)
    assert decide_shadow(restored, POLICY) == decide_shadow(comparison, POLICY)


def test_an_empty_shadow_comparison_round_trips():
    comparison = compare_shadow([], VariantWindow(0, 0), VariantWindow(0, 0))
    assert ShadowComparison.from_dict(json.loads(json.dumps(comparison.to_dict()))) == comparison


# -- phases of a run: promote, roll back ----------------------------------------------------------


def phase(go: bool, *reasons: str) -> dict:
    return {"decision": {"promote": go, "verdict": "continue" if go else "roll back", "reasons": list(reasons)}}


def test_every_phase_passing_promotes():
    assert all_phases_passed([phase(True), phase(True), phase(True)])


@pytest.mark.parametrize(
    "results",
    [
        [phase(True), phase(False, "p99 latency"), None],
        [phase(True), None],  # a step that never ran is no evidence
        [None],
        [phase(False)],
    ],
)
def test_a_failed_or_missing_phase_does_not_promote(results):
    assert not all_phases_passed(results)


def test_the_first_phase_that_said_stop_names_itself_and_its_reasons():
    phases = {
        "compare_shadow": phase(True, "win rate 0.50"),
        "shift_traffic_10pct": phase(False, "p99 latency 900 ms"),
        "shift_traffic_50pct": phase(False, "error rate 9%"),
    }
    stopped = first_stop(phases)
    assert stopped["phase"] == "shift_traffic_10pct"
    assert stopped["reasons"] == ["p99 latency 900 ms"] and stopped["promote"] is False


def test_no_stop_when_every_phase_that_ran_said_go_on():
    assert first_stop({"compare_shadow": phase(True), "shift_traffic_10pct": None}) is None
    assert first_stop({}) is None


def test_the_outcome_names_how_the_run_ended():
    assert rollout_outcome({"champion": "2"}, None) == "promoted"
    assert rollout_outcome(None, {"rolled_back": "2"}) == "rolled back"
    assert rollout_outcome(None, None) == "unfinished"


# -- the plan as XCom carries it ------------------------------------------------------------------

PLAN = {
    "model_name": "python-docs-assistant",
    "endpoint": "python-docs-assistant",
    "champion": {"version": "1", "artifact_uri": "file:///m1.tar.gz", "run_id": "r1", "base_model": "tiny"},
    "candidate": {"version": "2", "artifact_uri": "file:///m2.tar.gz", "run_id": None, "base_model": ""},
    "action": "rollout",
    "reason": "version 2 challenges champion version 1",
}


def test_a_plan_survives_xcom_unchanged():
    plan = RolloutPlan.model_validate(json.loads(json.dumps(PLAN)))
    assert plan.candidate == VersionRef(version="2", artifact_uri="file:///m2.tar.gz")
    dumped = plan.model_dump(mode="json")
    assert dumped == PLAN and list(dumped) == list(PLAN)  # same keys, same order: same ledger digest
    assert RolloutPlan.model_validate(plan) is plan


def test_a_first_deploy_plan_has_no_champion():
    plan = RolloutPlan.model_validate({**PLAN, "champion": None, "action": "first_deploy"})
    assert plan.champion is None and plan.model_dump(mode="json")["champion"] is None


@pytest.mark.parametrize(
    "change",
    [{"action": "deploy"}, {"extra": 1}, {"candidate": {"version": "2"}}],
    ids=["unknown action", "unknown field", "version without artifact"],
)
def test_a_malformed_plan_is_rejected(change):
    with pytest.raises(ValidationError):
        RolloutPlan.model_validate({**PLAN, **change})
