"""The steps of ``llm_rollout``: deploy (alone, or in shadow), compare the shadow, shift traffic
in steps, promote or roll back.

Each step drives the endpoint through a serving backend (``llmops.backends.endpoints``) and
decides with the pure functions of ``llmops.rollout.policy``; each keeps what it did in the
run's ledger (``llmops.rollout.ledger``), so a cleared task of a finished rollout changes nothing.
No Airflow here: the DAG calls these functions. Each takes the run's ``RolloutPlan`` or the dict
XCom carries of it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from datetime import UTC, datetime

from llmops.backends.endpoints import backend_for
from llmops.backends.endpoints.base import (
    IN_SERVICE,
    DeploymentError,
    DeploymentRejected,
    apply_config,
    capture_config,
    config_name,
    endpoint_config_request,
    ensure_models,
    serve_alone,
    variant_name,
)
from llmops.capture import request_prompt
from llmops.config import Settings
from llmops.contracts import VariantWindow
from llmops.gate import Check
from llmops.rollout.contracts import RolloutPlan
from llmops.rollout.ledger import drop_challenger_alias, finished_phase, record_phase, tag_version
from llmops.rollout.plan import current_champion
from llmops.rollout.policy import (
    SHADOW_TESTS,
    STEP_TESTS,
    Observed,
    RolloutPolicy,
    check_guardrails,
    compare_shadow,
    decide_shadow,
    evidence_checks,
    evidence_source,
    keep_decided,
    latency_limit,
    required_sample_size,
    run_tests,
    settled,
    step_label,
    step_request_budget,
    step_weights,
    with_evidence,
)
from llmops.rollout.replay import (
    captured_rows,
    catalog_items,
    mean,
    pairwise_preferences,
    replay,
    replay_items,
    score_rows,
    shadow_pairs,
    wait_for_capture,
    wait_for_shadow,
)
from llmops.tracking import CHAMPION, client
from serving.capture import read_capture


def _soon() -> datetime:
    """An end for reads of capture up to now (bounds the hour folders a read lists)."""
    return datetime.fromtimestamp(time.time() + 60, UTC)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def deploy_first(
    settings: Settings, plan: RolloutPlan | dict, run_key: str, log: Callable[[str], None] = print
) -> dict:
    """No champion yet: serve the candidate alone, and check it answers (a few catalog prompts)."""
    plan = RolloutPlan.model_validate(plan)
    if (done := finished_phase(settings, run_key, "deploy_champion", log)) is not None:
        return done
    backend = backend_for(settings)
    candidate = plan.candidate
    name = serve_alone(settings, backend, candidate.model_dump(), "initial", run_key)
    log(f"endpoint {plan.endpoint} serves version {candidate.version} ({name})")
    smoke = replay(settings, backend, catalog_items(settings)[:3], 3, tag=f"smoke-{run_key[-20:]}")
    failed = [r for r in smoke if r["status"] != 200]
    if failed:
        raise DeploymentError(
            f"the smoke test failed on {len(failed)} of {len(smoke)} requests: {failed[0].get('error')}"
        )
    result = {"config": name, "variant": variant_name(candidate.version), "smoke_requests": len(smoke)}
    return record_phase(settings, run_key, "deploy_champion", result)


def deploy_shadow(
    settings: Settings, plan: RolloutPlan | dict, run_key: str, log: Callable[[str], None] = print
) -> dict:
    """The champion serves all traffic; the candidate receives a mirrored copy as the shadow."""
    plan = RolloutPlan.model_validate(plan)
    if (done := finished_phase(settings, run_key, "deploy_shadow", log)) is not None:
        return done
    backend = backend_for(settings)
    champion, candidate = plan.champion, plan.candidate
    ensure_models(settings, backend, [champion.model_dump(), candidate.model_dump()])
    name = config_name(plan.endpoint, "shadow", run_key)
    described = apply_config(
        settings,
        backend,
        endpoint_config_request(
            name, plan.endpoint, {champion.version: 1.0}, candidate.version, capture_config(settings)
        ),
    )
    tag_version(
        settings,
        candidate.version,
        {"rollout.status": "shadow", "rollout.endpoint": plan.endpoint, "rollout.started": _now()},
    )
    log(
        f"endpoint {plan.endpoint}: champion {variant_name(champion.version)} serves, "
        f"{variant_name(candidate.version)} shadows it ({name})"
    )
    return record_phase(settings, run_key, "deploy_shadow", {"config": name, "status": described["EndpointStatus"]})


def evaluate_shadow(
    settings: Settings, plan: RolloutPlan | dict, policy, run_key: str, log: Callable[[str], None] = print
) -> dict:
    """Replay a traffic sample through the endpoint, then compare the shadow's answers with the
    champion's on the same requests, and decide (``llmops.rollout.decide_shadow``)."""

    plan = RolloutPlan.model_validate(plan)
    if (done := finished_phase(settings, run_key, "compare_shadow", log)) is not None:
        return done
    backend = backend_for(settings)
    endpoint = plan.endpoint
    mine, theirs = variant_name(plan.candidate.version), variant_name(plan.champion.version)
    items = replay_items(settings, max(policy.replay_requests, 1), policy.lookback_hours)
    sampled = settings.serving.sampling_percentage / 100
    if sampled <= 0:
        raise DeploymentRejected("data capture is off (sampling_percentage 0): shadow answers cannot be compared")
    since = time.time()
    started = datetime.fromtimestamp(since - 0.001, UTC)  # inferenceTime is cut to the millisecond
    # Enough requests that, at the capture's sampling rate, about replay_requests pairs are captured.
    requests = math.ceil(policy.replay_requests / sampled)
    results = replay(settings, backend, items, requests, tag=f"shadow-{run_key[-20:]}")
    log(f"replayed {len(results)} requests ({sum(r['status'] == 200 for r in results)} answered)")
    # Only answered requests were mirrored: one that never reached the endpoint has no shadow copy.
    answered = wait_for_shadow(
        backend,
        endpoint,
        mine,
        sum(r["status"] == 200 for r in results),
        since,
        settings.serving.deploy_timeout_minutes * 60,
    )
    log(f"the shadow answered {answered} mirrored copies")
    expected = math.floor(answered * settings.serving.sampling_percentage / 100)

    def scan():
        return read_capture(settings.serving.capture_uri, endpoint, [mine, theirs], start=started, end=_soon())

    wait_for_capture(lambda: len(shadow_pairs(scan().records)), expected)
    pairs = shadow_pairs(scan().records)
    references = {i["prompt"]: i for i in items}
    rows = captured_rows([r for pair in pairs for r in pair], references)
    scores = score_rows(settings, rows)
    windows = backend.variant_windows(endpoint, since)
    comparison = compare_shadow(
        [(scores[2 * i], scores[2 * i + 1]) for i in range(len(pairs))],
        backend.variant_windows(endpoint, since, shadow=True).get(mine, VariantWindow(0, 0)),
        windows.get(theirs, VariantWindow(0, 0)),
    )
    decision = decide_shadow(comparison, policy)
    evidence = None
    if policy.evidence is not None:
        evidence, checks = shadow_evidence(
            settings, policy, pairs, references, windows.get(theirs), comparison.shadow, run_key
        )
        decision = with_evidence(decision, checks)
    tag_version(
        settings,
        plan.candidate.version,
        {
            "rollout.shadow.decision": decision.verdict,
            "rollout.shadow.pairs": comparison.pairs,
            "rollout.shadow.win_rate": f"{comparison.win_rate:.3f}" if comparison.win_rate is not None else "none",
            "rollout.shadow.reasons": "; ".join(decision.reasons),
        },
    )
    result = {
        "comparison": comparison.to_dict(),
        "decision": decision.to_dict(),
        "replayed": len(results),
        "items": items,
    }
    if evidence is not None:
        result["evidence"] = evidence
    return record_phase(settings, run_key, "compare_shadow", result)


