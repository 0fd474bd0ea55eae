"""What ``llm_rollout``'s tasks need of Airflow beyond one rollout step: the run's key, the policy
as the trigger form overrides it, skipping a task that has nothing to do, and the watcher that
puts traffic back on the champion when a task failed outright.

The decisions stay in ``llmops.rollout.policy`` and the work in ``llmops.rollout.steps``.
"""

from __future__ import annotations

import logging
from typing import NoReturn

from llmops.compat import AirflowFailException, AirflowSkipException
from llmops.config import Settings
from llmops.rollout.contracts import RolloutPlan
from llmops.rollout.plan import current_champion
from llmops.rollout.policy import RolloutPolicy
from llmops.rollout.steps import roll_back

# Form fields that override the policy for one run: Param name -> policy field.
POLICY_PARAMS = {
    "replay_requests": "replay_requests",
    "step_requests": "step_requests",
    "min_shadow_win_rate": "shadow.min_win_rate",
    "max_error_rate": "guardrails.max_error_rate",
    "max_p99_latency_ms": "guardrails.max_p99_latency_ms",
    "bake_seconds": "bake_seconds",
    "max_step_seconds": "evidence.max_step_seconds",
    "on_inconclusive": "evidence.on_inconclusive",
}


def log(message: str) -> None:
    logging.getLogger("airflow.task").info(message)


def run_key(context) -> str:
    """The key a rollout's steps record what they did under: this DAG run."""
    return f"{context['dag'].dag_id}/{context['run_id']}"


def skip(reason: str) -> NoReturn:
    raise AirflowSkipException(reason)


def rollout_context(
    settings: Settings, plan: RolloutPlan | dict | None, context
) -> tuple[RolloutPlan, RolloutPolicy, str]:
    """(plan, policy, run key) of this run, from ``plan_rollout``'s result and the form; skips the
    task when there is nothing to roll out (``plan_rollout`` skipped: its result is None)."""
    if plan is None:
        skip("nothing to roll out")
    params = context["params"]
    overrides = {POLICY_PARAMS[k]: params[k] for k in POLICY_PARAMS if params.get(k) not in (None, "")}
    unused = sorted(k for k in overrides if k.startswith("evidence."))
    if unused and settings.serving.rollout.evidence is None:
        raise AirflowFailException(
            f"the form sets {', '.join(unused)}, but serving.rollout has no evidence block to override:"
            " add one to the config"
        )
    policy = settings.serving.policy(overrides)
    return RolloutPlan.model_validate(plan), policy, run_key(context)


def restore_champion(settings: Settings, plan: RolloutPlan | dict | None, context) -> NoReturn:
    """A task failed outright: put all traffic back on the champion, mark the candidate, fail.
    The failed tasks come from the run's task states: a failed task hands on no result."""
    ti = context["ti"]
    states = ti.get_task_states(context["dag"].dag_id, run_ids=[context["run_id"]]).get(context["run_id"], {})
    failed = sorted(t for t, state in states.items() if state == "failed") or ["an unknown task"]
    if plan is None:
        raise AirflowFailException(f"the rollout could not be planned ({', '.join(failed)} failed); nothing moved")
    plan = RolloutPlan.model_validate(plan)
    if states.get("promote") == "success" or current_champion(settings) == plan.candidate.version:
        raise AirflowFailException(
            f"version {plan.candidate.version} was promoted, then {', '.join(failed)} failed; nothing was rolled back"
        )
    roll_back(settings, plan, run_key(context), [f"the rollout failed at {', '.join(failed)}"], log, reject=False)
    what = "the champion serves all traffic" if plan.champion else "nothing serves yet"
    raise AirflowFailException(f"rollout failed at {', '.join(failed)}; {what}")
