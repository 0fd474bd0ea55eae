"""llm_rollout with dag.test(): a first deploy, then a challenger through shadow and A/B steps
to promotion, or rolled back by a guardrail; against a real gateway serving tiny models."""

from __future__ import annotations

import json

import pytest

from devtools.demo import return_value
from llmops.tracking import CHALLENGER, CHAMPION, client
from tests.dagruns import FAST_ROLLOUT, parsed_dag, rollout_stack, task_states

pytestmark = [pytest.mark.integration, pytest.mark.model]


@pytest.fixture
def stack(tmp_path, airflow_db, tiny_training_job, curated_dataset):
    """Two registered versions of the same tiny adapter, a running gateway, a short rollout policy."""
    with rollout_stack(tmp_path, tiny_training_job, curated_dataset) as built:
        yield built


def run_rollout(stack, **conf):
    with parsed_dag("llm_rollout", **stack["env"]) as dag:
        return dag.test(run_conf=conf)


def alias(tracking: str, name: str) -> str | None:
    from mlflow.exceptions import MlflowException

    try:
        return str(client(tracking).get_model_version_by_alias("python-docs-assistant", name).version)
    except MlflowException:
        return None


def serving(url: str) -> dict[str, float]:
    import httpx

    described = httpx.get(f"{url}/control/endpoints/python-docs-assistant").json()
    assert described["EndpointStatus"] == "InService"
    assert described["ShadowProductionVariants"] == []
    return {v["VariantName"]: v["CurrentWeight"] for v in described["ProductionVariants"]}


def invoke(url: str) -> tuple[str, dict]:
    import boto3

    runtime = boto3.client(
        "sagemaker-runtime", endpoint_url=url, region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="x"
    )
    response = runtime.invoke_endpoint(
        EndpointName="python-docs-assistant",
        Body=json.dumps({"inputs": "What does len() do?", "parameters": {"max_new_tokens": 4}}),
        ContentType="application/json",
    )
    return response["InvokedProductionVariant"], json.loads(response["Body"].read())


def test_first_deploy_then_a_challenger_is_promoted_through_shadow_and_ab(stack):
    mlflow_client = client(stack["tracking"])
    mlflow_client.set_registered_model_alias("python-docs-assistant", CHALLENGER, "1")

    run = run_rollout(stack)
    states = task_states(run)
    assert run.state == "success", states
    assert states["deploy_champion"] == "success" and states["deploy_shadow"] == "skipped"
    assert states["promote"] == "success" and states["roll_back"] == "skipped"
    assert alias(stack["tracking"], CHAMPION) == "1" and alias(stack["tracking"], CHALLENGER) is None
    assert serving(stack["url"]) == {"v1": 1.0}
    assert invoke(stack["url"])[0] == "v1"

    mlflow_client.set_registered_model_alias("python-docs-assistant", CHALLENGER, "2")
    run = run_rollout(stack)
    states = task_states(run)
    assert run.state == "success", states
    for task_id in ("deploy_shadow", "compare_shadow", "shift_traffic_50pct", "shift_traffic_100pct", "promote"):
        assert states[task_id] == "success", (task_id, states)
    assert states["roll_back"] == "skipped" and states["restore_on_failure"] == "skipped"

    shadow = return_value(run, "compare_shadow")
    assert shadow["decision"]["promote"], shadow["decision"]["reasons"]
    assert shadow["comparison"]["pairs"] >= FAST_ROLLOUT["shadow"]["min_pairs"]
    # Same adapter on both sides: the judge cannot tell them apart.
    assert shadow["comparison"]["win_rate"] == 0.5
    step = return_value(run, "shift_traffic_50pct")
    assert step["window"]["invocations"] >= FAST_ROLLOUT["guardrails"]["min_invocations"]

    assert alias(stack["tracking"], CHAMPION) == "2" and alias(stack["tracking"], CHALLENGER) is None
    assert serving(stack["url"]) == {"v2": 1.0}
    assert invoke(stack["url"])[0] == "v2"
    new, old = (mlflow_client.get_model_version("python-docs-assistant", v).tags for v in ("2", "1"))
    assert new["serving.status"] == CHAMPION and new["serving.variant"] == "v2" and new["serving.weight"] == "1.0"
    assert new["serving.endpoint"] == "python-docs-assistant" and new["rollout.outcome"] == "promoted"
    assert old["serving.status"] == "retired" and old["serving.weight"] == "0.0"
    recorded = mlflow_client.get_run(new["rollout.mlflow_run_id"])
    assert recorded.data.metrics["shadow.win_rate"] == 0.5
    assert "step.50pct.invocations" in recorded.data.metrics


@pytest.mark.reliability("faults")
def test_a_challenger_that_breaks_a_guardrail_is_rolled_back_at_the_first_step(stack):
    mlflow_client = client(stack["tracking"])
    mlflow_client.set_registered_model_alias("python-docs-assistant", CHALLENGER, "1")
    assert run_rollout(stack).state == "success"

    mlflow_client.set_registered_model_alias("python-docs-assistant", CHALLENGER, "2")
    run = run_rollout(stack, max_p99_latency_ms=0.001)  # no model answers that fast
    states = task_states(run)
    assert run.state == "success", states
    assert states["shift_traffic_50pct"] == "success" and states["shift_traffic_100pct"] == "skipped"
    assert states["roll_back"] == "success" and states["promote"] == "skipped"
    step = return_value(run, "shift_traffic_50pct")
    assert not step["decision"]["promote"]
    assert any("p99 latency" in reason for reason in step["decision"]["reasons"])

    assert alias(stack["tracking"], CHAMPION) == "1" and alias(stack["tracking"], CHALLENGER) is None
    assert serving(stack["url"]) == {"v1": 1.0}
    tags = mlflow_client.get_model_version("python-docs-assistant", "2").tags
    assert tags["rollout.status"] == "rolled_back" and "p99 latency" in tags["rollout.reasons"]
    assert tags["rollout.outcome"] == "rolled back" and tags["serving.weight"] == "0.0"


def test_a_rollout_that_fails_outright_puts_traffic_back_on_the_champion_and_fails(stack):
    mlflow_client = client(stack["tracking"])
    mlflow_client.set_registered_model_alias("python-docs-assistant", CHALLENGER, "1")
    assert run_rollout(stack).state == "success"
    # A version whose training artifact is gone: the gateway refuses to create its model.
    broken = mlflow_client.create_model_version(
        "python-docs-assistant",
        source="/nowhere",
        tags={"training.artifact_uri": f"file://{stack['home']}/gone/model.tar.gz"},
    )
    run = run_rollout(stack, model_version=str(broken.version))
    states = task_states(run)
    assert run.state == "failed", states
    assert states["deploy_shadow"] == "failed" and states["restore_on_failure"] == "failed", states
    assert alias(stack["tracking"], CHAMPION) == "1"
    assert serving(stack["url"]) == {"v1": 1.0}
    assert invoke(stack["url"])[0] == "v1"
    tags = mlflow_client.get_model_version("python-docs-assistant", str(broken.version)).tags
    # A failure is not a verdict on the model: it is marked failed, not rejected.
    assert tags["rollout.status"] == "failed" and "deploy_shadow" in tags["rollout.reasons"]
    assert "serving.status" not in tags
