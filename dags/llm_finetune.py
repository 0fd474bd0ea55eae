"""
### llm_finetune: fine-tune the base model with PEFT on a curated dataset, and register it

Runs nightly (cron and time zone from the config) and whenever `llm_data_prep` publishes a new
curated dataset version; also from the trigger form, where every hyperparameter can be changed
for one run.

resolve_config → select_dataset → decide_training → train_adapter → register_model

`decide_training` skips the run, saying why, when the serving champion was already trained on the
selected dataset and nothing asked for retraining (`force`, or a `reason` from a triggering DAG).
The registered MLflow model version carries the lineage: dataset version and validation result,
git SHA, this DAG run, the training job, base model, PEFT method and metrics.
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import AssetOrTimeSchedule, CronTriggerTimetable, Param, dag, get_current_context, task

from llmops.config import get_settings
from llmops.finetune import BACKENDS
from llmops.orchestration import curated_dataset_asset, fail_without_retry, storage_options_for

SETTINGS = get_settings()
DEFAULTS = SETTINGS.finetune.hyperparameters


def _hp(name: str, fallback):
    return DEFAULTS.get(name, fallback)


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
    def register_model(request: dict, dataset: dict, job: dict) -> dict:
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
            },
            storage_options_for(SETTINGS.store_uri, SETTINGS),
        )
        return {**registered.to_dict(), "metrics": job["metrics"]}

    request = resolve_config()
    dataset = select_dataset(request)
    go = decide_training(request, dataset)
    job = train_adapter(request, dataset)
    go >> job
    register_model(request, dataset, job)


llm_finetune()
