"""llm_finetune on the SageMaker backends, end to end against a moto server: the store is moto's S3,
the Airflow AWS connection points at it, and SageMaker training and processing jobs are run by the
emulators in ``tests.aws`` from the requests the DAG sent (source code, channels or inputs,
hyperparameters, metric definitions, entry point). Every request is also checked against
botocore's service model."""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import pytest
import yaml
from botocore.stub import Stubber

from devtools.demo import return_value
from llmops.backends.training.ec2 import command_outcome
from llmops.backends.training.job import TrainingJobError
from llmops.tracking import client as mlflow_client
from tests.aws import (
    aws_env,
    client,
    emulated_instances,
    emulated_processing,
    emulated_training,
    fake_bedrock,
    moto_server,
)
from tests.dagruns import fast_config, parsed_dag, task_states
from tests.datagen import good_records, write_jsonl

pytestmark = [pytest.mark.integration, pytest.mark.model]

BUCKET = "llmops-test"
ROLE = "arn:aws:iam::123456789012:role/llmops-sagemaker"


@pytest.fixture(scope="module")
def aws(tmp_path_factory, airflow_db):
    """A moto server with the emulator, the environment pointing at it, and a curated dataset
    version published to its S3 by the real pipeline."""
    from llmops.config import load_settings
    from llmops.data import stages

    home = tmp_path_factory.mktemp("aws-home")
    config = yaml.safe_load(fast_config(home).read_text())
    config["store_uri"] = f"s3://{BUCKET}/llmops"
    config["sagemaker"] = {"role_arn": ROLE, "poll_seconds": 1, "tags": {"project": "llmops-tests"}}
    config["aws"] = {"conn_id": "aws_default", "region": "us-east-1"}
    config["evaluation"]["backend"] = "sagemaker"
    config["evaluation"]["judge"] = "bedrock"
    config["ec2"] = {
        "ami_id": "ami-0123456789abcdef0",
        "instance_profile": "llmops-trainium",
        "activate": "true",  # the emulated instance's Python is this one
        "poll_seconds": 1,
        "ssm_online_timeout_minutes": 1,
        "command_timeout_minutes": 15,
    }
    config_file = home / "aws-config.yaml"
    config_file.write_text(yaml.safe_dump(config))
    with (
        moto_server() as url,
        emulated_training(url, home / "sagemaker") as emulator,
        emulated_processing(url, home / "processing") as processing,
        fake_bedrock() as (bedrock_url, judged),
        emulated_instances(url, home / "ec2") as instances,
        pytest.MonkeyPatch.context() as patch,
    ):
        env = aws_env(url)
        connection = json.loads(env["AIRFLOW_CONN_AWS_DEFAULT"])
        connection["extra"]["service_config"] = {"bedrock-runtime": {"endpoint_url": bedrock_url}}
        env = {
            **env,
            "AIRFLOW_CONN_AWS_DEFAULT": json.dumps(connection),
            "LLMOPS_HOME": str(home),
            "LLMOPS_CONFIG_FILE": str(config_file),
            "MLFLOW_TRACKING_URI": f"sqlite:///{home}/mlflow.db",
        }
        for key, value in env.items():
            patch.setenv(key, value)
        client("s3", url).create_bucket(Bucket=BUCKET)
        client("iam", url).create_instance_profile(InstanceProfileName="llmops-trainium")
        settings = load_settings()
        raw = write_jsonl(home / "raw.jsonl", good_records(60))
        dataset = stages.curate(settings, settings.data.model_copy(update={"raw_uri": str(raw)}))
        yield {
            "url": url,
            "env": env,
            "emulator": emulator,
            "processing": processing,
            "judged": judged,
            "instances": instances,
            "dataset": dataset,
            "settings": settings,
        }


@pytest.fixture(scope="module")
def dag(aws):
    with parsed_dag("llm_finetune", **aws["env"]) as dag:
        yield dag


