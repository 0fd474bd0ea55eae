"""``llm_finetune``'s evaluation as a task group: in the worker, or as a SageMaker Processing job.

``evaluation_group`` builds the backend of ``evaluation.backend`` inside a ``TaskGroup`` whose
task ids are not prefixed, and returns ``evaluate_models``: the evaluation in one shape whichever
backend ran it (the test split and the evaluation catalog answered by the base model, the
candidate and the serving champion, with what the record needs about them).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from airflow.sdk import TaskGroup, task

from llmops import storage
from llmops.backends.evaluation.sagemaker import collect_evaluation, stage_evaluation
from llmops.config import Settings
from llmops.contracts import DatasetManifest, EvaluationResult, RegisteredCandidate
from llmops.evaluation import build_items, champion_ref, evaluated_versions, models_to_evaluate, run_evaluation
from llmops.finetune import FinetuneRequest
from llmops.orchestration import fail_without_retry, sagemaker_processing_operator
from llmops.orchestration.context import RunContext
from llmops.prompts import load_eval_catalog, load_registered


@dataclass(frozen=True)
class EvaluationInputs:
    """What one run's evaluation job is given, and what its result records beside the outputs."""

    name: str
    items: list[dict]
    candidate: dict
    champion: dict | None
    models: dict[str, dict]  # label -> {"base_model_name", "artifact_uri"}
    record: dict  # the EvaluationResult fields the job does not know: models, versions, prompts, catalog


def evaluation_inputs(
    run: RunContext, request: FinetuneRequest, dataset: DatasetManifest, registered: RegisteredCandidate
) -> EvaluationInputs:
    """The items (test split + catalog), the models to evaluate and what to record about them."""

    settings = run.settings
    catalog = load_eval_catalog()
    template = load_registered(settings.mlflow.tracking_uri, catalog.template)
    items = build_items(dataset, template, catalog, settings.evaluation.max_test_items, run.storage_options)
    champion = champion_ref(settings.mlflow.tracking_uri, settings.finetune.model_name)
    candidate = {"version": registered.version, "artifact_uri": registered.artifact_uri}
    models = models_to_evaluate(request.base_model_name, candidate, champion)
    return EvaluationInputs(
        name=run.job_name(prefix="llmops-eval"),
        items=items,
        candidate=candidate,
        champion=champion,
        models=models,
        record={
            "models": sorted(models),
            "versions": evaluated_versions(candidate, champion, models),
            "prompt_refs": [template.ref],
            "catalog_sha256": catalog.content_sha256,
        },
    )


def evaluation_group(settings: Settings, request, dataset, registered, prompts):
    """The evaluation tasks of ``settings.evaluation.backend``; returns ``evaluate_models``."""
    with TaskGroup("evaluation", prefix_group_id=False):
        if settings.evaluation.backend == "local":
            return _local_evaluation(settings, request, dataset, registered, prompts)
        return _sagemaker_evaluation(settings, request, dataset, registered, prompts)


def _local_evaluation(settings: Settings, request, dataset, registered, prompts):
    @task(execution_timeout=timedelta(minutes=settings.evaluation.timeout_minutes + 10))
    @fail_without_retry
    def evaluate_models(request: dict, dataset: dict, registered: dict, prompts: dict) -> dict:
        run = RunContext.current(settings)
        request = FinetuneRequest.model_validate(request)
        dataset, registered = DatasetManifest.model_validate(dataset), RegisteredCandidate.model_validate(registered)
        inputs = evaluation_inputs(run, request, dataset, registered)
        result = run_evaluation(
            settings,
            inputs.name,
            inputs.candidate,
            request.base_model_name,
            inputs.champion,
            inputs.items,
            on_line=run.log.info,
            storage_options=run.storage_options,
        )
        return EvaluationResult.model_validate({**result, **inputs.record}).to_dict()

    return evaluate_models(request, dataset, registered, prompts)


def _sagemaker_evaluation(settings: Settings, request, dataset, registered, prompts):
    @task(multiple_outputs=True)
    @fail_without_retry
    def stage_evaluation_job(request: dict, dataset: dict, registered: dict, prompts: dict) -> dict:
        run = RunContext.current(settings)
        request = FinetuneRequest.model_validate(request)
        dataset, registered = DatasetManifest.model_validate(dataset), RegisteredCandidate.model_validate(registered)
        inputs = evaluation_inputs(run, request, dataset, registered)
        job = stage_evaluation(
            settings,
            inputs.name,
            inputs.models,
            inputs.items,
            {"airflow.dag_id": run.dag_id, "airflow.run_id": run.run_id},
            run.storage_options,
            run.log.info,
        )
        items_uri = storage.join(settings.store_uri, "evaluation-jobs", inputs.name, "input", "items", "items.jsonl")
        return {"request": job, "record": {**inputs.record, "items_uri": items_uri}}

    @task
    def evaluate_models(staged: dict) -> dict:
        """The Processing job's outputs, in the local backend's shape."""
        from airflow.providers.amazon.aws.hooks.sagemaker import SageMakerHook

        run = RunContext.current(settings)
        hook = SageMakerHook(aws_conn_id=settings.aws.conn_id, region_name=settings.aws.region)
        described = hook.describe_processing_job(staged["request"]["ProcessingJobName"])
        collected = collect_evaluation(settings, described, run.storage_options)
        return EvaluationResult.model_validate({**collected, **staged["record"]}).to_dict()

    staged = stage_evaluation_job(request, dataset, registered, prompts)
    job = sagemaker_processing_operator()(
        task_id="run_evaluation_job",
        config=staged["request"],
        aws_conn_id=settings.aws.conn_id,
        region_name=settings.aws.region,
        check_interval=settings.sagemaker.poll_seconds,
        max_attempts=settings.evaluation.timeout_minutes * 60 // settings.sagemaker.poll_seconds + 1,
        max_ingestion_time=settings.evaluation.timeout_minutes * 60,
        deferrable=settings.sagemaker.deferrable,
    )
    evaluation = evaluate_models({"request": staged["request"], "record": staged["record"]})
    job >> evaluation
    return evaluation
