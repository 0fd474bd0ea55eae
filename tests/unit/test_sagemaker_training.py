"""The SageMaker training backend's requests and results: checked against botocore's service model
(Stubber validates every parameter), sent to moto, and read back as the entrypoint would."""

from __future__ import annotations

import io
import json
import re
import tarfile

import boto3
import pytest
from botocore.stub import Stubber
from moto import mock_aws

from llmops.backends.training.job import TrainingJobError
from llmops.backends.training.sagemaker import (
    ENTRY_POINT,
    SageMakerRequestError,
    check_request,
    encode_hyperparameters,
    job_outcome,
    metric_definitions,
    source_bundle,
    training_job_request,
)
from llmops.config import PROJECT_ROOT, SageMakerConfig
from llmops.costs import estimate_cost
from tests.aws import toolkit_argv
from training.config import JobPaths, TrainConfig, load_config
from training.train import metric_line

ROLE = "arn:aws:iam::123456789012:role/llmops-sagemaker"
STORE = "s3://llmops-bucket/llmops"
DATA = f"{STORE}/datasets/python-docs-instruct/abc123"
CHANNELS = {
    "train": f"{DATA}/train.jsonl",
    "validation": f"{DATA}/validation.jsonl",
    "base_model": f"{STORE}/base-models/smollm2-135m-instruct/0123456789ab/",
}


def request_for(backend: str = "sagemaker", **config) -> dict:
    sagemaker = SageMakerConfig.model_validate({"role_arn": ROLE, **config})
    return training_job_request(
        sagemaker,
        backend=backend,
        job_name="llmops-ft-202611230200-0123456789ab",
        region="us-east-1",
        store_uri=STORE,
        hyperparameters=TrainConfig(base_model="smollm2-135m-instruct", max_steps=40).to_dict(),
        channels=CHANNELS,
        code_uri=f"{STORE}/code/sourcedir-0123456789abcdef.tar.gz",
        tags={"airflow.run_id": "scheduled__2026-11-23T02:00:00+00:00"},
    )


def sagemaker_client():
    return boto3.client("sagemaker", region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="x")


@pytest.mark.parametrize("backend", ["sagemaker", "sagemaker-trainium"])
def test_the_request_passes_botocores_service_model(backend):
    request = request_for(backend, spot=True, kms_key_id="alias/llmops", subnets=["subnet-1"], security_groups=["sg-1"])
    client = sagemaker_client()
    with Stubber(client) as stub:  # validates every parameter against the model before "sending"
        stub.add_response("create_training_job", {"TrainingJobArn": "arn:x"}, request)
        client.create_training_job(**request)
        stub.assert_no_pending_responses()


def test_gpu_and_trainium_requests_differ_where_a_reviewer_expects():
    gpu, trn = request_for("sagemaker"), request_for("sagemaker-trainium")
    assert "huggingface-pytorch-training:" in gpu["AlgorithmSpecification"]["TrainingImage"]
    assert ".dkr.ecr.us-east-1.amazonaws.com/" in gpu["AlgorithmSpecification"]["TrainingImage"]
    assert "huggingface-pytorch-training-neuronx:" in trn["AlgorithmSpecification"]["TrainingImage"]
    assert gpu["ResourceConfig"]["InstanceType"] == "ml.g5.2xlarge"
    assert trn["ResourceConfig"]["InstanceType"] == "ml.trn1.2xlarge"
    assert "sagemaker_torch_distributed_enabled" not in gpu["HyperParameters"]
    assert trn["HyperParameters"]["sagemaker_torch_distributed_enabled"] == "true"
    assert trn["HyperParameters"]["sagemaker_instance_type"] == "ml.trn1.2xlarge"
    assert trn["HyperParameters"]["precision"] == "bf16" and gpu["HyperParameters"]["precision"] == "fp32"
    for request in (gpu, trn):
        hp = request["HyperParameters"]
        assert hp["sagemaker_program"] == ENTRY_POINT
        assert hp["sagemaker_submit_directory"].endswith(".tar.gz")
        assert hp["base_model"] == "smollm2-135m-instruct", "the name, for the record; the channel has the files"
        assert hp["max_steps"] == "40" and hp["lora_target_modules"] == '["q_proj", "k_proj", "v_proj", "o_proj"]'
        assert [c["ChannelName"] for c in request["InputDataConfig"]] == ["train", "validation", "base_model"]
        assert request["OutputDataConfig"] == {"S3OutputPath": f"{STORE}/training-jobs"}
        assert request["CheckpointConfig"]["S3Uri"] == f"{STORE}/training-jobs/{request['TrainingJobName']}/checkpoints"
        assert {"Key": "airflow.run_id", "Value": "scheduled__2026-11-23T02:00:00+00:00"} in request["Tags"]
        assert "EnableManagedSpotTraining" not in request and "VpcConfig" not in request


