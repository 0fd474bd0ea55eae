"""What ``llm_finetune`` does after registering a candidate, as plain functions (no Airflow imports).

    build_items → run_evaluation (a job on a backend) → judge_evaluation → decide (compare + gate)
    → record_evaluation (MLflow run, HTML report, version tags and a link) → promote or reject

Each step reads and writes the store under ``evaluation-jobs/<job>/`` and is keyed by the Airflow
run, so a retried or re-run task finds what it made the first time.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from llmops import storage
from llmops.backends.evaluation.job import EvaluationJobSpec, evaluation_settings
from llmops.backends.evaluation.local import LocalEvaluationBackend
from llmops.comparison import Comparison, compare
from llmops.config import ConfigError, Settings
from llmops.contracts import DatasetManifest, EvaluationResult, GateDecision, GateOutcome, RegisteredCandidate
from llmops.costs import estimate_cost
from llmops.evaluation_report import comparison_table, markdown_summary, write_report
from llmops.gate import Decision, decide_promotion
from llmops.judges import judge_rows
from llmops.models import resolve_model
from llmops.prompts import EvalCatalog, PromptTemplate, link_to_run
from llmops.tracking import (
    CHALLENGER,
    CHAMPION,
    RUN_KEY,
    client,
    cost_figures,
    ensure_experiment,
    find_run,
    metric_entity,
    report_url,
    uri_source,
)


def _stable_order(record_id: str) -> str:
    return hashlib.sha256(record_id.encode()).hexdigest()


def build_items(
    dataset: DatasetManifest | dict,
    template: PromptTemplate,
    catalog: EvalCatalog,
    max_test_items: int,
    storage_options: dict | None = None,
) -> list[dict]:
    """A fixed sample of the test split (the same records for every run on this dataset version)
    plus every evaluation-catalog item rendered with the registered template."""
    test = storage.read_jsonl(DatasetManifest.model_validate(dataset).files.test.uri, storage_options)
    sample = sorted(test, key=lambda r: _stable_order(r["id"]))[:max_test_items]
    items = [
        {
            "item_id": f"test:{r['id']}",
            "set": "test",
            "kind": "open",
            "system": r.get("system") or "",
            "prompt": r["prompt"],
            "reference": r["response"],
        }
        for r in sample
    ]
    for item in catalog.items:
        system, prompt = template.render_instruction(item.instruction, item.context)
        items.append(
            {
                "item_id": f"catalog:{item.id}",
                "set": "catalog",
                "kind": item.kind,
                "system": system,
                "prompt": prompt,
                "reference": item.reference,
            }
        )
    return items


def champion_ref(tracking_uri: str, model_name: str) -> dict | None:
    """The serving champion's version, artifact and base model, or None."""
    from mlflow.exceptions import MlflowException

    try:
        version = client(tracking_uri).get_model_version_by_alias(model_name, CHAMPION)
    except MlflowException:
        return None
    return {
        "version": str(version.version),
        "artifact_uri": version.tags.get("training.artifact_uri"),
        "base_model_name": version.tags.get("base_model"),
        "run_id": version.run_id,
    }


def models_to_evaluate(base_model_name: str, candidate: dict, champion: dict | None) -> dict[str, dict]:
    """label -> {"base_model_name", "artifact_uri"}: the base model, the candidate and (when there is
    one, and it is another version) the champion."""
    models = {
        "base": {"base_model_name": base_model_name, "artifact_uri": None},
        "candidate": {"base_model_name": base_model_name, "artifact_uri": candidate["artifact_uri"]},
    }
    if champion and champion["version"] != candidate["version"]:
        if not champion.get("artifact_uri"):
            raise ConfigError(
                f"the champion (version {champion['version']}) has no training.artifact_uri tag, so it cannot be"
                " evaluated; without it the gate's non-regression checks would pass unchecked. Tag the version"
                " with the URI of its model.tar.gz, or move the champion alias"
            )
        models["champion"] = {
            "base_model_name": champion.get("base_model_name") or base_model_name,
            "artifact_uri": champion["artifact_uri"],
        }
    return models


def evaluated_versions(candidate: dict, champion: dict | None, models: dict) -> dict:
    versions = {"candidate": candidate["version"]}
    if "champion" in models:
        versions["champion"] = champion["version"]
    return versions


