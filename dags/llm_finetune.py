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
from airflow.providers.amazon.aws.operators.ec2 import EC2CreateInstanceOperator, EC2TerminateInstanceOperator
from airflow.providers.amazon.aws.operators.ssm import SsmRunCommandOperator
from airflow.sdk import Param, dag, get_current_context, task

from llmops.compat import AssetOrTimeSchedule, CronTriggerTimetable, TriggerRule
from llmops.config import get_settings
from llmops.finetune import BACKENDS
from llmops.orchestration import (
    APPROVAL_RESPONSE_KEY,
    approval_operator,
    challenger_asset,
    curated_dataset_asset,
    event_recorded,
    fail_without_retry,
    sagemaker_processing_operator,
    sagemaker_training_operator,
    skip_as_done,
    storage_options_for,
)

SETTINGS = get_settings()
DEFAULTS = SETTINGS.finetune.hyperparameters
CHALLENGER_ASSET = challenger_asset(SETTINGS)


def _hp(name: str, fallback):
    return DEFAULTS.get(name, fallback)


def _sagemaker_wait_minutes() -> int:
    """How long a SageMaker job may take, waiting for spot capacity included."""
    config = SETTINGS.sagemaker
    return (config.max_wait_minutes or 2 * config.max_runtime_minutes) if config.spot else config.max_runtime_minutes


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
    params={
        "dataset_version": Param(
            "latest",
            type="string",
            title="Dataset version",
            description="A curated dataset version (sha256), or 'latest' for the newest.",
        ),
        "base_model": Param(
            _hp("base_model", "smollm2-135m-instruct"),
            type="string",
            title="Base model",
            description="A built-in model name (smollm2-135m-instruct) or a Hugging Face model folder.",
        ),
        "peft_method": Param(
            _hp("peft_method", "lora"),
            enum=["lora", "prompt_tuning", "full", "qlora"],
            title="PEFT method",
            description="qlora needs a CUDA GPU and bitsandbytes.",
        ),
        "lora_r": Param(_hp("lora_r", 8), type="integer", minimum=1, maximum=256, title="LoRA rank"),
        "lora_alpha": Param(_hp("lora_alpha", 16), type="integer", minimum=1, maximum=512, title="LoRA alpha"),
        "epochs": Param(
            _hp("epochs", 1.0),
            type="number",
            exclusiveMinimum=0,
            title="Epochs",
            description="Used when max steps is -1.",
        ),
        "max_steps": Param(
            _hp("max_steps", -1),
            type="integer",
            minimum=-1,
            title="Max steps",
            description="Optimizer steps; -1 trains for the number of epochs.",
        ),
        "learning_rate": Param(
            _hp("learning_rate", 2e-4), type="number", exclusiveMinimum=0, maximum=1, title="Learning rate"
        ),
        "batch_size": Param(_hp("batch_size", 4), type="integer", minimum=1, maximum=512, title="Batch size"),
        "precision": Param(
            _hp("precision", "fp32"),
            enum=["fp32", "bf16"],
            title="Precision",
            description="bf16 is fast only on GPUs and CPUs with AMX or AVX512-BF16.",
        ),
        "backend": Param(SETTINGS.finetune.backend, enum=list(BACKENDS), title="Training backend"),
        "processes": Param(
            SETTINGS.finetune.processes,
            type="integer",
            minimum=1,
            maximum=64,
            title="Processes",
            description="More than one runs torchrun (data parallel).",
        ),
        "force": Param(
            False,
            type="boolean",
            title="Force retraining",
            description="Train even if the champion was trained on this dataset version.",
        ),
        "reason": Param(
            "", type="string", title="Reason", description="Why retraining was asked for (set by the drift monitor)."
        ),
        "drift_run_id": Param(
            "",
            type="string",
            title="Drift report",
            description="The MLflow run of the drift report that asked for this run (set by the drift monitor).",
        ),
        "require_approval": Param(
            SETTINGS.evaluation.require_approval,
            type="boolean",
            title="Require human approval",
            description="A candidate that passes the gate waits for a person to approve it in the Airflow UI "
            f"(Required Actions); no answer within {SETTINGS.evaluation.approval_timeout_hours:g} h rejects it.",
        ),
    },
)
def llm_finetune():
    @task
    @fail_without_retry
    def resolve_config() -> dict:
        from llmops.finetune import request_from_params

        params = dict(get_current_context()["params"])
        return request_from_params(SETTINGS, params).model_dump()

    @task
    @fail_without_retry
    def select_dataset(request: dict) -> dict:
        from llmops.finetune import select_dataset

        return select_dataset(SETTINGS, request["dataset_version"], storage_options_for(SETTINGS.store_uri, SETTINGS))

    @task.short_circuit
    def decide_training(request: dict, dataset: dict) -> bool:
        import logging

        from llmops.finetune import decide_training
        from llmops.tracking import champion_dataset_version

        champion = champion_dataset_version(SETTINGS.mlflow.tracking_uri, SETTINGS.finetune.model_name)
        decision = decide_training(dataset["version"], champion, request["force"], request["reason"])
        logging.getLogger("airflow.task").info("%s: %s", "training" if decision.train else "skipping", decision.reason)
        return decision.train

    @task.branch
    def choose_backend(request: dict) -> str:
        first = {"local": "train_adapter", "ec2-trainium": "stage_ec2_job"}
        return first.get(request["backend"], "stage_sagemaker_job")

    @task(execution_timeout=timedelta(minutes=SETTINGS.finetune.timeout_minutes + 10))
    @fail_without_retry
    def train_adapter(request: dict, dataset: dict) -> dict:
        import logging

        from llmops.data.stages import git_sha
        from llmops.finetune import FinetuneRequest, job_name, run_training

        context = get_current_context()
        log = logging.getLogger("airflow.task")
        lineage = {"dag_id": context["dag"].dag_id, "run_id": context["run_id"], "git_sha": git_sha()}
        return run_training(
            SETTINGS,
            FinetuneRequest.model_validate(request),
            dataset,
            job_name(context["dag"].dag_id, context["run_id"]),
            lineage,
            on_line=log.info,
            storage_options=storage_options_for(SETTINGS.store_uri, SETTINGS),
        )

    @task
    @fail_without_retry
    def stage_sagemaker_job(request: dict, dataset: dict) -> dict:
        import logging

        from llmops.backends.training.sagemaker import stage_job
        from llmops.data.stages import git_sha
        from llmops.finetune import FinetuneRequest, job_name

        context = get_current_context()
        return stage_job(
            SETTINGS,
            FinetuneRequest.model_validate(request),
            dataset,
            job_name(context["dag"].dag_id, context["run_id"]),
            {"dag_id": context["dag"].dag_id, "run_id": context["run_id"], "git_sha": git_sha()},
            storage_options_for(SETTINGS.store_uri, SETTINGS),
            logging.getLogger("airflow.task").info,
        )

    @task(multiple_outputs=True)
    @fail_without_retry
    def stage_ec2_job(request: dict, dataset: dict) -> dict:
        import logging

        from airflow.providers.amazon.aws.hooks.ssm import SsmHook

        from llmops.backends.training import ec2
        from llmops.data.stages import git_sha
        from llmops.finetune import FinetuneRequest, job_name

        context = get_current_context()
        image = SETTINGS.ec2.ami_id or SsmHook(
            aws_conn_id=SETTINGS.aws.conn_id, region_name=SETTINGS.aws.region
        ).get_parameter_value(SETTINGS.ec2.ami_parameter)
        return ec2.stage_job(
            SETTINGS,
            FinetuneRequest.model_validate(request),
            dataset,
            job_name(context["dag"].dag_id, context["run_id"]),
            {"dag_id": context["dag"].dag_id, "run_id": context["run_id"], "git_sha": git_sha()},
            image,
            storage_options_for(SETTINGS.store_uri, SETTINGS),
            logging.getLogger("airflow.task").info,
        )

    @task(execution_timeout=timedelta(minutes=SETTINGS.ec2.ssm_online_timeout_minutes + 5))
    def await_ssm_agent(instance_ids: list[str], job_name: str, commands: list[str], output_uri: str) -> dict:
        """Wait for the instance's SSM agent, then hand the command to run_training_command."""
        from airflow.providers.amazon.aws.hooks.ssm import SsmHook

        from llmops.backends.training import ec2

        ssm = SsmHook(aws_conn_id=SETTINGS.aws.conn_id, region_name=SETTINGS.aws.region).conn
        timeout = SETTINGS.ec2.ssm_online_timeout_minutes * 60
        ec2.wait_until_online(ssm, instance_ids[0], timeout, SETTINGS.ec2.poll_seconds)
        return ec2.send_command_kwargs(SETTINGS.ec2, instance_ids[0], job_name, commands, output_uri)

    @task(
        trigger_rule=TriggerRule.ALL_DONE,
        execution_timeout=timedelta(minutes=SETTINGS.ec2.command_timeout_minutes + 10),
    )
    def collect_ec2_job(request: dict) -> dict:
        """Waits for the command; its exit code and output tail (in the error when it failed), and
        the archive it pushed."""
        from datetime import UTC, datetime

        from airflow.providers.amazon.aws.hooks.ec2 import EC2Hook
        from airflow.providers.amazon.aws.hooks.ssm import SsmHook

        from llmops.backends.training import ec2
        from llmops.compat import AirflowFailException, AirflowSkipException

        if request["backend"] != "ec2-trainium":
            raise AirflowSkipException(f"backend {request['backend']}")
        ti = get_current_context()["ti"]
        staged = ti.xcom_pull(task_ids="stage_ec2_job")
        instance_ids = ti.xcom_pull(task_ids="launch_trainium_instance")
        command_id = ti.xcom_pull(task_ids="run_training_command")
        if not staged or not instance_ids or not command_id:
            raise AirflowFailException(
                "the EC2 training did not get as far as running its command; see the tasks above"
            )
        hook = SsmHook(aws_conn_id=SETTINGS.aws.conn_id, region_name=SETTINGS.aws.region)
        timeout = SETTINGS.ec2.command_timeout_minutes * 60 + 300
        invocation = ec2.wait_for_command(hook.conn, command_id, instance_ids[0], timeout, SETTINGS.ec2.poll_seconds)
        instance = EC2Hook(aws_conn_id=SETTINGS.aws.conn_id, region_name=SETTINGS.aws.region, api_type="client_type")
        launched = instance.conn.describe_instances(InstanceIds=instance_ids)["Reservations"][0]["Instances"][0]
        seconds = (datetime.now(UTC) - launched["LaunchTime"]).total_seconds()
        options = storage_options_for(SETTINGS.store_uri, SETTINGS)
        return ec2.collect(SETTINGS, staged, instance_ids[0], invocation, seconds, options)

    @task(trigger_rule=TriggerRule.NONE_FAILED_MIN_ONE_SUCCESS)
    def collect_training(request: dict) -> dict:
        """The training result of whichever backend ran, in one shape for registration."""
        ti = get_current_context()["ti"]
        if request["backend"] == "local":
            return ti.xcom_pull(task_ids="train_adapter")
        if request["backend"] == "ec2-trainium":
            return ti.xcom_pull(task_ids="collect_ec2_job")
        from airflow.providers.amazon.aws.hooks.sagemaker import SageMakerHook

        from llmops.backends.training.sagemaker import collect

        name = ti.xcom_pull(task_ids="stage_sagemaker_job")["TrainingJobName"]
        hook = SageMakerHook(aws_conn_id=SETTINGS.aws.conn_id, region_name=SETTINGS.aws.region)
        return collect(SETTINGS, hook.describe_training_job(name), storage_options_for(SETTINGS.store_uri, SETTINGS))

    @task
    def profile_baseline(dataset: dict) -> dict:
        from llmops.drift.monitor import ensure_baseline

        return ensure_baseline(SETTINGS, dataset, storage_options_for(SETTINGS.store_uri, SETTINGS))

    @task
    def register_model(request: dict, dataset: dict, job: dict, baseline: dict) -> dict:
        from llmops.data.stages import git_sha
        from llmops.tracking import record_training

        context = get_current_context()
        registered = record_training(
            SETTINGS.mlflow.tracking_uri,
            SETTINGS.mlflow.artifact_uri,
            SETTINGS.finetune.model_name,
            job,
            dataset,
            request["hyperparameters"],
            {
                "dag_id": context["dag"].dag_id,
                "run_id": context["run_id"],
                "git_sha": git_sha(),
                "base_model_name": request["base_model_name"],
                "reason": request["reason"],
                "drift_run_id": request["drift_run_id"],
                "baseline_uri": baseline["uri"],
            },
            storage_options_for(SETTINGS.store_uri, SETTINGS),
        )
        return {**registered.to_dict(), "metrics": job["metrics"], "artifact_uri": job["model_artifact_uri"]}

    @task
    def sync_prompts() -> dict:
        from llmops.prompts import sync_prompts

        return {name: result.to_dict() for name, result in sync_prompts(SETTINGS.mlflow.tracking_uri).items()}

    def _evaluation_inputs(request: dict, dataset: dict, registered: dict) -> dict:
        """The items (test split + catalog), the models to evaluate and what to record about them."""
        from llmops.evaluation import build_items, champion_ref, evaluated_versions, models_to_evaluate
        from llmops.finetune import job_name
        from llmops.prompts import load_eval_catalog, load_registered

        context = get_current_context()
        catalog = load_eval_catalog()
        template = load_registered(SETTINGS.mlflow.tracking_uri, catalog.template)
        options = storage_options_for(SETTINGS.store_uri, SETTINGS)
        items = build_items(dataset, template, catalog, SETTINGS.evaluation.max_test_items, options)
        champion = champion_ref(SETTINGS.mlflow.tracking_uri, SETTINGS.finetune.model_name)
        candidate = {"version": registered["version"], "artifact_uri": registered["artifact_uri"]}
        models = models_to_evaluate(request["base_model_name"], candidate, champion)
        return {
            "name": job_name(context["dag"].dag_id, context["run_id"], prefix="llmops-eval"),
            "items": items,
            "candidate": candidate,
            "champion": champion,
            "models": models,
            "record": {
                "models": sorted(models),
                "versions": evaluated_versions(candidate, champion, models),
                "prompt_refs": [template.ref],
                "catalog_sha256": catalog.content_sha256,
            },
        }

    if SETTINGS.evaluation.backend == "local":

        @task(execution_timeout=timedelta(minutes=SETTINGS.evaluation.timeout_minutes + 10))
        @fail_without_retry
        def evaluate_models(request: dict, dataset: dict, registered: dict, prompts: dict) -> dict:
            import logging

            from llmops.evaluation import run_evaluation

            inputs = _evaluation_inputs(request, dataset, registered)
            result = run_evaluation(
                SETTINGS,
                inputs["name"],
                inputs["candidate"],
                request["base_model_name"],
                inputs["champion"],
                inputs["items"],
                on_line=logging.getLogger("airflow.task").info,
                storage_options=storage_options_for(SETTINGS.store_uri, SETTINGS),
            )
            return {**result, **inputs["record"]}

    else:  # a SageMaker Processing job

        @task(multiple_outputs=True)
        @fail_without_retry
        def stage_evaluation_job(request: dict, dataset: dict, registered: dict, prompts: dict) -> dict:
            import logging

            from llmops import storage
            from llmops.backends.evaluation.sagemaker import stage_evaluation

            context = get_current_context()
            inputs = _evaluation_inputs(request, dataset, registered)
            job = stage_evaluation(
                SETTINGS,
                inputs["name"],
                inputs["models"],
                inputs["items"],
                {"airflow.dag_id": context["dag"].dag_id, "airflow.run_id": context["run_id"]},
                storage_options_for(SETTINGS.store_uri, SETTINGS),
                logging.getLogger("airflow.task").info,
            )
            items_uri = storage.join(
                SETTINGS.store_uri, "evaluation-jobs", inputs["name"], "input", "items", "items.jsonl"
            )
            return {"request": job, "record": {**inputs["record"], "items_uri": items_uri}}

        @task
        def evaluate_models(staged: dict) -> dict:
            """The Processing job's outputs, in the local backend's shape."""
            from airflow.providers.amazon.aws.hooks.sagemaker import SageMakerHook

            from llmops.backends.evaluation.sagemaker import collect_evaluation

            hook = SageMakerHook(aws_conn_id=SETTINGS.aws.conn_id, region_name=SETTINGS.aws.region)
            described = hook.describe_processing_job(staged["request"]["ProcessingJobName"])
            options = storage_options_for(SETTINGS.store_uri, SETTINGS)
            return {**collect_evaluation(SETTINGS, described, options), **staged["record"]}

    @task
    def judge_responses(evaluation: dict) -> dict:
        import logging

        from llmops.evaluation import judge_evaluation
        from llmops.judges import make_judge
        from llmops.prompts import load_registered

        rubric = load_registered(SETTINGS.mlflow.tracking_uri, "judge_rubric")
        judged = judge_evaluation(
            evaluation,
            make_judge(SETTINGS),
            rubric,
            SETTINGS.evaluation.judge_max_workers,
            logging.getLogger("airflow.task").warning,
            storage_options_for(SETTINGS.store_uri, SETTINGS),
        )
        return {**judged, "rubric": rubric.ref}

    @task
    def decide_promotion(evaluation: dict, judged: dict) -> dict:
        import logging

        from llmops.evaluation import decide

        decided = decide(SETTINGS, evaluation, judged, storage_options_for(SETTINGS.store_uri, SETTINGS))
        log = logging.getLogger("airflow.task")
        log.info("judge: %s\n%s", decided["judge"], decided["table"])
        log.info("gate %s:\n  %s", decided["decision"]["verdict"], "\n  ".join(decided["decision"]["reasons"]))
        return decided

    @task
    def record_evaluation(registered: dict, dataset: dict, evaluation: dict, judged: dict, decided: dict) -> dict:
        from llmops.evaluation import record_evaluation
        from llmops.prompts import load_eval_catalog

        context = get_current_context()
        return record_evaluation(
            SETTINGS,
            registered,
            evaluation,
            judged,
            decided,
            [*evaluation["prompt_refs"], judged["rubric"]],
            load_eval_catalog(),
            {
                "dag_id": context["dag"].dag_id,
                "run_id": context["run_id"],
                "dataset_name": dataset["name"],
                "dataset_version": dataset["version"],
            },
            storage_options_for(SETTINGS.store_uri, SETTINGS),
        )

    @task.branch
    def route_decision(request: dict, registered: dict, decided: dict, recorded: dict) -> list[str]:
        if not decided["decision"]["promote"]:
            return ["record_outcome"]
        if not request["require_approval"]:
            return ["promote_challenger", "record_outcome"]
        link = recorded.get("report_url") or recorded["report_uri"]
        body = (
            f"**{SETTINGS.finetune.model_name} version {registered['version']}** passed the gate.\n\n"
            f"Judge: {decided['judge']}\n\n{decided['markdown']}\n\n"
            + "\n".join(f"- {reason}" for reason in decided["decision"]["reasons"])
            + f"\n\nFull report: {link}\n\nApprove to make it the `challenger` (rollout then shadows it). "
            "Without an answer it is rejected when the wait times out."
        )
        get_current_context()["ti"].xcom_push(key="approval_body", value=body)
        return ["await_approval", "record_outcome"]

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
        from llmops.compat import AirflowSkipException
        from llmops.evaluation import approval_status, promote_challenger

        context = get_current_context()
        approval = context["ti"].xcom_pull(task_ids="await_approval", key=APPROVAL_RESPONSE_KEY)
        if request["require_approval"] and approval_status(approval)["status"] != "approved":
            # e.g. the approval task was marked skipped or successful by hand: no answer, no promotion.
            raise AirflowSkipException("approval was required and not given")
        asset, version = CHALLENGER_ASSET, registered["version"]
        announced = event_recorded(context, asset, model_name=registered["model_name"], version=version)
        promoted = promote_challenger(
            SETTINGS.mlflow.tracking_uri, registered["model_name"], version, approval, move=not announced
        )
        if announced:
            # Rollout may have moved the alias on since; this run's promotion happened once.
            skip_as_done(context, promoted, f"version {version} was made the challenger, and announced, already")
        context["outlet_events"][asset].extra = {"model_name": registered["model_name"], "version": version}
        return promoted

    @task(trigger_rule=TriggerRule.NONE_FAILED)
    def record_outcome(registered: dict, decided: dict) -> dict:
        import logging

        from llmops.evaluation import record_outcome

        ti = get_current_context()["ti"]
        outcome = record_outcome(
            SETTINGS.mlflow.tracking_uri,
            registered["model_name"],
            registered["version"],
            decided["decision"],
            ti.xcom_pull(task_ids="await_approval", key=APPROVAL_RESPONSE_KEY),
            ti.xcom_pull(task_ids="promote_challenger"),
        )
        logging.getLogger("airflow.task").info(
            "%s version %s: %s", registered["model_name"], registered["version"], outcome["outcome"]
        )
        return outcome

    request = resolve_config()
    dataset = select_dataset(request)
    go = decide_training(request, dataset)
    backend = choose_backend(request)
    local_job = train_adapter(request, dataset)
    staged = stage_sagemaker_job(request, dataset)
    sagemaker_job = sagemaker_training_operator()(
        task_id="run_sagemaker_job",
        config=staged,
        aws_conn_id=SETTINGS.aws.conn_id,
        region_name=SETTINGS.aws.region,
        check_interval=SETTINGS.sagemaker.poll_seconds,
        max_attempts=_sagemaker_wait_minutes() * 60 // SETTINGS.sagemaker.poll_seconds + 1,
        max_ingestion_time=_sagemaker_wait_minutes() * 60,
        deferrable=SETTINGS.sagemaker.deferrable,
    )
    staged_ec2 = stage_ec2_job(request, dataset)
    launch = EC2CreateInstanceOperator(
        task_id="launch_trainium_instance",
        image_id=staged_ec2["image_id"],
        config=staged_ec2["config"],
        wait_for_completion=True,
        poll_interval=SETTINGS.ec2.poll_seconds,
        max_attempts=max(3, 900 // SETTINGS.ec2.poll_seconds),
        aws_conn_id=SETTINGS.aws.conn_id,
        region_name=SETTINGS.aws.region,
    )
    command = await_ssm_agent(launch.output, staged_ec2["job_name"], staged_ec2["commands"], staged_ec2["output_uri"])
    run_command = SsmRunCommandOperator(  # sends it; collect_ec2_job waits, so a failure's output is read too
        task_id="run_training_command",
        document_name="AWS-RunShellScript",
        run_command_kwargs=command,
        wait_for_completion=False,
        aws_conn_id=SETTINGS.aws.conn_id,
        region_name=SETTINGS.aws.region,
        retries=0,  # a training command is not sent twice; clear the task to run it again
    )
    ec2_job = collect_ec2_job(request)
    terminate = EC2TerminateInstanceOperator(
        task_id="terminate_trainium_instance",
        instance_ids=launch.output,
        aws_conn_id=SETTINGS.aws.conn_id,
        region_name=SETTINGS.aws.region,
    )
    run_command >> ec2_job >> terminate.as_teardown(setups=launch)
    job = collect_training(request)
    baseline = profile_baseline(dataset)
    go >> [backend, baseline]
    backend >> [local_job, staged, staged_ec2]
    staged >> sagemaker_job >> job
    local_job >> job
    ec2_job >> job
    registered = register_model(request, dataset, job, baseline)
    if SETTINGS.evaluation.backend == "local":
        evaluation = evaluate_models(request, dataset, registered, sync_prompts())
    else:
        staged_evaluation = stage_evaluation_job(request, dataset, registered, sync_prompts())
        evaluation_job = sagemaker_processing_operator()(
            task_id="run_evaluation_job",
            config=staged_evaluation["request"],
            aws_conn_id=SETTINGS.aws.conn_id,
            region_name=SETTINGS.aws.region,
            check_interval=SETTINGS.sagemaker.poll_seconds,
            max_attempts=SETTINGS.evaluation.timeout_minutes * 60 // SETTINGS.sagemaker.poll_seconds + 1,
            max_ingestion_time=SETTINGS.evaluation.timeout_minutes * 60,
            deferrable=SETTINGS.sagemaker.deferrable,
        )
        evaluation = evaluate_models({"request": staged_evaluation["request"], "record": staged_evaluation["record"]})
        evaluation_job >> evaluation
    judged = judge_responses(evaluation)
    decided = decide_promotion(evaluation, judged)
    recorded = record_evaluation(registered, dataset, evaluation, judged, decided)
    route = route_decision(request, registered, decided, recorded)
    promoted = promote_challenger(request, registered)
    outcome = record_outcome(registered, decided)
    route >> await_approval >> promoted >> outcome
    route >> [promoted, outcome]


llm_finetune()