def test_spot_kms_and_vpc_come_from_config():
    request = request_for(
        spot=True, max_runtime_minutes=60, kms_key_id="alias/llmops", subnets=["subnet-1"], security_groups=["sg-1"]
    )
    assert request["EnableManagedSpotTraining"] is True
    assert request["StoppingCondition"] == {"MaxRuntimeInSeconds": 3600, "MaxWaitTimeInSeconds": 7200}
    assert request["OutputDataConfig"]["KmsKeyId"] == "alias/llmops"
    # g5 and trn1 have local NVMe storage (encrypted by the hardware); SageMaker refuses a volume key there.
    assert "VolumeKmsKeyId" not in request["ResourceConfig"]
    assert request["VpcConfig"] == {"Subnets": ["subnet-1"], "SecurityGroupIds": ["sg-1"]}


def test_metric_definitions_match_the_lines_the_entrypoint_prints():
    line = "starting\n" + metric_line({"loss": 2.5, "learning_rate": 1e-05, "eval_loss": 1.25, "step": 5}) + "\n"
    found = {}
    for definition in metric_definitions():
        match = re.search(definition["Regex"], line, re.MULTILINE)
        if match:
            found[definition["Name"]] = float(match.group(1))
    assert found == {"loss": 2.5, "learning_rate": 1e-05, "eval_loss": 1.25}, "eval_loss must not match as loss"


def test_hyperparameters_round_trip_through_sagemakers_file_and_the_toolkits_flags(tmp_path):
    config = TrainConfig(base_model="smollm2-135m-instruct", lora_r=32, learning_rate=3e-4, max_steps=7)
    encoded = encode_hyperparameters({"sagemaker_program": ENTRY_POINT, **config.to_dict()})
    assert all(isinstance(v, str) for v in encoded.values())
    (tmp_path / "hyperparameters.json").write_text(json.dumps(encoded))  # as SageMaker writes it
    paths = JobPaths.from_env({"SM_INPUT_CONFIG_DIR": str(tmp_path)})
    assert load_config([], paths) == config
    # The training toolkit also passes each hyperparameter as --name str(json-decoded value):
    # lists arrive as Python literals ("['q_proj', ...]").
    flags = toolkit_argv(encoded)
    assert "['q_proj', 'k_proj', 'v_proj', 'o_proj']" in flags
    assert load_config(flags, paths) == config


def test_the_source_bundle_is_deterministic_and_holds_the_entrypoint():
    one = source_bundle(PROJECT_ROOT, ("transformers==5.23.0",))
    two = source_bundle(PROJECT_ROOT, ("transformers==5.23.0",))
    assert one.sha256 == two.sha256 and one.data == two.data
    assert source_bundle(PROJECT_ROOT).sha256 != one.sha256
    with tarfile.open(fileobj=io.BytesIO(one.data), mode="r:gz") as tar:
        names = tar.getnames()
        launcher = tar.extractfile(ENTRY_POINT).read().decode()
    assert {ENTRY_POINT, "requirements.txt", "training/train.py", "training/config.py"} <= set(names)
    assert "from training.train import main" in launcher
    assert one.uri(STORE) == f"{STORE}/code/sourcedir-{one.sha256[:16]}.tar.gz"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"TrainingJobName": "x" * 64}, "1-63 letters"),
        ({"TrainingJobName": "has_underscore"}, "1-63 letters"),
        ({"HyperParameters": {"k": "v" * 2501}}, "values 2500"),
        ({"Tags": [{"Key": "bad#key", "Value": "v"}]}, "only letters"),
        ({"Tags": [{"Key": f"k{i}", "Value": "v"} for i in range(51)]}, "at most 50"),
        ({"StoppingCondition": {"MaxRuntimeInSeconds": 60, "MaxWaitTimeInSeconds": 30}}, "only for managed spot"),
        (
            {"EnableManagedSpotTraining": True, "StoppingCondition": {"MaxRuntimeInSeconds": 60}},
            "MaxWaitTimeInSeconds must be >= MaxRuntimeInSeconds",
        ),
    ],
)
def test_requests_aws_would_refuse_are_refused_here_with_the_reason(change, message):
    with pytest.raises(SageMakerRequestError, match=message):
        check_request({**request_for(), **change})


