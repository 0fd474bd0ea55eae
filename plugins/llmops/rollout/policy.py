"""Rollout decisions: a typed ``RolloutPolicy`` and pure functions of what was observed.

A challenger goes through three phases, each ending in a ``Decision`` (``llmops.gate``'s:
``promote`` means "go on", and every check says why):

1. **Shadow.** It receives mirrored copies of traffic next to the champion. ``compare_shadow``
   turns the paired answers' judge scores, error counts and latencies into a ``ShadowComparison``;
   ``decide_shadow`` checks it against ``policy.shadow`` (enough pairs, judge win rate, error
   rate, latency ratio).
2. **A/B steps.** Traffic moves to it in ``policy.traffic_steps`` (for example 10% → 50% → 100%);
   after each step ``check_guardrails`` looks at the step's window (its error rate, p99 latency
   and online judge score against the champion's) and says continue or roll back.
3. **Promote or roll back**, done by the DAG: ``all_phases_passed`` promotes, ``first_stop`` names
   the phase that rolls back.

With ``policy.evidence`` (an ``Evidence``), each phase also runs sequential tests whose power is
stated (``required_sample_size``): the error rate and the share of slow requests (SPRTs), and in
the shadow the pairwise judge's preference (a confidence sequence); see
``llmops.rollout.sequential``. ``run_tests`` reads what was ``Observed``; ``evidence_checks``
turns the outcomes into checks with their sample size, statistic and rule, and an inconclusive
test (undecided at the step's time limit) takes ``evidence.on_inconclusive``.

Nothing here knows Airflow, MLflow, the gateway or SageMaker: the same functions decide on the
local gateway and on a SageMaker endpoint.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from llmops.contracts import VariantWindow
from llmops.gate import Check, Decision
from llmops.rollout.sequential import (
    TestOutcome,
    bernoulli_sprt,
    mean_shift_test,
    required_bernoulli_sample_size,
    required_mean_sample_size,
)

# A variant's p95 latency: 5% of its requests are slower.
TAIL = 0.05
# The pairwise judge's preference per prompt (challenger 1, tie 1/2, champion 0) lies in [0, 1]:
# sub-Gaussian with sigma 1/2 (Hoeffding), whatever its distribution.
PREFERENCE_SIGMA = 0.5


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ShadowCriteria(_Strict):
    min_pairs: int = Field(8, ge=1, description="paired answers needed for a verdict")
    min_win_rate: float = Field(0.4, ge=0, le=1, description="share of pairs the judge prefers the shadow (ties: half)")
    max_error_rate: float = Field(0.02, ge=0, le=1)
    max_latency_ratio: float = Field(2.0, gt=0, description="shadow p95 latency / champion p95 latency")


class Guardrails(_Strict):
    min_invocations: int = Field(4, ge=1, description="challenger requests in a step needed for a verdict")
    max_error_rate: float = Field(0.02, ge=0, le=1)
    max_p99_latency_ms: float = Field(60_000, gt=0)
    max_judge_drop: float = Field(
        1.0, ge=0, description="how far (1-10 scale) the challenger's online judge mean may fall below the champion's"
    )
    min_judged: int = Field(2, ge=1, description="the challenger's answers in a step the judge must have scored")


class Evidence(_Strict):
    """What a decision must be able to tell apart, and how often it may be wrong. Each test of a
    decision runs at ``alpha`` split between the decision's tests (Bonferroni), so a challenger no
    worse than the champion is rolled back at most ``alpha`` of the time per decision, and a
    challenger with the stated harm passes at most ``beta`` of the time (power ``1 - beta``)."""

    alpha: float = Field(0.05, gt=0, lt=0.5, description="false roll-back rate a decision accepts")
    beta: float = Field(0.2, gt=0, lt=0.5, description="rate of missing the stated harm a decision accepts")
    baseline_error_rate: float = Field(
        0.01, gt=0, lt=1, description="error rate taken as the champion's when its measured one is lower"
    )
    error_rate_harm: float = Field(0.05, gt=0, lt=1, description="error-rate increase to detect (0.05: +5 points)")
    p95_increase: float = Field(
        0.2, ge=0, description="p95 latency increase over the champion's that is harm (0.2: +20%)"
    )
    slow_share_harm: float = Field(
        0.10,
        gt=TAIL,
        lt=1,
        description="share of the challenger's requests above the latency limit to detect (5%: the limit is its p95)",
    )
    judge_win_rate_drop: float = Field(
        0.15, gt=0, le=0.5, description="pairwise judge: how far below 0.5 the challenger's win rate is harm"
    )
    max_step_seconds: float = Field(600, gt=0, description="a step's time limit: undecided then is inconclusive")
    on_inconclusive: Literal["roll_back", "promote"] = Field(
        "roll_back", description="what an inconclusive test decides (never promote on thin evidence unless told)"
    )
    min_live_invocations: int = Field(
        0, ge=0, description="live requests to the challenger a step expects; replay tops up below it"
    )
    poll_seconds: float = Field(2, gt=0, description="how often a step reads its metrics while it collects")

    def error_rates(self, champion_rate: float | None = None) -> tuple[float, float]:
        """(p0, p1) of the error-rate test: the champion's rate (never below the baseline), and that
        plus the stated harm."""
        p0 = max(self.baseline_error_rate, champion_rate or 0.0)
        return p0, min(p0 + self.error_rate_harm, 0.999)

    def split_alpha(self, tests: int) -> float:
        return self.alpha / max(tests, 1)


class RolloutPolicy(_Strict):
    traffic_steps: list[float] = Field(default_factory=lambda: [0.1, 0.5, 1.0], min_length=1, max_length=10)
    replay_requests: int = Field(16, ge=0, description="requests replayed through the endpoint in the shadow phase")
    step_requests: int = Field(12, ge=0, description="requests replayed per traffic step (0: live traffic only)")
    bake_seconds: float = Field(0, ge=0, description="time each step waits for live traffic before its verdict")
    lookback_hours: float = Field(24, gt=0, description="how far back captured prompts are sampled for replay")
    shadow: ShadowCriteria = ShadowCriteria()
    guardrails: Guardrails = Guardrails()
    evidence: Evidence | None = Field(
        None, description="sequential tests with stated power; None: the fixed thresholds alone decide"
    )

    @model_validator(mode="after")
    def _steps_see_traffic(self) -> RolloutPolicy:
        if self.step_requests == 0 and self.bake_seconds == 0:
            raise ValueError("with step_requests 0 (live traffic only) a step needs bake_seconds > 0 to see any")
        return self

    @field_validator("traffic_steps")
    @classmethod
    def _increasing_to_all(cls, steps: list[float]) -> list[float]:
        if any(not 0 < s <= 1 for s in steps):
            raise ValueError(f"each traffic step is a share of traffic in (0, 1], got {steps}")
        if any(b <= a for a, b in itertools.pairwise(steps)):
            raise ValueError(f"traffic steps must increase, got {steps}")
        if steps[-1] != 1.0:
            raise ValueError(f"the last traffic step must send all traffic (1.0) to the challenger, got {steps[-1]}")
        return steps


def step_label(share: float) -> str:
    """``0.1`` -> ``10pct``: a step's name in task ids and tags."""
    return f"{round(share * 100):d}pct"


