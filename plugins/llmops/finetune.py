"""What ``llm_finetune`` decides and runs, as plain functions (no Airflow imports).

A run's Params become a ``FinetuneRequest`` (validated into the training entrypoint's own
``TrainConfig``), the dataset version is chosen, ``decide_training`` says whether to train and
why, and ``run_training`` hands the job to a backend.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from llmops import storage
from llmops.backends.training.job import TrainingJobSpec
from llmops.backends.training.local import LocalTrainingBackend
from llmops.config import TRAINING_BACKENDS, ConfigError, Settings, format_validation_error
from llmops.contracts import DatasetManifest
from llmops.costs import estimate_cost
from llmops.data import versioning
from llmops.data.integrity import verify_version
from llmops.data.records import DataQualityError
from llmops.models import resolve_model
from training.config import TrainConfig, config_from_mapping

LATEST = "latest"


class FinetuneRequest(BaseModel):
    """One fine-tuning run, fully resolved: everything the job and its lineage need."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    dataset_version: str = LATEST
    backend: str
    processes: int = Field(ge=1, le=64)
    force: bool = False
    reason: str = ""
    drift_run_id: str = ""
    require_approval: bool = False
    base_model_name: str
    hyperparameters: dict[str, Any]


REQUEST_FIELDS = {"dataset_version", "backend", "processes", "force", "reason", "drift_run_id", "require_approval"}


def request_from_params(settings: Settings, params: dict[str, Any]) -> FinetuneRequest:
    """Per-run overrides (the trigger form, or a triggering DAG's conf) on top of the config."""
    params = {k: v for k, v in params.items() if v is not None and v != ""}
    unknown = sorted(set(params) - REQUEST_FIELDS - {f.name for f in dataclasses.fields(TrainConfig)})
    if unknown:
        raise ConfigError(f"invalid run parameters:\n  unknown parameter(s): {', '.join(unknown)}")
    hyperparameters = {
        **settings.finetune.hyperparameters,
        **{k: v for k, v in params.items() if k not in REQUEST_FIELDS},
    }
    try:
        config = config_from_mapping(hyperparameters)
    except ValueError as exc:
        raise ConfigError(str(exc).replace("invalid training configuration", "invalid run parameters")) from None
    backend = params.get("backend", settings.finetune.backend)
    if backend not in TRAINING_BACKENDS:
        raise ConfigError(
            f"invalid run parameters:\n  backend: {backend!r} is not available"
            f" (available: {', '.join(TRAINING_BACKENDS)})"
        )
    problem = _backend_problem(settings, backend)
    if problem:
        raise ConfigError(f"invalid run parameters:\n  backend: {backend!r} {problem}")
    try:
        return FinetuneRequest(
            dataset_version=params.get("dataset_version", LATEST),
            backend=backend,
            processes=params.get("processes", settings.finetune.processes),
            force=params.get("force", False),
            reason=str(params.get("reason", "")),
            drift_run_id=str(params.get("drift_run_id", "")),
            require_approval=params.get("require_approval", settings.evaluation.require_approval),
            base_model_name=config.base_model,
            hyperparameters=config.to_dict(),
        )
    except ValidationError as exc:
        raise ConfigError(f"invalid run parameters:\n{format_validation_error(exc)}") from None


def _backend_problem(settings: Settings, backend: str) -> str | None:
    """What this environment lacks for an AWS backend, or None."""
    if backend == "local":
        return None
    if not settings.store_uri.startswith("s3://"):
        return f"reads its data from S3, and this environment's store is {settings.store_uri} (use LLMOPS_ENV=aws)"
    if backend == "ec2-trainium" and not settings.ec2.instance_profile:
        return "needs ec2.instance_profile (LLMOPS_EC2_INSTANCE_PROFILE): the instance reaches SSM and S3 with it"
    if backend.startswith("sagemaker") and not settings.sagemaker.role_arn:
        return "needs sagemaker.role_arn (LLMOPS_SAGEMAKER_ROLE_ARN), the role the training job runs as"
    return None