def run_evaluation(
    settings: Settings,
    name: str,
    candidate: dict,
    base_model_name: str,
    champion: dict | None,
    items: list[dict],
    on_line: Callable[[str], None] = print,
    storage_options: dict | None = None,
) -> dict:
    """Run the evaluation job for base, candidate and (when there is one) champion, here; returns
    an ``EvaluationResult``'s dict (without the prompt versions and catalog hash, which the
    caller knows)."""

    cache = settings.models.cache_dir
    models = {
        label: {"base": str(resolve_model(m["base_model_name"], cache)), "artifact_uri": m["artifact_uri"]}
        for label, m in models_to_evaluate(base_model_name, candidate, champion).items()
    }
    backend = LocalEvaluationBackend(settings.store_uri, Path(settings.home) / "jobs", storage_options)
    items_uri = storage.join(backend.jobs_uri, name, "input", "items.jsonl")
    storage.write_jsonl(items_uri, items, storage_options)
    spec = EvaluationJobSpec(
        job_name=name,
        items_uri=items_uri,
        models=models,
        embedding_model=str(resolve_model(settings.models.embedding, cache)),
        settings=evaluation_settings(settings),
        timeout_s=settings.evaluation.timeout_minutes * 60,
    )
    started = time.monotonic()
    result = backend.run(spec, on_line)
    # The cost is the job's that made the outputs: a re-run that reuses them reports that job's.
    cost_uri = storage.join(backend.jobs_uri, name, "output", "cost.json")
    if result.reused and storage.exists(cost_uri, storage_options):
        cost = storage.read_json(cost_uri, storage_options)
    else:
        cost = estimate_cost("local", 1, time.monotonic() - started, settings.sagemaker.prices_per_hour)
        storage.write_json(cost_uri, cost, storage_options)
    versions = evaluated_versions(candidate, champion, models)
    return EvaluationResult(
        **result.to_dict(), items_uri=items_uri, models=sorted(models), versions=versions, cost=cost
    ).to_dict()


def judge_evaluation(
    evaluation: EvaluationResult | dict,
    judge,
    rubric: PromptTemplate,
    max_workers: int = 4,
    on_error: Callable[[str], None] = print,
    storage_options: dict | None = None,
) -> dict:
    """Score every answer of the evaluation with ``judge``; reuses earlier scores by the same judge
    and rubric version."""

    evaluation = EvaluationResult.model_validate(evaluation)
    folder = evaluation.predictions_uri.rsplit("/", 1)[0]
    judgments_uri = storage.join(folder, "judgments.jsonl")
    meta_uri = storage.join(folder, "judgments.json")
    meta = {
        "judge": judge.label,
        "rubric": rubric.ref,
        "predictions": evaluation.summary.get("inputs_sha256"),
    }
    if storage.exists(meta_uri, storage_options) and storage.exists(judgments_uri, storage_options):
        existing = storage.read_json(meta_uri, storage_options)
        if {k: existing.get(k) for k in meta} == meta:
            return {**existing, "judgments_uri": judgments_uri, "reused": True}
    rows = storage.read_jsonl(evaluation.predictions_uri, storage_options)
    judged = judge_rows(rows, judge, rubric, max_workers, on_error)
    storage.write_jsonl(judgments_uri, judged, storage_options)
    meta["unscored"] = sum(j["judge_overall"] is None for j in judged)
    storage.write_json(meta_uri, meta, storage_options)
    return {**meta, "judgments_uri": judgments_uri, "reused": False}


def merged_rows(predictions_uri: str, judgments_uri: str | None, storage_options: dict | None = None) -> list[dict]:
    rows = storage.read_jsonl(predictions_uri, storage_options)
    if judgments_uri:
        scores = {(j["item_id"], j["model"]): j for j in storage.read_jsonl(judgments_uri, storage_options)}
        rows = [{**r, **scores.get((r["item_id"], r["model"]), {})} for r in rows]
    return rows


def decide(
    settings: Settings, evaluation: EvaluationResult | dict, judged: dict, storage_options: dict | None = None
) -> dict:
    """Compare the candidate with base and champion and apply the gate (both pure); returns a
    ``GateOutcome``'s dict."""

    evaluation = EvaluationResult.model_validate(evaluation)
    rows = merged_rows(evaluation.predictions_uri, judged.get("judgments_uri"), storage_options)
    comparison = compare(
        rows, resamples=settings.evaluation.bootstrap_resamples, confidence=settings.evaluation.confidence
    )
    decision = decide_promotion(comparison, settings.evaluation.policy())
    return GateOutcome(
        comparison=comparison.to_dict(),
        decision=GateDecision.model_validate(decision.to_dict()),
        table=comparison_table(comparison),
        markdown=markdown_summary(comparison),
        judge=judged.get("judge", ""),
    ).to_dict()


