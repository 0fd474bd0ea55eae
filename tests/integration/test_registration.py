"""MLflow tracking and registry: lineage tags, run contents, idempotent registration."""

from __future__ import annotations

import pytest

from llmops import storage
from llmops.tracking import RUN_KEY, client, record_training

pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def job(tiny_training_job) -> dict:
    return tiny_training_job


def _record(tmp_path, job, dataset, run_id="manual__1"):
    return record_training(
        f"sqlite:///{tmp_path}/mlflow.db",
        storage.to_uri(str(tmp_path / "artifacts")),
        "test-model",
        job,
        dataset,
        {"peft_method": "lora", "lora_r": 4, "max_steps": 4},
        {"dag_id": "llm_finetune", "run_id": run_id, "git_sha": "abc123", "base_model_name": "tiny"},
    )


def test_registered_version_carries_lineage_and_the_run_its_evidence(tmp_path, job, curated_dataset):
    registered = _record(tmp_path, job, curated_dataset)
    assert registered.created and registered.version == "1"
    mlflow_client = client(f"sqlite:///{tmp_path}/mlflow.db")
    version = mlflow_client.get_model_version("test-model", registered.version)
    tags = version.tags
    assert tags["dataset.version"] == curated_dataset["version"]
    assert tags["dataset.uri"] == curated_dataset["uri"]
    assert tags["validation.success"] == "true"
    assert tags["validation.result_uri"] == curated_dataset["validation"]["result_uri"]
    assert tags["code.git_sha"] == "abc123"
    assert (tags["airflow.dag_id"], tags["airflow.run_id"]) == ("llm_finetune", "manual__1")
    assert (tags["training.backend"], tags["training.job_name"]) == ("local", "job-reg")
    assert tags["base_model"] == "tiny" and tags["peft_method"] == "lora"
    assert float(tags["metrics.eval_loss"]) == pytest.approx(job["metrics"]["eval_loss"], rel=1e-4)

    run = mlflow_client.get_run(registered.run_id)
    assert run.data.params["lora_r"] == "4"
    assert len(mlflow_client.get_metric_history(registered.run_id, "loss")) >= 3, "per-step metrics"
    artifacts = {a.path for a in mlflow_client.list_artifacts(registered.run_id, "plots")}
    assert "plots/loss_curve.png" in artifacts
    model_files = {a.path for a in mlflow_client.list_artifacts(registered.run_id, "model")}
    assert "model/adapter_model.safetensors" in model_files
    inputs = run.inputs.dataset_inputs
    assert inputs and inputs[0].dataset.name == curated_dataset["name"]
    assert version.source.endswith("/model")


def test_registering_the_same_airflow_run_twice_returns_the_same_version(tmp_path, job, curated_dataset):
    first = _record(tmp_path, job, curated_dataset)
    again = _record(tmp_path, job, curated_dataset)
    assert (again.version, again.run_id, again.created) == (first.version, first.run_id, False)
    other = _record(tmp_path, job, curated_dataset, run_id="manual__2")
    assert other.version == "2" and other.created
    mlflow_client = client(f"sqlite:///{tmp_path}/mlflow.db")
    versions = mlflow_client.search_model_versions("name = 'test-model'")
    assert sorted(str(v.version) for v in versions) == ["1", "2"]
    assert {v.tags[RUN_KEY] for v in versions} == {"llm_finetune/manual__1", "llm_finetune/manual__2"}
