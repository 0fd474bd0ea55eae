"""The EC2 Trainium backend, as pure functions: a trn1 instance from a Neuron deep-learning AMI
runs the one training entrypoint over SSM, then is terminated.

``llm_finetune`` drives it with the Amazon provider's operators: ``EC2CreateInstanceOperator``
(the ``RunInstances`` config below), a wait until the SSM agent is online, ``SsmRunCommandOperator``
(``AWS-RunShellScript`` with the commands below), and ``EC2TerminateInstanceOperator`` as a
teardown. The commands lay the job out as SageMaker would (``input/config``, ``input/data/<channel>``,
``model/``), pull the source bundle, the channels and the base model from S3, run the entrypoint
under ``torchrun`` (a process per NeuronCore) in the AMI's Neuron environment, and push
``model.tar.gz`` to the same place a SageMaker job would: ``<store>/training-jobs/<job>/output/``.

Safety nets, in case Airflow never gets to terminate it: the instance shuts itself down after the
command's time limit plus a margin (``shutdown -h``), and shutting down terminates it.
"""

from __future__ import annotations

import base64
import json
import shlex
from typing import Any

from llmops import storage
from llmops.backends.training.job import TrainingJobError, TrainingJobResult
from llmops.backends.training.sagemaker import archive_metrics, encode_hyperparameters, source_bundle, upload_bundle
from llmops.contracts import DatasetManifest, TrainingData
from llmops.costs import estimate_cost
from llmops.staging import base_model_uri, ensure_model_staged

NEURON_CORES = {"trn1.2xlarge": 2, "trn1.32xlarge": 32, "trn1n.32xlarge": 32, "trn2.48xlarge": 64}
JOB_ROOT = "/opt/llmops/jobs"


def run_instances_config(ec2, job_name: str, tags: dict[str, str] | None = None) -> dict:
    """``RunInstances`` parameters beyond the image (``ec2``: ``llmops.config.Ec2Config``). The job
    name is the ``ClientToken``, so a retried launch does not start a second instance."""
    limit_minutes = ec2.command_timeout_minutes + 30
    user_data = f"#!/bin/bash\nshutdown -h +{limit_minutes}\n"  # the last resort, if nobody terminates it
    all_tags = [{"Key": k, "Value": str(v)} for k, v in sorted({**ec2.tags, **(tags or {}), "Name": job_name}.items())]
    config: dict[str, Any] = {
        "InstanceType": ec2.instance_type,
        "IamInstanceProfile": {"Name": ec2.instance_profile},
        "InstanceInitiatedShutdownBehavior": "terminate",
        "ClientToken": job_name[:64],
        "UserData": base64.b64encode(user_data.encode()).decode(),
        "MetadataOptions": {"HttpTokens": "required", "HttpEndpoint": "enabled"},
        "BlockDeviceMappings": [
            {
                "DeviceName": "/dev/sda1",
                "Ebs": {"VolumeSize": ec2.volume_size_gb, "VolumeType": "gp3", "DeleteOnTermination": True},
            }
        ],
        "TagSpecifications": [
            {"ResourceType": "instance", "Tags": all_tags},
            {"ResourceType": "volume", "Tags": all_tags},
        ],
    }
    if ec2.subnet_id:
        config["SubnetId"] = ec2.subnet_id
    if ec2.security_group_ids:
        config["SecurityGroupIds"] = list(ec2.security_group_ids)
    return config


