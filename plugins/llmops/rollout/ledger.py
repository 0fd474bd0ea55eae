"""What each phase of a rollout run did, kept in the run's partition of the store
(``runs/llm_rollout/<run>/phases/<task>.json``), and the rollout's record in MLflow.

Once a run has promoted or rolled back, a task of it cleared and run again returns what it did and
touches nothing: without it, clearing a finished run's ``deploy_shadow`` would put the endpoint
back in shadow, and an old run's ``promote`` would move ``champion`` back to its version.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable

from llmops import storage
from llmops.config import Settings
from llmops.rollout.contracts import RolloutPlan
from llmops.runs import run_folder
from llmops.tracking import CHALLENGER, RUN_KEY, client, ensure_experiment, find_run

# The phases that end a rollout with a verdict. A rollout that failed outright (restored by
# ``restore_on_failure``) has not ended: clearing its tasks rolls it out again.
CONCLUSIONS = ("promote", "roll_back")


def phase_uri(settings: Settings, run_key: str, phase: str) -> str:
    dag_id, _, run_id = run_key.partition("/")
    return storage.join(run_folder(settings, run_id, dag_id), "phases", f"{phase}.json")


def record_phase(settings: Settings, run_key: str, phase: str, result: dict) -> dict:
    """Keep what a phase of this rollout run did, in the run's partition of the store; returns it."""
    storage.write_json(phase_uri(settings, run_key, phase), result)
    return result


def finished_phase(settings: Settings, run_key: str, phase: str, log: Callable[[str], None] = print) -> dict | None:
    """What ``phase`` of this rollout run did, once the run has promoted or rolled back: a task of a
    finished rollout, cleared and run again (even after later rollouts moved the endpoint on),
    returns it and touches nothing; rolling out again is a new run. None while the rollout is under
    way (or failed outright): the phase is done again, idempotently (configs named by the run,
    waits for updates in progress)."""
    if not any(storage.exists(phase_uri(settings, run_key, p)) for p in CONCLUSIONS):
        return None
    uri = phase_uri(settings, run_key, phase)
    if not storage.exists(uri):
        return None
    log(f"{phase}: this rollout has ended; keeping what the phase did then ({uri})")
    return storage.read_json(uri)


def tag_version(settings: Settings, version: str, tags: dict[str, object]) -> None:
    mlflow_client = client(settings.mlflow.tracking_uri)
    for key, value in tags.items():
        mlflow_client.set_model_version_tag(settings.finetune.model_name, str(version), key, str(value)[:5000])


def drop_challenger_alias(settings: Settings, version: str) -> None:
    from mlflow.exceptions import MlflowException

    mlflow_client = client(settings.mlflow.tracking_uri)
    try:
        current = mlflow_client.get_model_version_by_alias(settings.finetune.model_name, CHALLENGER)
    except MlflowException:
        return
    if str(current.version) == str(version):
        mlflow_client.delete_registered_model_alias(settings.finetune.model_name, CHALLENGER)


def evidence_metrics(prefix: str, evidence: dict | None) -> dict[str, float]:
    """A phase's sequential tests as metrics: each test's sample size, its statistic, and the
    sample size the policy stated for it; the pairwise judge's position bias where measured."""
    if not evidence:
        return {}
    metrics = {}
    for test in evidence["tests"]:
        key = f"{prefix}.evidence.{test['name']}"
        metrics[f"{key}.n"] = test["n"]
        metrics[f"{key}.stated_n"] = evidence["stated_sample_size"][test["name"]]
        if test["statistic"] is not None:
            metrics[f"{key}.statistic"] = test["statistic"]
    if evidence.get("position_bias") is not None:
        metrics[f"{prefix}.judge_position_bias"] = evidence["position_bias"]
    return metrics


def record_rollout(settings: Settings, plan: RolloutPlan | dict, policy, lineage: dict, phases: dict) -> dict:
    """One MLflow run per rollout (in the model's experiment, keyed by the Airflow run): the
    policy, the shadow comparison and every step's figures, linked from the candidate's version.
    The same record again logs nothing (a metric logged twice would show twice in its history)."""
    import mlflow

    plan = RolloutPlan.model_validate(plan)
    mlflow_client = client(settings.mlflow.tracking_uri)
    experiment_id = ensure_experiment(mlflow_client, plan.model_name, settings.mlflow.artifact_uri)
    run_key = f"{lineage['dag_id']}/{lineage['run_id']}"
    outcome = phases.get("outcome", "unknown")
    record = json.dumps(
        {"plan": plan.model_dump(mode="json"), "policy": policy.model_dump(), **phases}, indent=1, default=str
    )
    digest = hashlib.sha256(record.encode()).hexdigest()
    run = find_run(mlflow_client, experiment_id, run_key)
    if run is None:
        run = mlflow_client.create_run(
            experiment_id,
            run_name=f"rollout-v{plan.candidate.version}",
            tags={
                RUN_KEY: run_key,
                "llmops.kind": "rollout",
                "airflow.dag_id": lineage["dag_id"],
                "airflow.run_id": lineage["run_id"],
                "model_version": plan.candidate.version,
            },
        )
    run_id = run.info.run_id
    params = {
        "action": plan.action,
        "endpoint": plan.endpoint,
        "champion_version": plan.champion.version if plan.champion else "none",
        "traffic_steps": ",".join(f"{s:g}" for s in policy.traffic_steps),
    }
    existing = mlflow_client.get_run(run_id).data.params
    mlflow_client.log_batch(
        run_id, params=[mlflow.entities.Param(k, str(v)) for k, v in params.items() if k not in existing]
    )
    metrics = {}
    shadow = phases.get("shadow")
    if shadow:
        comparison = shadow["comparison"]
        metrics.update(
            {
                "shadow.pairs": comparison["pairs"],
                "shadow.error_rate": comparison["shadow"]["errors"] / max(comparison["shadow"]["invocations"], 1),
            }
        )
        for key in ("win_rate", "challenger_judge_mean", "champion_judge_mean"):
            if comparison[key] is not None:
                metrics[f"shadow.{key}"] = comparison[key]
        metrics.update(evidence_metrics("shadow", shadow.get("evidence")))
    for step in phases.get("steps", []):
        prefix = f"step.{step['label']}"
        window = step["window"]
        metrics[f"{prefix}.invocations"] = window["invocations"]
        metrics[f"{prefix}.error_rate"] = window["errors"] / max(window["invocations"], 1)
        if window.get("p99_ms") is not None:
            metrics[f"{prefix}.p99_ms"] = window["p99_ms"]
        if step.get("judge_mean") is not None:
            metrics[f"{prefix}.judge_mean"] = step["judge_mean"]
        metrics.update(evidence_metrics(prefix, step.get("evidence")))
    recorded = run.info.status == "FINISHED" and run.data.tags.get("llmops.record_sha256") == digest
    if not recorded:
        stamp = int(time.time() * 1000)
        mlflow_client.log_batch(
            run_id, metrics=[mlflow.entities.Metric(k, float(v), stamp, 0) for k, v in metrics.items()]
        )
        mlflow_client.log_text(run_id, record, "rollout/rollout.json")
        mlflow_client.set_tag(run_id, "rollout.outcome", outcome)
        # The digest goes last: a run that has it holds the whole record.
        mlflow_client.set_tag(run_id, "llmops.record_sha256", digest)
        mlflow_client.set_terminated(run_id, "FINISHED")
    tag_version(settings, plan.candidate.version, {"rollout.mlflow_run_id": run_id, "rollout.outcome": outcome})
    return {"run_id": run_id, "outcome": outcome, "metrics": metrics}