def test_a_request_needs_a_role_and_a_sagemaker_backend():
    with pytest.raises(SageMakerRequestError, match="role_arn is not set"):
        training_job_request(
            SageMakerConfig(),
            backend="sagemaker",
            job_name="j",
            region="us-east-1",
            store_uri=STORE,
            hyperparameters={},
            channels={},
            code_uri="s3://b/c.tar.gz",
        )
    with pytest.raises(SageMakerRequestError, match="'local' is not a SageMaker backend"):
        request_for("local")


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"trainium": {"instance_type": "ml.g5.2xlarge", "image_uri": "x"}}, "not a Trainium instance"),
        ({"subnets": ["subnet-1"]}, "subnets and security_groups go together"),
        ({"max_runtime_minutes": 60, "max_wait_minutes": 30}, "at least max_runtime_minutes"),
        ({"role_arn": "my-role"}, "role_arn"),
    ],
)
def test_the_config_refuses_what_cannot_work(config, message):
    with pytest.raises(ValueError, match=message):
        SageMakerConfig.model_validate(config)


def test_a_completed_job_gives_its_artifact_metrics_and_cost_through_moto():
    request = request_for(spot=True)
    with mock_aws():
        client = sagemaker_client()
        client.create_training_job(**request)
        described = client.describe_training_job(TrainingJobName=request["TrainingJobName"])
    # moto leaves out what a real job reports; a spot job billed 900 of its 3000 seconds:
    described.update(
        TrainingTimeInSeconds=3000,
        BillableTimeInSeconds=900,
        FinalMetricDataList=[{"MetricName": "eval_loss", "Value": 1.5}, {"MetricName": "train:progress", "Value": 1}],
    )
    outcome = job_outcome(described, {"ml.g5.2xlarge": 1.2})
    name = request["TrainingJobName"]
    assert outcome["model_artifact_uri"] == f"{STORE}/training-jobs/{name}/output/model.tar.gz"
    assert outcome["job_arn"].endswith(f":training-job/{name}")
    assert outcome["metrics"] == {"eval_loss": 1.5}
    assert outcome["cost"] == {
        "instance_type": "ml.g5.2xlarge",
        "instance_count": 1,
        "billable_seconds": 900,
        "usd_per_hour": 1.2,
        "estimated_cost_usd": 0.3,
        "spot_savings": 0.7,
    }


@pytest.mark.parametrize("status", ["Failed", "Stopped"])
def test_a_failed_or_stopped_job_raises_with_sagemakers_reason(status):
    described = {"TrainingJobName": "j", "TrainingJobStatus": status, "FailureReason": "CUDA out of memory"}
    with pytest.raises(TrainingJobError, match=f"SageMaker training job j ended {status}: CUDA out of memory"):
        job_outcome(described, {})
    with pytest.raises(TrainingJobError, match="is InProgress, not finished"):
        job_outcome({"TrainingJobName": "j", "TrainingJobStatus": "InProgress"}, {})


def test_cost_without_a_price_says_so_instead_of_guessing():
    assert estimate_cost("ml.p5.48xlarge", 2, 3600, {})["estimated_cost_usd"] is None
    assert estimate_cost("ml.g5.2xlarge", 2, 7200, {"ml.g5.2xlarge": 1.5})["estimated_cost_usd"] == 3.0