def record_evaluation(
    settings: Settings,
    registered: RegisteredCandidate | dict,
    evaluation: EvaluationResult | dict,
    judged: dict,
    decided: GateOutcome | dict,
    prompt_refs: list[str],
    catalog: EvalCatalog,
    lineage: dict,
    storage_options: dict | None = None,
) -> dict:
    """Log the evaluation as an MLflow run nested under the candidate's training run (metrics,
    the HTML report, predictions and judgments, the prompt versions and the evaluation catalog),
    and tag the model version with the results, the gate's decision and a link to the report."""

    registered = RegisteredCandidate.model_validate(registered)
    evaluation = EvaluationResult.model_validate(evaluation)
    decided = GateOutcome.model_validate(decided)
    tracking_uri, model_name = settings.mlflow.tracking_uri, registered.model_name
    mlflow_client = client(tracking_uri)
    comparison = Comparison.from_dict(decided.comparison)
    decision = Decision.from_dict(decided.decision.to_dict())
    experiment_id = ensure_experiment(mlflow_client, model_name, settings.mlflow.artifact_uri)
    run_key = f"{lineage.get('dag_id', 'manual')}/{lineage.get('run_id', evaluation.job_name)}/evaluation"
    if evaluation.catalog_sha256 not in (None, catalog.content_sha256):
        raise ConfigError(
            f"{catalog.path} changed since the evaluation ran (sha256 {catalog.content_sha256[:12]}, evaluated"
            f" {evaluation.catalog_sha256[:12]}); clear evaluate_models to evaluate on the current catalog"
        )
    # The digest of the outcome as XCom carries it (to_dict is the JSON it was handed as).
    decided_sha256 = hashlib.sha256(json.dumps(decided.to_dict(), sort_keys=True, default=str).encode()).hexdigest()
    run = _reusable_run(mlflow_client, experiment_id, run_key, decided_sha256)
    if run is None:
        tags = _run_tags(run_key, decided_sha256, registered, evaluation, judged, prompt_refs, catalog)
        run_id = mlflow_client.create_run(experiment_id, run_name=evaluation.job_name, tags=tags).info.run_id
        _log_metrics(mlflow_client, run_id, comparison, evaluation)
        rows = merged_rows(evaluation.predictions_uri, judged.get("judgments_uri"), storage_options)
        details = _report_details(registered, evaluation, judged, decision, prompt_refs, catalog, lineage)
        _log_report(mlflow_client, run_id, comparison, rows, details, decided, registered, judged)
        link_to_run(tracking_uri, run_id, prompt_refs)
        _log_catalog_input(mlflow_client, run_id, catalog)
        mlflow_client.set_terminated(run_id, "FINISHED")
        run = mlflow_client.get_run(run_id)

    run_id = run.info.run_id
    url = report_url(settings, experiment_id, run_id, "evaluation/report.html")
    report_uri = f"{run.info.artifact_uri}/evaluation/report.html"
    _tag_version(mlflow_client, registered, comparison, decision, decided, judged, prompt_refs, run_id, report_uri, url)
    return {"run_id": run_id, "report_uri": report_uri, "report_url": url, "experiment_id": experiment_id}


def _reusable_run(mlflow_client, experiment_id: str, run_key: str, decided_sha256: str):
    """The finished evaluation run recorded for this decision, or None once any other run under the key is gone."""

    run = find_run(mlflow_client, experiment_id, run_key)
    if run is not None and run.data.tags.get("llmops.decided_sha256") != decided_sha256:
        # Re-recorded after a new decision (say, a changed gate): the old run's report would contradict it.
        mlflow_client.delete_run(run.info.run_id)
        run = None
    if run is not None and run.info.status != "FINISHED":
        mlflow_client.delete_run(run.info.run_id)
        run = None
    return run


