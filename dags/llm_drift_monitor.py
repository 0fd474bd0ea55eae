"""
### llm_drift_monitor: compare served traffic with the champion's training data; retrain on drift

Hourly (cron and time zone from `monitoring` in the config), over each run's data interval; from
the trigger form, over any window (`window_start`, `window_end`, ISO-8601).

resolve_window → load_baseline → analyze_window → record_report → decide_retraining
→ request_retraining (triggers `llm_finetune`)

* `load_baseline`: the serving `champion` and its baseline profile (computed from its training
  data when the version was registered; built now for a version that predates baselines).
* `analyze_window`: the endpoint's captured calls in the window (production variants, from the
  capture folder or S3) against the baseline: prompt embedding drift (MMD, permutation test),
  prompt and answer lengths (PSI with KS), out-of-vocabulary rate, writing systems, refusals,
  repetition, errors and latency. Too few calls is "no verdict", never an alarm.
* `record_report`: one MLflow run per window in the `monitoring.experiment` experiment, with the
  figures, plots and a readable report (`drift/report.html`), linked from the champion's version
  (`drift.last_*` tags). Re-running a window changes nothing.
* `decide_retraining`: a `drift` verdict asks `llm_finetune` to retrain unless a request was made
  within the cooldown; the request's conf carries the reason and the drift run's id, and its run
  id is fixed per window, so a re-run never asks twice.
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import Param, dag, get_current_context, task

from llmops.compat import CronDataIntervalTimetable
from llmops.config import get_settings
from llmops.orchestration import fail_without_retry, storage_options_for, trigger_once_operator

SETTINGS = get_settings()
MONITORING = SETTINGS.monitoring
POLICY = MONITORING.drift_policy()
# Form fields that override the policy for one run.
POLICY_PARAMS = ("min_records", "cooldown_hours")


def _policy():
    params = get_current_context()["params"]
    return MONITORING.drift_policy({k: params[k] for k in POLICY_PARAMS if params.get(k) is not None})


@dag(
    dag_id="llm_drift_monitor",
    schedule=CronDataIntervalTimetable(MONITORING.schedule, timezone=MONITORING.timezone),
    start_date=pendulum.datetime(2026, 1, 1, tz=MONITORING.timezone),
    catchup=False,
    max_active_runs=1,
    doc_md=__doc__,
    tags=["llmops", "monitoring"],
    default_args={"owner": "llmops", "retries": 1, "retry_delay": timedelta(minutes=1)},
    params={
        "window_start": Param(
            "",
            type="string",
            title="Window start",
            description="ISO-8601, e.g. 2026-11-22T10:00:00Z. Empty: the run's data interval "
            "(a manual run without one: the hour before the run).",
        ),
        "window_end": Param(
            "", type="string", title="Window end", description="ISO-8601; empty: the run's time (with a start)."
        ),
        "min_records": Param(
            POLICY.min_records,
            type="integer",
            minimum=2,
            title="Minimum calls",
            description="Fewer calls in the window give no verdict.",
        ),
        "cooldown_hours": Param(
            POLICY.cooldown_hours,
            type="number",
            minimum=0,
            title="Cooldown (hours)",
            description="After asking for retraining, do not ask again for this long.",
        ),
    },
)
def llm_drift_monitor():
    @task
    @fail_without_retry
    def resolve_window() -> dict:
        from llmops.drift.monitor import resolve_window

        context = get_current_context()
        params = context["params"]
        run = context["dag_run"]
        window = resolve_window(
            SETTINGS.serving.endpoint_name,
            params.get("window_start"),
            params.get("window_end"),
            context.get("data_interval_start"),
            context.get("data_interval_end"),
            run.run_after,
            delay_minutes=MONITORING.capture_delay_minutes,
        )
        _policy()  # a bad override fails here, before any work
        return window

    @task
    def load_baseline() -> dict:
        from llmops.compat import AirflowFailException, AirflowSkipException
        from llmops.drift.monitor import MonitoringError, champion_baseline

        try:
            champion = champion_baseline(SETTINGS, storage_options_for(SETTINGS.store_uri, SETTINGS))
        except MonitoringError as exc:  # the champion's lineage lacks what a baseline needs: retrying cannot help
            raise AirflowFailException(str(exc)) from exc
        if champion is None:
            raise AirflowSkipException(f"no champion of {SETTINGS.finetune.model_name} serves yet: nothing to watch")
        return champion

    @task
    def analyze_window(window: dict, champion: dict) -> dict:
        import logging

        from llmops.drift.monitor import analyze_window

        log = logging.getLogger("airflow.task")
        analysis = analyze_window(
            SETTINGS, window, champion, _policy(), storage_options_for(SETTINGS.store_uri, SETTINGS), log=log.info
        )
        log.info("verdict %s:\n  %s", analysis["verdict"], "\n  ".join(analysis["reasons"]))
        return analysis

    @task
    def record_report(window: dict, champion: dict, analysis: dict) -> dict:
        from llmops.drift.monitor import record_report

        context = get_current_context()
        return record_report(
            SETTINGS,
            window,
            champion,
            analysis,
            _policy(),
            {"dag_id": context["dag"].dag_id, "run_id": context["run_id"]},
            storage_options_for(SETTINGS.store_uri, SETTINGS),
        )

    @task.short_circuit
    def decide_retraining(window: dict, champion: dict, analysis: dict, recorded: dict) -> bool:
        import logging

        from llmops.drift.monitor import decide

        decision = decide(SETTINGS, window, champion, analysis, recorded, _policy())
        logging.getLogger("airflow.task").info(
            "%s: %s", "retraining requested" if decision["trigger"] else "no retraining", decision["reason"]
        )
        get_current_context()["ti"].xcom_push(key="decision", value=decision)
        return decision["trigger"]

    request_retraining = trigger_once_operator()(
        task_id="request_retraining",
        trigger_dag_id="llm_finetune",
        trigger_run_id="{{ ti.xcom_pull(task_ids='decide_retraining', key='decision')['run_id'] }}",
        conf={
            "reason": "{{ ti.xcom_pull(task_ids='decide_retraining', key='decision')['conf']['reason'] }}",
            "drift_run_id": "{{ ti.xcom_pull(task_ids='decide_retraining', key='decision')['conf']['drift_run_id'] }}",
        },
        skip_when_already_exists=True,
        wait_for_completion=False,
    )

    window = resolve_window()
    champion = load_baseline()
    analysis = analyze_window(window, champion)
    recorded = record_report(window, champion, analysis)
    decide_retraining(window, champion, analysis, recorded) >> request_retraining


llm_drift_monitor()
