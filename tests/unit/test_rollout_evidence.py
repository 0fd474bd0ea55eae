"""Rollout decisions with stated power: the sequential tests on simulated traffic with known
effects, over many seeds. A regression is caught within the sample size the policy states in at
least ``1 - beta`` of the seeds; identical models roll back no more often than ``alpha``."""

from __future__ import annotations

import math
import time
from types import SimpleNamespace

import numpy as np
import pytest
from pydantic import ValidationError

from llmops.contracts import VariantWindow
from llmops.gate import Decision
from llmops.judges import LocalJudge, PairwiseJudge, echo_share
from llmops.prompts import PromptTemplate
from llmops.rollout import steps
from llmops.rollout.policy import (
    SHADOW_TESTS,
    STEP_TESTS,
    TAIL,
    Evidence,
    Observed,
    RolloutPolicy,
    evidence_checks,
    keep_decided,
    latency_limit,
    required_sample_size,
    run_tests,
    settled,
    with_evidence,
)
from llmops.rollout.sequential import (
    bernoulli_sprt,
    mean_shift_test,
    mixture_half_width,
    required_bernoulli_sample_size,
    required_mean_sample_size,
)

EVIDENCE = Evidence()  # alpha 0.05, beta 0.2; +5 points of errors, slow share 10%, win-rate drop 0.15
SEEDS = 400


def tolerance(rate: float, seeds: int = SEEDS) -> float:
    """Three binomial standard deviations of a rate measured over ``seeds`` streams."""
    return 3 * math.sqrt(rate * (1 - rate) / seeds)


def decide_stream(evidence: Evidence, streams: dict[str, np.ndarray], tests, limit_ms: float = 100.0) -> str:
    """Feed one simulated stream to the policy request by request until every test decided or
    reached its stated sample size: "roll_back" (a harm, or an inconclusive test with the default)
    or "promote". ``streams``: per request, ``errors`` (0/1), ``latency`` (ms), ``preference``."""
    horizons = required_sample_size(evidence, tests)
    length = len(next(iter(streams.values())))
    errors = np.cumsum(streams.get("errors", np.zeros(length)))
    slow = np.cumsum(streams.get("latency", np.zeros(length)) > limit_ms)
    preference = np.cumsum(streams.get("preference", np.full(length, 0.5)))
    outcomes = None
    for n in range(1, length + 1):
        observed = Observed(
            requests=n,
            errors=int(errors[n - 1]),
            timed=n,
            slow=int(slow[n - 1]),
            latency_limit_ms=limit_ms,
            pairs=n,
            preference=float(preference[n - 1]),
        )
        outcomes = keep_decided(outcomes, run_tests(evidence, observed, tests))
        if any(o.verdict == "harm" for o in outcomes):
            return "roll_back"
        if settled(outcomes, horizons):
            break
    decision = with_evidence(Decision(True, ()), evidence_checks("step", outcomes, evidence, horizons, observed))
    return "promote" if decision.promote else "roll_back"


# -- the stated sample sizes ----------------------------------------------------------------------------


def test_the_policy_states_a_sample_size_for_each_test_up_front():
    sizes = required_sample_size(EVIDENCE, SHADOW_TESTS)
    assert set(sizes) == {"error_rate", "latency", "judge"}
    assert all(isinstance(n, int) and n > 0 for n in sizes.values())


def test_a_smaller_harm_or_stricter_error_rates_need_more_requests():
    base = required_sample_size(EVIDENCE, STEP_TESTS)["error_rate"]
    assert required_sample_size(Evidence(error_rate_harm=0.02), STEP_TESTS)["error_rate"] > base
    assert required_sample_size(Evidence(alpha=0.01), STEP_TESTS)["error_rate"] > base
    assert required_sample_size(Evidence(beta=0.05), STEP_TESTS)["error_rate"] > base
    judge = required_sample_size(EVIDENCE, SHADOW_TESTS)["judge"]
    assert required_sample_size(Evidence(judge_win_rate_drop=0.05), SHADOW_TESTS)["judge"] > judge