def _run_tags(
    run_key: str,
    decided_sha256: str,
    registered: RegisteredCandidate,
    evaluation: EvaluationResult,
    judged: dict,
    prompt_refs: list[str],
    catalog: EvalCatalog,
) -> dict[str, str]:
    return {
        RUN_KEY: run_key,
        "llmops.decided_sha256": decided_sha256,
        "mlflow.parentRunId": registered.run_id,
        "llmops.kind": "evaluation",
        "evaluation.judge": judged.get("judge", ""),
        "evaluation.backend": evaluation.backend,
        "evaluation.job_name": evaluation.job_name,
        "evaluation.job_arn": evaluation.job_arn or "",
        **{f"cost.{k}": str(v) for k, v in cost_figures(evaluation.to_dict()).items()},
        "model.version": registered.version,
        **_prompt_tags(prompt_refs),
        "eval_catalog.sha256": catalog.content_sha256,
    }


def _log_metrics(mlflow_client, run_id: str, comparison, evaluation: EvaluationResult) -> None:
    """Every model's summary, the evaluation's costs and every paired difference with its interval."""

    metrics = []
    for label, summary in comparison.models.items():
        metrics += [metric_entity(f"{label}.{k}", v, 0) for k, v in summary.items() if isinstance(v, (int, float))]
    metrics += [
        metric_entity(f"cost.{k}", float(v), 0)
        for k, v in cost_figures(evaluation.to_dict()).items()
        if isinstance(v, (int, float)) and not isinstance(v, bool)
    ]
    for reference, deltas in comparison.deltas.items():
        for metric, iv in deltas.items():
            metrics += [
                metric_entity(f"delta_vs_{reference}.{metric}", iv.mean, 0),
                metric_entity(f"delta_vs_{reference}.{metric}.low", iv.low, 0),
                metric_entity(f"delta_vs_{reference}.{metric}.high", iv.high, 0),
            ]
    for start in range(0, len(metrics), 900):
        mlflow_client.log_batch(run_id, metrics=metrics[start : start + 900])


def _report_details(
    registered: RegisteredCandidate,
    evaluation: EvaluationResult,
    judged: dict,
    decision,
    prompt_refs: list[str],
    catalog: EvalCatalog,
    lineage: dict,
) -> dict[str, str]:
    model_name = registered.model_name
    details = {
        "model": f"{model_name} version {registered.version}",
        "dataset": f"{lineage.get('dataset_name', '')}@{lineage.get('dataset_version', '')}",
        "judge": judged.get("judge", ""),
        "evaluation job": f"{evaluation.job_name} ({evaluation.backend})",
        "prompts": ", ".join(prompt_refs),
        "evaluation catalog": f"{catalog.path} (sha256 {catalog.content_sha256[:12]})",
        "airflow run": f"{lineage.get('dag_id', '')} / {lineage.get('run_id', '')}",
        "gate": decision.verdict,
    }
    if "champion" in evaluation.versions:
        details["champion"] = f"{model_name} version {evaluation.versions['champion']}"
    return details


def _log_report(
    mlflow_client,
    run_id: str,
    comparison,
    rows: list[dict],
    details: dict[str, str],
    decided: GateOutcome,
    registered: RegisteredCandidate,
    judged: dict,
) -> None:
    """The HTML report with its plots, the predictions and the decision, under the run's ``evaluation/``."""

    with tempfile.TemporaryDirectory(prefix="llmops-eval-") as tmp:
        out = Path(tmp) / "evaluation"
        write_report(
            comparison,
            rows,
            out,
            title=f"Evaluation of {registered.model_name} version {registered.version}",
            judge_label=judged.get("judge", ""),
            details=details,
            gate_lines=[
                f"{'SKIP' if c.skipped else 'PASS' if c.passed else 'FAIL'}: {c.detail}"
                for c in decided.decision.checks
            ],
        )
        (out / "predictions.jsonl").write_bytes(storage.jsonl_bytes(rows))
        (out / "decision.json").write_text(json.dumps(decided.decision.to_dict(), indent=2))
        mlflow_client.log_artifacts(run_id, str(out), "evaluation")


