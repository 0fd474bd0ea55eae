"""llm_finetune's second half with dag.test(): evaluation, the gate, and human approval both ways.

A run that needs approval parks ``await_approval`` in AWAITING_INPUT; ``dag.test()`` then waits
for a response recorded from outside, as the Airflow UI's Required Actions page records it. The
tests answer from a second thread through the same code path the REST API uses, and reproduce the
scheduler's timeout sweep for the no-answer case.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from devtools.demo import return_value
from llmops.tracking import CHALLENGER, client
from tests.dagruns import fast_config, parsed_dag, task_states

pytestmark = [pytest.mark.integration, pytest.mark.model]


@pytest.fixture(scope="module")
def home(airflow_db, curated_dataset) -> str:
    return curated_dataset["uri"].split("/store/")[0].removeprefix("file://")


def parse(home: str, gate: dict):
    return parsed_dag(
        "llm_finetune",
        LLMOPS_HOME=home,
        MLFLOW_TRACKING_URI=f"sqlite:///{home}/mlflow.db",
        LLMOPS_CONFIG_FILE=str(fast_config(Path(home), gate)),
    )


def conf(tiny_model, **extra) -> dict:
    return {
        "base_model": str(tiny_model),
        "max_steps": 2,
        "lora_r": 4,
        "lora_alpha": 8,
        "batch_size": 2,
        "force": True,
        **extra,
    }


def version_of(run, home: str) -> tuple:
    registered = return_value(run, "register_model")
    mlflow_client = client(f"sqlite:///{home}/mlflow.db")
    return registered, mlflow_client, mlflow_client.get_model_version(registered["model_name"], registered["version"])


def challenger_version(mlflow_client, model_name: str) -> str | None:
    from mlflow.exceptions import MlflowException

    try:
        return str(mlflow_client.get_model_version_by_alias(model_name, CHALLENGER).version)
    except MlflowException:
        return None


# --- answering a Human-in-the-loop task from outside the run -------------------------------------


def _awaiting(dag_id: str):
    from airflow.models.taskinstance import TaskInstance
    from airflow.utils.session import create_session
    from airflow.utils.state import TaskInstanceState
    from sqlalchemy import select

    with create_session() as session:
        return session.scalar(
            select(TaskInstance.id).where(
                TaskInstance.dag_id == dag_id,
                TaskInstance.task_id == "await_approval",
                TaskInstance.state == TaskInstanceState.AWAITING_INPUT,
            )
        )


def _fail(ti_id) -> None:
    from airflow.models.taskinstance import TaskInstance
    from airflow.utils.session import create_session
    from airflow.utils.state import TaskInstanceState

    with create_session() as session:
        session.get(TaskInstance, ti_id).state = TaskInstanceState.FAILED


def respond(ti_id, option: str, user: str = "reviewer") -> dict:
    """What PATCH .../hitlDetails does: record the answer and resume the parked task."""
    from airflow._shared.timezones import timezone
    from airflow.models.taskinstance import TaskInstance
    from airflow.models.trigger import handle_event_submit
    from airflow.triggers.base import TriggerEvent
    from airflow.utils.session import create_session
    from sqlalchemy.orm import joinedload

    with create_session() as session:
        ti = session.get(TaskInstance, ti_id, options=[joinedload(TaskInstance.hitl_detail)])
        detail = ti.hitl_detail
        request = {
            "subject": detail.subject,
            "body": detail.body,
            "options": detail.options,
            "defaults": detail.defaults,
        }
        detail.responded_by = {"id": user, "name": user}
        detail.responded_at = timezone.utcnow()
        detail.chosen_options = [option]
        detail.params_input = {}
        session.add(detail)
        handle_event_submit(TriggerEvent(detail.as_resume_event_payload()), task_instance=ti, session=session)
    return request


def time_out(ti_id) -> dict:
    """The scheduler's AWAITING_INPUT timeout sweep, with the deadline moved into the past."""
    from datetime import timedelta

    from airflow._shared.timezones import timezone
    from airflow.jobs.scheduler_job_runner import SchedulerJobRunner
    from airflow.models.taskinstance import TaskInstance
    from airflow.utils.session import create_session
    from sqlalchemy.orm import joinedload

    with create_session() as session:
        ti = session.get(TaskInstance, ti_id, options=[joinedload(TaskInstance.hitl_detail)])
        request = {"defaults": ti.hitl_detail.defaults}
        ti.trigger_timeout = timezone.utcnow() - timedelta(seconds=1)
    sweeper = type("Sweeper", (), {"log": __import__("logging").getLogger("sweep")})()
    with create_session() as session:
        SchedulerJobRunner.check_awaiting_input_timeouts(sweeper, session=session)
    return request


