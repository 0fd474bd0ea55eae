"""The rollout on a SageMaker endpoint: every request the backend sends is checked against
botocore's service model (Stubber), the deployment steps run against a moto server, and the state
checks catch what SageMaker reports only through ``FailureReason``."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import boto3
import pytest
from botocore.stub import ANY, Stubber

from llmops.backends.endpoints import backend_for
from llmops.backends.endpoints.base import (
    DeploymentError,
    DeploymentRejected,
    apply_config,
    capture_config,
    config_name,
    endpoint_config_request,
    ensure_models,
    model_request,
    serve_alone,
)
from llmops.backends.endpoints.sagemaker import (
    BASE_MODEL_DIR,
    SageMakerEndpointBackend,
    alarm_requests,
    deployment_config,
    metric_queries,
)
from llmops.config import load_settings
from llmops.rollout.policy import step_weights
from tests.aws import REGION, aws_env, moto_server

ROLE = "arn:aws:iam::123456789012:role/llmops-sagemaker"
IMAGE = "123456789012.dkr.ecr.{region}.amazonaws.com/llmops-serving:1"
ENDPOINT = "python-docs-assistant"
ENDPOINT_ARN = f"arn:aws:sagemaker:{REGION}:123456789012:endpoint/{ENDPOINT}"
CONFIG_ARN = f"arn:aws:sagemaker:{REGION}:123456789012:endpoint-config/cfg"


@pytest.fixture
def settings(monkeypatch, tmp_path):
    for name, value in {
        "LLMOPS_S3_BUCKET": "llmops-bucket",
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db",
        "LLMOPS_SAGEMAKER_ROLE_ARN": ROLE,
        "LLMOPS_SERVING_IMAGE_URI": IMAGE,
        "AWS_DEFAULT_REGION": REGION,
        "LLMOPS_HOME": str(tmp_path),
    }.items():
        monkeypatch.setenv(name, value)
    return load_settings("aws")


def clients():
    def make(service):
        return boto3.client(service, region_name=REGION, aws_access_key_id="x", aws_secret_access_key="x")

    return make("sagemaker"), make("cloudwatch")


def backend(settings, sagemaker, cloudwatch=None, **kwargs) -> SageMakerEndpointBackend:
    return SageMakerEndpointBackend(
        settings, sagemaker=sagemaker, cloudwatch=cloudwatch, sleep=lambda _: None, **kwargs
    )


def endpoint(config: str, status: str = "InService", weights: dict | None = None, **extra) -> dict:
    return {
        "EndpointName": ENDPOINT,
        "EndpointArn": f"arn:aws:sagemaker:{REGION}:123456789012:endpoint/{ENDPOINT}",
        "EndpointConfigName": config,
        "EndpointStatus": status,
        "CreationTime": datetime(2026, 11, 23, tzinfo=UTC),
        "LastModifiedTime": datetime(2026, 11, 23, tzinfo=UTC),
        "ProductionVariants": [
            {"VariantName": v, "CurrentWeight": w, "DesiredWeight": w} for v, w in (weights or {"v1": 1.0}).items()
        ],
        **extra,
    }


def config_description(request: dict) -> dict:
    return {
        **{k: v for k, v in request.items() if k != "Tags"},
        "EndpointConfigArn": f"arn:aws:sagemaker:{REGION}:123456789012:endpoint-config/x",
        "CreationTime": datetime(2026, 11, 23, tzinfo=UTC),
    }


def missing(stub, operation: str, what: str):
    stub.add_client_error(operation, "ValidationException", f"Could not find {what}.")


# -- the requests, against botocore's service model ---------------------------------------------


def test_serving_on_sagemaker_is_chosen_by_the_config(settings):
    assert settings.serving.backend == "sagemaker"
    assert isinstance(backend_for(settings), SageMakerEndpointBackend)


def test_a_model_mounts_its_base_model_next_to_the_adapter(settings):
    request = model_request(ENDPOINT, 3, "s3://llmops-bucket/llmops/jobs/x/model.tar.gz", {"A": "1"}, "smollm2-x")
    definition = backend(settings, None).model_definition(request)
    container = definition["PrimaryContainer"]
    assert container["Image"] == "123456789012.dkr.ecr.us-east-1.amazonaws.com/llmops-serving:1"
    assert container["Environment"] == {"A": "1", "LLMOPS_BASE_MODEL": BASE_MODEL_DIR}
    source = container["AdditionalModelDataSources"][0]["S3DataSource"]
    assert source["S3Uri"] == "s3://llmops-bucket/llmops/base-models/smollm2-x/"
    assert definition["ExecutionRoleArn"] == ROLE
    sagemaker, _ = clients()
    with Stubber(sagemaker) as stub:
        stub.add_response("create_model", {"ModelArn": f"arn:aws:sagemaker:{REGION}:123456789012:model/x"}, definition)
        sagemaker.create_model(**definition)


def test_a_missing_image_or_role_is_refused_with_what_to_set(settings, monkeypatch):
    request = model_request(ENDPOINT, 3, "s3://b/m.tar.gz", {})
    monkeypatch.setenv("LLMOPS_SERVING_IMAGE_URI", "")
    with pytest.raises(DeploymentRejected, match="LLMOPS_SERVING_IMAGE_URI"):
        backend(load_settings("aws"), None).model_definition(request)
    monkeypatch.setenv("LLMOPS_SAGEMAKER_ROLE_ARN", "")
    with pytest.raises(DeploymentRejected, match="role_arn"):
        backend(load_settings("aws"), None).model_definition(request)


def test_capture_must_go_to_s3_on_sagemaker(settings):
    with pytest.raises(ValueError, match="capture_uri"):
        type(settings.serving).model_validate({**settings.serving.model_dump(), "capture_uri": "/tmp/capture"})


def test_a_shadow_config_with_capture_passes_the_service_model(settings):
    sagemaker, _ = clients()
    request = endpoint_config_request("cfg-shadow", ENDPOINT, {"1": 1.0}, "2", capture_config(settings))
    definition = backend(settings, sagemaker).endpoint_config_definition(request)
    assert definition["ShadowProductionVariants"][0]["InstanceType"] == "ml.g5.xlarge"
    assert definition["DataCaptureConfig"]["DestinationS3Uri"] == "s3://llmops-bucket/llmops/capture"
    with Stubber(sagemaker) as stub:
        missing(stub, "describe_endpoint_config", "endpoint configuration")
        stub.add_response("create_endpoint_config", {"EndpointConfigArn": CONFIG_ARN}, definition)
        backend(settings, sagemaker).create_endpoint_config(request)
        stub.assert_no_pending_responses()


def test_a_retried_task_reuses_its_config_but_never_a_different_one(settings):
    sagemaker, _ = clients()
    request = endpoint_config_request("cfg-ab", ENDPOINT, {"1": 0.9, "2": 0.1}, None, None)
    definition = backend(settings, sagemaker).endpoint_config_definition(request)
    other = endpoint_config_request("cfg-ab", ENDPOINT, {"1": 0.5, "2": 0.5}, None, None)
    with Stubber(sagemaker) as stub:
        stub.add_response("describe_endpoint_config", config_description(definition), {"EndpointConfigName": "cfg-ab"})
        assert backend(settings, sagemaker).create_endpoint_config(request)["EndpointConfigName"] == "cfg-ab"
        stub.add_response("describe_endpoint_config", config_description(definition), {"EndpointConfigName": "cfg-ab"})
        with pytest.raises(DeploymentRejected, match="immutable"):
            backend(settings, sagemaker).create_endpoint_config(other)


def test_a_new_fleet_behind_the_same_variant_is_blue_green_with_rollback_alarms(settings):
    """Re-serving a version alone on a new config (say, after a restart or new instance settings)."""
    sagemaker, cloudwatch = clients()
    target = backend(settings, sagemaker).endpoint_config_definition(
        endpoint_config_request("cfg-final", ENDPOINT, {"2": 1.0}, None, capture_config(settings))
    )
    alarms = alarm_requests(ENDPOINT, "v2", settings.serving.policy().guardrails.max_p99_latency_ms, 2)
    expected = {
        "EndpointName": ENDPOINT,
        "EndpointConfigName": "cfg-final",
        "DeploymentConfig": deployment_config(
            [a["AlarmName"] for a in alarms], 300, settings.serving.deploy_timeout_minutes * 60
        ),
    }
    with Stubber(sagemaker) as sm, Stubber(cloudwatch) as cw:
        sm.add_response("describe_endpoint", endpoint("cfg-initial", weights={"v2": 1.0}), {"EndpointName": ENDPOINT})
        sm.add_response("describe_endpoint_config", config_description(target), {"EndpointConfigName": "cfg-final"})
        for alarm in alarms:
            cw.add_response("put_metric_alarm", {}, alarm)
        sm.add_response("update_endpoint", {"EndpointArn": ENDPOINT_ARN}, expected)
        backend(settings, sagemaker, cloudwatch).update_endpoint(ENDPOINT, "cfg-final")
        sm.assert_no_pending_responses()
        cw.assert_no_pending_responses()
    assert alarms[1]["Threshold"] == settings.serving.policy().guardrails.max_p99_latency_ms * 1000  # microseconds


def test_an_update_that_changes_the_variants_has_no_blue_green_policy(settings):
    """SageMaker's blue/green needs the same variant names on both sides: promotion changes them."""
    sagemaker, cloudwatch = clients()
    target = backend(settings, sagemaker).endpoint_config_definition(
        endpoint_config_request("cfg-final", ENDPOINT, {"2": 1.0}, None, None)
    )
    with Stubber(sagemaker) as sm:
        sm.add_response(
            "describe_endpoint", endpoint("cfg-ab", weights={"v1": 0.0, "v2": 1.0}), {"EndpointName": ENDPOINT}
        )
        sm.add_response("describe_endpoint_config", config_description(target), {"EndpointConfigName": "cfg-final"})
        sm.add_response(
            "update_endpoint",
            {"EndpointArn": ENDPOINT_ARN},
            {"EndpointName": ENDPOINT, "EndpointConfigName": "cfg-final"},
        )
        backend(settings, sagemaker, cloudwatch).update_endpoint(ENDPOINT, "cfg-final")
        sm.assert_no_pending_responses()


