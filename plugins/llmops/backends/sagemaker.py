"""The SageMaker training backend, as pure functions: the ``CreateTrainingJob`` request for the
one training entrypoint, the source bundle it runs, and what a finished job's description means.

Nothing here calls AWS; ``llm_finetune`` sends the request with the Amazon provider's
``SageMakerTrainingOperator`` and reads the job back through its hook. Everything the request
needs is in the typed config (``sagemaker:``): no field is filled in later, so a dry run
(``python -m llmops.backends.sagemaker``) prints exactly what a run would send.

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
from llmops.backends.local import TrainingJobError

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


# -- the source bundle ----------------------------------------------------------------------------


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


# -- the request ----------------------------------------------------------------------------------


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


# -- a finished job -------------------------------------------------------------------------------


def estimate_cost(instance_type: str, instance_count: int, billable_seconds: float, prices: dict[str, float]) -> dict:
    """What a run cost, from the price table in config (USD per instance-hour)."""
    price = prices.get(instance_type)
    return {
        "instance_type": instance_type,
        "instance_count": instance_count,
        "billable_seconds": round(billable_seconds, 1),
        "usd_per_hour": price,
        "estimated_cost_usd": None if price is None else round(price * billable_seconds / 3600, 4),
    }


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


# -- dry run --------------------------------------------------------------------------------------


def base_model_uri(store_uri: str, name: str) -> str:
    """Where the base model's folder sits for the ``base_model`` channel (uploaded once). A model
    given as a folder is keyed by the folder's name."""
    key = re.sub(r"[^A-Za-z0-9._-]", "-", Path(name).name) or "model"
    return storage.join(store_uri, "base-models", key) + "/"


STAGED_MARKER = "_STAGED.json"


def stage_files(files: dict[str, bytes], uri: str, storage_options: dict | None = None, source: str = "") -> dict:
    """Upload files under the prefix ``uri`` once. The marker (the file list with hashes) is
    written last, so a half-finished upload is never taken for a complete one."""
    marker_uri = storage.join(uri, STAGED_MARKER)
    if storage.exists(marker_uri, storage_options):
        return storage.read_json(marker_uri, storage_options)
    for relative, data in sorted(files.items()):
        storage.write_bytes(storage.join(uri, relative), data, storage_options)
    staged = {"source": source, "files": {k: hashlib.sha256(v).hexdigest() for k, v in sorted(files.items())}}
    storage.write_json(marker_uri, staged, storage_options)
    return staged


def stage_base_model(folder: Path, uri: str, storage_options: dict | None = None) -> dict:
    """Upload a model folder to ``uri`` once (see ``stage_files``)."""
    if storage.exists(storage.join(uri, STAGED_MARKER), storage_options):
        return storage.read_json(storage.join(uri, STAGED_MARKER), storage_options)
    files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
    return stage_files(files, uri, storage_options, source=str(folder))


def ensure_model_staged(settings, name: str, storage_options: dict | None = None, log=print) -> str:
    """The S3 prefix of model ``name`` (a base model or the encoder), staged from this machine when
    it is not there yet; a ``ConfigError`` saying how to stage it when it is on neither."""
    from llmops.config import ConfigError
    from llmops.models import ModelNotFoundError, resolve_model

    uri = base_model_uri(settings.store_uri, name)
    if not storage.exists(storage.join(uri, STAGED_MARKER), storage_options):
        try:
            folder = resolve_model(name, settings.models.cache_dir)
        except ModelNotFoundError as exc:
            raise ConfigError(
                f"model {name!r} is not staged at {uri} and not on this machine ({exc}); stage it once with:"
                f" python -m llmops.backends.sagemaker stage-model {name}"
            ) from None
        stage_base_model(folder, uri, storage_options)
        log(f"staged model {name} at {uri}")
    return uri


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
    dataset: dict,
    name: str,
    lineage: dict,
    storage_options: dict | None = None,
    log=print,
) -> dict:
    """Everything a SageMaker job needs in S3 (the source bundle, the base model), then its
    ``CreateTrainingJob`` request. A base model that is neither staged nor on this machine is a
    ``ConfigError`` that says how to stage it."""
    from llmops.config import PROJECT_ROOT, ConfigError

    if not settings.store_uri.startswith("s3://"):
        raise ConfigError(
            f"backend {request.backend} needs an S3 store (LLMOPS_ENV=aws); store_uri is {settings.store_uri}"
        )
    target = getattr(settings.sagemaker, BACKENDS[request.backend])
    code_uri = upload_bundle(settings, source_bundle(PROJECT_ROOT, tuple(target.requirements)), storage_options, log)
    ensure_model_staged(settings, request.base_model_name, storage_options, log)
    return plan_job(settings, request, dataset, name, lineage, code_uri)


def plan_job(settings, request, dataset: dict, name: str, lineage: dict, code_uri: str) -> dict:
    """The ``CreateTrainingJob`` request of one run (no upload): what ``stage_job`` sends and the
    dry run prints."""
    files = dataset["files"]
    return training_job_request(
        settings.sagemaker,
        backend=request.backend,
        job_name=name,
        region=settings.aws.region or "us-east-1",
        store_uri=settings.store_uri,
        hyperparameters=request.hyperparameters,
        channels={
            "train": files["train"]["uri"],
            "validation": files["validation"]["uri"],
            "base_model": base_model_uri(settings.store_uri, request.base_model_name),
        },
        code_uri=code_uri,
        tags={
            "airflow.dag_id": lineage.get("dag_id", ""),
            "airflow.run_id": lineage.get("run_id", ""),
            "dataset.version": dataset["version"],
        },
        lineage={**lineage, "base_model_name": request.base_model_name, "dataset_version": dataset["version"]},
    )