def run_answering(dag, run_conf: dict, answer, timeout_s: float = 600):
    """Run the DAG (in this thread: tasks install signal handlers); a second thread answers the
    approval request with ``answer(ti_id)`` once the run waits for it. Returns (run, request)."""
    answered: dict = {}
    stop = threading.Event()

    def responder():
        deadline = time.monotonic() + timeout_s
        try:
            while not stop.is_set() and time.monotonic() < deadline:
                ti_id = _awaiting(dag.dag_id)
                if ti_id is not None:
                    answered["request"] = answer(ti_id)
                    return
                time.sleep(1)
        except BaseException as exc:  # surfaced below; the run itself must not wait forever
            answered["error"] = exc
            ti_id = _awaiting(dag.dag_id)
            if ti_id is not None:
                _fail(ti_id)

    thread = threading.Thread(target=responder, daemon=True)
    thread.start()
    try:
        run = dag.test(run_conf=run_conf)
    finally:
        stop.set()
        thread.join(timeout=30)
    if "error" in answered:
        raise answered["error"]
    return run, answered.get("request")


# --- the tests -----------------------------------------------------------------------------------


def test_a_candidate_that_fails_the_gate_ends_cleanly_and_moves_nothing(home, tiny_model, curated_dataset):
    with parse(home, {"minimum": {"judge_overall": 9.9}}) as dag:
        run = dag.test(run_conf=conf(tiny_model))
    states = task_states(run)
    assert run.state == "success", states
    assert states["promote_challenger"] == "skipped" and states["await_approval"] == "skipped"
    assert states["record_outcome"] == "success"
    registered, mlflow_client, version = version_of(run, home)
    assert version.tags["gate.decision"] == "fail"
    assert "judge_overall" in version.tags["gate.reasons"] and "< minimum 9.9" in version.tags["gate.reasons"]
    assert version.tags["promotion.outcome"] == "rejected by the gate"
    assert challenger_version(mlflow_client, registered["model_name"]) != registered["version"]

    # The evaluation is in MLflow, nested under the training run, and the version links to its report.
    evaluation = mlflow_client.get_run(version.tags["evaluation.run_id"])
    assert evaluation.data.tags["mlflow.parentRunId"] == registered["run_id"]
    assert "candidate.rouge_l" in evaluation.data.metrics and "delta_vs_base.loss" in evaluation.data.metrics
    assert version.tags["evaluation.report_url"].endswith("/artifacts/evaluation/report.html")
    assert version.tags["evaluation.report_url"] in version.description
    assert "local heuristic judge" in version.tags["evaluation.judge"]
    artifacts = {a.path for a in mlflow_client.list_artifacts(evaluation.info.run_id, "evaluation")}
    assert {"evaluation/report.html", "evaluation/predictions.jsonl", "evaluation/decision.json"} <= artifacts
    assert version.tags["prompts.python_docs_qa"].startswith("python_docs_qa@")
    assert version.tags["prompts.judge_rubric"].startswith("judge_rubric@")


def test_approval_approved_moves_the_challenger_alias(home, tiny_model):
    with parse(home, {}) as dag:
        run, request = run_answering(dag, conf(tiny_model, require_approval=True), lambda ti: respond(ti, "Approve"))
    states = task_states(run)
    assert run.state == "success", states
    assert request["options"] == ["Approve", "Reject"] and request["defaults"] == ["Reject"]
    assert "passed the gate" in request["body"] and "| Metric" in request["body"]
    assert "version" in request["subject"]
    registered, mlflow_client, version = version_of(run, home)
    assert states["promote_challenger"] == "success"
    assert challenger_version(mlflow_client, registered["model_name"]) == registered["version"]
    assert version.tags["approval.status"] == "approved" and version.tags["approval.by"] == "reviewer"
    assert version.tags["promotion.outcome"] == f"promoted to {CHALLENGER}"


def test_approval_rejected_moves_nothing_and_says_who(home, tiny_model):
    with parse(home, {}) as dag:
        run, _ = run_answering(dag, conf(tiny_model, require_approval=True), lambda ti: respond(ti, "Reject", "alice"))
    states = task_states(run)
    assert run.state == "success", states
    assert states["promote_challenger"] == "skipped" and states["record_outcome"] == "success"
    registered, mlflow_client, version = version_of(run, home)
    assert challenger_version(mlflow_client, registered["model_name"]) != registered["version"]
    assert version.tags["approval.status"] == "rejected" and version.tags["approval.by"] == "alice"
    assert version.tags["promotion.outcome"] == "rejected by alice"


def test_no_answer_before_the_timeout_rejects(home, tiny_model):
    with parse(home, {}) as dag:
        run, request = run_answering(dag, conf(tiny_model, require_approval=True), time_out)
    assert request["defaults"] == ["Reject"]
    states = task_states(run)
    assert run.state == "success", states
    assert states["promote_challenger"] == "skipped"
    registered, mlflow_client, version = version_of(run, home)
    assert challenger_version(mlflow_client, registered["model_name"]) != registered["version"]
    assert version.tags["approval.status"] == "rejected_on_timeout"
    assert version.tags["promotion.outcome"] == "rejected: no approval before the timeout"


def test_without_approval_a_passing_candidate_becomes_challenger(home, tiny_model):
    with parse(home, {}) as dag:
        run = dag.test(run_conf=conf(tiny_model))
    states = task_states(run)
    assert run.state == "success", states
    assert states["await_approval"] == "skipped" and states["promote_challenger"] == "success"
    registered, mlflow_client, version = version_of(run, home)
    assert challenger_version(mlflow_client, registered["model_name"]) == registered["version"]
    assert version.tags["approval.status"] == "not_required"