def shadow_evidence(
    settings: Settings,
    policy: RolloutPolicy,
    pairs: list[tuple],
    references: dict[str, dict],
    champion: VariantWindow | None,
    shadow_window: VariantWindow,
    run_key: str,
) -> tuple[dict, list[Check]]:
    """The shadow phase's sequential tests on what it collected: the shadow's error rate and its
    requests slower than the champion's p95 on the same requests (plus the allowed increase), and
    the pairwise judge on each pair of answers. Replayed prompts are those of ``references``."""
    evidence = policy.evidence
    champion = champion or VariantWindow(0, 0)
    champion_rate = champion.error_rate if champion.invocations else None
    limit = latency_limit(champion.p95_ms, evidence)
    rows = captured_rows([r for pair in pairs for r in pair], references)
    judged = pairwise_preferences(settings, [(rows[2 * i], rows[2 * i + 1]) for i in range(len(pairs))], run_key)
    preferences = [p for p in judged["preferences"] if p is not None]
    latencies = [record.latency_ms for record, _ in pairs if record.latency_ms is not None]
    replayed = sum(1 for record, _ in pairs if request_prompt(record.request_json())[1] in references)
    observed = Observed(
        requests=shadow_window.invocations,
        errors=shadow_window.errors,
        timed=len(latencies),
        slow=sum(ms > limit for ms in latencies) if limit else 0,
        latency_limit_ms=limit,
        pairs=len(preferences),
        preference=sum(preferences),
        live=len(pairs) - replayed,
        replayed=replayed,
        latency_measured=bool(latencies) or not pairs,
    )
    horizons = required_sample_size(evidence, SHADOW_TESTS, champion_rate)
    outcomes = run_tests(evidence, observed, SHADOW_TESTS, champion_rate)
    found = {
        "observed": observed.to_dict(),
        "tests": [o.to_dict() for o in outcomes],
        "stated_sample_size": horizons,
        "source": evidence_source(observed),
        "judge": judged["judge"],
        "position_bias": judged["position_bias"],
        "swapped_pairs": judged["swapped_pairs"],
    }
    return found, evidence_checks("shadow", outcomes, evidence, horizons, observed)


