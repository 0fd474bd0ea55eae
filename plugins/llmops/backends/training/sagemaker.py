"""The SageMaker training backend, as pure functions: the ``CreateTrainingJob`` request for the
one training entrypoint, the source bundle it runs, and what a finished job's description means.

Nothing here calls AWS; ``llm_finetune`` sends the request with the Amazon provider's
``SageMakerTrainingOperator`` and reads the job back through its hook. Everything the request
needs is in the typed config (``sagemaker:``): no field is filled in later, so a dry run
(``python -m devtools.aws dry-run``) prints exactly what a run would send.

* **GPU** (``sagemaker``): the Hugging Face PyTorch training image.
* **Trainium** (``sagemaker-trainium``, ``ml.trn1.*``): the Hugging Face Neuron training image; the
  job runs under ``torch_distributed`` (``sagemaker_torch_distributed_enabled``), one process per
  NeuronCore, in bf16.

The job's layout is the local backend's: channels ``train``, ``validation`` and ``base_model`` (the
base model's folder, staged once: containers need no hub access; the entrypoint loads the base
model from that channel, and the ``base_model`` hyperparameter keeps its name), the model at
``<store>/training-jobs/<job>/output/model.tar.gz``, checkpoints under
``<store>/training-jobs/<job>/checkpoints/`` so a spot interruption resumes.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmops import storage
from llmops.backends.training.job import TrainingJobError, TrainingJobResult
from llmops.contracts import DatasetManifest, TrainingData
from llmops.costs import estimate_cost
from llmops.staging import base_model_uri, ensure_model_staged
from training.archive import model_archive_limits, read_member

BACKENDS = {"sagemaker": "gpu", "sagemaker-trainium": "trainium"}


ENTRY_POINT = "llmops_train.py"


LAUNCHER = '''"""SageMaker's entry point: the project's one training entrypoint, unchanged."""
import sys

from training.train import main

sys.exit(main(sys.argv[1:]))
'''


# Metric lines the entrypoint prints ("name=value;"), as SageMaker MetricDefinitions.
METRICS = (
    "loss",
    "grad_norm",
    "learning_rate",
    "epoch",
    "eval_loss",
    "eval_loss_before",
    "eval_perplexity",
    "train_loss",
    "train_samples_per_second",
)


NUMBER = r"([-+]?[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)"


JOB_NAME = re.compile(r"^[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}$")


TAG_TEXT = re.compile(r"^[\w .:/=+\-@]*$")


class SageMakerRequestError(ValueError):
    """A request SageMaker would refuse; the message lists every problem."""


def metric_definitions() -> list[dict]:
    return [{"Name": name, "Regex": rf"(?:^|\s){name}={NUMBER};"} for name in METRICS]


def encode_hyperparameters(values: dict[str, Any]) -> dict[str, str]:
    """SageMaker hyperparameters are strings. Text goes as it is, numbers and booleans as JSON, lists
    as JSON arrays: what ``training.config`` reads back from ``hyperparameters.json`` and flags."""
    encoded = {}
    for key, value in values.items():
        if isinstance(value, str):
            encoded[key] = value
        elif isinstance(value, (list, tuple)):
            encoded[key] = json.dumps(list(value))
        else:
            encoded[key] = json.dumps(value)
    return encoded


@dataclass(frozen=True)
class SourceBundle:
    data: bytes
    sha256: str

    def uri(self, store_uri: str) -> str:
        return storage.join(store_uri, "code", f"sourcedir-{self.sha256[:16]}.tar.gz")


def source_files(root: Path, launchers: dict[str, str], requirements: tuple[str, ...] = ()) -> dict[str, bytes]:
    """The ``training`` package, launcher scripts at the top, and a ``requirements.txt``."""
    files = {name: text.encode() for name, text in launchers.items()}
    for path in sorted((root / "training").rglob("*.py")):
        files[path.relative_to(root).as_posix()] = path.read_bytes()
    if requirements:
        files["requirements.txt"] = ("\n".join(requirements) + "\n").encode()
    return files


def source_bundle(root: Path, requirements: tuple[str, ...] = ()) -> SourceBundle:
    """``sourcedir.tar.gz``: the ``training`` package, the launcher and a ``requirements.txt`` the
    container installs before it starts. Deterministic (sorted, no times or owners), so the same
    code has the same hash and is uploaded once."""
    import gzip

    files = source_files(root, {ENTRY_POINT: LAUNCHER}, requirements)
    buffer = io.BytesIO()
    # gzip's header holds a time: fix it, so equal contents give equal bytes.
    with gzip.GzipFile(fileobj=buffer, mode="wb", mtime=0) as zipped, tarfile.open(fileobj=zipped, mode="w") as tar:
        for name, data in sorted(files.items()):
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, 0
            tar.addfile(info, io.BytesIO(data))
    data = buffer.getvalue()
    return SourceBundle(data, hashlib.sha256(data).hexdigest())


def image_uri(template: str, region: str) -> str:
    return template.format(region=region)


def training_job_request(
    sagemaker,
    *,
    backend: str,
    job_name: str,
    region: str,
    store_uri: str,
    hyperparameters: dict[str, Any],
    channels: dict[str, str],
    code_uri: str,
    tags: dict[str, str] | None = None,
    lineage: dict | None = None,
) -> dict:
    """The ``CreateTrainingJob`` request of one run (``sagemaker``: ``llmops.config.SageMakerConfig``;
    ``channels``: name -> S3 URI of a file or a prefix). ``SageMakerRequestError`` lists what AWS
    would refuse."""
    if backend not in BACKENDS:
        raise SageMakerRequestError(f"backend {backend!r} is not a SageMaker backend ({', '.join(BACKENDS)})")
    if not sagemaker.role_arn:
        raise SageMakerRequestError("sagemaker.role_arn is not set: the training job needs an execution role")
    target = getattr(sagemaker, BACKENDS[backend])
    job_uri = storage.join(store_uri, "training-jobs", job_name)
    program = {
        "sagemaker_program": ENTRY_POINT,
        "sagemaker_submit_directory": code_uri,
        "sagemaker_container_log_level": 20,
        "sagemaker_job_name": job_name,
        "sagemaker_region": region,
    }
    hyperparameters = dict(hyperparameters)
    if BACKENDS[backend] == "trainium":
        program.update(sagemaker_torch_distributed_enabled=True, sagemaker_instance_type=target.instance_type)
        hyperparameters["precision"] = "bf16"  # Trainium computes in bf16
    request: dict[str, Any] = {
        "TrainingJobName": job_name,
        "RoleArn": sagemaker.role_arn,
        "AlgorithmSpecification": {
            "TrainingImage": image_uri(target.image_uri, region),
            "TrainingInputMode": "File",
            "MetricDefinitions": metric_definitions(),
            "EnableSageMakerMetricsTimeSeries": True,
        },
        "HyperParameters": encode_hyperparameters({**program, **hyperparameters}),
        "InputDataConfig": [
            {
                "ChannelName": name,
                "DataSource": {
                    "S3DataSource": {
                        "S3DataType": "S3Prefix",
                        "S3Uri": uri,
                        "S3DataDistributionType": "FullyReplicated",
                    }
                },
                **({"ContentType": "application/jsonlines"} if uri.endswith(".jsonl") else {}),
            }
            for name, uri in channels.items()
        ],
        "OutputDataConfig": {"S3OutputPath": storage.join(store_uri, "training-jobs")},
        "ResourceConfig": {
            "InstanceType": target.instance_type,
            "InstanceCount": target.instance_count,
            "VolumeSizeInGB": sagemaker.volume_size_gb,
        },
        "StoppingCondition": {"MaxRuntimeInSeconds": sagemaker.max_runtime_minutes * 60},
        "CheckpointConfig": {"S3Uri": storage.join(job_uri, "checkpoints"), "LocalPath": "/opt/ml/checkpoints"},
        "Environment": {
            "LLMOPS_CHECKPOINT_DIR": "/opt/ml/checkpoints",
            "TOKENIZERS_PARALLELISM": "false",
            **({"LLMOPS_LINEAGE": json.dumps(lineage, sort_keys=True)} if lineage else {}),
        },
        "Tags": [{"Key": k, "Value": str(v)} for k, v in sorted({**sagemaker.tags, **(tags or {})}.items())],
    }
    if sagemaker.spot:
        request["EnableManagedSpotTraining"] = True
        wait = sagemaker.max_wait_minutes or 2 * sagemaker.max_runtime_minutes
        request["StoppingCondition"]["MaxWaitTimeInSeconds"] = wait * 60
    if sagemaker.kms_key_id:  # the model archive; instances with local NVMe (g5, trn1) refuse VolumeKmsKeyId
        request["OutputDataConfig"]["KmsKeyId"] = sagemaker.kms_key_id
    if sagemaker.subnets:
        request["VpcConfig"] = {"Subnets": list(sagemaker.subnets), "SecurityGroupIds": list(sagemaker.security_groups)}
    check_request(request)
    return request


def check_request(request: dict) -> None:
    """The limits botocore does not check before sending (lengths, patterns, the spot rule)."""
    problems = []
    name = request.get("TrainingJobName", "")
    if not JOB_NAME.match(name):
        problems.append(f"TrainingJobName {name!r}: 1-63 letters, digits and hyphens, starting with a letter or digit")
    hyperparameters = request.get("HyperParameters", {})
    if len(hyperparameters) > 100:
        problems.append(f"HyperParameters: {len(hyperparameters)} entries; at most 100")
    for key, value in hyperparameters.items():
        if len(key) > 256 or len(value) > 2500:
            problems.append(f"HyperParameters.{key[:40]}: keys are at most 256 characters, values 2500")
    for metric in request.get("AlgorithmSpecification", {}).get("MetricDefinitions", []):
        if len(metric["Regex"]) > 500:
            problems.append(f"MetricDefinitions.{metric['Name']}: the regex is over 500 characters")
    tags = request.get("Tags", [])
    if len(tags) > 50:
        problems.append(f"Tags: {len(tags)}; at most 50")
    for tag in tags:
        if not (1 <= len(tag["Key"]) <= 128 and len(tag["Value"]) <= 256):
            problems.append(f"tag {tag['Key'][:40]!r}: keys are 1-128 characters, values at most 256")
        elif not (TAG_TEXT.match(tag["Key"]) and TAG_TEXT.match(tag["Value"])):
            problems.append(f"tag {tag['Key']!r}: only letters, digits, spaces and _ . : / = + - @ are allowed")
    for key, value in request.get("Environment", {}).items():
        if len(value) > 512:
            problems.append(f"Environment.{key}: {len(value)} characters; at most 512")
    stopping = request.get("StoppingCondition", {})
    if request.get("EnableManagedSpotTraining"):
        if stopping.get("MaxWaitTimeInSeconds", 0) < stopping.get("MaxRuntimeInSeconds", 0):
            problems.append("StoppingCondition: with managed spot, MaxWaitTimeInSeconds must be >= MaxRuntimeInSeconds")
    elif "MaxWaitTimeInSeconds" in stopping:
        problems.append("StoppingCondition.MaxWaitTimeInSeconds is only for managed spot training")
    vpc = request.get("VpcConfig")
    if vpc and not (1 <= len(vpc["Subnets"]) <= 16 and 1 <= len(vpc["SecurityGroupIds"]) <= 5):
        problems.append("VpcConfig: 1-16 subnets and 1-5 security groups")
    if problems:
        raise SageMakerRequestError("invalid CreateTrainingJob request:\n  " + "\n  ".join(problems))


def job_outcome(described: dict, prices: dict[str, float]) -> dict:
    """A finished job's ``DescribeTrainingJob`` as the backend's result: the artifact, the ARN, the
    final metrics and the cost. A job that ended Failed or Stopped raises ``TrainingJobError`` with
    SageMaker's reason; one still running is an error of the caller."""
    name, status = described["TrainingJobName"], described["TrainingJobStatus"]
    if status in ("Failed", "Stopped"):
        reason = described.get("FailureReason") or "(SageMaker gave no reason)"
        raise TrainingJobError(f"SageMaker training job {name} ended {status}: {reason}")
    if status != "Completed":
        raise TrainingJobError(f"SageMaker training job {name} is {status}, not finished")
    resources = described["ResourceConfig"]
    count = resources.get("InstanceCount", 1)
    # BillableTimeInSeconds is per instance, after spot savings.
    training = described.get("TrainingTimeInSeconds")
    billable = described.get("BillableTimeInSeconds", training)
    cost = estimate_cost(resources["InstanceType"], count, (billable or 0) * count, prices)
    if billable is not None and training:
        cost["spot_savings"] = round(1 - billable / training, 4)
    metrics = {
        m["MetricName"]: m["Value"] for m in described.get("FinalMetricDataList", []) if m["MetricName"] in METRICS
    }
    return {
        "job_name": name,
        "job_arn": described["TrainingJobArn"],
        "model_artifact_uri": described["ModelArtifacts"]["S3ModelArtifacts"],
        "metrics": metrics,
        "cost": cost,
        "training_seconds": training,
    }


