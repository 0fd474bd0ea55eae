"""Evaluation as a SageMaker Processing job: the same entrypoint (``training.evaluate``), which
already reads and writes the Processing layout, run where the models fit and workers stay light.

``stage_evaluation`` puts what the job reads in S3 (the items and ``evaluation.json`` under
``<store>/evaluation-jobs/<job>/input/``, the code as files under ``<store>/code/evaluate-<hash>/``,
the base models and the encoder under ``<store>/base-models/``) and returns the
``CreateProcessingJob`` request; ``SageMakerProcessingOperator`` runs it; ``collect_evaluation``
reads the job and its outputs (``output/predictions.jsonl`` and ``summary.json``) back into the
shape the local backend returns, with the job's ARN and cost. Inside the container, paths are
relative to ``/opt/ml/processing`` (``LLMOPS_PROCESSING_DIR``):

    input/config/evaluation.json   input/items/items.jsonl   input/models/<label>/model.tar.gz
    input/base-models/<model>/     input/code/               output/
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime
from typing import Any

from llmops import storage
from llmops.backends.evaluation.job import evaluation_settings
from llmops.backends.training.job import TrainingJobError
from llmops.backends.training.sagemaker import JOB_NAME, SageMakerRequestError, image_uri, source_files
from llmops.costs import estimate_cost
from llmops.staging import base_model_uri, ensure_model_staged, stage_files

ROOT = "/opt/ml/processing"
EVALUATE = "llmops_evaluate.py"
LAUNCHER = '''"""SageMaker Processing's entry point: the evaluation's requirements, then the project's one
evaluation entrypoint (training.evaluate), unchanged."""
import os
import subprocess
import sys

here = os.path.dirname(os.path.abspath(__file__))
requirements = os.path.join(here, "requirements.txt")
if os.path.exists(requirements) and os.environ.get("LLMOPS_PIP_INSTALL", "1") == "1":
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "-r", requirements], check=True)
sys.path.insert(0, here)
from training.evaluate import main  # noqa: E402

sys.exit(main(sys.argv[1:]))
'''


def _key(uri: str) -> str:
    """The folder name a staged model has under ``input/base-models/``."""
    return uri.rstrip("/").rsplit("/", 1)[-1]


def processing_job_request(
    sagemaker,
    *,
    job_name: str,
    region: str,
    inputs: list[tuple[str, str, str]],
    output_uri: str,
    tags: dict[str, str] | None = None,
) -> dict:
    """The ``CreateProcessingJob`` request (``inputs``: (name, S3 URI, path under ``input/``))."""
    if not sagemaker.role_arn:
        raise SageMakerRequestError("sagemaker.role_arn is not set: the processing job needs an execution role")
    if not JOB_NAME.match(job_name):
        raise SageMakerRequestError(f"ProcessingJobName {job_name!r}: 1-63 letters, digits and hyphens")
    if len(inputs) > 10:
        raise SageMakerRequestError(f"{len(inputs)} processing inputs; SageMaker takes at most 10")
    target = sagemaker.evaluation
    request: dict[str, Any] = {
        "ProcessingJobName": job_name,
        "RoleArn": sagemaker.role_arn,
        "AppSpecification": {
            "ImageUri": image_uri(target.image_uri, region),
            "ContainerEntrypoint": ["python3", f"{ROOT}/input/code/{EVALUATE}"],
        },
        "ProcessingInputs": [
            {
                "InputName": name,
                "S3Input": {
                    "S3Uri": uri,
                    "LocalPath": f"{ROOT}/input/{path}",
                    "S3DataType": "S3Prefix",
                    "S3InputMode": "File",
                    "S3DataDistributionType": "FullyReplicated",
                },
            }
            for name, uri, path in inputs
        ],
        "ProcessingOutputConfig": {
            "Outputs": [
                {
                    "OutputName": "evaluation",
                    "S3Output": {"S3Uri": output_uri, "LocalPath": f"{ROOT}/output", "S3UploadMode": "EndOfJob"},
                }
            ]
        },
        "ProcessingResources": {
            "ClusterConfig": {
                "InstanceCount": 1,
                "InstanceType": target.instance_type,
                "VolumeSizeInGB": sagemaker.volume_size_gb,
            }
        },
        "StoppingCondition": {"MaxRuntimeInSeconds": min(sagemaker.max_runtime_minutes * 60, 777600)},
        "Environment": {"LLMOPS_PROCESSING_DIR": ROOT, "TOKENIZERS_PARALLELISM": "false"},
        "Tags": [{"Key": k, "Value": str(v)} for k, v in sorted({**sagemaker.tags, **(tags or {})}.items())],
    }
    if sagemaker.kms_key_id:
        request["ProcessingOutputConfig"]["KmsKeyId"] = sagemaker.kms_key_id
    if sagemaker.subnets:
        request["NetworkConfig"] = {
            "VpcConfig": {"Subnets": list(sagemaker.subnets), "SecurityGroupIds": list(sagemaker.security_groups)}
        }
    return request


def evaluation_plan(settings, name: str, models: dict[str, dict], tags: dict | None = None) -> dict:
    """What the job needs where (no upload): the code files and their prefix, the staged models,
    ``evaluation.json``, and the ``CreateProcessingJob`` request (``models``: label ->
    {"base_model_name", "artifact_uri"}, as ``llmops.evaluation.models_to_evaluate`` gives)."""
    from llmops.config import PROJECT_ROOT, ConfigError

    if not settings.store_uri.startswith("s3://"):
        raise ConfigError(f"evaluation on SageMaker needs an S3 store (LLMOPS_ENV=aws); it is {settings.store_uri}")
    job_uri = storage.join(settings.store_uri, "evaluation-jobs", name)
    files = source_files(PROJECT_ROOT, {EVALUATE: LAUNCHER}, tuple(settings.sagemaker.evaluation.requirements))
    digest = hashlib.sha256(json.dumps({k: hashlib.sha256(v).hexdigest() for k, v in files.items()}).encode())
    code_uri = storage.join(settings.store_uri, "code", f"evaluate-{digest.hexdigest()[:16]}") + "/"
    inputs = [("code", code_uri, "code")]
    staged = {}
    for model in sorted({m["base_model_name"] for m in models.values()} | {settings.models.embedding}):
        staged[model] = base_model_uri(settings.store_uri, model)
        inputs.append((f"model-{len(staged)}", staged[model], f"base-models/{_key(staged[model])}"))
    entries = []
    for label, model in models.items():
        entry = {"label": label, "base": f"input/base-models/{_key(staged[model['base_model_name']])}", "adapter": None}
        if model["artifact_uri"]:
            inputs.append((f"models-{label}", model["artifact_uri"], f"models/{label}"))
            entry["adapter"] = f"input/models/{label}/{model['artifact_uri'].rsplit('/', 1)[-1]}"
        entries.append(entry)
    config = {
        **evaluation_settings(settings),
        "models": entries,
        "embedding_model": f"input/base-models/{_key(staged[settings.models.embedding])}",
    }
    inputs += [
        ("config", storage.join(job_uri, "input", "config") + "/", "config"),
        ("items", storage.join(job_uri, "input", "items") + "/", "items"),
    ]
    request = processing_job_request(
        settings.sagemaker,
        job_name=name,
        region=settings.aws.region or "us-east-1",
        inputs=inputs,
        output_uri=storage.join(job_uri, "output"),
        tags={k: v for k, v in (tags or {}).items() if v},
    )
    return {
        "code_uri": code_uri,
        "code_files": files,
        "models": staged,
        "config_uri": storage.join(job_uri, "input", "config", "evaluation.json"),
        "config": config,
        "items_uri": storage.join(job_uri, "input", "items", "items.jsonl"),
        "request": request,
    }


def stage_evaluation(
    settings,
    name: str,
    models: dict[str, dict],
    items: list[dict],
    tags: dict | None = None,
    storage_options: dict | None = None,
    log=print,
) -> dict:
    """Upload what the job reads (see ``evaluation_plan``) and return its request."""
    plan = evaluation_plan(settings, name, models, tags)
    stage_files(plan["code_files"], plan["code_uri"], storage_options, source="training/ and the evaluation launcher")
    for model in plan["models"]:
        ensure_model_staged(settings, model, storage_options, log)
    storage.write_json(plan["config_uri"], plan["config"], storage_options)
    storage.write_jsonl(plan["items_uri"], items, storage_options)
    return plan["request"]


def _seconds(described: dict) -> float:
    start, end = described.get("ProcessingStartTime"), described.get("ProcessingEndTime")
    if isinstance(start, datetime) and isinstance(end, datetime):
        return max(0.0, (end - start).total_seconds())
    return 0.0


def collect_evaluation(settings, described: dict, storage_options: dict | None = None) -> dict:
    """A finished Processing job as the evaluation result (the local backend's shape), with its ARN
    and cost. A job that ended Failed or Stopped raises with SageMaker's reason."""
    name, status = described["ProcessingJobName"], described["ProcessingJobStatus"]
    if status != "Completed":
        reason = described.get("FailureReason") or described.get("ExitMessage") or "(SageMaker gave no reason)"
        raise TrainingJobError(f"SageMaker processing job {name} ended {status}: {reason}")
    output = described["ProcessingOutputConfig"]["Outputs"][0]["S3Output"]["S3Uri"]
    summary = storage.read_json(storage.join(output, "summary.json"), storage_options)
    resources = described.get("ProcessingResources", {}).get("ClusterConfig", {})
    instance_type = resources.get("InstanceType", settings.sagemaker.evaluation.instance_type)
    count = resources.get("InstanceCount", 1)
    return {
        "job_name": name,
        "backend": "sagemaker",
        "predictions_uri": storage.join(output, "predictions.jsonl"),
        "summary": summary,
        "log_uri": f"cloudwatch:/aws/sagemaker/ProcessingJobs/{name}",
        "reused": False,
        "job_arn": described["ProcessingJobArn"],
        "cost": estimate_cost(instance_type, count, _seconds(described) * count, settings.sagemaker.prices_per_hour),
    }