def _log_catalog_input(mlflow_client, run_id: str, catalog: EvalCatalog) -> None:
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag

    catalog_input = MetaDataset(
        source=_catalog_source(catalog.path), name="eval_catalog", digest=catalog.content_sha256[:36]
    )
    mlflow_client.log_inputs(
        run_id,
        datasets=[
            DatasetInput(catalog_input._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", "evaluation")])
        ],
    )


def _tag_version(
    mlflow_client,
    registered: RegisteredCandidate,
    comparison,
    decision,
    decided: GateOutcome,
    judged: dict,
    prompt_refs: list[str],
    run_id: str,
    report_uri: str,
    url: str | None,
) -> None:
    """The results, the gate's decision and a link to the report, on the model version and in its description."""
    model_name, version = registered.model_name, registered.version
    candidate = comparison.models.get("candidate", {})
    tags = {
        "evaluation.run_id": run_id,
        "evaluation.report_uri": report_uri,
        "evaluation.judge": judged.get("judge", ""),
        **({"evaluation.report_url": url} if url else {}),
        **_prompt_tags(prompt_refs),
        **{f"metrics.eval.{k}": f"{v:.6g}" for k, v in candidate.items() if isinstance(v, (int, float))},
        **decision.tags(),
    }
    for key, value in tags.items():
        mlflow_client.set_model_version_tag(model_name, version, key, str(value))
    marker = "\n\n---\n**Evaluation**"
    description = (mlflow_client.get_model_version(model_name, version).description or "").split(marker)[0]
    link = f"[open the evaluation report]({url})" if url else f"report: `{report_uri}`"
    description += (
        f"{marker}: gate **{decision.verdict}**, {link}. Judge: {judged.get('judge', '')}.\n\n{decided.markdown}"
    )
    mlflow_client.update_model_version(model_name, version, description=description)


def _prompt_tags(refs: list[str]) -> dict[str, str]:
    return {f"prompts.{ref.split('@')[0]}": ref for ref in refs}


def _catalog_source(path: str):
    from mlflow.data.http_dataset_source import HTTPDatasetSource

    try:
        return uri_source(Path(path).resolve().as_uri())
    except Exception:
        return HTTPDatasetSource(Path(path).resolve().as_uri())


def promote_challenger(
    tracking_uri: str, model_name: str, version: str, approval: dict | None, move: bool = True
) -> dict:
    """Point the ``challenger`` alias at ``version`` (nothing serves it yet: rollout does that),
    unless it points there already. Without ``move`` (this run promoted it before, and the alias
    may have moved on since: rollout drops it) only the result is made, as the first time."""
    from mlflow.exceptions import MlflowException

    if move:
        mlflow_client = client(tracking_uri)
        try:
            current = str(mlflow_client.get_model_version_by_alias(model_name, CHALLENGER).version)
        except MlflowException:
            current = None
        if current != str(version):
            mlflow_client.set_registered_model_alias(model_name, CHALLENGER, str(version))
    return {"alias": CHALLENGER, "version": str(version), "approval": approval_status(approval)}


def approval_status(approval: dict | None) -> dict:
    """What the human said: not asked, approved or rejected (by whom), or rejected on timeout."""
    if approval is None:
        return {"status": "not_required", "by": ""}
    chosen = (approval.get("chosen_options") or [""])[0]
    by = approval.get("responded_by_user") or {}
    name = by.get("name", "") if isinstance(by, dict) else str(by)
    if chosen == "Approve":
        return {"status": "approved", "by": name}
    if not name:
        return {"status": "rejected_on_timeout", "by": ""}
    return {"status": "rejected", "by": name}


def record_outcome(
    tracking_uri: str,
    model_name: str,
    version: str,
    decision: GateDecision | dict,
    approval: dict | None,
    promoted: dict | None,
) -> dict:
    """The run's final word on the candidate, as version tags; returns it."""

    decision = GateDecision.model_validate(decision)
    status = approval_status(approval)
    if promoted:
        outcome = f"promoted to {CHALLENGER}"
    elif not decision.promote:
        outcome = "rejected by the gate"
    elif status["status"] == "rejected_on_timeout":
        outcome = "rejected: no approval before the timeout"
    elif status["status"] == "rejected":
        outcome = f"rejected by {status['by']}"
    else:
        outcome = "not promoted"
    tags = {"promotion.outcome": outcome, "approval.status": status["status"]}
    if status["by"]:
        tags["approval.by"] = status["by"]
    mlflow_client = client(tracking_uri)
    for key, value in tags.items():
        mlflow_client.set_model_version_tag(model_name, str(version), key, value)
    return {"outcome": outcome, "version": str(version), **status}