def conf(tiny_model, **extra) -> dict:
    """A run's conf, every Param the tests vary set explicitly: dag.test() leaves a run's conf in
    the DAG object's Param defaults, so a value one test sets would leak into the next."""
    return {
        "backend": "sagemaker",
        "peft_method": "lora",
        "base_model": str(tiny_model),
        "max_steps": 3,
        "lora_r": 4,
        "lora_alpha": 8,
        "batch_size": 2,
        "learning_rate": 0.01,
        **extra,
    }


def s3_bytes(url: str, uri: str) -> bytes:
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    return client("s3", url).get_object(Bucket=bucket, Key=key)["Body"].read()


def test_a_sagemaker_run_trains_from_the_request_and_registers_with_its_job_and_cost(aws, dag, tiny_model):
    run = dag.test(run_conf=conf(tiny_model))
    states = task_states(run)
    assert run.state == "success", states
    assert states["train_adapter"] == "skipped"
    assert states["stage_sagemaker_job"] == states["run_sagemaker_job"] == states["collect_training"] == "success"

    request = return_value(run, "stage_sagemaker_job")
    name = request["TrainingJobName"]
    assert list(aws["emulator"].requests) == [name], "exactly one training job for the run"
    sagemaker = client("sagemaker", aws["url"])
    with Stubber(sagemaker) as stub:  # the request as sent passes botocore's service model
        stub.add_response("create_training_job", {"TrainingJobArn": "arn:x"}, request)
        sagemaker.create_training_job(**request)

    registered = return_value(run, "register_model")
    version = mlflow_client(os.environ["MLFLOW_TRACKING_URI"]).get_model_version(
        registered["model_name"], registered["version"]
    )
    tags = version.tags
    artifact = f"s3://{BUCKET}/llmops/training-jobs/{name}/output/model.tar.gz"
    assert tags["training.backend"] == "sagemaker" and tags["training.job_name"] == name
    assert tags["training.job_arn"].endswith(f":training-job/{name}")
    assert tags["training.artifact_uri"] == artifact
    assert tags["cost.instance_type"] == "ml.g5.2xlarge" and tags["cost.instance_count"] == "1"
    assert float(tags["cost.billable_seconds"]) >= 1 and float(tags["cost.estimated_cost_usd"]) > 0
    assert tags["dataset.version"] == aws["dataset"]["version"]
    assert float(tags["metrics.eval_loss"]) > 0, "the entrypoint's own metrics.json, from the archive"
    run_metrics = mlflow_client(os.environ["MLFLOW_TRACKING_URI"]).get_run(registered["run_id"]).data.metrics
    assert run_metrics["cost.estimated_cost_usd"] > 0

    with tarfile.open(fileobj=io.BytesIO(s3_bytes(aws["url"], artifact)), mode="r:gz") as tar:
        training_config = json.loads(tar.extractfile("training_config.json").read())
    assert training_config["lora_r"] == 4 and training_config["max_steps"] == 3
    assert training_config["lineage"]["run_id"] == run.run_id, "lineage reached the container"
    assert training_config["base_model"] == str(tiny_model), "the name; the files came from the channel"
    staged = return_value(run, "stage_sagemaker_job")["HyperParameters"]["sagemaker_submit_directory"]
    assert s3_bytes(aws["url"], staged)[:2] == b"\x1f\x8b", "the source bundle was uploaded"

    # The evaluation ran as a Processing job on the SageMaker-trained candidate, and the gate decided.
    assert states["stage_evaluation_job"] == states["run_evaluation_job"] == states["evaluate_models"] == "success"
    assert states["decide_promotion"] == "success"
    evaluation_request = return_value(run, "stage_evaluation_job")["request"]
    assert list(aws["processing"].requests) == [evaluation_request["ProcessingJobName"]]
    with Stubber(sagemaker) as stub:
        stub.add_response("create_processing_job", {"ProcessingJobArn": "arn:x"}, evaluation_request)
        sagemaker.create_processing_job(**evaluation_request)
    inputs = {i["InputName"]: i["S3Input"]["LocalPath"] for i in evaluation_request["ProcessingInputs"]}
    assert inputs["models-candidate"] == "/opt/ml/processing/input/models/candidate"
    assert inputs["items"] == "/opt/ml/processing/input/items"
    evaluation = return_value(run, "evaluate_models")
    assert evaluation["backend"] == "sagemaker" and evaluation["predictions_uri"].startswith(f"s3://{BUCKET}/")
    assert set(evaluation["summary"]["models"]) >= {"base", "candidate"}
    assert evaluation["cost"]["instance_type"] == "ml.g5.xlarge" and evaluation["cost"]["estimated_cost_usd"] > 0
    # The judge was Bedrock's Converse API, called through the provider's hook with the rubric.
    calls = aws["judged"]
    rows = evaluation["summary"]["items"] * len(evaluation["summary"]["models"])
    assert len(calls) == rows and {c["model_id"] for c in calls} == {aws["settings"].evaluation.judge_model_id}
    assert calls[0]["body"]["inferenceConfig"] == {"maxTokens": 400, "temperature": 0.0}
    assert calls[0]["body"]["system"] and calls[0]["body"]["messages"][0]["role"] == "user"
    judged = return_value(run, "judge_responses")
    assert judged["judge"].startswith("Amazon Bedrock model")
    recorded = return_value(run, "record_evaluation")
    eval_tags = mlflow_client(os.environ["MLFLOW_TRACKING_URI"]).get_run(recorded["run_id"]).data.tags
    assert eval_tags["evaluation.backend"] == "sagemaker" and eval_tags["cost.instance_type"] == "ml.g5.xlarge"