def step_weights(share: float, champion_variant: str, challenger_variant: str) -> dict[str, float]:
    """The production variants' weights at a step: ``share`` of traffic to the challenger."""
    return {champion_variant: round(1.0 - share, 6), challenger_variant: round(share, 6)}


def step_request_budget(share: float, policy: RolloutPolicy, sampling_percentage: float = 100) -> tuple[int, int]:
    """(at least, at most) requests to replay in a step: at least ``step_requests``, and enough
    that the challenger, drawn with probability ``share``, very likely gets ``min_invocations``
    and has ``min_judged`` of its answers captured at the capture's sampling rate."""
    if policy.step_requests == 0:
        return 0, 0
    rails = policy.guardrails
    wanted = max(rails.min_invocations, math.ceil(rails.min_judged * 100 / max(sampling_percentage, 1)))
    needed = math.ceil(wanted / share)
    return max(policy.step_requests, needed), max(policy.step_requests, 6 * needed)


def win_rate(pairs: list[tuple[float | None, float | None]]) -> tuple[float | None, int]:
    """Share of (challenger score, champion score) pairs where the challenger scores higher,
    ties counting half; pairs with a missing score are left out. Returns (rate, pairs used)."""
    scored = [(a, b) for a, b in pairs if a is not None and b is not None]
    if not scored:
        return None, 0
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in scored)
    return wins / len(scored), len(scored)


@dataclass(frozen=True)
class ShadowComparison:
    pairs: int
    win_rate: float | None
    challenger_judge_mean: float | None
    champion_judge_mean: float | None
    shadow: VariantWindow
    champion: VariantWindow

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ShadowComparison:
        return cls(**{**data, "shadow": VariantWindow(**data["shadow"]), "champion": VariantWindow(**data["champion"])})


