"""The DAGs triggered over the REST API on a real Airflow stack (api-server, scheduler,
dag-processor, LocalExecutor, PostgreSQL, and the endpoint gateway): a run's ``conf`` reaches
the tasks as Params, the fine-tuned version ends up serving behind the gateway, and off-domain
traffic through it makes the drift monitor ask llm_finetune to retrain."""

from __future__ import annotations

import ast
import json
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from tests.tinymodel import build_tiny_model

pytestmark = [pytest.mark.e2e, pytest.mark.model]

DAGS = ("llm_data_prep", "llm_finetune", "llm_rollout", "llm_drift_monitor")
FINISHED = ("success", "failed")


def _wait_for_dags(stack) -> None:
    def parsed() -> bool:
        for dag_id in DAGS:
            response = stack.http.get(f"{stack.base_url}/api/v2/dags/{dag_id}", timeout=30)
            if response.status_code == 404:
                return False
            assert response.status_code == 200, f"GET /api/v2/dags/{dag_id}: {response.status_code} {response.text}"
        return True

    def import_errors() -> str:
        return "import errors: " + stack.http.get(f"{stack.base_url}/api/v2/importErrors", timeout=30).text

    stack.wait_until("the dag-processor to parse both DAGs", parsed, timeout=120, details=import_errors)
    errors = stack.request("GET", "/api/v2/importErrors")
    assert errors["total_entries"] == 0, errors


def _trigger(stack, dag_id: str, conf: dict) -> str:
    run = stack.request(
        "POST", f"/api/v2/dags/{dag_id}/dagRuns", expect=(200,), json={"logical_date": None, "conf": conf}
    )
    # Manual run ids look like ``manual__2026-11-22T15:24:48.362045+00:00``: quoted once here, they
    # stay intact in every URL they are put in (a bare ``+`` is at the mercy of each client).
    return quote(run["dag_run_id"], safe="")


def _wait_for_run(stack, dag_id: str, run_id: str, timeout: float, may_skip: frozenset[str] = frozenset()) -> dict:
    def finished() -> dict | None:
        run = stack.request("GET", f"/api/v2/dags/{dag_id}/dagRuns/{run_id}")
        return run if run["state"] in FINISHED else None

    run = stack.wait_until(
        f"{dag_id} run {run_id} to finish",
        finished,
        timeout=timeout,
        interval=3,
        details=lambda: stack.task_logs(dag_id, run_id),
    )
    assert run["state"] == "success", f"{dag_id} run {run_id} ended {run['state']}\n" + stack.diagnostics(
        dag_id, run_id
    )
    states = {ti["task_id"]: ti["state"] for ti in stack.task_instances(dag_id, run_id)}
    expected = {t: ("success", "skipped") if t in may_skip else ("success",) for t in states}
    assert states and all(states[t] in expected[t] for t in states), f"{states}\n{stack.diagnostics(dag_id, run_id)}"
    return run


def _wait_captured(capture: Path, endpoint: str, start: datetime, end: datetime, count: int) -> None:
    """Until the gateway's capture writer (it flushes every 0.2 s) has put ``count`` records of the
    window on disk."""
    from serving.capture import read_capture

    deadline = time.monotonic() + 60
    while (found := len(read_capture(str(capture), endpoint, start=start, end=end).records)) < count:
        assert time.monotonic() < deadline, f"{found} of {count} records captured under {capture} after 60 s"
        time.sleep(0.2)


def return_value(stack, dag_id: str, run_id: str, task_id: str) -> Any:
    """A task's return value. Without ``deserialize`` the API returns the value as stored: a JSON
    document (PostgreSQL's JSONB comes back as an object), or a string of it on other backends."""
    entry = stack.request(
        "GET", f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/xcomEntries/return_value"
    )
    value = entry["value"]
    for _ in range(2):  # a JSON string may itself hold JSON text
        if not isinstance(value, str):
            break
        try:
            value = json.loads(value)
        except ValueError:
            value = ast.literal_eval(value)
    return value


