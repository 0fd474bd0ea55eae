"""The EC2 Trainium backend's requests and decisions: RunInstances and SendCommand against
botocore's service model, the commands a trn1 instance runs, waiting for SSM, and a command's
outcome. (The DAG runs them end to end in tests/integration/test_llm_finetune_sagemaker.py.)"""

from __future__ import annotations

import base64
import json

import boto3
import pytest
from botocore.stub import Stubber

from llmops.backends.training.ec2 import (
    command_outcome,
    run_instances_config,
    send_command_kwargs,
    training_commands,
    wait_until_online,
)
from llmops.backends.training.job import TrainingJobError
from llmops.config import Ec2Config

EC2 = Ec2Config(instance_profile="llmops-trn", subnet_id="subnet-1", security_group_ids=["sg-1"], tags={"team": "ml"})
STORE = "s3://llmops-bucket/llmops"


def aws(service: str):
    return boto3.client(service, region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="x")


def test_the_launch_passes_botocores_model_with_its_safety_nets():
    config = run_instances_config(EC2, "llmops-ft-202611230200-0123456789ab", {"airflow.run_id": "manual__1"})
    client = aws("ec2")
    with Stubber(client) as stub:
        stub.add_response("run_instances", {}, {"ImageId": "ami-1", "MinCount": 1, "MaxCount": 1, **config})
        client.run_instances(ImageId="ami-1", MinCount=1, MaxCount=1, **config)
    assert config["InstanceType"] == "trn1.2xlarge" and config["IamInstanceProfile"] == {"Name": "llmops-trn"}
    assert config["InstanceInitiatedShutdownBehavior"] == "terminate"
    assert config["ClientToken"] == "llmops-ft-202611230200-0123456789ab", "a retried launch starts no second instance"
    assert "shutdown -h +510" in base64.b64decode(config["UserData"]).decode()
    tags = {t["Key"]: t["Value"] for t in config["TagSpecifications"][0]["Tags"]}
    assert tags == {"Name": "llmops-ft-202611230200-0123456789ab", "airflow.run_id": "manual__1", "team": "ml"}
    assert config["SubnetId"] == "subnet-1" and config["MetadataOptions"]["HttpTokens"] == "required"


def test_the_commands_lay_the_job_out_as_sagemaker_would_and_push_the_archive():
    commands = training_commands(
        EC2,
        job_name="job-1",
        code_uri=f"{STORE}/code/sourcedir-1.tar.gz",
        channels={"train": f"{STORE}/d/train.jsonl", "base_model": f"{STORE}/base-models/m/"},
        hyperparameters={"lora_r": 8, "lora_target_modules": ("q_proj", "v_proj"), "peft_method": "lora"},
        artifact_uri=f"{STORE}/training-jobs/job-1/output/model.tar.gz",
    )
    script = "\n".join(commands)
    assert commands[0] == "set -eu"
    assert f"aws s3 cp {STORE}/d/train.jsonl /opt/llmops/jobs/job-1/input/data/train/" in script
    assert f"aws s3 cp --recursive {STORE}/base-models/m/ /opt/llmops/jobs/job-1/input/data/base_model/" in script
    hyperparameters = json.loads(script.split("printf '%s' '")[1].split("' >")[0])
    assert hyperparameters == {"lora_r": "8", "lora_target_modules": '["q_proj", "v_proj"]', "peft_method": "lora"}
    assert ". /opt/aws_neuronx_venv_pytorch_2_8/bin/activate" in commands
    assert "SM_CHANNEL_BASE_MODEL=/opt/llmops/jobs/job-1/input/data/base_model" in script
    assert "torchrun --standalone --nproc_per_node=2 llmops_train.py" in script
    assert commands[-1].endswith(
        f"aws s3 cp /opt/llmops/jobs/job-1/model.tar.gz {STORE}/training-jobs/job-1/output/model.tar.gz"
    )


def test_the_command_passes_botocores_model_with_a_long_enough_time_limit():
    kwargs = send_command_kwargs(EC2, "i-0123", "job-1", ["echo hi"], f"{STORE}/training-jobs/job-1/ssm-output")
    client = aws("ssm")
    with Stubber(client) as stub:
        stub.add_response("send_command", {}, {"DocumentName": "AWS-RunShellScript", **kwargs})
        client.send_command(DocumentName="AWS-RunShellScript", **kwargs)
    assert kwargs["Parameters"]["executionTimeout"] == ["28800"], "the document's default would stop it after 1 h"
    assert (kwargs["OutputS3BucketName"], kwargs["OutputS3KeyPrefix"]) == (
        "llmops-bucket",
        "llmops/training-jobs/job-1/ssm-output",
    )


class FakeSsm:
    def __init__(self, states):
        self.states = list(states)

    def describe_instance_information(self, Filters):
        state = self.states.pop(0) if len(self.states) > 1 else self.states[0]
        return {"InstanceInformationList": [] if state is None else [{"InstanceId": "i-1", "PingStatus": state}]}


def test_waiting_for_ssm_ends_when_the_agent_is_online_or_names_the_last_state():
    clock = iter(range(0, 10_000, 10))
    info = wait_until_online(
        FakeSsm([None, "Inactive", "Online"]), "i-1", 600, 10, sleep=lambda s: None, clock=lambda: next(clock)
    )
    assert info["PingStatus"] == "Online"
    clock = iter(range(0, 10_000, 10))
    with pytest.raises(TrainingJobError, match=r"not online within 1 minutes \(PingStatus ConnectionLost\)"):
        wait_until_online(FakeSsm(["ConnectionLost"]), "i-1", 60, 10, sleep=lambda s: None, clock=lambda: next(clock))


def test_a_command_that_did_not_succeed_raises_with_its_exit_code_and_tail():
    invocation = {
        "InstanceId": "i-1",
        "Status": "Failed",
        "ResponseCode": 2,
        "StandardOutputContent": "".join(f"line {n}\n" for n in range(100)),
        "StandardErrorContent": "training failed: peft_method=qlora needs a CUDA GPU\n",
    }
    with pytest.raises(TrainingJobError) as failed:
        command_outcome(invocation)
    first, tail = str(failed.value).split("\noutput tail:\n")
    assert first.endswith("ended Failed (exit code 2): training failed: peft_method=qlora needs a CUDA GPU")
    assert tail.startswith("line 61") and tail.endswith("qlora needs a CUDA GPU")
    ok = command_outcome({**invocation, "Status": "Success", "ResponseCode": 0})
    assert ok["exit_code"] == 0 and ok["output_tail"].endswith("CUDA GPU")


def test_waiting_for_the_command_returns_its_final_invocation_or_times_out():
    from llmops.backends.training.ec2 import wait_for_command

    client = aws("ssm")
    with Stubber(client) as stub:
        stub.add_client_error("get_command_invocation", "InvocationDoesNotExist")
        stub.add_response("get_command_invocation", {"Status": "InProgress"})
        stub.add_response("get_command_invocation", {"Status": "Failed", "ResponseCode": 2})
        clock = iter(range(0, 10_000, 10))
        invocation = wait_for_command(client, "0" * 36, "i-1", 600, 10, sleep=lambda s: None, clock=lambda: next(clock))
    assert invocation["Status"] == "Failed" and invocation["ResponseCode"] == 2
    with Stubber(client) as stub:
        stub.add_response("get_command_invocation", {"Status": "InProgress"})
        clock = iter(range(0, 10_000, 100))
        with pytest.raises(TrainingJobError, match="still InProgress after 1 minutes"):
            wait_for_command(client, "0" * 36, "i-1", 60, 10, sleep=lambda s: None, clock=lambda: next(clock))
