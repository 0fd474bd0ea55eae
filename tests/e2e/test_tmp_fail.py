import pytest

from tests.e2e.test_rest_trigger import _trigger, _wait_for_dags, _wait_for_run

pytestmark = [pytest.mark.e2e]


def test_fails(airflow_stack):
    _wait_for_dags(airflow_stack)
    airflow_stack.request("PATCH", "/api/v2/dags/llm_data_prep", json={"is_paused": False})
    run_id = _trigger(airflow_stack, "llm_data_prep", {"raw_uri": "/nonexistent.jsonl"})
    _wait_for_run(airflow_stack, "llm_data_prep", run_id, timeout=200)
