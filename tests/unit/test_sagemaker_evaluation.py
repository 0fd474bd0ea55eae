"""Evaluation as a SageMaker Processing job: the request against botocore's service model, the
layout the evaluation entrypoint reads, and what a finished or failed job gives back."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import boto3
import pytest
from botocore.stub import Stubber
from moto import mock_aws

from llmops import storage
from llmops.backends.evaluation.sagemaker import collect_evaluation, processing_job_request, stage_evaluation
from llmops.backends.training.job import TrainingJobError
from llmops.backends.training.sagemaker import SageMakerRequestError
from llmops.config import SageMakerConfig

ROLE = "arn:aws:iam::123456789012:role/llmops-sagemaker"
STORE = "s3://llmops-bucket/llmops"


def request_for(**config) -> dict:
    return processing_job_request(
        SageMakerConfig.model_validate({"role_arn": ROLE, **config}),
        job_name="llmops-eval-202611230200-0123456789ab",
        region="eu-west-1",
        inputs=[("code", f"{STORE}/code/evaluate-0123/", "code"), ("items", f"{STORE}/e/input/items/", "items")],
        output_uri=f"{STORE}/evaluation-jobs/j/output",
        tags={"airflow.run_id": "manual__1"},
    )


def test_the_request_passes_botocores_service_model():
    request = request_for(kms_key_id="alias/llmops", subnets=["subnet-1"], security_groups=["sg-1"])
    client = boto3.client("sagemaker", region_name="eu-west-1", aws_access_key_id="x", aws_secret_access_key="x")
    with Stubber(client) as stub:
        stub.add_response("create_processing_job", {"ProcessingJobArn": "arn:x"}, request)
        client.create_processing_job(**request)
    assert request["AppSpecification"]["ImageUri"].startswith("763104351884.dkr.ecr.eu-west-1.amazonaws.com/")
    assert request["AppSpecification"]["ContainerEntrypoint"] == [
        "python3",
        "/opt/ml/processing/input/code/llmops_evaluate.py",
    ]
    assert request["ProcessingInputs"][1]["S3Input"]["LocalPath"] == "/opt/ml/processing/input/items"
    assert request["ProcessingOutputConfig"]["Outputs"][0]["S3Output"]["LocalPath"] == "/opt/ml/processing/output"
    assert request["ProcessingResources"]["ClusterConfig"]["InstanceType"] == "ml.g5.xlarge"
    assert request["Environment"]["LLMOPS_PROCESSING_DIR"] == "/opt/ml/processing"
    assert request["NetworkConfig"]["VpcConfig"] == {"Subnets": ["subnet-1"], "SecurityGroupIds": ["sg-1"]}


def test_more_than_ten_inputs_or_no_role_is_refused():
    config = SageMakerConfig.model_validate({"role_arn": ROLE})
    inputs = [(f"i{n}", f"{STORE}/{n}/", f"x{n}") for n in range(11)]
    with pytest.raises(SageMakerRequestError, match="at most 10"):
        processing_job_request(config, job_name="j", region="us-east-1", inputs=inputs, output_uri=STORE)
    with pytest.raises(SageMakerRequestError, match="role_arn is not set"):
        processing_job_request(SageMakerConfig(), job_name="j", region="us-east-1", inputs=[], output_uri=STORE)


def described(status: str, **extra) -> dict:
    start = datetime(2026, 11, 23, 2, 0, tzinfo=UTC)
    return {
        "ProcessingJobName": "llmops-eval-1",
        "ProcessingJobArn": "arn:aws:sagemaker:us-east-1:123456789012:processing-job/llmops-eval-1",
        "ProcessingJobStatus": status,
        "ProcessingStartTime": start,
        "ProcessingEndTime": start + timedelta(minutes=30),
        "ProcessingResources": {"ClusterConfig": {"InstanceType": "ml.g5.xlarge", "InstanceCount": 1}},
        "ProcessingOutputConfig": {"Outputs": [{"S3Output": {"S3Uri": "s3://llmops-bucket/llmops/ev/output"}}]},
        **extra,
    }


def test_a_completed_job_gives_its_outputs_and_cost(settings):
    with mock_aws():
        client = boto3.client("s3", region_name="us-east-1")
        client.create_bucket(Bucket="llmops-bucket")
        options = {"client": client}
        storage.write_json("s3://llmops-bucket/llmops/ev/output/summary.json", {"models": {"base": {}}}, options)
        prices = {"ml.g5.xlarge": 1.4}
        on_s3 = settings.model_copy(
            update={"sagemaker": settings.sagemaker.model_copy(update={"prices_per_hour": prices})}
        )
        result = collect_evaluation(on_s3, described("Completed"), options)
    assert result["predictions_uri"] == "s3://llmops-bucket/llmops/ev/output/predictions.jsonl"
    assert result["summary"] == {"models": {"base": {}}}
    assert result["cost"]["estimated_cost_usd"] == 0.7 and result["cost"]["billable_seconds"] == 1800
    assert result["job_arn"].endswith("processing-job/llmops-eval-1") and result["backend"] == "sagemaker"


@pytest.mark.parametrize("status", ["Failed", "Stopped"])
def test_a_failed_or_stopped_job_raises_with_its_reason(settings, status):
    with pytest.raises(TrainingJobError, match=f"ended {status}: CUDA error"):
        collect_evaluation(settings, described(status, FailureReason="CUDA error"))


def test_staging_needs_an_s3_store(settings):
    from llmops.config import ConfigError

    with pytest.raises(ConfigError, match="needs an S3 store"):
        stage_evaluation(settings, "j", {}, [])