def test_a_deploy_timeout_shorter_than_a_blue_green_update_is_refused(settings):
    with pytest.raises(ValueError, match="shorter than a blue/green update"):
        type(settings.serving).model_validate({**settings.serving.model_dump(), "deploy_timeout_minutes": 15})


def test_the_execution_limit_covers_both_waits_and_the_fleets_start():
    policy = deployment_config(["a"], 3600, 900)["BlueGreenUpdatePolicy"]
    assert policy["MaximumExecutionTimeoutInSeconds"] > policy["TerminationWaitInSeconds"] + 3600


@pytest.mark.parametrize(("instance_type", "top_level_key"), [("ml.g5.xlarge", False), ("ml.m5.xlarge", True)])
def test_a_kms_key_encrypts_the_capture_and_the_volumes_where_sagemaker_takes_one(
    settings, instance_type, top_level_key
):
    serving = settings.serving.sagemaker.model_copy(
        update={"kms_key_id": "alias/llmops", "instance_type": instance_type}
    )
    settings = settings.model_copy(update={"serving": settings.serving.model_copy(update={"sagemaker": serving})})
    request = endpoint_config_request("cfg", ENDPOINT, {"1": 1.0}, None, capture_config(settings))
    definition = backend(settings, None).endpoint_config_definition(request)
    assert definition["DataCaptureConfig"]["KmsKeyId"] == "alias/llmops"
    assert ("KmsKeyId" in definition) is top_level_key  # local NVMe instances refuse one


