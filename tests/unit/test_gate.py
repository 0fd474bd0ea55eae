"""The promotion gate as a table of cases: each row is a comparison, a policy and the verdict."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from llmops.comparison import Comparison, Interval
from llmops.gate import Decision, GatePolicy, decide_promotion


def iv(mean: float, low: float | None = None, high: float | None = None) -> Interval:
    return Interval(mean, mean if low is None else low, mean if high is None else high, 20)


def comparison(candidate: dict, vs_base: dict | None = None, vs_champion: dict | None = None) -> Comparison:
    models = {"base": {}, "candidate": candidate}
    deltas = {"base": vs_base or {}}
    if vs_champion is not None:
        models["champion"] = {}
        deltas["champion"] = vs_champion
    return Comparison(candidate="candidate", models=models, deltas=deltas, by_set={})


POLICY = GatePolicy(
    minimum={"judge_overall": 5.0},
    maximum={"refusal": 0.2},
    max_latency_p95_s=10,
    improve_on_base=["loss"],
    non_regression={"rouge_l": 0.02, "loss": 0.05},
)
GOOD = {"judge_overall": 6.0, "refusal": 0.0, "latency_p95_s": 3.0}
BETTER_THAN_BASE = {"loss": iv(-0.5, -0.6, -0.4)}

CASES = [
    # (id, candidate means, vs base, vs champion, promote, phrase in the reasons)
    ("first model, all good", GOOD, BETTER_THAN_BASE, None, True, "loss vs base"),
    (
        "below the judge minimum",
        {**GOOD, "judge_overall": 4.9},
        BETTER_THAN_BASE,
        None,
        False,
        "judge_overall 4.9 < minimum 5",
    ),
    (
        "above the refusal maximum",
        {**GOOD, "refusal": 0.25},
        BETTER_THAN_BASE,
        None,
        False,
        "refusal 0.25 > maximum 0.2",
    ),
    ("too slow", {**GOOD, "latency_p95_s": 12.0}, BETTER_THAN_BASE, None, False, "p95 latency 12 s > ceiling 10 s"),
    (
        "no better than base: interval crosses zero",
        GOOD,
        {"loss": iv(-0.1, -0.3, 0.1)},
        None,
        False,
        "not clearly better",
    ),
    ("worse than base", GOOD, {"loss": iv(0.2, 0.1, 0.3)}, None, False, "not clearly better"),
    (
        "champion: within the margins",
        GOOD,
        BETTER_THAN_BASE,
        {"rouge_l": iv(-0.01, -0.05, 0.03), "loss": iv(0.04, 0.0, 0.08)},
        True,
        "within the allowed regression",
    ),
    (
        "champion: rouge-l regressed beyond the margin",
        GOOD,
        BETTER_THAN_BASE,
        {"rouge_l": iv(-0.03, -0.06, 0.0), "loss": iv(0.0)},
        False,
        "rouge_l vs champion -0.03",
    ),
    (
        "champion: loss (lower is better) rose beyond the margin",
        GOOD,
        BETTER_THAN_BASE,
        {"rouge_l": iv(0.0), "loss": iv(0.06, 0.02, 0.1)},
        False,
        "loss vs champion +0.06",
    ),
    (
        "champion: better on everything",
        GOOD,
        BETTER_THAN_BASE,
        {"rouge_l": iv(0.1, 0.05, 0.15), "loss": iv(-0.2, -0.3, -0.1)},
        True,
        "within",
    ),
    (
        "missing judge score fails closed",
        {"refusal": 0.0, "latency_p95_s": 1.0},
        BETTER_THAN_BASE,
        None,
        False,
        "judge_overall was not measured",
    ),
    ("missing base comparison fails closed", GOOD, {}, None, False, "loss was not compared with the base model"),
    (
        "missing champion comparison fails closed",
        GOOD,
        BETTER_THAN_BASE,
        {"loss": iv(0.0)},
        False,
        "rouge_l was not compared with the champion",
    ),
]


@pytest.mark.parametrize(
    ("candidate", "vs_base", "vs_champion", "promote", "phrase"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_gate_table(candidate, vs_base, vs_champion, promote, phrase):
    decision = decide_promotion(comparison(candidate, vs_base, vs_champion), POLICY)
    assert decision.promote is promote
    assert any(phrase in reason for reason in decision.reasons), decision.reasons
    assert decision.verdict == ("pass" if promote else "fail")


def test_without_a_champion_the_regression_checks_are_skipped_not_failed():
    decision = decide_promotion(comparison(GOOD, BETTER_THAN_BASE), POLICY)
    skipped = [c for c in decision.checks if c.skipped]
    assert {c.name for c in skipped} == {"non_regression:rouge_l", "non_regression:loss"}
    assert all(c.passed for c in skipped)
    assert not any("no champion" in r for r in decision.reasons)  # reasons list only checks that ran


def test_a_failing_decision_lists_only_the_failures_and_tags_them():
    decision = decide_promotion(comparison({**GOOD, "judge_overall": 1.0, "refusal": 0.9}, BETTER_THAN_BASE), POLICY)
    assert len(decision.reasons) == 2
    tags = decision.tags()
    assert tags["gate.decision"] == "fail"
    assert tags["gate.checks_failed"] == "2"
    assert "judge_overall 1 < minimum 5" in tags["gate.reasons"]


def test_decision_round_trips_through_a_dict():
    decision = decide_promotion(comparison(GOOD, BETTER_THAN_BASE, {"rouge_l": iv(0.0), "loss": iv(0.0)}), POLICY)
    assert Decision.from_dict(decision.to_dict()) == decision


def test_an_empty_policy_passes_anything():
    decision = decide_promotion(comparison({}), GatePolicy())
    assert decision.promote and decision.checks == ()


@pytest.mark.parametrize(
    ("policy", "message"),
    [
        ({"minimum": {"bogus": 1}}, "bogus"),
        ({"non_regression": {"loss": -0.1}}, "margins must be >= 0"),
        ({"improve_on_base": ["response_tokens"]}, "no better direction"),
        ({"non_regression": {"response_tokens": 5}}, "no better direction"),
        ({"improve_on_base": ["perplexity"]}, "not a per-item metric"),
        ({"non_regression": {"latency_p95_s": 1}}, "not a per-item metric"),
        ({"max_latency_p95_s": 0}, "greater than 0"),
        ({"minimums": {}}, "Extra inputs are not permitted"),
    ],
)
def test_bad_policies_are_rejected_with_the_field(policy, message):
    with pytest.raises(ValidationError, match=message):
        GatePolicy.model_validate(policy)