def training_commands(
    ec2,
    *,
    job_name: str,
    code_uri: str,
    channels: dict[str, str],
    hyperparameters: dict[str, Any],
    artifact_uri: str,
    environment: dict[str, str] | None = None,
) -> list[str]:
    """The shell lines ``AWS-RunShellScript`` runs on the instance. Channel URIs ending in ``/``
    are prefixes (copied recursively), others single files."""
    job = f"{JOB_ROOT}/{job_name}"
    q = shlex.quote
    encoded = encode_hyperparameters(hyperparameters)
    lines = [
        "set -eu",
        f"rm -rf {q(job)} && mkdir -p {q(job)}/code {q(job)}/input/config {q(job)}/model {q(job)}/checkpoints",
        f"aws s3 cp {q(code_uri)} {q(job)}/sourcedir.tar.gz && tar -xzf {q(job)}/sourcedir.tar.gz -C {q(job)}/code",
    ]
    for name, uri in channels.items():
        target = f"{job}/input/data/{name}"
        recursive = " --recursive" if uri.endswith("/") else ""
        lines.append(f"mkdir -p {q(target)} && aws s3 cp{recursive} {q(uri)} {q(target)}/")
    lines.append(f"printf '%s' {q(json.dumps(encoded, sort_keys=True))} > {q(job)}/input/config/hyperparameters.json")
    if ec2.activate:
        lines.append(ec2.activate)
    lines.append(f"cd {q(job)}/code && if [ -f requirements.txt ]; then pip install --quiet -r requirements.txt; fi")
    env = {
        "SM_INPUT_CONFIG_DIR": f"{job}/input/config",
        "SM_MODEL_DIR": f"{job}/model",
        "SM_OUTPUT_DATA_DIR": f"{job}/output/data",
        "SM_TRAINING_JOB_NAME": job_name,
        "LLMOPS_CHECKPOINT_DIR": f"{job}/checkpoints",
        "TOKENIZERS_PARALLELISM": "false",
        **{f"SM_CHANNEL_{name.upper()}": f"{job}/input/data/{name}" for name in channels},
        **(environment or {}),
    }
    exports = " ".join(f"{k}={q(v)}" for k, v in sorted(env.items()))
    processes = NEURON_CORES.get(ec2.instance_type, 1)
    lines.append(f"env {exports} torchrun --standalone --nproc_per_node={processes} llmops_train.py")
    lines.append(
        f"tar -czf {q(job)}/model.tar.gz -C {q(job)}/model . && aws s3 cp {q(job)}/model.tar.gz {q(artifact_uri)}"
    )
    return lines


def send_command_kwargs(ec2, instance_id: str, job_name: str, commands: list[str], output_uri: str) -> dict:
    """``SendCommand`` parameters for ``SsmRunCommandOperator``; the full output goes to S3 (the
    API keeps 24,000 characters)."""
    bucket, _, prefix = output_uri.removeprefix("s3://").partition("/")
    return {
        "InstanceIds": [instance_id],
        "Comment": f"llmops training job {job_name}"[:100],
        "Parameters": {"commands": commands, "executionTimeout": [str(ec2.command_timeout_minutes * 60)]},
        "TimeoutSeconds": 600,
        "OutputS3BucketName": bucket,
        "OutputS3KeyPrefix": prefix.rstrip("/"),
    }


def command_outcome(invocation: dict, log_tail_lines: int = 40) -> dict:
    """``GetCommandInvocation`` of the training command: its status, exit code and output tail.
    Anything but Success raises ``TrainingJobError`` with the tail."""
    status = invocation.get("Status", "Unknown")
    output = (invocation.get("StandardOutputContent") or "") + (invocation.get("StandardErrorContent") or "")
    lines = output.strip().splitlines()
    tail = "\n".join(lines[-log_tail_lines:])
    if status != "Success":
        # The entrypoint's own "training failed: ..." line says why; under torchrun it is buried
        # above the launcher's report.
        reasons = list(dict.fromkeys(line.strip() for line in lines if "training failed:" in line))
        reason = "\n".join(reasons[:3])
        raise TrainingJobError(
            f"the training command on {invocation.get('InstanceId')} ended {status}"
            f" (exit code {invocation.get('ResponseCode')}): {reason or '(see the output)'}\noutput tail:\n{tail}"
        )
    return {"status": status, "exit_code": invocation.get("ResponseCode"), "output_tail": tail}


def artifact_uri(store_uri: str, job_name: str) -> str:
    return storage.join(store_uri, "training-jobs", job_name, "output", "model.tar.gz")


def plan_job(
    settings,
    request,
    dataset: TrainingData | DatasetManifest | dict,
    name: str,
    lineage: dict,
    image_id: str,
    code_uri: str,
) -> dict:
    """What the operators take (no upload): the image, the ``RunInstances`` config, the commands,
    and where the archive and the command's output go."""

    dataset = TrainingData.of(dataset)
    artifact = artifact_uri(settings.store_uri, name)
    full_lineage = {**lineage, "base_model_name": request.base_model_name, "dataset_version": dataset.version}
    commands = training_commands(
        settings.ec2,
        job_name=name,
        code_uri=code_uri,
        channels={
            "train": dataset.files.train.uri,
            "validation": dataset.files.validation.uri,
            "base_model": base_model_uri(settings.store_uri, request.base_model_name),
        },
        hyperparameters={**request.hyperparameters, "precision": "bf16"},  # Trainium computes in bf16
        artifact_uri=artifact,
        environment={"LLMOPS_LINEAGE": json.dumps(full_lineage, sort_keys=True)},
    )
    tags = {"airflow.dag_id": lineage.get("dag_id", ""), "airflow.run_id": lineage.get("run_id", "")}
    return {
        "job_name": name,
        "image_id": image_id,
        "config": run_instances_config(settings.ec2, name, {k: v for k, v in tags.items() if v}),
        "commands": commands,
        "artifact_uri": artifact,
        "output_uri": storage.join(settings.store_uri, "training-jobs", name, "ssm-output"),
    }