def test_deleting_waits_until_the_endpoint_is_gone(settings):
    sagemaker, _ = clients()
    with Stubber(sagemaker) as sm:
        sm.add_response("delete_endpoint", {}, {"EndpointName": ENDPOINT})
        sm.add_response("describe_endpoint", endpoint("cfg", "Deleting"), {"EndpointName": ENDPOINT})
        missing(sm, "describe_endpoint", "endpoint")
        backend(settings, sagemaker, poll_seconds=0).delete_endpoint(ENDPOINT)
        sm.assert_no_pending_responses()


def test_an_update_to_or_from_a_shadow_config_has_no_blue_green_policy(settings):
    sagemaker, cloudwatch = clients()
    target = backend(settings, sagemaker).endpoint_config_definition(
        endpoint_config_request("cfg-shadow", ENDPOINT, {"1": 1.0}, "2", None)
    )
    with Stubber(sagemaker) as sm:
        sm.add_response("describe_endpoint", endpoint("cfg-initial"), {"EndpointName": ENDPOINT})
        sm.add_response("describe_endpoint_config", config_description(target), {"EndpointConfigName": "cfg-shadow"})
        sm.add_response(
            "update_endpoint",
            {"EndpointArn": ENDPOINT_ARN},
            {"EndpointName": ENDPOINT, "EndpointConfigName": "cfg-shadow"},
        )
        backend(settings, sagemaker, cloudwatch).update_endpoint(ENDPOINT, "cfg-shadow")
        sm.assert_no_pending_responses()