def traffic_step(
    settings: Settings,
    plan: RolloutPlan | dict,
    policy,
    run_key: str,
    share: float,
    shadow: dict,
    log: Callable[[str], None] = print,
) -> dict:
    """Move ``share`` of traffic to the candidate, let the step run (replayed and live traffic),
    then check the guardrails on what the candidate did in the step."""

    plan = RolloutPlan.model_validate(plan)
    label = step_label(share)
    phase = f"shift_traffic_{label}"
    if (done := finished_phase(settings, run_key, phase, log)) is not None:
        return done
    backend = backend_for(settings)
    endpoint = plan.endpoint
    champion, candidate = plan.champion.version, plan.candidate.version
    mine, theirs = variant_name(candidate), variant_name(champion)
    described = backend.describe_endpoint(endpoint)
    production = {v["VariantName"] for v in (described or {}).get("ProductionVariants", [])}
    if mine not in production:
        name = config_name(endpoint, "ab", run_key)
        request = endpoint_config_request(
            name, endpoint, {champion: round(1 - share, 6), candidate: share}, None, capture_config(settings)
        )
        described = apply_config(settings, backend, request)
    weights = step_weights(share, theirs, mine)
    backend.update_endpoint_weights(endpoint, weights)
    described = backend.describe_endpoint(endpoint)
    applied = {v["VariantName"]: v["CurrentWeight"] for v in described["ProductionVariants"]}
    if any(abs(applied.get(v, -1) - w) > 1e-6 for v, w in weights.items()):
        raise DeploymentError(f"endpoint {endpoint} did not take the weights {weights}: it has {applied}")
    tag_version(settings, candidate, {"rollout.status": f"ab:{label}", "serving.weight": share})
    log(f"step {label}: weights {weights}")

    since = time.time()
    started = datetime.fromtimestamp(since - 0.001, UTC)

    def records():
        scan = read_capture(settings.serving.capture_uri, endpoint, [mine], start=started, end=_soon())
        return [r for r in scan.records if not r.shadow]

    evidence = None
    if policy.evidence is None:
        least, most = step_request_budget(share, policy, settings.serving.sampling_percentage)
        rails = policy.guardrails
        results = replay(
            settings,
            backend,
            shadow["items"],
            least,
            most,
            until=lambda done: sum(r["variant"] == mine for r in done) >= rails.min_invocations,
            tag=f"{label}-{run_key[-20:]}",
        )
        if policy.bake_seconds:
            time.sleep(policy.bake_seconds)
    else:
        results, evidence, evidence_found = collect_step(
            settings,
            backend,
            policy,
            shadow,
            label,
            mine,
            since,
            records,
            policy.step_requests,  # a replay batch: only while live traffic is below the floor
            f"{label}-{run_key[-20:]}",
            log,
        )
    served = sum(r["variant"] == mine for r in results)
    log(f"step {label}: replayed {len(results)} requests, {served} served by {mine}")
    window = backend.variant_windows(endpoint, since).get(mine, VariantWindow(0, 0))
    expected = math.floor(window.invocations * settings.serving.sampling_percentage / 100)

    wait_for_capture(lambda: len(records()), expected)
    references = {i["prompt"]: i for i in shadow["items"]}
    scores = score_rows(settings, captured_rows(records(), references))
    judged = mean(scores)
    scored = sum(s is not None for s in scores)
    decision = check_guardrails(
        label, window, judged, shadow["comparison"]["champion_judge_mean"], policy, judged_answers=scored
    )
    if evidence is not None:
        decision = with_evidence(decision, evidence_found)
    tag_version(
        settings,
        candidate,
        {f"rollout.{label}.decision": decision.verdict, f"rollout.{label}.reasons": "; ".join(decision.reasons)},
    )
    result = {
        "label": label,
        "share": share,
        "weights": weights,
        "window": window.__dict__,
        "judge_mean": judged,
        "judged_answers": scored,
        "replayed": len(results),
        "decision": decision.to_dict(),
    }
    if evidence is not None:
        result["evidence"] = evidence
    return record_phase(settings, run_key, phase, result)