def stage_job(
    settings,
    request,
    dataset: DatasetManifest | dict,
    name: str,
    lineage: dict,
    image_id: str,
    storage_options: dict | None = None,
    log=print,
) -> dict:
    """Upload the source bundle and the base model when missing, then ``plan_job``."""
    from llmops.config import PROJECT_ROOT

    dataset = DatasetManifest.model_validate(dataset)
    code_uri = upload_bundle(settings, source_bundle(PROJECT_ROOT), storage_options, log)
    ensure_model_staged(settings, request.base_model_name, storage_options, log)
    return plan_job(settings, request, dataset, name, lineage, image_id, code_uri)


def wait_until_online(client, instance_id: str, timeout_s: float, poll_s: float, sleep=None, clock=None) -> dict:
    """Wait until the instance's SSM agent reports Online (``client``: boto3 ``ssm``); a
    ``TrainingJobError`` naming the last state after ``timeout_s``."""
    import time

    sleep, clock = sleep or time.sleep, clock or time.monotonic
    deadline, state = clock() + timeout_s, "not registered with SSM yet"
    while True:
        found = client.describe_instance_information(Filters=[{"Key": "InstanceIds", "Values": [instance_id]}])
        for info in found.get("InstanceInformationList", []):
            if info.get("PingStatus") == "Online":
                return info
            state = f"PingStatus {info.get('PingStatus')}"
        if clock() >= deadline:
            raise TrainingJobError(
                f"the SSM agent of {instance_id} was not online within {timeout_s / 60:g} minutes ({state}); check the"
                " instance profile (AmazonSSMManagedInstanceCore) and that the subnet reaches SSM"
            )
        sleep(poll_s)


TERMINAL = {"Success", "Failed", "Cancelled", "TimedOut", "Cancelling"}


def wait_for_command(
    client, command_id: str, instance_id: str, timeout_s: float, poll_s: float, sleep=None, clock=None
):
    """The command's ``GetCommandInvocation`` once it has finished (``client``: boto3 ``ssm``); a
    ``TrainingJobError`` after ``timeout_s``."""
    import time

    sleep, clock = sleep or time.sleep, clock or time.monotonic
    deadline = clock() + timeout_s
    while True:
        try:
            invocation = client.get_command_invocation(CommandId=command_id, InstanceId=instance_id)
        except client.exceptions.InvocationDoesNotExist:  # just sent: not registered yet
            invocation = {"Status": "Pending"}
        if invocation.get("Status") in TERMINAL:
            return invocation
        if clock() >= deadline:
            raise TrainingJobError(
                f"command {command_id} on {instance_id} still {invocation.get('Status')}"
                f" after {timeout_s / 60:g} minutes"
            )
        sleep(poll_s)


def collect(settings, staged: dict, instance_id: str, invocation: dict, seconds: float, storage_options=None) -> dict:
    """The command's outcome and the archive it pushed, as the training result (the local
    backend's shape), with the instance and its cost."""

    outcome = command_outcome(invocation)
    artifact = staged["artifact_uri"]
    if not storage.exists(artifact, storage_options):
        raise TrainingJobError(f"the training command succeeded but left no model archive at {artifact}")
    return TrainingJobResult(
        job_name=staged["job_name"],
        backend="ec2-trainium",
        model_artifact_uri=artifact,
        metrics=archive_metrics(artifact, storage_options),
        log_uri=staged["output_uri"],
        job_arn="",
        instance_id=instance_id,
        output_tail=outcome["output_tail"],
        cost=estimate_cost(settings.ec2.instance_type, 1, seconds, settings.sagemaker.prices_per_hour),
    ).to_dict()