@pytest.mark.reliability("faults")
def test_a_failed_update_that_leaves_the_endpoint_in_service_on_the_old_config_is_an_error(settings):
    """SageMaker answers a failed (or auto-rolled-back) update with InService on the old config."""
    sagemaker, _ = clients()
    rollback = settings.serving.sagemaker.model_copy(update={"rollback_alarms": False})
    settings = settings.model_copy(update={"serving": settings.serving.model_copy(update={"sagemaker": rollback})})
    request = endpoint_config_request("cfg-new", ENDPOINT, {"2": 1.0}, None, None)
    definition = backend(settings, sagemaker).endpoint_config_definition(request)
    with Stubber(sagemaker) as sm:
        missing(sm, "describe_endpoint_config", "endpoint configuration")
        sm.add_response("create_endpoint_config", {"EndpointConfigArn": CONFIG_ARN}, definition)
        sm.add_response("describe_endpoint", endpoint("cfg-old"), {"EndpointName": ENDPOINT})
        sm.add_response(
            "update_endpoint",
            {"EndpointArn": ENDPOINT_ARN},
            {"EndpointName": ENDPOINT, "EndpointConfigName": "cfg-new"},
        )
        sm.add_response("describe_endpoint", endpoint("cfg-old", "Updating"), {"EndpointName": ENDPOINT})
        sm.add_response(
            "describe_endpoint",
            endpoint("cfg-old", FailureReason="Alarm python-docs-assistant-v2-5xx fired: rolled back"),
            {"EndpointName": ENDPOINT},
        )
        with pytest.raises(DeploymentError, match="did not move to config cfg-new: Alarm .*-v2-5xx fired"):
            apply_config(settings, backend(settings, sagemaker), request)


def test_weights_are_read_back_once_the_update_is_done(settings):
    sagemaker, _ = clients()
    weights = step_weights(0.1, "v1", "v2")
    with Stubber(sagemaker) as sm:
        sm.add_response(
            "update_endpoint_weights_and_capacities",
            {"EndpointArn": ENDPOINT_ARN},
            {
                "EndpointName": ENDPOINT,
                "DesiredWeightsAndCapacities": [
                    {"VariantName": "v1", "DesiredWeight": 0.9},
                    {"VariantName": "v2", "DesiredWeight": 0.1},
                ],
            },
        )
        sm.add_response(
            "describe_endpoint", endpoint("cfg-ab", "Updating", {"v1": 0.5, "v2": 0.5}), {"EndpointName": ENDPOINT}
        )
        sm.add_response("describe_endpoint", endpoint("cfg-ab", weights=weights), {"EndpointName": ENDPOINT})
        described = backend(settings, sagemaker).update_endpoint_weights(ENDPOINT, weights)
    assert {v["VariantName"]: v["CurrentWeight"] for v in described["ProductionVariants"]} == weights
    with Stubber(sagemaker) as sm:
        sm.add_response("update_endpoint_weights_and_capacities", {"EndpointArn": ENDPOINT_ARN}, None)
        sm.add_response("describe_endpoint", endpoint("cfg-ab", "Failed", FailureReason="capacity"), None)
        with pytest.raises(DeploymentError, match="failed a weight update: capacity"):
            backend(settings, sagemaker).update_endpoint_weights(ENDPOINT, weights)