def _champion_reference(shadow: dict) -> tuple[float | None, float | None]:
    """(error rate, p95 ms) of the champion in the shadow phase: fixed before a step begins, so the
    step's tests compare with a known reference (a moving one would void their error rates)."""
    champion = shadow["comparison"]["champion"]
    rate = champion["errors"] / champion["invocations"] if champion["invocations"] else None
    return rate, champion.get("p95_ms")


def request_latencies(records, results: list[dict], variant: str) -> list[float] | None:
    """The challenger's latency per request: the capture's (the gateway records each one), else,
    where the capture has none (SageMaker's), the replayed requests' as their caller saw them,
    network included, which errs toward slow. None when neither has any yet: no captured record
    holds a latency and nothing was replayed."""
    captured = [r.latency_ms for r in records if r.latency_ms is not None]
    if captured:
        return captured
    replayed = [r["latency_ms"] for r in results if r["variant"] == variant and r.get("latency_ms") is not None]
    return replayed if replayed or not records else None


def collect_step(
    settings: Settings,
    backend,
    policy: RolloutPolicy,
    shadow: dict,
    label: str,
    variant: str,
    since: float,
    records: Callable[[], list],
    batch: int,
    tag: str,
    log: Callable[[str], None] = print,
) -> tuple[list[dict], dict, list[Check]]:
    """Live traffic first: wait through the bake time, then read the challenger's window until the
    step's sequential tests decide (or reach their stated sample size), replaying a batch only
    while live traffic is below ``evidence.min_live_invocations``; past ``max_step_seconds`` what
    is undecided is inconclusive. Returns the replayed results, the evidence (what was observed,
    each test's outcome, the stated sample sizes) and its checks."""
    evidence = policy.evidence
    champion_rate, champion_p95 = _champion_reference(shadow)
    limit = latency_limit(champion_p95, evidence)
    horizons = required_sample_size(evidence, STEP_TESTS, champion_rate)
    deadline = time.monotonic() + evidence.max_step_seconds
    if policy.bake_seconds:
        time.sleep(min(policy.bake_seconds, evidence.max_step_seconds))
    results: list[dict] = []
    rounds = 0
    outcomes = None
    while True:
        window = backend.variant_windows(settings.serving.endpoint_name, since).get(variant, VariantWindow(0, 0))
        replayed = sum(r["variant"] == variant for r in results)
        live = max(window.invocations - replayed, 0)
        latencies = request_latencies(records(), results, variant)
        measured = latencies is not None
        latencies = latencies or []
        observed = Observed(
            requests=window.invocations,
            errors=window.errors,
            timed=len(latencies),
            slow=sum(ms > limit for ms in latencies) if limit else 0,
            latency_limit_ms=limit,
            live=live,
            replayed=replayed,
            latency_measured=measured,
        )
        outcomes = keep_decided(outcomes, run_tests(evidence, observed, STEP_TESTS, champion_rate))
        if settled(outcomes, horizons) or time.monotonic() >= deadline:
            break
        if live < evidence.min_live_invocations and batch > 0 and shadow["items"]:
            results += replay(settings, backend, shadow["items"], batch, tag=f"{tag}-{rounds}")
            rounds += 1
        else:
            time.sleep(evidence.poll_seconds)
    log(f"evidence: {observed.live} live, {observed.replayed} replayed; " + "; ".join(o.rule for o in outcomes))
    return (
        results,
        {
            "observed": observed.to_dict(),
            "tests": [o.to_dict() for o in outcomes],
            "stated_sample_size": horizons,
            "source": evidence_source(observed),
        },
        evidence_checks(label, outcomes, evidence, horizons, observed),
    )