def archive_metrics(artifact: str, storage_options: dict | None = None) -> dict:
    """The final metrics the entrypoint wrote into the model archive (``metrics.json``)."""
    from training.archive import model_archive_limits, read_member

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
    return {
        "job_name": outcome["job_name"],
        "backend": "sagemaker",
        "model_artifact_uri": artifact,
        "metrics": metrics or outcome["metrics"],
        "log_uri": (
            f"https://{region}.console.aws.amazon.com/cloudwatch/home?region={region}#logsV2:log-groups/"
            f"log-group/$252Faws$252Fsagemaker$252FTrainingJobs$3FlogStreamNameFilter$3D{outcome['job_name']}"
        ),
        "reused": False,
        "job_arn": outcome["job_arn"],
        "cost": outcome["cost"],
    }


DRY_RUN_BACKENDS = (*BACKENDS, "ec2-trainium")


def dry_run(settings, backend: str, dataset_version: str, run_id: str, params: dict[str, Any]) -> dict:
    """What ``llm_finetune`` would send for one run, without calling AWS: the uploads, then the
    training requests of ``backend`` and, when evaluation runs on SageMaker, the Processing job."""
    from llmops.config import PROJECT_ROOT, ConfigError
    from llmops.finetune import LATEST, job_name, request_from_params

    if not settings.store_uri.startswith("s3://"):
        raise ConfigError(
            f"store_uri is {settings.store_uri}: the AWS backends read their data from S3 (use LLMOPS_ENV=aws)"
        )
    if dataset_version == LATEST:
        raise ConfigError("name the dataset version (--dataset-version): a dry run does not read the store")
    request = request_from_params(settings, {**params, "backend": backend, "dataset_version": dataset_version})
    data_uri = storage.join(settings.datasets_uri(), settings.data.dataset_name, dataset_version)
    dataset = {
        "version": dataset_version,
        "files": {s: {"uri": storage.join(data_uri, f"{s}.jsonl")} for s in ("train", "validation")},
    }
    name = job_name("llm_finetune", run_id)
    lineage = {"dag_id": "llm_finetune", "run_id": run_id}
    if backend == "ec2-trainium":
        from llmops.backends import ec2

        bundle = source_bundle(PROJECT_ROOT)
        image = settings.ec2.ami_id or f"(the value of SSM parameter {settings.ec2.ami_parameter})"
        plan = ec2.plan_job(settings, request, dataset, name, lineage, image, bundle.uri(settings.store_uri))
        sent = {
            "RunInstances": {"ImageId": plan["image_id"], "MinCount": 1, "MaxCount": 1, **plan["config"]},
            "SendCommand": {
                "DocumentName": "AWS-RunShellScript",
                **ec2.send_command_kwargs(
                    settings.ec2, "(the launched instance)", name, plan["commands"], plan["output_uri"]
                ),
            },
        }
        artifact = plan["artifact_uri"]
    else:
        target = getattr(settings.sagemaker, BACKENDS[backend])
        bundle = source_bundle(PROJECT_ROOT, tuple(target.requirements))
        create = plan_job(settings, request, dataset, name, lineage, bundle.uri(settings.store_uri))
        sent = {"CreateTrainingJob": create}
        artifact = storage.join(create["OutputDataConfig"]["S3OutputPath"], name, "output", "model.tar.gz")
    printed = {
        "upload": {"uri": bundle.uri(settings.store_uri), "sha256": bundle.sha256, "bytes": len(bundle.data)},
        **sent,
    }
    if settings.evaluation.backend == "sagemaker":
        from llmops.backends.sagemaker_evaluation import evaluation_plan
        from llmops.evaluation import models_to_evaluate

        models = models_to_evaluate(request.base_model_name, {"version": "new", "artifact_uri": artifact}, None)
        plan = evaluation_plan(settings, job_name("llm_finetune", run_id, prefix="llmops-eval"), models)
        printed["CreateProcessingJob"] = plan["request"]
    return printed


def main(argv: list[str] | None = None) -> int:
    import argparse
    import sys

    from llmops.config import ConfigError, load_settings

    parser = argparse.ArgumentParser(prog="python -m llmops.backends.sagemaker", description="SageMaker training jobs.")
    commands = parser.add_subparsers(dest="command", required=True)
    dry = commands.add_parser("dry-run", help="print the requests one llm_finetune run would send (nothing is sent)")
    dry.add_argument("--backend", choices=sorted(DRY_RUN_BACKENDS), default="sagemaker")
    dry.add_argument("--dataset-version", required=True, help="a curated dataset version (its hash)")
    dry.add_argument("--run-id", default="manual__dry-run", help="the Airflow run id the job name derives from")
    dry.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="a hyperparameter")
    stage = commands.add_parser("stage-model", help="upload a base model to the store for the base_model channel")
    stage.add_argument("model", help="a built-in model name or a model folder")
    args = parser.parse_args(argv)
    try:
        settings = load_settings()
        if args.command == "stage-model":
            from llmops.models import resolve_model
            from llmops.orchestration import storage_options_for

            uri = base_model_uri(settings.store_uri, args.model)
            folder = resolve_model(args.model, settings.models.cache_dir)
            staged = stage_base_model(folder, uri, storage_options_for(settings.store_uri, settings))
            print(f"{args.model}: {len(staged['files'])} files at {uri}")
            return 0
        params = {}
        for item in args.set:
            name, sep, value = item.partition("=")
            if not sep:
                parser.error(f"--set {item!r}: expected NAME=VALUE")
            params[name] = value
        printed = dry_run(settings, args.backend, args.dataset_version, args.run_id, params)
    except (ConfigError, SageMakerRequestError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(printed, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
