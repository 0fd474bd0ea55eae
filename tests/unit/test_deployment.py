"""Deployment requests and the rollout's bookkeeping: the bodies sent to the gateway are valid
SageMaker API requests (botocore's model) and valid gateway specs; capture records become
judge-ready pairs; the plan follows the registry's aliases."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import botocore.session
import pytest
from botocore.validate import ParamValidator

from llmops.backends.endpoints.base import DeploymentError, config_name, endpoint_config_request, model_request
from llmops.capture import request_prompt
from llmops.rollout.plan import plan_rollout
from llmops.rollout.replay import captured_rows, shadow_pairs
from serving.capture import capture_record, parse_record
from serving.endpoints import EndpointConfigSpec, ModelSpec

SAGEMAKER = botocore.session.get_session().get_service_model("sagemaker")
CAPTURE = {
    "EnableCapture": True,
    "InitialSamplingPercentage": 100,
    "DestinationS3Uri": "s3://bucket/capture",
    "CaptureOptions": [{"CaptureMode": "Input"}, {"CaptureMode": "Output"}],
    "CaptureContentTypeHeader": {"JsonContentTypes": ["application/json"]},
}


def sagemaker_errors(operation: str, request: dict) -> str:
    shape = SAGEMAKER.operation_model(operation).input_shape
    return ParamValidator().validate(request, shape).generate_report()


def test_a_shadow_config_is_a_valid_sagemaker_request_and_gateway_spec():
    name = config_name("python-docs-assistant", "shadow", "llm_rollout/manual__2026-11-22T10:00:00")
    request = endpoint_config_request(name, "python-docs-assistant", {"3": 1.0}, "4", CAPTURE)
    assert sagemaker_errors("CreateEndpointConfig", request) == ""
    spec = EndpointConfigSpec.model_validate(request)
    assert [v.VariantName for v in spec.ProductionVariants] == ["v3"]
    assert spec.ShadowProductionVariants[0].ModelName == "python-docs-assistant-v4"


def test_an_ab_config_splits_weights_between_two_versions():
    request = endpoint_config_request("cfg", "ep", {"3": 0.9, "4": 0.1}, None, None)
    assert sagemaker_errors("CreateEndpointConfig", request) == ""
    assert {v["VariantName"]: v["InitialVariantWeight"] for v in request["ProductionVariants"]} == {
        "v3": 0.9,
        "v4": 0.1,
    }
    assert "ShadowProductionVariants" not in request and "DataCaptureConfig" not in request


def test_a_model_request_is_valid_for_sagemaker_with_an_image_added():
    request = model_request("ep", "7", "s3://bucket/runs/job/model.tar.gz", {"LLMOPS_SYSTEM_PROMPT": "Be brief."})
    assert ModelSpec.model_validate(request).ModelName == "ep-v7"
    on_aws = {**request, "ExecutionRoleArn": "arn:aws:iam::123456789012:role/sm"}
    on_aws["PrimaryContainer"] = {**request["PrimaryContainer"], "Image": "123.dkr.ecr.us-east-1.amazonaws.com/x:1"}
    assert sagemaker_errors("CreateModel", on_aws) == ""


def test_config_names_are_stable_per_run_and_phase_and_fit_sagemaker():
    long = "e" * 63
    a = config_name(long, "restored", "llm_rollout/run-1")
    assert a == config_name(long, "restored", "llm_rollout/run-1")
    assert a != config_name(long, "restored", "llm_rollout/run-2") != config_name(long, "final", "llm_rollout/run-1")
    assert len(a) <= 63 and sagemaker_errors("DescribeEndpointConfig", {"EndpointConfigName": a}) == ""


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        ({"inputs": "plain"}, ("", "plain")),
        (
            {
                "inputs": [
                    {"role": "system", "content": "S"},
                    {"role": "user", "content": "a"},
                    {"role": "assistant", "content": "b"},
                    {"role": "user", "content": "c"},
                ]
            },
            ("S", "c"),
        ),
        ({"inputs": []}, ("", "")),
        ({"other": 1}, ("", "")),
        (None, ("", "")),
    ],
)
def test_request_prompt_reads_text_and_chat_inputs(payload, expected):
    assert request_prompt(payload) == expected


def record(event_id: str, variant: str, prompt: str, answer: dict | None, status=200, shadow=False, source=None):
    raw = capture_record(
        endpoint="ep",
        variant=variant,
        request=json.dumps({"inputs": [{"role": "user", "content": prompt}]}).encode(),
        request_type="application/json",
        response=json.dumps(answer or {"error": "boom"}).encode(),
        response_type="application/json",
        status_code=status,
        latency_ms=10,
        inference_time=datetime(2026, 11, 22, tzinfo=UTC),
        event_id=event_id,
        shadow=shadow,
        source_event_id=source,
    )
    return parse_record(json.dumps(raw), "ep", variant)


def test_shadow_records_pair_with_the_production_records_they_mirror():
    production = [record("p1", "v1", "q1", {"generated_text": "a"}), record("p2", "v1", "q2", {"generated_text": "b"})]
    shadows = [
        record("s1", "v2", "q1", {"generated_text": "c"}, shadow=True, source="p1"),
        record("s9", "v2", "q9", {"generated_text": "d"}, shadow=True, source="missing"),
    ]
    pairs = shadow_pairs(production + shadows)
    assert [(s.event_id, p.event_id) for s, p in pairs] == [("s1", "p1")]


def test_captured_rows_carry_references_of_replayed_items_and_mark_failures():
    references = {"q1": {"reference": "ref", "kind": "short_answer"}}
    rows = captured_rows(
        [
            record("a", "v1", "q1", {"generated_text": "x", "finish_reason": "length"}),
            record("b", "v1", "q2", {"generated_text": "y"}),
            record("c", "v1", "q3", None, status=424),
        ],
        references,
    )
    assert [(r["reference"], r["kind"], r["truncated"], r["failed"]) for r in rows] == [
        ("ref", "short_answer", True, False),
        ("", "open", False, False),
        ("", "open", False, True),
    ]
    assert rows[0]["prompt"] == "q1" and rows[0]["response"] == "x" and rows[2]["response"] == ""


@pytest.fixture
def registry(tmp_path, monkeypatch):
    """Two registered versions with training artifacts, in the test's own MLflow."""
    from llmops.config import load_settings
    from llmops.tracking import client

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    settings = load_settings("local")

    mlflow_client = client(settings.mlflow.tracking_uri)
    name = settings.finetune.model_name
    mlflow_client.create_registered_model(name)
    for version in (1, 2):
        mlflow_client.create_model_version(
            name, source=f"/tmp/m{version}", tags={"training.artifact_uri": f"file:///store/m{version}.tar.gz"}
        )
    mlflow_client.create_model_version(name, source="/tmp/m3")  # no artifact tag
    return settings, mlflow_client


def test_the_plan_follows_the_aliases(registry):
    settings, registry = registry
    name = settings.finetune.model_name
    assert plan_rollout(settings, None)["action"] == "nothing"
    registry.set_registered_model_alias(name, "challenger", "1")
    plan = plan_rollout(settings, None)
    assert plan["action"] == "first_deploy" and plan["candidate"]["artifact_uri"] == "file:///store/m1.tar.gz"
    registry.set_registered_model_alias(name, "champion", "1")
    assert plan_rollout(settings, None)["action"] == "nothing"  # the challenger already is the champion
    registry.set_registered_model_alias(name, "challenger", "2")
    plan = plan_rollout(settings, None)
    assert (plan["action"], plan["champion"]["version"], plan["candidate"]["version"]) == ("rollout", "1", "2")
    assert plan_rollout(settings, "2") == plan  # a version from the form, same plan


def test_the_plan_refuses_what_cannot_be_served(registry):
    settings, _ = registry
    with pytest.raises(DeploymentError, match="has no version 42"):
        plan_rollout(settings, "42")
    with pytest.raises(DeploymentError, match="no training.artifact_uri"):
        plan_rollout(settings, "3")