def test_a_trainium_run_sends_a_torch_distributed_job_to_a_trn1_instance(aws, dag, tiny_model):
    run = dag.test(run_conf=conf(tiny_model, backend="sagemaker-trainium"))
    assert run.state == "success", task_states(run)
    request = return_value(run, "stage_sagemaker_job")
    assert request["ResourceConfig"]["InstanceType"] == "ml.trn1.2xlarge"
    assert "huggingface-pytorch-training-neuronx" in request["AlgorithmSpecification"]["TrainingImage"]
    assert request["HyperParameters"]["sagemaker_torch_distributed_enabled"] == "true"
    assert request["HyperParameters"]["precision"] == "bf16"
    registered = return_value(run, "register_model")
    tags = (
        mlflow_client(os.environ["MLFLOW_TRACKING_URI"])
        .get_model_version(registered["model_name"], registered["version"])
        .tags
    )
    assert tags["cost.instance_type"] == "ml.trn1.2xlarge" and tags["training.job_name"] == request["TrainingJobName"]


def test_a_job_that_fails_in_the_container_fails_the_task_with_its_reason_and_registers_nothing(aws, dag, tiny_model):
    before = len(aws["emulator"].requests)
    run = dag.test(run_conf=conf(tiny_model, peft_method="qlora"))  # no CUDA in the emulator
    states = task_states(run)
    assert run.state == "failed"
    assert states["run_sagemaker_job"] == "failed"
    assert states["collect_training"] == states["register_model"] == "upstream_failed"
    assert len(aws["emulator"].requests) == before + 1
    name = return_value(run, "stage_sagemaker_job")["TrainingJobName"]
    described = client("sagemaker", aws["url"]).describe_training_job(TrainingJobName=name)
    assert described["TrainingJobStatus"] == "Failed"
    assert "qlora" in described["FailureReason"]
    versions = mlflow_client(os.environ["MLFLOW_TRACKING_URI"]).search_model_versions(
        f"tags.`airflow.run_id`='{run.run_id}'"
    )
    assert list(versions) == []


def test_the_form_refuses_a_sagemaker_run_without_a_role(aws, tiny_model, tmp_path):
    config = yaml.safe_load(Path(aws["env"]["LLMOPS_CONFIG_FILE"]).read_text())
    config["sagemaker"].pop("role_arn")
    no_role = tmp_path / "no-role.yaml"
    no_role.write_text(yaml.safe_dump(config))
    with parsed_dag("llm_finetune", **{**aws["env"], "LLMOPS_CONFIG_FILE": str(no_role)}) as dag:
        run = dag.test(run_conf=conf(tiny_model))
    assert run.state == "failed" and task_states(run)["resolve_config"] == "failed"