@pytest.mark.timeout(900)
def test_dag_runs_triggered_over_rest_with_conf_complete(airflow_stack, base_model_dir):
    stack = airflow_stack
    _wait_for_dags(stack)
    for dag_id in DAGS:
        dag = stack.request("PATCH", f"/api/v2/dags/{dag_id}", json={"is_paused": False})
        assert dag["is_paused"] is False, dag

    prep_id = _trigger(stack, "llm_data_prep", {"max_tokens": 400})
    tiny_model = build_tiny_model(stack.home / "models" / "tiny-llama", base_model_dir)
    prep = _wait_for_run(stack, "llm_data_prep", prep_id, timeout=300)
    assert prep["conf"]["max_tokens"] == 400, prep["conf"]
    resolved = return_value(stack, "llm_data_prep", prep_id, "resolve_config")
    assert resolved["data"]["max_tokens"] == 400, resolved
    published = return_value(stack, "llm_data_prep", prep_id, "publish_version")
    assert published["created"] is True, published

    conf = {
        "base_model": str(tiny_model),
        "max_steps": 4,
        "max_eval_samples": 8,
        "checkpoint_steps": 2,
        "lora_r": 4,
        "force": True,
    }
    finetune_id = _trigger(stack, "llm_finetune", conf)
    # Which of these run depends on the gate's verdict on a tiny random model (and no approval);
    # the other training backends' tasks are skipped by the backend's branch.
    other_backends = {"stage_sagemaker_job", "run_sagemaker_job", "stage_ec2_job", "launch_trainium_instance"}
    other_backends |= {"await_ssm_agent", "run_training_command", "collect_ec2_job", "terminate_trainium_instance"}
    branches = frozenset({"await_approval", "promote_challenger", *other_backends})
    finetune = _wait_for_run(stack, "llm_finetune", finetune_id, timeout=600, may_skip=branches)
    assert finetune["conf"] == conf, finetune["conf"]

    registered = return_value(stack, "llm_finetune", finetune_id, "register_model")
    assert registered["model_name"] and str(registered["version"]).isdigit(), registered
    assert registered["metrics"]["global_step"] == 4, registered["metrics"]
    # The candidate went through evaluation and the gate to a recorded outcome.
    outcome = return_value(stack, "llm_finetune", finetune_id, "record_outcome")
    assert outcome["version"] == str(registered["version"]) and outcome["outcome"], outcome

    # The trigger form of llm_rollout, with the version just registered: no champion yet, so it is
    # deployed alone, answers a smoke test, and becomes the champion serving behind the gateway.
    rollout_id = _trigger(stack, "llm_rollout", {"model_version": str(registered["version"])})
    may_skip = frozenset({"deploy_shadow", "compare_shadow", "roll_back", "restore_on_failure"}) | {
        t for t in _task_ids(stack, "llm_rollout") if t.startswith("shift_traffic_")
    }
    _wait_for_run(stack, "llm_rollout", rollout_id, timeout=300, may_skip=may_skip)
    plan = return_value(stack, "llm_rollout", rollout_id, "plan_rollout")
    assert plan["action"] == "first_deploy", plan
    promoted = return_value(stack, "llm_rollout", rollout_id, "promote")
    assert promoted["champion"] == str(registered["version"]), promoted

    import boto3

    runtime = boto3.client(
        "sagemaker-runtime",
        endpoint_url=stack.env["LLMOPS_GATEWAY_URL"],
        region_name="us-east-1",
        aws_access_key_id="x",
        aws_secret_access_key="x",
    )
    answer = runtime.invoke_endpoint(
        EndpointName=plan["endpoint"],
        ContentType="application/json",
        Body=json.dumps({"inputs": "What does len() do?", "parameters": {"max_new_tokens": 4}}),
    )
    assert answer["InvokedProductionVariant"] == f"v{registered['version']}"
    assert "generated_text" in json.loads(answer["Body"].read())

    # Off-domain traffic through the endpoint, then the drift monitor over that window from the
    # form: a drift verdict asks llm_finetune to retrain (paused here, so the run waits queued).
    from devtools import traffic

    stack.request("PATCH", "/api/v2/dags/llm_finetune", json={"is_paused": True})
    started = datetime.now(UTC)
    for prompt in traffic.off_domain_prompts(30):
        runtime.invoke_endpoint(
            EndpointName=plan["endpoint"],
            ContentType="application/json",
            Body=json.dumps({"inputs": prompt, "parameters": {"max_new_tokens": 4}}),
        )["Body"].read()
    ended = datetime.now(UTC)
    _wait_captured(stack.home / "capture", plan["endpoint"], started, ended, count=30)
    window = {"window_start": started.isoformat(), "window_end": ended.isoformat(), "min_records": 20}
    monitor_id = _trigger(stack, "llm_drift_monitor", window)
    _wait_for_run(stack, "llm_drift_monitor", monitor_id, timeout=300)
    analysis = return_value(stack, "llm_drift_monitor", monitor_id, "analyze_window")
    assert analysis["verdict"] == "drift" and analysis["records"] == 30, analysis
    recorded = return_value(stack, "llm_drift_monitor", monitor_id, "record_report")
    runs = stack.request("GET", "/api/v2/dags/llm_finetune/dagRuns")["dag_runs"]
    requested = [r for r in runs if r["dag_run_id"].startswith("drift__")]
    assert len(requested) == 1, runs
    assert requested[0]["conf"]["drift_run_id"] == recorded["run_id"], requested[0]
    assert requested[0]["conf"]["reason"].startswith("drift on "), requested[0]


def _task_ids(stack, dag_id: str) -> set[str]:
    return {t["task_id"] for t in stack.request("GET", f"/api/v2/dags/{dag_id}/tasks")["tasks"]}


def test_only_a_user_with_the_role_may_trigger_a_run(airflow_stack):
    """No all-admins mode: a request without a token is refused, a wrong password gets no token,
    and a viewer may read the DAGs but not trigger one."""
    import requests

    stack = airflow_stack
    url = f"{stack.base_url}/api/v2/dags/llm_data_prep/dagRuns"
    assert requests.get(f"{stack.base_url}/api/v2/dags", timeout=30).status_code == 401
    passwords = json.loads(Path(stack.env["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE"]).read_text())

    def token(user: str) -> dict:
        login = {"username": user, "password": passwords[user]}
        answer = requests.post(f"{stack.base_url}/auth/token", json=login, timeout=30)
        assert answer.status_code in (200, 201), answer.text
        return {"Authorization": f"Bearer {answer.json()['access_token']}"}

    viewer = token("viewer")
    assert requests.get(f"{stack.base_url}/api/v2/dags", headers=viewer, timeout=30).status_code == 200
    refused = requests.post(url, headers=viewer, json={"logical_date": None, "conf": {}, "dag_run_id": "viewer-try"})
    assert refused.status_code == 403, refused.text
    wrong = requests.post(f"{stack.base_url}/auth/token", json={"username": "admin", "password": "x"}, timeout=30)
    assert wrong.status_code == 401