def upload_bundle(settings, bundle: SourceBundle, storage_options: dict | None = None, log=print) -> str:
    """The bundle's URI in the store, uploaded if it is not there yet."""
    code_uri = bundle.uri(settings.store_uri)
    if not storage.exists(code_uri, storage_options):
        storage.write_bytes(code_uri, bundle.data, storage_options)
        log(f"uploaded the source bundle to {code_uri} ({len(bundle.data)} bytes)")
    return code_uri


def stage_job(
    settings,
    request,
    dataset: DatasetManifest | dict,
    name: str,
    lineage: dict,
    storage_options: dict | None = None,
    log=print,
) -> dict:
    """Everything a SageMaker job needs in S3 (the source bundle, the base model), then its
    ``CreateTrainingJob`` request. A base model that is neither staged nor on this machine is a
    ``ConfigError`` that says how to stage it."""
    from llmops.config import PROJECT_ROOT, ConfigError

    dataset = DatasetManifest.model_validate(dataset)
    if not settings.store_uri.startswith("s3://"):
        raise ConfigError(
            f"backend {request.backend} needs an S3 store (LLMOPS_ENV=aws); store_uri is {settings.store_uri}"
        )
    target = getattr(settings.sagemaker, BACKENDS[request.backend])
    code_uri = upload_bundle(settings, source_bundle(PROJECT_ROOT, tuple(target.requirements)), storage_options, log)
    ensure_model_staged(settings, request.base_model_name, storage_options, log)
    return plan_job(settings, request, dataset, name, lineage, code_uri)