def test_an_ec2_trainium_run_trains_over_ssm_and_terminates_the_instance(aws, dag, tiny_model):
    run = dag.test(run_conf=conf(tiny_model, backend="ec2-trainium"))
    states = task_states(run)
    assert run.state == "success", states
    path = ["stage_ec2_job", "launch_trainium_instance", "await_ssm_agent", "run_training_command", "collect_ec2_job"]
    assert [states[t] for t in path] == ["success"] * len(path)
    assert states["terminate_trainium_instance"] == "success"
    assert states["train_adapter"] == states["run_sagemaker_job"] == "skipped"

    staged = return_value(run, "stage_ec2_job")
    [instance_id] = return_value(run, "launch_trainium_instance")
    ec2 = client("ec2", aws["url"])
    with Stubber(ec2) as stub:  # the launch as sent passes botocore's service model
        stub.add_response(
            "run_instances", {}, {"ImageId": staged["image_id"], "MinCount": 1, "MaxCount": 1, **staged["config"]}
        )
        ec2.run_instances(ImageId=staged["image_id"], MinCount=1, MaxCount=1, **staged["config"])
    described = ec2.describe_instances(InstanceIds=[instance_id])["Reservations"][0]["Instances"][0]
    assert described["InstanceType"] == "trn1.2xlarge" and described["State"]["Name"] == "terminated"
    shutdown = ec2.describe_instance_attribute(InstanceId=instance_id, Attribute="instanceInitiatedShutdownBehavior")
    assert shutdown["InstanceInitiatedShutdownBehavior"]["Value"] == "terminate"

    [sent] = [c for c in aws["instances"].commands if c["Comment"].endswith(staged["job_name"])]
    ssm = client("ssm", aws["url"])
    with Stubber(ssm) as stub:
        stub.add_response("send_command", {}, sent)
        ssm.send_command(**sent)
    assert sent["DocumentName"] == "AWS-RunShellScript" and sent["InstanceIds"] == [instance_id]
    assert any(
        "torchrun --standalone --nproc_per_node=2 llmops_train.py" in line for line in sent["Parameters"]["commands"]
    )

    registered = return_value(run, "register_model")
    tags = (
        mlflow_client(os.environ["MLFLOW_TRACKING_URI"])
        .get_model_version(registered["model_name"], registered["version"])
        .tags
    )
    assert tags["training.backend"] == "ec2-trainium"
    assert (
        tags["training.artifact_uri"] == f"s3://{BUCKET}/llmops/training-jobs/{staged['job_name']}/output/model.tar.gz"
    )
    assert tags["cost.instance_type"] == "trn1.2xlarge" and float(tags["cost.estimated_cost_usd"]) > 0


def test_a_failing_ec2_command_fails_with_its_output_tail_and_still_terminates(aws, dag, tiny_model):
    run = dag.test(run_conf=conf(tiny_model, backend="ec2-trainium", peft_method="qlora"))
    states = task_states(run)
    assert run.state == "failed"
    assert states["run_training_command"] == "success", "sent; its outcome is collect_ec2_job's"
    assert states["collect_ec2_job"] == "failed"
    assert states["terminate_trainium_instance"] == "success", "the teardown runs, and hides no failure"
    assert states["register_model"] == "upstream_failed"
    [instance_id] = return_value(run, "launch_trainium_instance")
    state = client("ec2", aws["url"]).describe_instances(InstanceIds=[instance_id])["Reservations"][0]["Instances"][0]
    assert state["State"]["Name"] == "terminated"
    # collect_ec2_job failed with the command's exit code and the tail of its output:
    command_id = return_value(run, "run_training_command")
    invocation = client("ssm", aws["url"]).get_command_invocation(CommandId=command_id, InstanceId=instance_id)
    with pytest.raises(TrainingJobError, match=r"ended Failed \(exit code [1-9][0-9]*\): training failed: .*qlora"):
        command_outcome(invocation)
    versions = mlflow_client(os.environ["MLFLOW_TRACKING_URI"]).search_model_versions(
        f"tags.`airflow.run_id`='{run.run_id}'"
    )
    assert list(versions) == []
