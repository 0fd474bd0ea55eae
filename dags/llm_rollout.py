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
from llmops.rollout.policy import step_label

SETTINGS = get_settings()
POLICY = SETTINGS.serving.policy()
STEPS = [f"shift_traffic_{step_label(share)}" for share in POLICY.traffic_steps]
# Form fields that override the policy for one run: Param name -> policy field.
POLICY_PARAMS = {
    "replay_requests": "replay_requests",
    "step_requests": "step_requests",
    "min_shadow_win_rate": "shadow.min_win_rate",
    "max_error_rate": "guardrails.max_error_rate",
    "max_p99_latency_ms": "guardrails.max_p99_latency_ms",
    "bake_seconds": "bake_seconds",
}
DEPLOY_TIMEOUT = timedelta(minutes=SETTINGS.serving.deploy_timeout_minutes * 2 + 10)


def _log(message: str) -> None:
    import logging

    logging.getLogger("airflow.task").info(message)


def _context() -> tuple[dict, object, str]:
    """(plan, policy, run key) of this run, from ``plan_rollout``'s result and the form; skips the
    task when there is nothing to roll out."""
    context = get_current_context()
    plan = context["ti"].xcom_pull(task_ids="plan_rollout")
    if plan is None:
        _skip("nothing to roll out")
    params = context["params"]
    policy = SETTINGS.serving.policy({POLICY_PARAMS[k]: params[k] for k in POLICY_PARAMS if params.get(k) is not None})
    return plan, policy, _run_key(context)


def _run_key(context) -> str:
    """The key a rollout's steps record what they did under: this DAG run."""
    return f"{context['dag'].dag_id}/{context['run_id']}"


def _skip(reason: str):
    from llmops.compat import AirflowSkipException

    raise AirflowSkipException(reason)


def _all_passed(ti) -> bool:
    """Every phase of a shadow rollout ran and said go on: promotion needs evidence, not silence."""
    results = [ti.xcom_pull(task_ids=task_id) for task_id in ["compare_shadow", *STEPS]]
    return all(result and result["decision"]["promote"] for result in results)


