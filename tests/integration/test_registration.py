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


# -- what an earlier attempt left behind ---------------------------------------------------------


def _versions(tmp_path, run_id="manual__1") -> list[str]:
    found = client(f"sqlite:///{tmp_path}/mlflow.db").search_model_versions(
        f"name = 'test-model' and tag.`{RUN_KEY}` = 'llm_finetune/{run_id}'"
    )
    return sorted(str(v.version) for v in found)


def _set_status(tmp_path, version: str, status: str) -> None:
    """What a registry with asynchronous registration (or one that failed it) reports."""
    import sqlite3

    with sqlite3.connect(tmp_path / "mlflow.db") as db:
        db.execute("UPDATE model_versions SET status = ? WHERE name = 'test-model' AND version = ?", (status, version))


@pytest.mark.reliability("faults")
def test_a_registration_sent_twice_by_the_http_client_is_left_with_one_version(tmp_path, job, curated_dataset):
    first = _record(tmp_path, job, curated_dataset)
    # A create whose reply was lost, sent again by MLflow's HTTP retries: the same key registered twice.
    mlflow_client = client(f"sqlite:///{tmp_path}/mlflow.db")
    mlflow_client.create_model_version(
        "test-model", source=first.source, run_id=first.run_id, tags={RUN_KEY: "llm_finetune/manual__1"}
    )
    assert _versions(tmp_path) == ["1", "2"]
    again = _record(tmp_path, job, curated_dataset)
    assert (again.version, again.created) == ("1", False)
    assert _versions(tmp_path) == ["1"]


def test_a_duplicate_someone_gave_an_alias_is_kept(tmp_path, job, curated_dataset):
    first = _record(tmp_path, job, curated_dataset)
    mlflow_client = client(f"sqlite:///{tmp_path}/mlflow.db")
    mlflow_client.create_model_version(
        "test-model", source=first.source, run_id=first.run_id, tags={RUN_KEY: "llm_finetune/manual__1"}
    )
    mlflow_client.set_registered_model_alias("test-model", "champion", "2")
    assert _record(tmp_path, job, curated_dataset).version == "1"
    assert _versions(tmp_path) == ["1", "2"]


@pytest.mark.reliability("faults")
def test_a_version_whose_registration_failed_is_registered_again(tmp_path, job, curated_dataset):
    first = _record(tmp_path, job, curated_dataset)
    _set_status(tmp_path, first.version, "FAILED_REGISTRATION")
    again = _record(tmp_path, job, curated_dataset)
    assert again.created and again.run_id == first.run_id, "the finished run is reused"
    assert _versions(tmp_path) == [again.version] and again.version != first.version


def test_a_version_still_pending_registration_is_returned_not_registered_twice(tmp_path, job, curated_dataset):
    first = _record(tmp_path, job, curated_dataset)
    _set_status(tmp_path, first.version, "PENDING_REGISTRATION")
    again = _record(tmp_path, job, curated_dataset)
    assert (again.version, again.created) == (first.version, False)
    assert _versions(tmp_path) == [first.version]


@pytest.mark.reliability("faults")
def test_a_registry_that_cannot_answer_the_lookup_fails_the_attempt_instead_of_registering_twice(
    tmp_path, job, curated_dataset, monkeypatch
):
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    _record(tmp_path, job, curated_dataset)

    def unavailable(self, *args, **kwargs):
        raise MlflowException("the registry is restarting", error_code="TEMPORARILY_UNAVAILABLE")

    monkeypatch.setattr(MlflowClient, "search_model_versions", unavailable)
    with pytest.raises(MlflowException, match="restarting"):
        _record(tmp_path, job, curated_dataset)
    monkeypatch.undo()
    assert _versions(tmp_path) == ["1"]