def compare_shadow(
    scores: list[tuple[float | None, float | None]], shadow: VariantWindow, champion: VariantWindow
) -> ShadowComparison:
    rate, used = win_rate(scores)
    complete = [(a, b) for a, b in scores if a is not None and b is not None]
    mine, theirs = [a for a, _ in complete], [b for _, b in complete]
    return ShadowComparison(
        pairs=used,
        win_rate=rate,
        challenger_judge_mean=sum(mine) / len(mine) if mine else None,
        champion_judge_mean=sum(theirs) / len(theirs) if theirs else None,
        shadow=shadow,
        champion=champion,
    )


def decide_shadow(comparison: ShadowComparison, policy: RolloutPolicy) -> Decision:
    """Go on to A/B only when the shadow answered enough paired requests, won often enough with
    the judge, erred rarely enough and was not too slow next to the champion."""
    criteria = policy.shadow
    checks = []
    enough = comparison.pairs >= criteria.min_pairs
    checks.append(Check("shadow_pairs", enough, f"{comparison.pairs} paired answers (need {criteria.min_pairs})"))
    if enough and comparison.win_rate is not None:
        ok = comparison.win_rate >= criteria.min_win_rate
        checks.append(
            Check(
                "shadow_win_rate",
                ok,
                f"judge win rate {comparison.win_rate:.2f} {'>=' if ok else '<'} {criteria.min_win_rate:.2f}"
                f" (challenger {comparison.challenger_judge_mean:.2f}"
                f" vs champion {comparison.champion_judge_mean:.2f})",
            )
        )
    else:
        checks.append(Check("shadow_win_rate", False, "no judge verdict: too few paired answers"))
    rate = comparison.shadow.error_rate
    ok = comparison.shadow.invocations > 0 and rate <= criteria.max_error_rate
    checks.append(
        Check(
            "shadow_error_rate",
            ok,
            f"shadow error rate {rate:.1%} of {comparison.shadow.invocations} (at most {criteria.max_error_rate:.1%})"
            if comparison.shadow.invocations
            else "the shadow answered no requests",
        )
    )
    mine, theirs = comparison.shadow.p95_ms, comparison.champion.p95_ms
    if mine is None or not theirs:
        checks.append(Check("shadow_latency", False, "no latency to compare: a variant answered no requests"))
    else:
        ratio = mine / theirs
        ok = ratio <= criteria.max_latency_ratio
        checks.append(
            Check(
                "shadow_latency",
                ok,
                f"p95 latency {mine:.0f} ms vs champion {theirs:.0f} ms: {ratio:.2f}x"
                f" ({'within' if ok else 'beyond'} {criteria.max_latency_ratio:g}x)",
            )
        )
    return Decision(all(c.passed for c in checks), tuple(checks))


def check_guardrails(
    label: str,
    challenger: VariantWindow,
    challenger_judge_mean: float | None,
    champion_judge_mean: float | None,
    policy: RolloutPolicy,
    judged_answers: int | None = None,
) -> Decision:
    """After a traffic step: continue only if the challenger served enough requests in the step,
    with an error rate, p99 latency and online judge score inside the guardrails. Too little
    traffic is no verdict, and no verdict rolls back (never promote on missing evidence)."""
    rails = policy.guardrails
    checks = []
    enough = challenger.invocations >= rails.min_invocations
    checks.append(
        Check(
            f"{label}_traffic",
            enough,
            f"step {label}: the challenger served {challenger.invocations} requests (need {rails.min_invocations})",
        )
    )
    if not enough:  # no verdict on the rest: too little to measure
        return Decision(False, tuple(checks))
    ok = challenger.error_rate <= rails.max_error_rate
    checks.append(
        Check(
            f"{label}_error_rate",
            ok,
            f"step {label}: error rate {challenger.error_rate:.1%} (at most {rails.max_error_rate:.1%})",
        )
    )
    if challenger.p99_ms is None:
        checks.append(Check(f"{label}_p99_latency", False, f"step {label}: no latency measured"))
    else:
        ok = challenger.p99_ms <= rails.max_p99_latency_ms
        checks.append(
            Check(
                f"{label}_p99_latency",
                ok,
                f"step {label}: p99 latency {challenger.p99_ms:.0f} ms ({'within' if ok else 'above'}"
                f" {rails.max_p99_latency_ms:.0f} ms)",
            )
        )
    if challenger_judge_mean is None or champion_judge_mean is None:
        checks.append(Check(f"{label}_judge", False, f"step {label}: no online judge score"))
    elif judged_answers is not None and judged_answers < rails.min_judged:
        checks.append(
            Check(
                f"{label}_judge",
                False,
                f"step {label}: the judge scored {judged_answers} of the challenger's answers"
                f" (need {rails.min_judged})",
            )
        )
    else:
        drop = champion_judge_mean - challenger_judge_mean
        ok = drop <= rails.max_judge_drop
        checks.append(
            Check(
                f"{label}_judge",
                ok,
                f"step {label}: online judge {challenger_judge_mean:.2f} vs champion {champion_judge_mean:.2f}"
                f" ({'within' if ok else 'beyond'} the allowed drop of {rails.max_judge_drop:g})",
            )
        )
    return Decision(all(c.passed for c in checks), tuple(checks))