def test_variant_windows_come_from_cloudwatch_per_variant(settings):
    sagemaker, cloudwatch = clients()
    since = datetime(2026, 11, 23, 10, 0, 30, tzinfo=UTC).timestamp()
    queries, meaning = metric_queries(ENDPOINT, ["v1", "v2"], 600)
    values = {
        ("v1", "Invocations:Sum"): [90.0],
        ("v1", "Invocation5XXErrors:Sum"): [1.0],
        ("v1", "ModelLatency:p99"): [800_000.0],
        ("v2", "Invocations:Sum"): [8.0, 2.0],
        ("v2", "Invocation4XXErrors:Sum"): [1.0],
        ("v2", "ModelLatency:p95"): [400_000.0],
    }
    results = [
        {"Id": qid, "Label": qid, "StatusCode": "Complete", "Values": values.get(meaning[qid], []), "Timestamps": []}
        for qid in meaning
    ]
    slept = []
    with Stubber(sagemaker) as sm, Stubber(cloudwatch) as cw:
        sm.add_response(
            "describe_endpoint", endpoint("cfg-ab", weights={"v1": 0.9, "v2": 0.1}), {"EndpointName": ENDPOINT}
        )
        cw.add_response(
            "get_metric_data",
            {"MetricDataResults": results},
            {"MetricDataQueries": ANY, "StartTime": datetime(2026, 11, 23, 10, 0, tzinfo=UTC), "EndTime": ANY},
        )
        windows = SageMakerEndpointBackend(
            settings, sagemaker=sagemaker, cloudwatch=cloudwatch, sleep=slept.append
        ).variant_windows(ENDPOINT, since)
    assert windows["v1"].invocations == 90 and windows["v1"].errors == 1 and windows["v1"].p99_ms == 800
    assert windows["v2"].invocations == 10 and windows["v2"].errors == 1 and windows["v2"].p95_ms == 400
    assert windows["v2"].p99_ms is None
    assert slept == [settings.serving.sagemaker.metrics_delay_seconds]  # CloudWatch publishes late
    assert {q["MetricStat"]["Metric"]["MetricName"] for q in queries} == {
        "Invocations",
        "Invocation4XXErrors",
        "Invocation5XXErrors",
        "ModelLatency",
    }


# -- the deployment steps against a moto server -------------------------------------------------


@pytest.fixture
def moto(settings, monkeypatch):
    """A moto server with the store's bucket and a staged base model; ``UpdateEndpoint`` (which moto
    lacks) switches the endpoint's config, or, for a config named in ``fail``, leaves it InService
    on the old one with a FailureReason, as SageMaker does."""
    from moto.sagemaker.responses import SageMakerResponse

    fail: set[str] = set()

    def update_endpoint(self):
        request = json.loads(self.body)
        backend = self.sagemaker_backend
        endpoint = backend.endpoints[request["EndpointName"]]
        config = backend.describe_endpoint_config(request["EndpointConfigName"])
        if request["EndpointConfigName"] in fail:
            endpoint.failure_reason = "the new variant failed its health check"
        else:
            endpoint.endpoint_config_name = request["EndpointConfigName"]
            endpoint.production_variants = endpoint._process_production_variants(config["ProductionVariants"])
            endpoint.failure_reason = None
        return json.dumps({"EndpointArn": endpoint.arn})

    monkeypatch.setattr(SageMakerResponse, "update_endpoint", update_endpoint, raising=False)
    with moto_server() as url:
        for name, value in aws_env(url).items():
            monkeypatch.setenv(name, value)
        s3 = boto3.client("s3", endpoint_url=url, region_name=REGION)
        s3.create_bucket(Bucket="llmops-bucket")
        s3.put_object(Bucket="llmops-bucket", Key="llmops/base-models/smollm2-135m-instruct/_STAGED.json", Body=b"{}")
        yield url, fail


