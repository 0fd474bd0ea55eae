"""
### llm_finetune: fine-tune the base model with PEFT on a curated dataset, and register it

Runs nightly (cron and time zone from the config) and whenever `llm_data_prep` publishes a new
curated dataset version; also from the trigger form, where every hyperparameter can be changed
for one run.

resolve_config → select_dataset → decide_training → choose_backend → train_adapter (local)
  | stage_sagemaker_job → run_sagemaker_job (SageMaker)
  | stage_ec2_job → launch_trainium_instance → await_ssm_agent → run_training_command → collect_ec2_job
    → terminate_trainium_instance (a teardown: it runs whatever happened, and hides no failure)
→ collect_training, and profile_baseline → register_model
→ evaluate_models → judge_responses → decide_promotion → record_evaluation → route_decision
→ [await_approval] → promote_challenger → record_outcome

`decide_training` skips the run, saying why, when the serving champion was already trained on the
selected dataset and nothing asked for retraining (`force`, or a `reason` from a triggering DAG).
The registered MLflow model version carries the lineage: dataset version and validation result,
git SHA, this DAG run, the training job, base model, PEFT method and metrics, the reason and drift
report of a retraining the drift monitor asked for, and the baseline profile of its training data
(`profile_baseline`) that `llm_drift_monitor` compares served traffic with.

The candidate is then evaluated next to the base model and the serving champion (an evaluation
job on the test split and the evaluation prompt catalog), its answers are scored by the judge,
and the gate (`evaluation.gate` in the config) decides. The comparison, the gate's reasons and an
HTML report are logged to MLflow and linked from the model version. A pass moves the
`challenger` alias to the version, after a human approves in the Airflow UI when
`require_approval` is set (no answer before the timeout rejects). A fail, or a rejection, ends
the run cleanly with its reasons on the version; nothing moves toward serving. A new
`challenger` updates the challenger Asset, which starts `llm_rollout`.
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import dag, task

from llmops.backends.training.job import TrainingJobResult
from llmops.compat import AssetOrTimeSchedule, CronTriggerTimetable, TriggerRule
from llmops.config import get_settings
from llmops.contracts import DatasetManifest, EvaluationResult, GateOutcome, RegisteredCandidate
from llmops.finetune import FinetuneRequest
from llmops.orchestration import (
    APPROVAL_RESPONSE_KEY,
    approval_operator,
    challenger_asset,
    curated_dataset_asset,
    fail_without_retry,
)
from llmops.orchestration import approval as approval_steps
from llmops.orchestration.context import RunContext
from llmops.orchestration.evaluation import evaluation_group
from llmops.orchestration.finetune_params import finetune_params
from llmops.orchestration.training import (
    collect_training,
    ec2_training,
    first_training_task,
    local_training,
    sagemaker_training,
)

SETTINGS = get_settings()
CHALLENGER_ASSET = challenger_asset(SETTINGS)


@dag(
    dag_id="llm_finetune",
    schedule=AssetOrTimeSchedule(
        timetable=CronTriggerTimetable(SETTINGS.finetune.schedule, timezone=SETTINGS.finetune.timezone),
        assets=[curated_dataset_asset(SETTINGS)],
    ),
    start_date=pendulum.datetime(2026, 1, 1, tz=SETTINGS.finetune.timezone),
    catchup=False,
    max_active_runs=1,
    doc_md=__doc__,
    tags=["llmops", "training"],
    default_args={"owner": "llmops", "retries": 1, "retry_delay": timedelta(minutes=1)},
    params=finetune_params(SETTINGS),
)
def llm_finetune():
    @task
    @fail_without_retry
    def resolve_config() -> dict:
        from llmops.finetune import request_from_params

        return request_from_params(SETTINGS, RunContext.current(SETTINGS).params).model_dump()

    @task
    @fail_without_retry
    def select_dataset(request: dict) -> dict:
        from llmops.finetune import select_dataset

        run = RunContext.current(SETTINGS)
        return select_dataset(SETTINGS, FinetuneRequest.model_validate(request).dataset_version, run.storage_options)

    @task.short_circuit
    def decide_training(request: dict, dataset: dict) -> bool:
        from llmops.finetune import decide_training
        from llmops.tracking import champion_dataset_version

        run = RunContext.current(SETTINGS)
        request, dataset = FinetuneRequest.model_validate(request), DatasetManifest.model_validate(dataset)
        champion = champion_dataset_version(SETTINGS.mlflow.tracking_uri, SETTINGS.finetune.model_name)
        decision = decide_training(dataset.version, champion, request.force, request.reason)
        run.log.info("%s: %s", "training" if decision.train else "skipping", decision.reason)
        return decision.train

    @task.branch
    def choose_backend(request: dict) -> str:
        return first_training_task(FinetuneRequest.model_validate(request).backend)

    @task
    def profile_baseline(dataset: dict) -> dict:
        from llmops.drift.monitor import ensure_baseline

        return ensure_baseline(SETTINGS, dataset, RunContext.current(SETTINGS).storage_options)

    @task
    def register_model(request: dict, dataset: dict, job: dict, baseline: dict) -> dict:
        from llmops.tracking import record_training

        run = RunContext.current(SETTINGS)
        request, result = FinetuneRequest.model_validate(request), TrainingJobResult(**job)
        registered = record_training(
            SETTINGS.mlflow.tracking_uri,
            SETTINGS.mlflow.artifact_uri,
            SETTINGS.finetune.model_name,
            job,
            dataset,
            request.hyperparameters,
            {
                **run.lineage,
                "base_model_name": request.base_model_name,
                "reason": request.reason,
                "drift_run_id": request.drift_run_id,
                "baseline_uri": baseline["uri"],
            },
            run.storage_options,
        )
        return RegisteredCandidate(
            **registered.to_dict(), metrics=result.metrics, artifact_uri=result.model_artifact_uri
        ).to_dict()

    @task
    def sync_prompts() -> dict:
        from llmops.prompts import sync_prompts

        return {name: result.to_dict() for name, result in sync_prompts(SETTINGS.mlflow.tracking_uri).items()}

    @task
    def judge_responses(evaluation: dict) -> dict:
        from llmops.evaluation import judge_evaluation
        from llmops.judges import make_judge
        from llmops.prompts import load_registered

        run = RunContext.current(SETTINGS)
        rubric = load_registered(SETTINGS.mlflow.tracking_uri, "judge_rubric")
        judged = judge_evaluation(
            evaluation,
            make_judge(SETTINGS),
            rubric,
            SETTINGS.evaluation.judge_max_workers,
            run.log.warning,
            run.storage_options,
        )
        return {**judged, "rubric": rubric.ref}

    @task
    def decide_promotion(evaluation: dict, judged: dict) -> dict:
        from llmops.evaluation import decide

        run = RunContext.current(SETTINGS)
        decided = decide(SETTINGS, evaluation, judged, run.storage_options)
        outcome = GateOutcome.model_validate(decided)
        run.log.info("judge: %s\n%s", outcome.judge, outcome.table)
        run.log.info("gate %s:\n  %s", outcome.decision.verdict, "\n  ".join(outcome.decision.reasons))
        return decided

    @task
    def record_evaluation(registered: dict, dataset: dict, evaluation: dict, judged: dict, decided: dict) -> dict:
        from llmops.evaluation import record_evaluation
        from llmops.prompts import load_eval_catalog

        run = RunContext.current(SETTINGS)
        dataset, evaluation = DatasetManifest.model_validate(dataset), EvaluationResult.model_validate(evaluation)
        return record_evaluation(
            SETTINGS,
            registered,
            evaluation,
            judged,
            decided,
            [*evaluation.prompt_refs, judged["rubric"]],
            load_eval_catalog(),
            {
                "dag_id": run.dag_id,
                "run_id": run.run_id,
                "dataset_name": dataset.name,
                "dataset_version": dataset.version,
            },
            run.storage_options,
        )

    @task.branch
    def route_decision(request: dict, registered: dict, decided: dict, recorded: dict) -> list[str]:
        run = RunContext.current(SETTINGS)
        return approval_steps.route_decision(run, request, registered, decided, recorded)

    await_approval = approval_operator(
        task_id="await_approval",
        tracking_uri=SETTINGS.mlflow.tracking_uri,
        model_name=SETTINGS.finetune.model_name,
        version="{{ ti.xcom_pull(task_ids='register_model')['version'] }}",
        subject=f"Promote {SETTINGS.finetune.model_name}"
        " version {{ ti.xcom_pull(task_ids='register_model')['version'] }} to challenger?",
        body="{{ ti.xcom_pull(task_ids='route_decision', key='approval_body') }}",
        response_timeout=timedelta(hours=SETTINGS.evaluation.approval_timeout_hours),
        retries=0,
    )

    @task(
        trigger_rule=TriggerRule.NONE_FAILED_MIN_ONE_SUCCESS,
        inlets=[CHALLENGER_ASSET],
        outlets=[CHALLENGER_ASSET],
    )
    def promote_challenger(request: dict, registered: dict) -> dict:
        return approval_steps.promote(RunContext.current(SETTINGS), CHALLENGER_ASSET, request, registered)

    @task(trigger_rule=TriggerRule.NONE_FAILED)
    def record_outcome(registered: dict, decided: dict) -> dict:
        from llmops.evaluation import record_outcome

        run = RunContext.current(SETTINGS)
        registered = RegisteredCandidate.model_validate(registered)
        outcome = record_outcome(
            SETTINGS.mlflow.tracking_uri,
            registered.model_name,
            registered.version,
            GateOutcome.model_validate(decided).decision,
            run.ti.xcom_pull(task_ids="await_approval", key=APPROVAL_RESPONSE_KEY),
            run.ti.xcom_pull(task_ids="promote_challenger"),
        )
        run.log.info("%s version %s: %s", registered.model_name, registered.version, outcome["outcome"])
        return outcome

    request = resolve_config()
    dataset = select_dataset(request)
    go = decide_training(request, dataset)
    backend = choose_backend(request)
    paths = [
        local_training(SETTINGS, request, dataset),
        sagemaker_training(SETTINGS, request, dataset),
        ec2_training(SETTINGS, request, dataset),
    ]
    job = collect_training(SETTINGS, request)
    baseline = profile_baseline(dataset)
    go >> [backend, baseline]
    for path in paths:
        backend >> path.first
        path.result >> job
    registered = register_model(request, dataset, job, baseline)
    evaluation = evaluation_group(SETTINGS, request, dataset, registered, sync_prompts())
    judged = judge_responses(evaluation)
    decided = decide_promotion(evaluation, judged)
    recorded = record_evaluation(registered, dataset, evaluation, judged, decided)
    route = route_decision(request, registered, decided, recorded)
    promoted = promote_challenger(request, registered)
    outcome = record_outcome(registered, decided)
    route >> await_approval >> promoted >> outcome
    route >> [promoted, outcome]


llm_finetune()