@pytest.fixture
def aws_env(monkeypatch):
    monkeypatch.setenv("LLMOPS_ENV", "aws")
    monkeypatch.setenv("LLMOPS_S3_BUCKET", "llmops-bucket")
    monkeypatch.setenv("LLMOPS_SAGEMAKER_ROLE_ARN", ROLE)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.internal:5000")
    monkeypatch.setenv("LLMOPS_EC2_INSTANCE_PROFILE", "llmops-trn")


def test_the_dry_run_prints_the_upload_and_the_request_a_run_would_send(aws_env, capsys):
    from devtools.aws import main

    assert (
        main(["dry-run", "--backend", "sagemaker-trainium", "--dataset-version", "3f2a9c", "--set", "max_steps=100"])
        == 0
    )
    printed = json.loads(capsys.readouterr().out)
    create = printed["CreateTrainingJob"]
    assert printed["upload"]["uri"] == create["HyperParameters"]["sagemaker_submit_directory"]
    assert create["HyperParameters"]["max_steps"] == "100"
    assert create["InputDataConfig"][0]["DataSource"]["S3DataSource"]["S3Uri"] == (
        "s3://llmops-bucket/llmops/datasets/python-docs-instruct/3f2a9c/train.jsonl"
    )
    assert create["ResourceConfig"]["InstanceType"] == "ml.trn1.2xlarge"
    evaluate = printed["CreateProcessingJob"]  # aws.yaml evaluates on SageMaker Processing too
    candidate = next(i for i in evaluate["ProcessingInputs"] if i["InputName"] == "models-candidate")
    assert candidate["S3Input"]["S3Uri"] == (
        f"s3://llmops-bucket/llmops/training-jobs/{create['TrainingJobName']}/output/model.tar.gz"
    )
    client = sagemaker_client()
    with Stubber(client) as stub:
        stub.add_response("create_training_job", {"TrainingJobArn": "arn:x"}, create)
        stub.add_response("create_processing_job", {"ProcessingJobArn": "arn:y"}, evaluate)
        client.create_training_job(**create)
        client.create_processing_job(**evaluate)


def test_the_dry_run_says_what_is_missing(aws_env, monkeypatch, capsys):
    from devtools.aws import main

    assert main(["dry-run", "--dataset-version", "latest"]) == 2
    assert "name the dataset version" in capsys.readouterr().err
    assert main(["dry-run", "--dataset-version", "abc", "--set", "lora_r=-1"]) == 2
    assert "lora_r: must be > 0" in capsys.readouterr().err
    monkeypatch.setenv("LLMOPS_SAGEMAKER_ROLE_ARN", "")
    assert main(["dry-run", "--dataset-version", "abc"]) == 2
    assert "needs sagemaker.role_arn" in capsys.readouterr().err
    monkeypatch.setenv("LLMOPS_ENV", "local")
    assert main(["dry-run", "--dataset-version", "abc"]) == 2
    assert "the AWS backends read their data from S3" in capsys.readouterr().err


def test_the_dry_run_of_ec2_trainium_prints_the_launch_and_the_command(aws_env, capsys):
    from devtools.aws import main

    assert main(["dry-run", "--backend", "ec2-trainium", "--dataset-version", "3f2a9c"]) == 0
    printed = json.loads(capsys.readouterr().out)
    launch, command = printed["RunInstances"], printed["SendCommand"]
    assert launch["InstanceType"] == "trn1.2xlarge" and "SSM parameter /aws/service/neuron" in launch["ImageId"]
    assert command["DocumentName"] == "AWS-RunShellScript"
    assert any("torchrun" in line for line in command["Parameters"]["commands"])
    ec2 = boto3.client("ec2", region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="x")
    ssm = boto3.client("ssm", region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="x")
    with Stubber(ec2) as ec2_stub, Stubber(ssm) as ssm_stub:
        ec2_stub.add_response("run_instances", {}, launch)
        ssm_stub.add_response("send_command", {}, command)
        ec2.run_instances(**launch)
        ssm.send_command(**command)
