"""
### llm_rollout: serve a challenger in shadow, shift traffic to it in steps, promote or roll back

Starts when `llm_finetune` moves the `challenger` alias (the challenger Asset), or from the
trigger form with a model version.

plan_rollout → deploy_champion (no champion yet) → promote
plan_rollout → deploy_shadow → compare_shadow → shift_traffic_<step>… → promote | roll_back
→ record_rollout

* **No champion yet:** the candidate is deployed alone, answers a smoke test, and becomes the
  `champion`.
* **Otherwise:** the candidate shadows the champion (a mirrored copy of every request, never
  seen by callers); a traffic sample is replayed (recent captured prompts, topped up from the
  evaluation catalog) and the shadow's answers are compared with the champion's on the same
  requests: judge win rate, error rate, latency. Then traffic moves to it in the steps of
  `serving.rollout.traffic_steps`, each followed by a guardrail check (error rate, p99 latency,
  online judge score). A pass at every step promotes it: the `champion` alias moves, the old
  variant retires, and both versions record endpoint, variant and weight as tags. A failed check
  rolls back at once: traffic returns to the champion and the candidate is tagged rejected with
  the reasons. A task that fails outright also restores the champion before the run fails.

With `serving.rollout.evidence`, each phase also runs sequential tests with stated power (error
rate, slow requests, and the pairwise judge in the shadow); a step bakes on live traffic and
replays only below `min_live_invocations`, and a test still undecided at `max_step_seconds` is
inconclusive and takes `on_inconclusive`.

Every decision comes from `llmops.rollout.policy` (pure functions of the measurements, with reasons);
`record_rollout` logs the measurements to an MLflow run linked from the candidate's version.

**Where it serves** is `serving.backend`: the local gateway, or a SageMaker real-time endpoint
(`llmops.backends.endpoints.sagemaker`: production and shadow variants, data capture to S3,
`UpdateEndpointWeightsAndCapacities` for the steps, blue/green updates with rollback alarms, and
a state check after every update). The graph and the decisions are the same on both.
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import Param, dag, get_current_context, task

from llmops.compat import TriggerRule
from llmops.config import get_settings
from llmops.orchestration import challenger_asset, fail_without_retry
from llmops.orchestration.rollout import log, restore_champion, rollout_context, run_key, skip
from llmops.rollout import ledger, steps
from llmops.rollout.plan import plan_rollout as plan_run
from llmops.rollout.policy import all_phases_passed, first_stop, rollout_outcome, step_label

SETTINGS = get_settings()
POLICY = SETTINGS.serving.policy()
EVIDENCE = POLICY.evidence
DEPLOY_TIMEOUT = timedelta(minutes=SETTINGS.serving.deploy_timeout_minutes * 2 + 10)
# A traffic step also bakes and collects evidence, up to its time limit.
STEP_TIMEOUT = DEPLOY_TIMEOUT + timedelta(seconds=POLICY.bake_seconds + (EVIDENCE.max_step_seconds if EVIDENCE else 0))


@dag(
    dag_id="llm_rollout",
    schedule=[challenger_asset(SETTINGS)],
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,  # one rollout at a time moves an endpoint's traffic
    doc_md=__doc__,
    tags=["llmops", "serving"],
    default_args={"owner": "llmops", "retries": 1, "retry_delay": timedelta(seconds=30)},
    params={
        "model_version": Param(
            "",
            type="string",
            title="Model version",
            description=f"A version of {SETTINGS.finetune.model_name} to roll out; empty: the current challenger.",
        ),
        "replay_requests": Param(POLICY.replay_requests, type="integer", minimum=0, title="Shadow replay requests"),
        "step_requests": Param(
            POLICY.step_requests,
            type="integer",
            minimum=0,
            title="Requests per traffic step",
            description="Replayed at each A/B step (0: judge live traffic only).",
        ),
        "min_shadow_win_rate": Param(
            POLICY.shadow.min_win_rate,
            type="number",
            minimum=0,
            maximum=1,
            title="Minimum shadow win rate",
            description="Share of paired answers the judge must prefer the challenger's (ties count half).",
        ),
        "max_error_rate": Param(
            POLICY.guardrails.max_error_rate, type="number", minimum=0, maximum=1, title="Guardrail: max error rate"
        ),
        "max_p99_latency_ms": Param(
            POLICY.guardrails.max_p99_latency_ms,
            type="number",
            exclusiveMinimum=0,
            title="Guardrail: max p99 latency (ms)",
        ),
        "bake_seconds": Param(
            POLICY.bake_seconds,
            type="number",
            minimum=0,
            title="Bake time per step (s)",
            description="How long each traffic step lets live traffic flow before its guardrail check.",
        ),
        "max_step_seconds": Param(
            EVIDENCE.max_step_seconds if EVIDENCE else None,
            type=["null", "number"],
            exclusiveMinimum=0,
            # The step's task times out past the configured limit.
            **({"maximum": EVIDENCE.max_step_seconds} if EVIDENCE else {}),
            title="Step time limit (s)",
            description="How long a step collects for its sequential tests (at most the configured limit);"
            " undecided then is inconclusive.",
        ),
        "on_inconclusive": Param(
            EVIDENCE.on_inconclusive if EVIDENCE else None,
            type=["null", "string"],
            enum=[None, "roll_back", "promote"],
            title="An inconclusive test",
            description="What a test still undecided at the time limit decides.",
        ),
    },
)
def llm_rollout():
    @task
    @fail_without_retry
    def plan_rollout() -> dict:
        context = get_current_context()
        plan = plan_run(SETTINGS, context["params"]["model_version"] or None, run_key(context), log)
        log(f"{plan['action']}: {plan['reason']}")
        if plan["action"] == "nothing":
            skip(plan["reason"])
        return plan

    @task(execution_timeout=DEPLOY_TIMEOUT)
    @fail_without_retry
    def deploy_champion(plan: dict | None) -> dict:
        plan, _, key = rollout_context(SETTINGS, plan, get_current_context())
        if plan.action != "first_deploy":
            skip(f"there is a champion (version {plan.champion.version}): the candidate goes through shadow")
        return steps.deploy_first(SETTINGS, plan, key, log)

    @task(execution_timeout=DEPLOY_TIMEOUT)
    @fail_without_retry
    def deploy_shadow(plan: dict | None) -> dict:
        plan, _, key = rollout_context(SETTINGS, plan, get_current_context())
        if plan.action != "rollout":
            skip("no champion yet: nothing to shadow")
        return steps.deploy_shadow(SETTINGS, plan, key, log)

    @task(execution_timeout=DEPLOY_TIMEOUT)
    @fail_without_retry
    def compare_shadow(plan: dict | None) -> dict:
        plan, policy, key = rollout_context(SETTINGS, plan, get_current_context())
        result = steps.evaluate_shadow(SETTINGS, plan, policy, key, log)
        log(f"shadow {result['decision']['verdict']}:\n  " + "\n  ".join(result["decision"]["reasons"]))
        return result

    def traffic_step(share: float):
        @task(task_id=f"shift_traffic_{step_label(share)}", execution_timeout=STEP_TIMEOUT)
        @fail_without_retry
        def shift(plan: dict | None, shadow: dict, earlier: dict[str, dict | None]) -> dict:
            """``earlier``: every phase before this step, in order, by task id."""
            plan, policy, key = rollout_context(SETTINGS, plan, get_current_context())
            stopped = first_stop(earlier)
            if stopped is not None:
                skip(f"{stopped['phase']} said roll back")
            result = steps.traffic_step(SETTINGS, plan, policy, key, share, shadow, log)
            log(
                f"step {result['label']} {result['decision']['verdict']}:\n  "
                + "\n  ".join(result["decision"]["reasons"])
            )
            return result

        return shift

    @task(trigger_rule=TriggerRule.NONE_FAILED, execution_timeout=DEPLOY_TIMEOUT)
    @fail_without_retry
    def promote(plan: dict | None, phases: list[dict | None]) -> dict:
        plan, _, key = rollout_context(SETTINGS, plan, get_current_context())
        if plan.action == "rollout" and not all_phases_passed(phases):
            skip("not every phase of the rollout passed")
        return steps.promote(SETTINGS, plan, key, log)

    @task(trigger_rule=TriggerRule.NONE_FAILED, execution_timeout=DEPLOY_TIMEOUT)
    def roll_back(plan: dict | None, phases: dict[str, dict | None]) -> dict:
        plan, _, key = rollout_context(SETTINGS, plan, get_current_context())
        stopped = first_stop(phases)
        if stopped is None:
            skip("every check passed")
        return steps.roll_back(SETTINGS, plan, key, [f"{stopped['phase']}: {r}" for r in stopped["reasons"]], log)

    @task(trigger_rule=TriggerRule.NONE_FAILED)
    def record_rollout(
        plan: dict | None,
        deployed_first: dict | None,
        deployed_shadow: dict | None,
        shadow: dict | None,
        shifted: list[dict | None],
        promoted: dict | None,
        rolled_back: dict | None,
    ) -> dict:
        context = get_current_context()
        plan, policy, _ = rollout_context(SETTINGS, plan, context)
        phases = {
            "deploy": deployed_first or deployed_shadow,
            "shadow": shadow,
            "steps": [s for s in shifted if s],
            "promoted": promoted,
            "rolled_back": rolled_back,
            "outcome": rollout_outcome(promoted, rolled_back),
        }
        lineage = {"dag_id": context["dag"].dag_id, "run_id": context["run_id"]}
        recorded = ledger.record_rollout(SETTINGS, plan, policy, lineage, phases)
        log(f"version {plan.candidate.version}: {recorded['outcome']} (MLflow run {recorded['run_id']})")
        return recorded

    @task(trigger_rule=TriggerRule.ONE_FAILED, retries=0)
    def restore_on_failure(plan: dict | None) -> None:
        """A task failed outright: put all traffic back on the champion, mark the candidate, fail."""
        restore_champion(SETTINGS, plan, get_current_context())

    # Each task gets the results it reads as arguments, which also makes them its upstream; the
    # edges below carry no data. A skipped task's result arrives as None.
    plan = plan_rollout()
    first = deploy_champion(plan)
    shadow = deploy_shadow(plan)
    compared = compare_shadow(plan)
    shadow >> compared
    shifted = []
    for share in POLICY.traffic_steps:
        earlier = {"compare_shadow": compared, **{s.operator.task_id: s for s in shifted}}
        shifted.append(traffic_step(share)(plan, compared, earlier))
    phases = {"compare_shadow": compared, **{s.operator.task_id: s for s in shifted}}
    promoted = promote(plan, list(phases.values()))
    rolled_back = roll_back(plan, phases)
    first >> promoted
    record_rollout(plan, first, shadow, compared, shifted, promoted, rolled_back)
    # Not record_rollout: bookkeeping that fails after a promotion must not undo it.
    [first, shadow, compared, *shifted, promoted, rolled_back] >> restore_on_failure(plan)


llm_rollout()
