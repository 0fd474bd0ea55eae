"""MLflow tracking and registry with lineage: one experiment and one registered model per use case.

``record_training`` logs a training job as an MLflow run (params, per-step metrics, a loss
curve, the curated dataset as an input, the model files) and registers it as a model version
whose tags answer "where did this come from": dataset URI and hash, validation result, git SHA,
Airflow DAG and run, backend and job, base model, PEFT method, metrics. Both steps are keyed by
the Airflow run, so a retried or re-run task finds and returns what it made the first time.

An attempt can die anywhere (the MLflow server gone, a full disk under the artifact store, a
worker killed), and an HTTP client that retries a request whose reply was lost can make a thing
twice. So a run counts as made only once it is ``FINISHED`` (its last write); the next attempt
deletes the key's unfinished runs and logs a new one, and a model version exists only for a
finished run. Duplicate versions of one key are removed, the lowest kept; a version whose
registration failed is replaced.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

from llmops import storage
from llmops.artifacts import extract_model
from llmops.config import Settings
from llmops.contracts import DatasetManifest
from llmops.prompts import link_to_run

RUN_KEY = "llmops.run_key"
CHAMPION, CHALLENGER = "champion", "challenger"


@dataclass(frozen=True)
class RegisteredVersion:
    model_name: str
    version: str
    run_id: str
    experiment_id: str
    source: str
    created: bool

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def client(tracking_uri: str):
    import mlflow
    from mlflow import MlflowClient

    mlflow.set_tracking_uri(tracking_uri)
    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def ensure_experiment(mlflow_client, name: str, artifact_root: str) -> str:
    experiment = mlflow_client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    return mlflow_client.create_experiment(name, artifact_location=storage.join(artifact_root, name))


def find_run(mlflow_client, experiment_id: str, run_key: str):
    runs = mlflow_client.search_runs([experiment_id], filter_string=f"tags.`{RUN_KEY}` = '{run_key}'", max_results=5)
    return runs[0] if runs else None


def _finished_run(mlflow_client, experiment_id: str, run_key: str):
    """The key's finished run, if an earlier attempt got that far. Every other active run of the
    key is the remains of an attempt that died (or a retried create) and is deleted."""
    runs = mlflow_client.search_runs(
        [experiment_id], filter_string=f"tags.`{RUN_KEY}` = '{run_key}'", max_results=50, order_by=["start_time ASC"]
    )
    finished = next((r for r in runs if r.info.status == "FINISHED"), None)
    for run in runs:
        if run is not finished:
            mlflow_client.delete_run(run.info.run_id)
    return finished


def loss_curve_png(history: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(h["step"], h["loss"]) for h in history if "loss" in h and "step" in h]
    evals = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h and "step" in h]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss")
    if evals:
        ax.plot(*zip(*evals, strict=True), "o-", label="held-out loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def version_tags(job: dict, dataset: DatasetManifest | dict, hyperparameters: dict, lineage: dict) -> dict[str, str]:
    dataset = DatasetManifest.model_validate(dataset)
    if dataset.uri is None or dataset.manifest_uri is None:
        raise ValueError(
            f"dataset {dataset.label}: the manifest does not say where the version is (uri, manifest_uri);"
            " register with what llmops.finetune.select_dataset returns"
        )
    metrics = job.get("metrics", {})
    tags = {
        "dataset.name": dataset.name,
        "dataset.version": dataset.version,
        "dataset.uri": dataset.uri,
        "dataset.manifest_uri": dataset.manifest_uri,
        "dataset.content_sha256": dataset.content_sha256,
        "dataset.template": dataset.template,
        "validation.success": str(dataset.validation.success).lower(),
        "validation.result_uri": dataset.validation.result_uri,
        "validation.data_docs_uri": dataset.validation.data_docs_uri,
        "code.git_sha": lineage.get("git_sha", "unknown"),
        "airflow.dag_id": lineage.get("dag_id", ""),
        "airflow.run_id": lineage.get("run_id", ""),
        "training.backend": job["backend"],
        "training.job_name": job["job_name"],
        "training.job_arn": job.get("job_arn", ""),
        "training.artifact_uri": job["model_artifact_uri"],
        "base_model": lineage.get("base_model_name", hyperparameters.get("base_model", "")),
        "peft_method": hyperparameters.get("peft_method", "lora"),
    }
    if lineage.get("reason"):
        tags["retrain.reason"] = lineage["reason"][:5000]
    if lineage.get("drift_run_id"):
        tags["retrain.drift_run_id"] = lineage["drift_run_id"]
    if lineage.get("baseline_uri"):
        tags["drift.baseline_uri"] = lineage["baseline_uri"]
    for key in ("eval_loss_before", "eval_loss", "eval_perplexity", "train_loss"):
        if key in metrics:
            tags[f"metrics.{key}"] = f"{metrics[key]:.6g}"
    for key, value in cost_figures(job).items():
        tags[f"cost.{key}"] = "unknown" if value is None else f"{value:g}" if isinstance(value, float) else value
    return {k: str(v) for k, v in tags.items()}


def cost_figures(job: dict) -> dict:
    """What the job's instances were and cost (``cost`` of a backend's result; None: no price)."""
    cost = job.get("cost") or {}
    keys = ("instance_type", "instance_count", "billable_seconds", "usd_per_hour", "estimated_cost_usd", "spot_savings")
    return {k: cost[k] for k in keys if k in cost}


def record_training(
    tracking_uri: str,
    artifact_root: str,
    model_name: str,
    job: dict,
    dataset: DatasetManifest | dict,
    hyperparameters: dict,
    lineage: dict,
    storage_options: dict | None = None,
) -> RegisteredVersion:
    """Log the job as a run and register it; returns the existing version when this Airflow run
    already registered one."""
    dataset = DatasetManifest.model_validate(dataset)
    mlflow_client = client(tracking_uri)
    run_key = f"{lineage.get('dag_id', 'manual')}/{lineage.get('run_id', job['job_name'])}"
    existing = _registered_version(mlflow_client, model_name, run_key)
    if existing is not None:
        return existing

    experiment_id = ensure_experiment(mlflow_client, model_name, artifact_root)
    tags = version_tags(job, dataset, hyperparameters, lineage)
    run = _finished_run(mlflow_client, experiment_id, run_key)
    if run is None:
        run = mlflow_client.create_run(experiment_id, run_name=job["job_name"], tags={RUN_KEY: run_key, **tags})
        run_id = run.info.run_id
        try:
            _log_training_run(
                mlflow_client, tracking_uri, run_id, job, dataset, hyperparameters, lineage, tags, storage_options
            )
        except BaseException:
            _mark_failed(mlflow_client, run_id)
            raise
        mlflow_client.set_terminated(run_id, "FINISHED")
        run = mlflow_client.get_run(run_id)

    run_id = run.info.run_id
    _ensure_registered_model(mlflow_client, model_name)
    source = f"{run.info.artifact_uri}/model"
    version = mlflow_client.create_model_version(
        model_name,
        source=source,
        run_id=run_id,
        tags={RUN_KEY: run_key, **tags},
        description=(f"Fine-tuned {tags['base_model']} ({tags['peft_method']}) on {dataset.label}"),
    )
    # MLflow's HTTP client resends a POST whose reply was lost, which registers the run twice: settle
    # on the first version now, before anything downstream learns a number.
    settled = _registered_version(mlflow_client, model_name, run_key)
    number = settled.version if settled is not None else str(version.version)
    return RegisteredVersion(model_name, number, run_id, experiment_id, source, created=True)


def _log_training_run(
    mlflow_client,
    tracking_uri: str,
    run_id: str,
    job: dict,
    dataset: DatasetManifest,
    hyperparameters: dict,
    lineage: dict,
    tags: dict[str, str],
    storage_options: dict | None,
) -> None:
    """Everything a training run holds: params, per-step and final metrics, the loss curve, the model
    files, the drift baseline, the dataset input and the prompt it was formatted with."""
    import mlflow
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag

    mlflow_client.log_batch(
        run_id, params=[mlflow.entities.Param(k, str(v)[:6000]) for k, v in sorted(hyperparameters.items())]
    )
    with tempfile.TemporaryDirectory(prefix="llmops-mlflow-") as tmp:
        artifact = job["model_artifact_uri"]
        model_dir = extract_model(storage.read_bytes(artifact, storage_options), Path(tmp) / "model", name=artifact)
        history = json.loads((model_dir / "metrics.json").read_text())["history"]
        _log_history(mlflow_client, run_id, history)
        final = {k: v for k, v in job["metrics"].items() if isinstance(v, (int, float))}
        final.update(
            {
                f"cost.{k}": float(v)
                for k, v in cost_figures(job).items()
                if isinstance(v, (int, float)) and not isinstance(v, bool)
            }
        )
        mlflow_client.log_batch(
            run_id, metrics=[metric_entity(k, v, final.get("global_step", 0)) for k, v in final.items()]
        )
        mlflow_client.log_artifact(run_id, str(loss_curve_png(history, Path(tmp) / "loss_curve.png")), "plots")
        mlflow_client.log_artifacts(run_id, str(model_dir), "model")
        if lineage.get("baseline_uri"):
            baseline_dir = Path(tmp) / "baseline"
            baseline_dir.mkdir()
            for name in ("profile.json", "embeddings.npy"):
                payload = storage.read_bytes(storage.join(lineage["baseline_uri"], name), storage_options)
                (baseline_dir / name).write_bytes(payload)
            mlflow_client.log_artifacts(run_id, str(baseline_dir), "baseline")
    dataset_entity = MetaDataset(source=uri_source(dataset.uri), name=dataset.name, digest=dataset.version[:36])
    mlflow_client.log_inputs(
        run_id,
        datasets=[DatasetInput(dataset_entity._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", "training")])],
    )
    if tags["dataset.template"]:
        link_to_run(tracking_uri, run_id, [tags["dataset.template"]])


def _mark_failed(mlflow_client, run_id: str) -> None:
    """Best effort, on the way out of a failed attempt: the run must not look like it is still
    going. The server may be what failed; the next attempt deletes the run either way."""
    import logging

    try:
        mlflow_client.set_terminated(run_id, "FAILED")
    except Exception as exc:
        logging.getLogger(__name__).warning("could not mark MLflow run %s FAILED: %s", run_id, exc)


def uri_source(uri: str):
    from mlflow.data.dataset_source_registry import resolve_dataset_source

    try:
        return resolve_dataset_source(uri)
    except Exception:
        from mlflow.data.http_dataset_source import HTTPDatasetSource

        return HTTPDatasetSource(uri)


def metric_entity(key: str, value: float, step: int):
    import time

    from mlflow.entities import Metric

    return Metric(key, float(value), int(time.time() * 1000), int(step))


def _log_history(mlflow_client, run_id: str, history: list[dict]) -> None:
    metrics = []
    for entry in history:
        step = int(entry.get("step", 0))
        metrics += [metric_entity(k, v, step) for k, v in entry.items() if k != "step" and isinstance(v, (int, float))]
    for start in range(0, len(metrics), 900):
        mlflow_client.log_batch(run_id, metrics=metrics[start : start + 900])


def _ensure_registered_model(mlflow_client, name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        mlflow_client.get_registered_model(name)
        return
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise  # the server is down or refused: not a reason to create anything
    try:
        mlflow_client.create_registered_model(name, description="Fine-tuned model of the llmops use case.")
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":  # made by a concurrent or lost-reply attempt
            raise


def _registered_version(mlflow_client, model_name: str, run_key: str) -> RegisteredVersion | None:
    """The version this key registered; an error (not None) when the registry cannot say."""
    versions = mlflow_client.search_model_versions(f"name = '{model_name}' and tag.`{RUN_KEY}` = '{run_key}'")
    for failed in [v for v in versions if v.status == "FAILED_REGISTRATION"]:
        mlflow_client.delete_model_version(model_name, failed.version)
    versions = sorted((v for v in versions if v.status != "FAILED_REGISTRATION"), key=lambda v: int(v.version))
    if not versions:
        return None
    version, duplicates = versions[0], versions[1:]
    # A create whose reply was lost and that the HTTP client sent again registers the run twice.
    # record_training settles on the first right after creating, so a later one is only ever known
    # to a process that died in between; one with an alias is someone's choice, and stays.
    for duplicate in duplicates:
        # Search results carry no aliases: ask for the version itself.
        if not mlflow_client.get_model_version(model_name, duplicate.version).aliases:
            mlflow_client.delete_model_version(model_name, duplicate.version)
    run = mlflow_client.get_run(version.run_id)
    return RegisteredVersion(
        model_name, str(version.version), version.run_id, run.info.experiment_id, version.source, False
    )


def champion_dataset_version(tracking_uri: str, model_name: str) -> str | None:
    """The dataset version the serving champion was trained on, or None without a champion."""
    from mlflow.exceptions import MlflowException

    mlflow_client = client(tracking_uri)
    try:
        version = mlflow_client.get_model_version_by_alias(model_name, CHAMPION)
    except MlflowException:
        return None
    return version.tags.get("dataset.version")


def report_url(settings: Settings, experiment_id: str, run_id: str, artifact_path: str) -> str | None:
    if not settings.mlflow.ui_url:
        return None
    return f"{settings.mlflow.ui_url.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}/artifacts/{artifact_path}"
