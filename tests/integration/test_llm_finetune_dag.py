"""llm_finetune end to end with dag.test(): Params reach training, the version is registered with
lineage, and a run on the champion's own dataset is skipped unless forced."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from devtools.demo import return_value
from llmops.tracking import CHAMPION, client
from tests.dagruns import fast_config, parsed_dag, task_states

pytestmark = [pytest.mark.integration, pytest.mark.model]


@pytest.fixture(scope="module")
def dag(airflow_db, curated_dataset):
    """The DAG parsed against the store that holds ``curated_dataset``."""
    home = curated_dataset["uri"].split("/store/")[0].removeprefix("file://")
    with parsed_dag(
        "llm_finetune",
        LLMOPS_HOME=home,
        MLFLOW_TRACKING_URI=f"sqlite:///{home}/mlflow.db",
        LLMOPS_CONFIG_FILE=str(fast_config(Path(home))),
    ) as dag:
        yield dag


def _conf(tiny_model, **extra):
    return {
        "base_model": str(tiny_model),
        "max_steps": 3,
        "lora_r": 4,
        "lora_alpha": 8,
        "batch_size": 2,
        "learning_rate": 0.01,
        **extra,
    }


def test_trigger_form_params_train_and_register_with_lineage(dag, tiny_model, curated_dataset):
    run = dag.test(run_conf=_conf(tiny_model))
    assert run.state == "success", task_states(run)
    registered = return_value(run, "register_model")
    assert registered["created"] and registered["metrics"]["global_step"] == 3
    mlflow_client = client(os.environ["MLFLOW_TRACKING_URI"])
    version = mlflow_client.get_model_version(registered["model_name"], registered["version"])
    assert version.tags["dataset.version"] == curated_dataset["version"]
    assert version.tags["validation.result_uri"] == curated_dataset["validation"]["result_uri"]
    assert version.tags["airflow.run_id"] == run.run_id
    assert version.tags["training.job_name"].startswith("llmops-ft-")
    params = mlflow_client.get_run(registered["run_id"]).data.params
    assert (params["lora_r"], params["batch_size"], params["learning_rate"]) == ("4", "2", "0.01")


def test_champion_on_the_same_dataset_skips_training_unless_forced(dag, tiny_model):
    run = dag.test(run_conf=_conf(tiny_model))
    assert run.state == "success", task_states(run)
    registered = return_value(run, "register_model")
    mlflow_client = client(os.environ["MLFLOW_TRACKING_URI"])
    mlflow_client.set_registered_model_alias(registered["model_name"], CHAMPION, registered["version"])

    skipped = dag.test(run_conf=_conf(tiny_model))
    states = task_states(skipped)
    assert skipped.state == "success"
    assert states["decide_training"] == "success"
    assert states["train_adapter"] == "skipped" and states["register_model"] == "skipped"

    forced = dag.test(run_conf=_conf(tiny_model, force=True))
    assert task_states(forced)["register_model"] == "success"


def test_a_retraining_asked_for_by_the_drift_monitor_records_why_and_a_baseline(dag, tiny_model, curated_dataset):
    """The monitor's conf (reason, drift run) retrains even on the champion's own dataset, and the
    version records both; every version points at the baseline profile of its training data."""
    reason = "drift on python-docs-assistant (champion version 1) in [...]: prompt embeddings: MMD 0.5"
    run = dag.test(run_conf=_conf(tiny_model, reason=reason, drift_run_id="abc123"))
    assert run.state == "success", task_states(run)
    registered = return_value(run, "register_model")
    mlflow_client = client(os.environ["MLFLOW_TRACKING_URI"])
    version = mlflow_client.get_model_version(registered["model_name"], registered["version"])
    assert version.tags["retrain.reason"] == reason
    assert version.tags["retrain.drift_run_id"] == "abc123"
    baseline = return_value(run, "profile_baseline")
    assert version.tags["drift.baseline_uri"] == baseline["uri"]
    assert baseline["summary"]["dataset_version"] == curated_dataset["version"]
    assert baseline["summary"]["records"] == curated_dataset["counts"]["train"]
    artifacts = {a.path for a in mlflow_client.list_artifacts(registered["run_id"], "baseline")}
    assert artifacts == {"baseline/profile.json", "baseline/embeddings.npy"}


def test_a_bad_value_is_refused_by_the_form_or_stops_the_run_before_training(dag, tiny_model):
    from airflow.sdk.exceptions import ParamValidationError

    with pytest.raises(ParamValidationError, match="peft_method"):
        dag.test(run_conf=_conf(tiny_model, peft_method="magic"))

    # Passes the form's schema, fails the typed training config: stops at resolve_config.
    run = dag.test(run_conf=_conf(tiny_model, max_seq_length=8))
    states = task_states(run)
    assert run.state == "failed"
    assert states["resolve_config"] == "failed"
    assert states["train_adapter"] in ("upstream_failed", None)