def all_phases_passed(results: list[dict | None]) -> bool:
    """Every phase of a shadow rollout (the shadow comparison, then each step) ran and said go on:
    promotion needs evidence, not silence."""
    return all(result and result["decision"]["promote"] for result in results)


def first_stop(phases: dict[str, dict | None]) -> dict | None:
    """The first phase (in order, by name) whose decision says stop, with its decision; None when
    none did. A phase that has not run (None) says nothing."""
    for phase, result in phases.items():
        if result and not result["decision"]["promote"]:
            return {"phase": phase, **result["decision"]}
    return None


def rollout_outcome(promoted: dict | None, rolled_back: dict | None) -> str:
    """How a rollout run ended, as its record and the candidate's tags name it."""
    return "promoted" if promoted else "rolled back" if rolled_back else "unfinished"


# -- decisions with stated power ---------------------------------------------------------------------

STEP_TESTS = ("error_rate", "latency")
SHADOW_TESTS = ("error_rate", "latency", "judge")


@dataclass(frozen=True)
class Observed:
    """What a phase saw of the challenger, as the sequential tests count it: its requests and errors,
    the requests with a latency and how many were slower than the limit, the pairwise judge's
    preferences (their count and sum), and where the requests came from."""

    requests: int
    errors: int
    timed: int = 0
    slow: int = 0
    latency_limit_ms: float | None = None
    pairs: int = 0
    preference: float = 0.0
    live: int = 0
    replayed: int = 0
    latency_measured: bool = True  # per-request latencies exist (SageMaker's capture has none)

    def to_dict(self) -> dict:
        return asdict(self)


def latency_limit(champion_p95_ms: float | None, evidence: Evidence) -> float | None:
    """The latency above which a challenger's request counts as slow: the champion's p95, plus the
    increase the policy allows. A challenger whose p95 is within it has at most 5% of its requests
    above it; the test detects one with ``slow_share_harm`` of them above (its p90 there, at 10%)."""
    return champion_p95_ms * (1 + evidence.p95_increase) if champion_p95_ms else None


def required_sample_size(
    evidence: Evidence, tests: tuple[str, ...] = STEP_TESTS, champion_error_rate: float | None = None
) -> dict[str, int]:
    """The sample size each test of a decision needs, stated before it starts: by then the test has
    caught the stated harm with probability at least ``1 - beta``, and (for the rates) passed a
    challenger no worse than the champion with probability at least ``1 - alpha``."""
    alpha, beta = evidence.split_alpha(len(tests)), evidence.beta
    sizes = {}
    for test in tests:
        if test == "error_rate":
            sizes[test] = required_bernoulli_sample_size(*evidence.error_rates(champion_error_rate), alpha, beta)
        elif test == "latency":
            sizes[test] = required_bernoulli_sample_size(TAIL, evidence.slow_share_harm, alpha, beta)
        elif test == "judge":
            sizes[test] = required_mean_sample_size(PREFERENCE_SIGMA, evidence.judge_win_rate_drop, alpha, beta)
        else:
            raise ValueError(f"unknown sequential test {test!r}: one of {', '.join(SHADOW_TESTS)}")
    return sizes