@pytest.mark.reliability("faults")
def test_serving_alone_then_moving_on_runs_against_sagemakers_api(settings, moto):
    _, fail = moto
    # moto's list of instance types stops before ml.g5; g4dn is a real GPU type it knows.
    rollback = settings.serving.sagemaker.model_copy(
        update={"rollback_alarms": False, "instance_type": "ml.g4dn.xlarge"}
    )
    settings = settings.model_copy(update={"serving": settings.serving.model_copy(update={"sagemaker": rollback})})
    endpoints = SageMakerEndpointBackend(settings, sleep=lambda _: None, poll_seconds=0)
    v1 = {"version": "1", "artifact_uri": "s3://llmops-bucket/llmops/jobs/1/model.tar.gz", "base_model": ""}
    v2 = {"version": "2", "artifact_uri": "s3://llmops-bucket/llmops/jobs/2/model.tar.gz", "base_model": ""}
    first = serve_alone(settings, endpoints, v1, "initial", "llm_rollout/run-1")
    assert serve_alone(settings, endpoints, v1, "initial", "llm_rollout/run-1") == first  # a retry: same config
    model = endpoints.describe_model(f"{ENDPOINT}-v1")
    assert model["PrimaryContainer"]["Image"].endswith("llmops-serving:1")
    assert endpoints.describe_endpoint(ENDPOINT)["EndpointConfigName"] == first

    ensure_models(settings, endpoints, [v1, v2])
    ab = config_name(ENDPOINT, "ab", "llm_rollout/run-2")
    request = endpoint_config_request(ab, ENDPOINT, {"1": 0.9, "2": 0.1}, None, capture_config(settings))
    assert apply_config(settings, endpoints, request)["EndpointConfigName"] == ab
    described = endpoints.update_endpoint_weights(ENDPOINT, {"v1": 0.5, "v2": 0.5})
    assert {v["VariantName"]: v["CurrentWeight"] for v in described["ProductionVariants"]} == {"v1": 0.5, "v2": 0.5}

    final = config_name(ENDPOINT, "final", "llm_rollout/run-2")
    fail.add(final)
    with pytest.raises(DeploymentError, match=f"did not move to config {final}: the new variant failed"):
        serve_alone(settings, endpoints, v2, "final", "llm_rollout/run-2")
    assert endpoints.describe_endpoint(ENDPOINT)["EndpointConfigName"] == ab  # still serving the A/B config

    endpoints.delete_endpoint(ENDPOINT)
    endpoints.delete_endpoint(ENDPOINT)  # gone already: nothing to do
    assert endpoints.describe_endpoint(ENDPOINT) is None


def test_the_aws_rollout_policy_states_its_power_and_feeds_the_rollback_alarms(settings):
    """aws.yaml has its own production-sized rollout block: its p99 ceiling is the alarms' threshold,
    and its sequential tests state sample sizes a real endpoint's traffic reaches, not a demo's."""
    from llmops.rollout.policy import STEP_TESTS, required_sample_size

    policy = settings.serving.policy()
    assert policy.evidence is not None and policy.evidence.on_inconclusive == "roll_back"
    assert policy.bake_seconds > 0 and policy.guardrails.min_invocations >= 100
    sizes = required_sample_size(policy.evidence, STEP_TESTS)
    assert all(n >= 500 for n in sizes.values()), sizes
    alarms = alarm_requests(ENDPOINT, "v2", policy.guardrails.max_p99_latency_ms, 2)
    assert alarms[1]["Threshold"] == policy.guardrails.max_p99_latency_ms * 1000 == 30_000_000