def _failed_decision(ti) -> dict | None:
    """The first phase of this run whose decision says stop, or None."""
    for task_id in ["compare_shadow", *STEPS]:
        result = ti.xcom_pull(task_ids=task_id)
        if result and not result["decision"]["promote"]:
            return {"phase": task_id, **result["decision"]}
    return None


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
    },
)
def llm_rollout():
    @task
    @fail_without_retry
    def plan_rollout() -> dict:
        from llmops.rollout.plan import plan_rollout

        context = get_current_context()
        plan = plan_rollout(SETTINGS, context["params"]["model_version"] or None, _run_key(context), _log)
        _log(f"{plan['action']}: {plan['reason']}")
        if plan["action"] == "nothing":
            _skip(plan["reason"])
        return plan

    @task(execution_timeout=DEPLOY_TIMEOUT)
    @fail_without_retry
    def deploy_champion() -> dict:
        from llmops.rollout.steps import deploy_first

        plan, _, run_key = _context()
        if plan["action"] != "first_deploy":
            _skip(f"there is a champion (version {plan['champion']['version']}): the candidate goes through shadow")
        return deploy_first(SETTINGS, plan, run_key, _log)

    @task(execution_timeout=DEPLOY_TIMEOUT)
    @fail_without_retry
    def deploy_shadow() -> dict:
        from llmops.rollout.steps import deploy_shadow

        plan, _, run_key = _context()
        if plan["action"] != "rollout":
            _skip("no champion yet: nothing to shadow")
        return deploy_shadow(SETTINGS, plan, run_key, _log)

    @task(execution_timeout=DEPLOY_TIMEOUT)
    @fail_without_retry
    def compare_shadow() -> dict:
        from llmops.rollout.steps import evaluate_shadow

        plan, policy, run_key = _context()
        result = evaluate_shadow(SETTINGS, plan, policy, run_key, _log)
        _log(f"shadow {result['decision']['verdict']}:\n  " + "\n  ".join(result["decision"]["reasons"]))
        return result

    def traffic_step(share: float):
        @task(task_id=f"shift_traffic_{step_label(share)}", execution_timeout=DEPLOY_TIMEOUT)
        @fail_without_retry
        def shift() -> dict:
            from llmops.rollout.steps import traffic_step

            plan, policy, run_key = _context()
            ti = get_current_context()["ti"]
            stopped = _failed_decision(ti)
            if stopped is not None:
                _skip(f"{stopped['phase']} said roll back")
            result = traffic_step(SETTINGS, plan, policy, run_key, share, ti.xcom_pull(task_ids="compare_shadow"), _log)
            _log(
                f"step {result['label']} {result['decision']['verdict']}:\n  "
                + "\n  ".join(result["decision"]["reasons"])
            )
            return result

        return shift()

    @task(trigger_rule=TriggerRule.NONE_FAILED, execution_timeout=DEPLOY_TIMEOUT)
    @fail_without_retry
    def promote() -> dict:
        from llmops.rollout.steps import promote

        plan, _, run_key = _context()
        if plan["action"] == "rollout" and not _all_passed(get_current_context()["ti"]):
            _skip("not every phase of the rollout passed")
        return promote(SETTINGS, plan, run_key, _log)

    @task(trigger_rule=TriggerRule.NONE_FAILED, execution_timeout=DEPLOY_TIMEOUT)
    def roll_back() -> dict:
        from llmops.rollout.steps import roll_back

        plan, _, run_key = _context()
        stopped = _failed_decision(get_current_context()["ti"])
        if stopped is None:
            _skip("every check passed")
        return roll_back(SETTINGS, plan, run_key, [f"{stopped['phase']}: {r}" for r in stopped["reasons"]], _log)

    @task(trigger_rule=TriggerRule.NONE_FAILED)
    def record_rollout() -> dict:
        from llmops.rollout.ledger import record_rollout

        plan, policy, _ = _context()
        context = get_current_context()
        ti = context["ti"]
        promoted, rolled_back = ti.xcom_pull(task_ids="promote"), ti.xcom_pull(task_ids="roll_back")
        phases = {
            "deploy": ti.xcom_pull(task_ids="deploy_champion") or ti.xcom_pull(task_ids="deploy_shadow"),
            "shadow": ti.xcom_pull(task_ids="compare_shadow"),
            "steps": [s for s in (ti.xcom_pull(task_ids=t) for t in STEPS) if s],
            "promoted": promoted,
            "rolled_back": rolled_back,
            "outcome": "promoted" if promoted else "rolled back" if rolled_back else "unfinished",
        }
        lineage = {"dag_id": context["dag"].dag_id, "run_id": context["run_id"]}
        recorded = record_rollout(SETTINGS, plan, policy, lineage, phases)
        _log(f"version {plan['candidate']['version']}: {recorded['outcome']} (MLflow run {recorded['run_id']})")
        return recorded

    @task(trigger_rule=TriggerRule.ONE_FAILED, retries=0)
    def restore_on_failure() -> None:
        """A task failed outright: put all traffic back on the champion, mark the candidate, fail."""
        from llmops.compat import AirflowFailException
        from llmops.rollout.steps import roll_back

        context = get_current_context()
        ti = context["ti"]
        states = ti.get_task_states(context["dag"].dag_id, run_ids=[context["run_id"]]).get(context["run_id"], {})
        failed = sorted(t for t, state in states.items() if state == "failed") or ["an unknown task"]
        plan = ti.xcom_pull(task_ids="plan_rollout")
        if plan is None:
            raise AirflowFailException(f"the rollout could not be planned ({', '.join(failed)} failed); nothing moved")
        from llmops.rollout.plan import current_champion

        if states.get("promote") == "success" or current_champion(SETTINGS) == plan["candidate"]["version"]:
            raise AirflowFailException(
                f"version {plan['candidate']['version']} was promoted, then {', '.join(failed)} failed;"
                " nothing was rolled back"
            )
        roll_back(SETTINGS, plan, _run_key(context), [f"the rollout failed at {', '.join(failed)}"], _log, reject=False)
        what = "the champion serves all traffic" if plan["champion"] else "nothing serves yet"
        raise AirflowFailException(f"rollout failed at {', '.join(failed)}; {what}")

    plan = plan_rollout()
    first = deploy_champion()
    shadow = deploy_shadow()
    compared = compare_shadow()
    promoted, rolled_back, recorded = promote(), roll_back(), record_rollout()
    plan >> [first, shadow]
    shadow >> compared
    previous = compared
    steps = []
    for share in POLICY.traffic_steps:
        step = traffic_step(share)
        previous >> step
        steps.append(step)
        previous = step
    first >> promoted
    previous >> [promoted, rolled_back]
    [promoted, rolled_back] >> recorded
    # Not record_rollout: bookkeeping that fails after a promotion must not undo it.
    [plan, first, shadow, compared, *steps, promoted, rolled_back] >> restore_on_failure()


llm_rollout()