def run_tests(
    evidence: Evidence,
    observed: Observed,
    tests: tuple[str, ...] = STEP_TESTS,
    champion_error_rate: float | None = None,
) -> list[TestOutcome]:
    """Each sequential test on what was observed so far (see ``llmops.rollout.sequential``)."""
    alpha, beta = evidence.split_alpha(len(tests)), evidence.beta
    horizons = required_sample_size(evidence, tests, champion_error_rate)
    outcomes = []
    for test in tests:
        if test == "error_rate":
            p0, p1 = evidence.error_rates(champion_error_rate)
            outcomes.append(
                bernoulli_sprt("error_rate", observed.requests, observed.errors, p0, p1, alpha, beta, horizons[test])
            )
        elif test == "latency":
            if not observed.latency_measured:
                why = "no per-request latencies (the capture has none): the p99 ceiling and alarms guard latency"
                outcomes.append(TestOutcome("latency", "untested", 0, None, None, None, why))
                continue
            if observed.latency_limit_ms is None:
                outcomes.append(TestOutcome("latency", "undecided", 0, None, None, None, "no champion p95 to limit"))
                continue
            outcome = bernoulli_sprt(
                "latency", observed.timed, observed.slow, TAIL, evidence.slow_share_harm, alpha, beta, horizons[test]
            )
            rule = f"slower than {observed.latency_limit_ms:.0f} ms: {outcome.rule}"
            outcomes.append(TestOutcome(**{**outcome.to_dict(), "rule": rule}))
        elif test == "judge":
            outcomes.append(
                mean_shift_test(
                    "judge",
                    observed.pairs,
                    observed.preference,
                    0.5,
                    evidence.judge_win_rate_drop,
                    PREFERENCE_SIGMA,
                    alpha,
                    beta,
                )
            )
    return outcomes


def keep_decided(before: list[TestOutcome] | None, now: list[TestOutcome]) -> list[TestOutcome]:
    """Each test's first decision stands: a sequential test stops when it decides, and looking on
    afterwards (while another test still collects) would give it more chances to be wrong."""
    done = {o.name: o for o in before or () if o.verdict in ("harm", "no_harm")}
    return [done.get(o.name, o) for o in now]


def settled(outcomes: list[TestOutcome], horizons: dict[str, int]) -> bool:
    """Collecting more changes nothing: a test found harm (that rolls back whatever the others
    say), or every test decided or reached its stated sample size."""
    if any(o.verdict == "harm" for o in outcomes):
        return True
    return all(o.verdict in ("harm", "no_harm", "untested") or o.n >= horizons[o.name] for o in outcomes)


def evidence_source(observed: Observed) -> str:
    if observed.live and observed.replayed:
        return "both"
    return "replayed" if observed.replayed else "live" if observed.live else "none"


def evidence_checks(
    label: str, outcomes: list[TestOutcome], evidence: Evidence, horizons: dict[str, int], observed: Observed
) -> list[Check]:
    """One check per sequential test (its verdict, sample size, statistic and the rule that fired),
    and one naming the evidence: live, replayed or both, and whether it was thin (some test stopped
    short of its stated sample size undecided)."""
    checks = []
    for o in outcomes:
        stated = f"n {o.n} of stated {horizons[o.name]}"
        if o.verdict == "harm":
            checks.append(Check(f"{label}_{o.name}_test", False, f"{label} {o.name}: harm ({stated}); {o.rule}"))
        elif o.verdict == "no_harm":
            checks.append(Check(f"{label}_{o.name}_test", True, f"{label} {o.name}: no harm ({stated}); {o.rule}"))
        elif o.verdict == "untested":
            checks.append(Check(f"{label}_{o.name}_test", True, f"{label} {o.name}: not tested; {o.rule}", True))
        else:
            default = evidence.on_inconclusive
            checks.append(
                Check(
                    f"{label}_{o.name}_test",
                    default == "promote",
                    f"{label} {o.name}: inconclusive ({stated}), default {default.replace('_', ' ')}; {o.rule}",
                )
            )
    thin = any(o.verdict == "undecided" and o.n < horizons[o.name] for o in outcomes)
    checks.append(
        Check(
            f"{label}_evidence",
            True,
            f"{label} evidence: {evidence_source(observed)} ({observed.live} live, {observed.replayed} replayed"
            f" requests{f', {observed.pairs} judged pairs' if observed.pairs else ''})"
            + ("; thin: a test stopped short of its stated sample size" if thin else ""),
        )
    )
    return checks


def with_evidence(decision: Decision, checks: list[Check]) -> Decision:
    """A fixed-threshold decision with the sequential tests' checks added: both must pass."""
    merged = (*decision.checks, *checks)
    return Decision(all(c.passed for c in merged), merged)