def select_dataset(settings: Settings, version: str, storage_options: dict | None = None) -> dict:
    """The manifest of the requested curated dataset version (``latest``: the newest), as a
    ``DatasetManifest``'s dict, with where the version and its manifest are."""
    name = settings.data.dataset_name
    if version == LATEST:
        manifest = versioning.latest_version(settings.datasets_uri(), name, storage_options)
        if manifest is None:
            raise ConfigError(f"no curated version of dataset {name!r} exists yet; run llm_data_prep first")
    else:
        uri = storage.join(settings.datasets_uri(), name, version, versioning.MANIFEST)
        if not storage.exists(uri, storage_options):
            known = [
                m["version"][:12] for m in versioning.list_versions(settings.datasets_uri(), name, storage_options)
            ]
            raise ConfigError(f"dataset_version: {version!r} of {name!r} does not exist (known: {known})")
        manifest = storage.read_json(uri, storage_options)
    if not manifest.get("validation", {}).get("success"):
        raise ConfigError(f"dataset {name}@{manifest['version']} did not pass validation; refusing to train on it")
    try:
        verify_version(settings.datasets_uri(), name, manifest, storage_options)
    except DataQualityError as exc:
        raise ConfigError(f"{exc}; refusing to train on it") from None
    uri = storage.join(settings.datasets_uri(), name, manifest["version"])
    try:
        selected = DatasetManifest.model_validate(
            {**manifest, "uri": uri, "manifest_uri": storage.join(uri, versioning.MANIFEST)}
        )
    except ValidationError as exc:
        raise ConfigError(
            f"dataset {name}@{manifest['version'][:12]}: {storage.join(uri, versioning.MANIFEST)} is not a dataset"
            f" manifest:\n{format_validation_error(exc)}"
        ) from None
    return selected.to_dict()


@dataclass(frozen=True)
class TrainingDecision:
    train: bool
    reason: str


def decide_training(
    dataset_version: str, champion_dataset_version: str | None, force: bool, reason: str
) -> TrainingDecision:
    """Train unless the champion already learned from this very dataset and nobody asked again."""
    if force:
        return TrainingDecision(True, "forced by the force parameter")
    if reason:
        return TrainingDecision(True, f"retraining requested: {reason}")
    if champion_dataset_version is None:
        return TrainingDecision(True, "no champion is serving yet")
    if champion_dataset_version == dataset_version:
        return TrainingDecision(
            False, f"the champion was trained on dataset version {dataset_version[:12]} already; set force to retrain"
        )
    return TrainingDecision(
        True, f"new dataset version {dataset_version[:12]} (champion: {champion_dataset_version[:12]})"
    )


def job_name(dag_id: str, run_id: str, prefix: str = "llmops-ft") -> str:
    """A training job name that is the same for every retry of one Airflow run: SageMaker job
    names are unique, at most 63 characters of ``[a-zA-Z0-9-]``."""
    digest = hashlib.sha256(f"{dag_id}\x00{run_id}".encode()).hexdigest()[:12]
    stamp = re.sub(r"[^0-9]", "", run_id)[:12]
    return f"{prefix}-{stamp}-{digest}" if stamp else f"{prefix}-{digest}"


def run_training(
    settings: Settings,
    request: FinetuneRequest,
    dataset: DatasetManifest | dict,
    name: str,
    lineage: dict,
    on_line: Callable[[str], None] = print,
    storage_options: dict | None = None,
) -> dict:
    """Train on ``dataset``'s train and validation splits in a subprocess here (the local
    backend); returns the ``TrainingJobResult``'s dict with its cost."""
    dataset = DatasetManifest.model_validate(dataset)
    base_dir = resolve_model(request.base_model_name, settings.models.cache_dir)
    spec = TrainingJobSpec(
        job_name=name,
        hyperparameters={**request.hyperparameters, "base_model": str(base_dir)},
        channels={"train": dataset.files.train.uri, "validation": dataset.files.validation.uri},
        processes=request.processes,
        timeout_s=settings.finetune.timeout_minutes * 60,
        lineage={**lineage, "base_model_name": request.base_model_name, "dataset_version": dataset.version},
    )
    backend = LocalTrainingBackend(settings.store_uri, Path(settings.home) / "jobs", storage_options)
    result = backend.run(spec, on_line).to_dict()
    seconds = float(result["metrics"].get("train_wall_seconds", 0))
    result["cost"] = estimate_cost("local", 1, seconds, settings.sagemaker.prices_per_hour)
    return result