def test_the_bernoulli_sample_size_holds_its_power_by_monte_carlo():
    p0, p1, alpha, beta = 0.01, 0.06, 0.05, 0.2
    n = required_bernoulli_sample_size(p0, p1, alpha, beta)
    rng = np.random.default_rng(7)
    lower, upper = math.log(beta), math.log(1 / alpha)
    up, down = math.log(p1 / p0), math.log((1 - p1) / (1 - p0))

    def rolled_back_by(rate: float, horizon: int) -> float:
        events = rng.random((4000, horizon)) < rate
        k = np.cumsum(events, axis=1)
        llr = k * up + (np.arange(1, horizon + 1) - k) * down
        first_up = np.where((llr >= upper).any(1), (llr >= upper).argmax(1), horizon)
        first_down = np.where((llr <= lower).any(1), (llr <= lower).argmax(1), horizon)
        return float(np.mean(first_up < first_down))

    assert rolled_back_by(p1, n) >= 1 - beta - 0.02
    assert rolled_back_by(p0, n) <= alpha
    # The size is the smallest that holds: a tenth of it leaves the power far short.
    assert rolled_back_by(p1, n // 10) < 1 - beta - 0.1


def test_the_mixture_sequence_narrows_and_decides_by_its_stated_size():
    widths = [mixture_half_width(n, 0.5, 0.05, 4.0) for n in (10, 100, 1000, 10000)]
    assert widths == sorted(widths, reverse=True) and widths[-1] < 0.05
    n = required_mean_sample_size(0.5, 0.15, 0.025, 0.2)
    # At the stated size, whatever the data, one of the two sequences has fired.
    for mean in np.linspace(0, 1, 41):
        assert mean_shift_test("judge", n, mean * n, 0.5, 0.15, 0.5, 0.025, 0.2).verdict != "undecided"


@pytest.mark.parametrize(
    ("call", "phrase"),
    [
        (lambda: required_bernoulli_sample_size(0.1, 0.05, 0.05, 0.2), "0 < p0 < p1 < 1"),
        (lambda: required_bernoulli_sample_size(0.01, 0.05, 1.5, 0.2), "alpha and beta must lie in (0, 1)"),
        (lambda: bernoulli_sprt("x", 3, 4, 0.01, 0.05, 0.05, 0.2), "between 0 and the trials"),
        (lambda: required_mean_sample_size(0.5, 0.0, 0.05, 0.2), "must be positive"),
        (lambda: required_bernoulli_sample_size(0.5, 0.5000001, 0.01, 0.01), "state a larger harm"),
    ],
)
def test_impossible_or_bad_test_settings_are_refused_by_name(call, phrase):
    with pytest.raises(ValueError, match=phrase.replace("(", r"\(").replace(")", r"\)")):
        call()


@pytest.mark.parametrize(
    "data",
    [
        {"alpha": 0},
        {"beta": 0.6},
        {"slow_share_harm": 0.05},  # at the limit, 5% of requests are above it already
        {"judge_win_rate_drop": 0.6},
        {"on_inconclusive": "maybe"},
        {"max_step_seconds": 0},
        {"surprise": 1},
    ],
)
def test_bad_evidence_settings_are_rejected(data):
    with pytest.raises(ValidationError):
        Evidence(**data)


def test_a_policy_without_evidence_decides_on_fixed_thresholds_and_one_with_it_reads_it():
    assert RolloutPolicy().evidence is None
    policy = RolloutPolicy.model_validate({"evidence": {"error_rate_harm": 0.02}})
    assert policy.evidence.error_rate_harm == 0.02 and policy.evidence.on_inconclusive == "roll_back"


# -- simulated streams over many seeds ---------------------------------------------------------------


def test_a_five_point_error_rate_regression_is_caught_within_the_stated_sample_size():
    horizon = required_sample_size(EVIDENCE, ("error_rate",))["error_rate"]
    caught = 0
    for seed in range(SEEDS):
        rng = np.random.default_rng(seed)
        errors = (rng.random(horizon) < EVIDENCE.baseline_error_rate + 0.05).astype(float)
        caught += decide_stream(EVIDENCE, {"errors": errors}, ("error_rate",)) == "roll_back"
    assert caught / SEEDS >= 1 - EVIDENCE.beta - tolerance(EVIDENCE.beta)


def test_an_a_a_rollout_rolls_back_no_more_often_than_alpha():
    """Identical models: the challenger's errors at the champion's rate and its latencies from the
    champion's distribution; the limit from a champion sample's p95."""
    horizons = required_sample_size(EVIDENCE, STEP_TESTS)
    length = max(horizons.values())
    champion = np.random.default_rng(10_000).lognormal(5, 0.5, 5000)
    limit = latency_limit(float(np.percentile(champion, 95)), EVIDENCE)
    rolled_back = 0
    for seed in range(SEEDS):
        rng = np.random.default_rng(seed)
        streams = {
            "errors": (rng.random(length) < EVIDENCE.baseline_error_rate).astype(float),
            "latency": rng.lognormal(5, 0.5, length),
        }
        rolled_back += decide_stream(EVIDENCE, streams, STEP_TESTS, limit) == "roll_back"
    assert rolled_back / SEEDS <= EVIDENCE.alpha + tolerance(EVIDENCE.alpha)


def test_a_slower_challenger_is_caught_within_the_stated_sample_size():
    """The challenger's p90 at the limit (champion p95 + 20%): 10% of its requests beyond it."""
    horizon = required_sample_size(EVIDENCE, STEP_TESTS)["latency"]
    champion_p95 = 100.0
    limit = latency_limit(champion_p95, EVIDENCE)
    caught = 0
    for seed in range(SEEDS):
        rng = np.random.default_rng(seed)
        latency = np.where(rng.random(horizon) < EVIDENCE.slow_share_harm, limit * 1.5, limit * 0.5)
        caught += decide_stream(EVIDENCE, {"latency": latency}, STEP_TESTS, limit) == "roll_back"
    assert caught / SEEDS >= 1 - EVIDENCE.beta - tolerance(EVIDENCE.beta)


def test_a_challenger_the_pairwise_judge_prefers_less_is_caught_and_an_equal_one_passes():
    horizon = required_sample_size(EVIDENCE, SHADOW_TESTS)["judge"]
    worse = equal_rolled_back = 0
    for seed in range(SEEDS // 4):  # the judge's horizon is long: fewer seeds, wider tolerance
        rng = np.random.default_rng(seed)
        # Win 25%, tie 20%, lose 55%: mean preference 0.35, the stated harm (0.5 - 0.15).
        draws = rng.choice([1.0, 0.5, 0.0], size=horizon, p=[0.25, 0.2, 0.55])
        worse += decide_stream(EVIDENCE, {"preference": draws}, ("judge",)) == "roll_back"
        same = rng.choice([1.0, 0.5, 0.0], size=horizon, p=[0.4, 0.2, 0.4])
        equal_rolled_back += decide_stream(EVIDENCE, {"preference": same}, ("judge",)) == "roll_back"
    seeds = SEEDS // 4
    assert worse / seeds >= 1 - EVIDENCE.beta - tolerance(EVIDENCE.beta, seeds)
    assert equal_rolled_back / seeds <= EVIDENCE.alpha + tolerance(EVIDENCE.alpha, seeds)


# -- what a decision records --------------------------------------------------------------------------


def test_a_decision_records_sample_size_statistic_and_the_rule_that_fired():
    observed = Observed(requests=200, errors=15, timed=200, slow=3, latency_limit_ms=120.0, replayed=200)
    outcomes = run_tests(EVIDENCE, observed, STEP_TESTS)
    horizons = required_sample_size(EVIDENCE, STEP_TESTS)
    by_name = {o.name: o for o in outcomes}
    assert by_name["error_rate"].verdict == "harm" and by_name["error_rate"].n == 200
    assert by_name["error_rate"].statistic >= by_name["error_rate"].upper
    assert "log LR" in by_name["error_rate"].rule and "15 of 200" in by_name["error_rate"].rule
    checks = evidence_checks("10pct", outcomes, EVIDENCE, horizons, observed)
    decision = with_evidence(Decision(True, ()), checks)
    assert not decision.promote
    reason = next(r for r in decision.reasons if "error_rate" in r)
    assert f"n 200 of stated {horizons['error_rate']}" in reason and "harm" in reason
    assert decision.to_dict()["checks"][-1]["name"] == "10pct_evidence"


def test_an_inconclusive_test_takes_the_configured_default_and_says_the_evidence_was_thin():
    observed = Observed(requests=5, errors=0, timed=5, slow=0, latency_limit_ms=120.0, live=5)
    outcomes = run_tests(EVIDENCE, observed, STEP_TESTS)
    horizons = required_sample_size(EVIDENCE, STEP_TESTS)
    assert not settled(outcomes, horizons)
    rolled = with_evidence(Decision(True, ()), evidence_checks("50pct", outcomes, EVIDENCE, horizons, observed))
    assert not rolled.promote
    assert any("inconclusive" in r and "default roll back" in r for r in rolled.reasons)
    lenient = Evidence(on_inconclusive="promote")
    passed = with_evidence(Decision(True, ()), evidence_checks("50pct", outcomes, lenient, horizons, observed))
    assert passed.promote
    assert any("evidence: live (5 live, 0 replayed requests); thin" in r for r in passed.reasons)


def test_a_harm_rolls_back_even_when_inconclusive_means_promote():
    observed = Observed(requests=40, errors=12, timed=40, slow=0, latency_limit_ms=120.0, live=40)
    lenient = Evidence(on_inconclusive="promote")
    outcomes = run_tests(lenient, observed, STEP_TESTS)
    checks = evidence_checks("50pct", outcomes, lenient, required_sample_size(lenient, STEP_TESTS), observed)
    assert not with_evidence(Decision(True, ()), checks).promote


def test_a_tests_first_decision_stands_while_another_still_collects():
    early = run_tests(EVIDENCE, Observed(requests=60, errors=0, timed=5, slow=0, latency_limit_ms=1.0), STEP_TESTS)
    assert {o.name: o.verdict for o in early} == {"error_rate": "no_harm", "latency": "undecided"}
    later = run_tests(EVIDENCE, Observed(requests=90, errors=9, timed=40, slow=0, latency_limit_ms=1.0), STEP_TESTS)
    assert {o.name: o.verdict for o in later}["error_rate"] == "harm"
    kept = {o.name: o for o in keep_decided(early, later)}
    assert kept["error_rate"].verdict == "no_harm" and kept["error_rate"].n == 60
    assert kept["latency"].n == 40


def test_without_per_request_latencies_latency_is_not_tested_and_says_why():
    observed = Observed(requests=300, errors=0, latency_measured=False, live=300)
    outcomes = {o.name: o for o in run_tests(EVIDENCE, observed, STEP_TESTS)}
    assert outcomes["latency"].verdict == "untested" and "p99 ceiling" in outcomes["latency"].rule
    assert outcomes["error_rate"].verdict == "no_harm"


def test_the_champions_measured_error_rate_raises_the_null_never_lowers_it():
    assert EVIDENCE.error_rates(None) == pytest.approx((0.01, 0.06))
    assert EVIDENCE.error_rates(0.001) == pytest.approx((0.01, 0.06))
    assert EVIDENCE.error_rates(0.03) == pytest.approx((0.03, 0.08))


def test_the_latency_limit_is_the_champions_p95_plus_the_allowed_increase():
    assert latency_limit(100.0, EVIDENCE) == pytest.approx(120.0)
    assert latency_limit(None, EVIDENCE) is None
    assert TAIL == 0.05


# -- the pairwise judge -------------------------------------------------------------------------------

RUBRIC = PromptTemplate(name="judge_rubric", messages=())


def row(prompt: str, response: str, on_topic: float) -> dict:
    return {
        "prompt": prompt,
        "response": response,
        "reference": "",
        "question_similarity": on_topic,
        "repetition": 0.0,
        "refusal": 0.0,
    }


PROMPT = "How do I reverse a list in Python without changing the original list?"
ECHO = row(PROMPT, PROMPT, 1.0)  # an echo is as similar to the question as anything can be
ANSWER = row(
    PROMPT,
    "Use slicing: reversed_copy = items[::-1] returns a new list and leaves items as it was; "
    "reversed(items) gives an iterator over it instead.",
    0.62,
)


def test_the_single_answer_local_judge_is_fooled_by_an_echo_without_a_reference():
    # Why the rollout judges pairwise: alone, the echo outscores the real answer.
    assert LocalJudge().judge(ECHO, RUBRIC).overall > LocalJudge().judge(ANSWER, RUBRIC).overall


@pytest.mark.parametrize("echo_first", [True, False])
def test_an_answer_that_echoes_the_prompt_loses_the_pairwise_judge_in_either_position(echo_first):
    judge = PairwiseJudge(LocalJudge())
    first, second = (ECHO, ANSWER) if echo_first else (ANSWER, ECHO)
    preference = judge.compare(first, second, RUBRIC)
    assert preference.winner == ("second" if echo_first else "first")
    assert "of its words are the prompt's" in preference.rationale


def test_the_echo_share_measures_how_much_of_an_answer_is_the_prompt():
    assert echo_share(PROMPT, PROMPT) == 1.0
    assert echo_share(PROMPT, "") == 0.0
    assert echo_share(PROMPT, ANSWER["response"]) < 0.5


def test_pairwise_preferences_shuffle_positions_and_measure_position_bias(monkeypatch):
    from llmops.rollout import replay

    monkeypatch.setattr(replay, "make_judge", lambda settings: LocalJudge())
    monkeypatch.setattr(replay, "load_registered", lambda uri, name: RUBRIC)
    monkeypatch.setattr(replay, "judge_signals", lambda settings, rows: [{**r, "failed": False} for r in rows])
    pairs = [(ANSWER, ECHO)] * 8 + [(ECHO, ANSWER)] * 8
    judged = replay.pairwise_preferences(SimpleNamespace(mlflow=SimpleNamespace(tracking_uri="")), pairs, "seed")
    assert judged["preferences"] == [1.0] * 8 + [0.0] * 8  # whatever order each pair was shown in
    assert judged["swapped_pairs"] == 4
    assert judged["position_bias"] == 0.5  # a judge of content: the first position wins half the swaps
    again = replay.pairwise_preferences(SimpleNamespace(mlflow=SimpleNamespace(tracking_uri="")), pairs, "seed")
    assert again == judged


# -- a step: live traffic first, replay only below the floor -----------------------------------------


class Backend:
    """A serving backend whose challenger variant serves ``live`` requests per metrics read."""

    def __init__(self, live_per_read: int, errors_per_read: int = 0):
        self.live_per_read = live_per_read
        self.errors_per_read = errors_per_read
        self.invocations = 0
        self.errors = 0

    def variant_windows(self, name, since, shadow=False):
        self.invocations += self.live_per_read
        self.errors += self.errors_per_read
        return {"v2": VariantWindow(self.invocations, self.errors, 100.0, 120.0)}


def run_step(monkeypatch, backend, evidence: Evidence, latency_ms: float = 50.0, captured=(), clock=None):
    """``collect_step`` against ``backend``, replay faked; ``captured``: the capture's records."""
    replayed = []

    def fake_replay(settings, backend_, items, minimum, tag="replay", **_):
        batch = [{"item": "x", "variant": "v2", "status": 200, "latency_ms": latency_ms} for _ in range(minimum)]
        backend_.invocations += minimum
        replayed.extend(batch)
        return batch

    monkeypatch.setattr(steps, "replay", fake_replay)
    ticks = iter(range(0, 1_000_000, clock or 1))
    monkeypatch.setattr(
        steps, "time", SimpleNamespace(time=time.time, sleep=lambda s: None, monotonic=lambda: next(ticks))
    )
    settings = SimpleNamespace(serving=SimpleNamespace(endpoint_name="ep"))
    policy = RolloutPolicy(evidence=evidence)
    shadow = {
        "items": [{"id": "a", "prompt": "p"}],
        "comparison": {"champion": {"invocations": 100, "errors": 0, "p95_ms": 100.0, "p99_ms": 120.0}},
    }
    results, found, checks = steps.collect_step(
        settings, backend, policy, shadow, "50pct", "v2", 0.0, lambda: list(captured), 10, "50pct-run", lambda m: None
    )
    return results, found, checks, replayed


def test_a_step_with_enough_live_traffic_decides_on_it_alone(monkeypatch):
    evidence = Evidence(min_live_invocations=5, error_rate_harm=0.3, slow_share_harm=0.4, alpha=0.2)
    # No per-request latencies from live traffic (SageMaker's capture): latency untested.
    no_latency = [SimpleNamespace(latency_ms=None)] * 3
    _, found, checks, replayed = run_step(monkeypatch, Backend(live_per_read=20), evidence, captured=no_latency)
    assert replayed == [] and found["source"] == "live"
    tests = {t["name"]: t["verdict"] for t in found["tests"]}
    assert tests == {"error_rate": "no_harm", "latency": "untested"}
    assert all(c.passed for c in checks)


def test_a_step_below_the_live_floor_tops_up_with_replay_until_the_tests_decide(monkeypatch):
    evidence = Evidence(min_live_invocations=1000, error_rate_harm=0.3, slow_share_harm=0.4, alpha=0.2)
    _, found, checks, replayed = run_step(monkeypatch, Backend(live_per_read=1), evidence)
    assert replayed and found["source"] == "both"
    assert {t["verdict"] for t in found["tests"]} == {"no_harm"}
    assert found["observed"]["replayed"] == len(replayed)
    assert any("evidence: both" in c.detail for c in checks)


def test_a_step_that_errs_is_rolled_back_by_the_sprt(monkeypatch):
    evidence = Evidence(min_live_invocations=0, error_rate_harm=0.05)
    _, found, checks, _ = run_step(monkeypatch, Backend(live_per_read=10, errors_per_read=2), evidence)
    assert {t["name"]: t["verdict"] for t in found["tests"]}["error_rate"] == "harm"
    assert not all(c.passed for c in checks)


def test_a_step_past_its_time_limit_is_inconclusive(monkeypatch):
    evidence = Evidence(min_live_invocations=0, max_step_seconds=250)
    _, found, checks, replayed = run_step(monkeypatch, Backend(live_per_read=1), evidence, clock=100)
    assert replayed == []
    assert found["observed"]["requests"] < found["stated_sample_size"]["error_rate"]
    failed = [c.detail for c in checks if not c.passed]
    assert failed and all("inconclusive" in d for d in failed)