def promote(settings: Settings, plan: RolloutPlan | dict, run_key: str, log: Callable[[str], None] = print) -> dict:
    """The candidate takes all traffic on its own config (the old variant retires), the
    ``champion`` alias moves to it, and both versions record where they serve."""

    plan = RolloutPlan.model_validate(plan)
    if (done := finished_phase(settings, run_key, "promote", log)) is not None:
        return done
    backend = backend_for(settings)
    endpoint, candidate, previous = plan.endpoint, plan.candidate, plan.champion
    name = serve_alone(settings, backend, candidate.model_dump(), "final", run_key)
    client(settings.mlflow.tracking_uri).set_registered_model_alias(plan.model_name, CHAMPION, candidate.version)
    drop_challenger_alias(settings, candidate.version)
    now = _now()
    tag_version(
        settings,
        candidate.version,
        {
            "serving.status": CHAMPION,
            "serving.endpoint": endpoint,
            "serving.variant": variant_name(candidate.version),
            "serving.weight": 1.0,
            "serving.endpoint_config": name,
            "serving.since": now,
            "rollout.status": "promoted",
        },
    )
    if previous is not None:
        tag_version(
            settings,
            previous.version,
            {
                "serving.status": "retired",
                "serving.weight": 0.0,
                "serving.retired_at": now,
                "serving.retired_by": candidate.version,
            },
        )
    log(f"version {candidate.version} is the {CHAMPION}, serving all traffic on {endpoint}")
    result = {"champion": candidate.version, "previous": previous.version if previous else None, "config": name}
    return record_phase(settings, run_key, "promote", result)


def roll_back(
    settings: Settings,
    plan: RolloutPlan | dict,
    run_key: str,
    reasons: list[str],
    log: Callable[[str], None] = print,
    reject: bool = True,
) -> dict:
    """Traffic returns to the champion at once (weights), then the endpoint serves it alone again
    (re-created if it is gone). With ``reject`` (a failed check) the candidate is tagged rejected
    with the reasons and loses the ``challenger`` alias; without (the rollout itself failed) it is
    tagged failed and keeps the alias, so it can be rolled out again."""
    plan = RolloutPlan.model_validate(plan)
    if reject and (done := finished_phase(settings, run_key, "roll_back", log)) is not None:
        return done
    backend = backend_for(settings)
    endpoint, candidate, champion = plan.endpoint, plan.candidate, plan.champion
    described = backend.describe_endpoint(endpoint)
    restored = None
    if champion is None:
        # Nothing served before this run; unless the candidate became the champion after all.
        if described is not None and current_champion(settings) != candidate.version:
            backend.delete_endpoint(endpoint)
    else:
        mine, theirs = variant_name(candidate.version), variant_name(champion.version)
        production = {v["VariantName"] for v in (described or {}).get("ProductionVariants", [])}
        if described and described["EndpointStatus"] == IN_SERVICE and {mine, theirs} <= production:
            backend.update_endpoint_weights(endpoint, {theirs: 1.0, mine: 0.0})
            log(f"traffic back on {theirs}")
        restored = serve_alone(settings, backend, champion.model_dump(), "restored", run_key)
    tags = {
        "rollout.status": "rolled_back" if reject else "failed",
        "rollout.reasons": "; ".join(reasons) or "unspecified",
        "rollout.rolled_back_at": _now(),
        "serving.weight": 0.0,
    }
    if reject:
        tags["serving.status"] = "rejected"
    tag_version(settings, candidate.version, tags)
    if reject:
        drop_challenger_alias(settings, candidate.version)
    log(f"version {candidate.version} rolled back: " + "; ".join(reasons))
    result = {"rolled_back": candidate.version, "reasons": reasons, "config": restored, "rejected": reject}
    # A verdict ends the rollout; a failure does not (clearing the failed tasks tries again).
    return record_phase(settings, run_key, "roll_back", result) if reject else result