def plan_job(
    settings, request, dataset: TrainingData | DatasetManifest | dict, name: str, lineage: dict, code_uri: str
) -> dict:
    """The ``CreateTrainingJob`` request of one run (no upload): what ``stage_job`` sends and the
    dry run prints."""
    dataset = TrainingData.of(dataset)
    return training_job_request(
        settings.sagemaker,
        backend=request.backend,
        job_name=name,
        region=settings.aws.region or "us-east-1",
        store_uri=settings.store_uri,
        hyperparameters=request.hyperparameters,
        channels={
            "train": dataset.files.train.uri,
            "validation": dataset.files.validation.uri,
            "base_model": base_model_uri(settings.store_uri, request.base_model_name),
        },
        code_uri=code_uri,
        tags={
            "airflow.dag_id": lineage.get("dag_id", ""),
            "airflow.run_id": lineage.get("run_id", ""),
            "dataset.version": dataset.version,
        },
        lineage={**lineage, "base_model_name": request.base_model_name, "dataset_version": dataset.version},
    )


def archive_metrics(artifact: str, storage_options: dict | None = None) -> dict:
    """The final metrics the entrypoint wrote into the model archive (``metrics.json``)."""

    data = read_member(
        storage.read_bytes(artifact, storage_options), "metrics.json", name=artifact, **model_archive_limits()
    )
    return json.loads(data)["final"] if data is not None else {}


def collect(settings, described: dict, storage_options: dict | None = None) -> dict:
    """A finished job as the training result ``register_model`` takes (the local backend's shape):
    the final metrics come from ``metrics.json`` inside the model archive, as the entrypoint wrote
    them; SageMaker's ARN, instance and cost come along."""
    outcome = job_outcome(described, settings.sagemaker.prices_per_hour)
    artifact = outcome["model_artifact_uri"]
    metrics = archive_metrics(artifact, storage_options)
    region = settings.aws.region or "us-east-1"
    return TrainingJobResult(
        job_name=outcome["job_name"],
        backend="sagemaker",
        model_artifact_uri=artifact,
        metrics=metrics or outcome["metrics"],
        log_uri=(
            f"https://{region}.console.aws.amazon.com/cloudwatch/home?region={region}#logsV2:log-groups/"
            f"log-group/$252Faws$252Fsagemaker$252FTrainingJobs$3FlogStreamNameFilter$3D{outcome['job_name']}"
        ),
        job_arn=outcome["job_arn"],
        cost=outcome["cost"],
    ).to_dict()
